"""Deployment: saving, loading and running trained Bi-Real Nets, float or packed to 1 bit.

    from bireal_jax import deploy
    m = deploy.load("runs/demo/inference")        # any export: training, converter, packed
    logits = m(images)                            # eval-mode float32 logits
    logits = m(images, impl="openvino")           # the same on OpenVINO's CPU plugin (extra)
    deploy.save("b18_packed", m.packed())         # 1-bit export (~4 MB for Bi-Real-18)
    pm = deploy.load("b18_packed").packed()       # PackedModel: XOR/popcount binary convs

One file per job:
  * `ops/bits.py` — bit packing and the exact binary convolutions (shared with training's ops);
  * `fold.py`     — α and BatchNorm folded into one per-channel affine per binary conv;
  * `forward.py`  — the packed forward pass over the models' stage plan, and its four `IMPLS`;
  * `runtime.py`  — micro-batches, concurrent streams, the jit cache, XLA options;
  * `model.py`    — `PackedModel` and `pack`;
  * `format.py`   — the one on-disk format (`save`, `load`, `Exported`);
  * `openvino.py` — the OpenVINO IR of a packed model and impl="openvino" (optional extra,
                    imported only when used);
  * `export.py`   — `export_openvino` (path or model → IR files); `python -m bireal_jax.deploy
                    export --to openvino`.
"""
from bireal_jax.deploy.fold import fold_bn, pack_tree
from bireal_jax.deploy.format import (FORMAT, FORMAT_VERSION, KINDS, Exported, directory_bytes,
                                      load, metadata, save)
from bireal_jax.deploy.forward import (IMPLS, default_impl, forward, forward_pieces,
                                       runtime_params)
from bireal_jax.deploy.model import CALL_IMPLS, OPENVINO, PackedModel, pack
from bireal_jax.deploy.runtime import (compiler_options, default_micro_batch,
                                       default_stage_micro_batch, default_streams,
                                       split_streams)

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "IMPLS", "CALL_IMPLS", "OPENVINO", "Exported",
           "PackedModel", "save", "load", "metadata", "pack", "export_openvino", "forward",
           "forward_pieces", "runtime_params", "default_impl", "default_micro_batch",
           "default_stage_micro_batch", "default_streams", "split_streams", "compiler_options",
           "directory_bytes", "fold_bn", "pack_tree"]


def export_openvino(path_or_model, out_dir, overwrite: bool = False) -> str:
  """`deploy.openvino.export_openvino`: the OpenVINO IR of a Bi-Real export (needs the extra
  bireal_jax[openvino]; imported here, on use, so that `import bireal_jax.deploy` does not)."""
  from bireal_jax.deploy import export
  return export.export_openvino(path_or_model, out_dir, overwrite)
