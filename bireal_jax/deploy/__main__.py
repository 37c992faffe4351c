"""`python -m bireal_jax.deploy export --to openvino IN OUT`: convert a bireal_jax export.

IN is any export `deploy.load` opens (training export, converter output, packed model); OUT the
directory to write (model.xml + model.bin for OpenVINO).
"""
from __future__ import annotations

import argparse
import sys

FORMATS = ("openvino",)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bireal_jax.deploy", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="convert an export to another runtime's format")
  ex.add_argument("--to", required=True, choices=FORMATS, help="target format")
  ex.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.xml")
  ex.add_argument("src", metavar="IN", help="a bireal_jax export directory")
  ex.add_argument("out", metavar="OUT", help="directory to write")
  args = ap.parse_args(argv)
  from bireal_jax.deploy import export
  try:
    xml = export.export_openvino(args.src, args.out, args.overwrite)
  except (ImportError, ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(xml)
  return 0


if __name__ == "__main__":
  sys.exit(main())
