"""The CogVideoX 3D causal VAE decoder (diffusers' AutoencoderKLCogVideoX), in JAX."""
from models.cogvideox_vae.model import (Tiling, VAEConfig, decode, decode_batch, decode_frames,
                                        frame_batches, param_shapes)

__all__ = ["Tiling", "VAEConfig", "decode", "decode_batch", "decode_frames", "frame_batches",
           "param_shapes"]
