"""bireal_jax: Bi-Real Net 1-bit CNNs in JAX/Flax (Liu et al., ECCV 2018, arXiv 1808.00278).

Importing this package (quantizers, layers, models) never imports TensorFlow; only
`bireal_jax.data` (the input pipelines; `bireal_jax.input_pipeline` is its alias) does.
"""
from bireal_jax import layers, models, quantizers
from bireal_jax.layers import BinaryConv, BiRealBlock, BiRealBottleneck
from bireal_jax.models import BiRealNet
from bireal_jax.zoo import pretrained

__version__ = "0.1.0"
__all__ = ["layers", "models", "quantizers", "BinaryConv", "BiRealBlock", "BiRealBottleneck",
           "BiRealNet", "pretrained"]
