"""mpqjax: inference-time NVFP4/INT8 mixed precision and a temporal delta cache for video
diffusion transformers, in JAX.

The public names load on first use (PEP 562 `__getattr__`), so `import mpqjax` and the CLI's
`mpqjax --help` do not pay for importing jax."""
import importlib as _importlib  # underscored: dir(mpqjax) lists only the package's own names
import sys as _sys
import types as _types

from mpqjax._version import __version__

# public name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(("Int8Tensor", "NVFP4Tensor", "dequantize_int8", "dequantize_nvfp4", "hadamard",
                     "quantize_int8", "quantize_nvfp4"), "mpqjax.formats"),
    "load_transformer": "mpqjax.loading",
    **dict.fromkeys(("Mode", "QuantizedLinear", "linear", "qlinear", "quantize_linear"),
                    "mpqjax.qlinear"),
}
# submodules reachable as attributes: `attention` is public (a callable module:
# mpqjax.attention(q, k, v, precision=...)); the others were bound by the former eager imports
_SUBMODULES = ("attention", "errors", "formats", "loading")

__all__ = [
    "__version__", "attention", "Int8Tensor", "NVFP4Tensor", "dequantize_int8", "dequantize_nvfp4",
    "hadamard", "quantize_int8", "quantize_nvfp4", "Mode", "QuantizedLinear", "linear",
    "qlinear", "quantize_linear", "load_transformer",
]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")  # the import binds it on the package
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(_importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _Package(_types.ModuleType):
  """Keeps `mpqjax.qlinear` the exported function: importing the submodule mpqjax.qlinear (from
  anywhere) binds the module to the package attribute of the same name."""

  def __setattr__(self, name, value):
    if name == "qlinear" and value is _sys.modules.get(f"{__name__}.qlinear"):
      value = value.qlinear
    super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
