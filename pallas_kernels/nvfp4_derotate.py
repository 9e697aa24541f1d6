"""The NVFP4 weight rotated back by its block Hadamard, in one launch (W4A16's fold).

  derotate(t, block) -> bf16[N, K] = bf16((wv[N, K] . blockdiag(H_b)) in f32)
  wv = e2m1(code) * f32(s_block)  (the exact block values, no tensor scale)

which is qlinear_xla.derotated_block_values(t, block) up to f32 summation order. W4A16 from
4096 rows multiplies x as it is by this weight instead of rotating x (qlinear_xla,
`w4a16_folds_rotation`).

How: the block Hadamard acts on each row's `block`-wide column blocks independently, so the
weight viewed as [N K / block, block] (a free reshape of the packed codes and scales: the
16-wide scale blocks stay whole) times H_b is the same product. That is the NVFP4 register-
decode kernel (pallas_kernels.nvfp4_matmul) with the +-1 sign matrix as its bf16 "x"
operand (M = K = block), 1/sqrt(block) as its one column scale, and the accumulator stored as
it is, [rows, block] (`weight_major`): the codes are read once (0.5 B per element) and the
bf16 result written once (2 B), where XLA took two launches (the decode fusion, then a +-1
dot) and ~6.6 B per element (pallas_kernels/NOTES.md, "Session 14", "Session 15").
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax import formats, qlinear_xla
from pallas_kernels import nvfp4_matmul as nvmm
from pallas_kernels.w8a8_matmul import Dim


@dataclasses.dataclass(frozen=True)
class DerotateConfig:
  """tile_rows: weight rows (of `block` columns each) per consumer warpgroup, a multiple of
  64; the CTA has two. tile_k: the K step over a row's `block` columns (64 or block).
  decode: nvfp4_matmul's ("perm" reads the sign matrix in its K order, a constant).
  chain_tiles: nvfp4_matmul's (the next tile's codes fetched during this tile's epilogue).
  block >= 2 * tile_k: two K steps (and two pipeline stages) per row tile, so that the chained
  pipeline can fetch the next tile's first step while this one's second is used."""
  tile_rows: int = 64
  tile_k: int = 64
  decode: str = "perm"
  epi_tile: int = 64
  chain_tiles: bool = True

  def kernel_config(self, block: int) -> nvmm.NVFP4MatmulConfig:
    return nvmm.NVFP4MatmulConfig(
        tile_n=self.tile_rows, tile_m=block, tile_k=self.tile_k,
        max_concurrent_steps=block // self.tile_k, epi_tile_m=min(self.epi_tile, block),
        grid_minor_dim=Dim.N, grid_tile_width=1, k_splits=1, decode=self.decode,
        chain_tiles=self.chain_tiles)


def supported(shape: tuple[int, int], block: int, config: DerotateConfig = DerotateConfig()
              ) -> bool:
  """Whether the kernel tiles a [N, K] weight with this Hadamard block (else use `reference`)."""
  n, k = shape
  return (block in (128, 256) and k % block == 0 and block % config.tile_k == 0
          and block >= 2 * config.tile_k and (n * k // block) % (2 * config.tile_rows) == 0)


def pick_config(shape: tuple[int, int], block: int) -> DerotateConfig:
  """256-row CTA tiles where they tile the weight (H100: 102 vs 120 us at 8192^2, 58 vs 69 at
  12288 x 3072; NOTES.md "Session 15"), else 128-row ones."""
  wide = DerotateConfig(tile_rows=128)
  return wide if supported(shape, block, wide) else DerotateConfig()


def _sign_matrix(block: int) -> np.ndarray:
  """The +-1 Sylvester matrix (symmetric) in bf16, a host constant."""
  return np.sign(formats.hadamard_matrix(block)).astype(jnp.bfloat16)


def derotate(t: formats.NVFP4Tensor, block: int, *, config: DerotateConfig | None = None,
             interpret=None, sms: int | None = None) -> jax.Array:
  """t: NVFP4Tensor [N, K] -> bf16[N, K], its block values times blockdiag(H_block).
  config: `pick_config`'s by default.

  Raises ValueError where the kernel does not tile the shape (see `supported`)."""
  if len(t.shape) != 2:
    raise ValueError(f"derotate: the weight must be 2-D [N, K], got {t.shape}")
  n, k = t.shape
  config = config or pick_config((n, k), block)
  if not supported((n, k), block, config):
    raise ValueError(f"derotate: a [{n}, {k}] weight with Hadamard block {block} does not fit "
                     f"{config} (block 128 or 256 dividing K, two or more K steps of tile_k "
                     f"per block, N*K/block a multiple of {2 * config.tile_rows})")
  rows = n * k // block
  blocks = formats.NVFP4Tensor(t.codes.reshape(rows, block // 2),
                               t.scales.reshape(rows, block // formats.NVFP4_BLOCK),
                               t.global_scale)
  w4, ws, gain = nvmm.weight_operands(blocks, config.decode)
  with jax.named_scope("nvfp4_derotate"):
    out = nvmm.nvfp4_matmul(_sign_matrix(block), w4, ws, np.float32(1 / math.sqrt(block)),
                            config=config.kernel_config(block), interpret=interpret, sms=sms,
                            gain=float(gain), weight_major=True)
  return out.reshape(n, k)


reference = qlinear_xla.derotated_block_values
