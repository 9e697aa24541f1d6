"""Flax/JAX port of diffusers' CogVideoXTransformer3DModel (CogVideoX 1.0: 2B and 5B).

See models/cogvideox/README.md for the block interface the method code builds on."""
from models.cogvideox.config import PRESETS, CogVideoXConfig
from models.cogvideox.model import (UNQUANTIZED_MODE, block, embed, forward, modes_for_precision,
                                    outlier_ratio, unembed)
from models.cogvideox.params import (BLOCKS, LINEAR_NAMES, MODULATION_LINEARS, checkpoint_shapes,
                                     init_params, is_quantized, quantize_blocks)

__all__ = ["PRESETS", "CogVideoXConfig", "UNQUANTIZED_MODE", "block", "embed", "forward",
           "modes_for_precision", "outlier_ratio", "unembed", "BLOCKS", "LINEAR_NAMES",
           "MODULATION_LINEARS", "checkpoint_shapes", "init_params", "is_quantized",
           "quantize_blocks"]
