"""The CogVideoX 3D causal VAE (diffusers' AutoencoderKLCogVideoX) in JAX: decoder, and encoder."""
from models.cogvideox_vae.model import (Tiling, VAEConfig, decode, decode_batch, decode_frames,
                                        encode, encode_batch, encode_frames, frame_batches,
                                        latent_mode, param_shapes)

__all__ = ["Tiling", "VAEConfig", "decode", "decode_batch", "decode_frames", "encode",
           "encode_batch", "encode_frames", "frame_batches", "latent_mode", "param_shapes"]
