"""mpqjax: inference-time NVFP4/INT8 mixed precision and a temporal delta cache for video
diffusion transformers, in JAX."""
from mpqjax._version import __version__
from mpqjax import attention  # callable module: mpqjax.attention(q, k, v, precision=...)
from mpqjax.formats import (Int8Tensor, NVFP4Tensor, dequantize_int8, dequantize_nvfp4,
                            hadamard, quantize_int8, quantize_nvfp4)
from mpqjax.loading import load_transformer
from mpqjax.qlinear import Mode, QuantizedLinear, linear, qlinear, quantize_linear

__all__ = [
    "__version__", "attention", "Int8Tensor", "NVFP4Tensor", "dequantize_int8", "dequantize_nvfp4",
    "hadamard", "quantize_int8", "quantize_nvfp4", "Mode", "QuantizedLinear", "linear",
    "qlinear", "quantize_linear", "load_transformer",
]
