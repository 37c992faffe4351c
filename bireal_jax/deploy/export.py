"""Exports of a Bi-Real model to other engines' formats: `export_openvino` (OpenVINO IR).

Above `format` (which reads our exports), `model` (`PackedModel`) and `openvino` (the IR
builder and runner) in the import order, so that none of those imports another back.
"""
from __future__ import annotations

import os
from typing import Any, Union

from bireal_jax import storage
from bireal_jax.deploy import format as fmt
from bireal_jax.deploy import openvino
from bireal_jax.deploy.model import PackedModel


def _packed_and_metadata(path_or_model) -> tuple[PackedModel, dict]:
  if isinstance(path_or_model, PackedModel):
    pm = path_or_model
    meta = fmt.metadata("packed", pm.config, {"kind": "packed"})
  else:
    exp = path_or_model
    if isinstance(exp, (str, os.PathLike)):
      exp = fmt.load(exp)
    if not isinstance(exp, fmt.Exported):
      raise TypeError(f"expected an export directory, an Exported (deploy.load) or a "
                      f"PackedModel, got {type(path_or_model).__name__}")
    openvino.check_exportable(exp.config)  # before packing: a float model's refusal names the IR
    pm = exp.packed()
    meta = fmt.metadata(exp.kind, exp.config, exp.source)
  meta["model"]["axis_name"] = None
  return pm, meta


def export_openvino(path_or_model: Union[str, os.PathLike, Any], out_dir: Union[str, os.PathLike],
                    overwrite: bool = False) -> str:
  """Write the OpenVINO IR of a Bi-Real export to `out_dir` (model.xml + model.bin).

  `path_or_model`: an export directory (any `deploy.load` opens: float or packed), an `Exported`
  or a `PackedModel`. Refuses (ValueError, with the reason) a model the IR cannot compute
  exactly: non-binary activations or weights, padding other than "torch", binary convs whose
  input channels are not a multiple of `openvino.CHANNEL_MULTIPLE`. The IR's rt_info keeps the
  export's model.json facts (`openvino.read_metadata`). Returns the path of model.xml.
  """
  ov = openvino.require()
  pm, meta = _packed_and_metadata(path_or_model)
  if storage.is_url(out_dir):
    raise ValueError(f"out_dir={os.fspath(out_dir)!r}: OpenVINO writes its IR to a local "
                     f"directory; expected a local path (copy it to the bucket afterwards)")
  out_dir = os.path.abspath(os.fspath(out_dir))
  xml = os.path.join(out_dir, openvino.IR_FILE)
  if os.path.exists(xml) and not overwrite:
    raise FileExistsError(f"{xml!r} already exists; expected a new directory (or pass "
                          f"overwrite=True)")
  model = openvino.build(pm, meta)
  os.makedirs(out_dir, exist_ok=True)
  # fp16 weights would round SIGN_THRESHOLD to −0 (and the real kernels): keep float32
  ov.save_model(model, xml, compress_to_fp16=False)
  return xml
