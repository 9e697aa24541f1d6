"""The int8 attention kernel's V^T operand from bf16 V in one pass (Mosaic GPU).

  transposed_fp8_v_mgpu(v bf16[B, S, H, D], inv_scale f32[B, H, D], s_pad, terms=1)
    -> vt8 f8e4m3[B, H, terms * (D + 8), s_pad]

equals attention_mosaic.prepare_vt(e4m3(v * inv_scale) zero-padded to s_pad tokens, terms): V
scaled per channel, rounded to FP8 e4m3, transposed (8-bit wgmma needs the PV operand K-major),
the tokens permuted inside each group of 16 (attention_mosaic.permute_kv_tokens, matching how
the kernel reinterprets P's registers), and 8 extra rows, ones then zeros (PV then also sums P);
with terms = 2 also the rounding error lo = e4m3(x - hi) and 8 zero rows.

XLA does this as a chain of fusions (0.95-1.2 ms at the CogVideoX-2B shape on an H200, NOTES.md);
here one CTA takes 256 tokens of one batch and walks the heads with a TMA pipeline. Both the
transpose and the token permutation are done by the tensor cores: each [64 tokens, D] bf16 tile
T is read from shared memory transposed as the wgmma A operand and multiplied by the 0/1
permutation matrix Pm (exact: one nonzero product per output), acc[D, 64] = T^T Pm, whose rows
are channels: the per-channel scale is then one value per accumulator row.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.attention_mosaic import V_EXTRA_ROWS, permute_kv_tokens
from pallas_kernels.attention_quant_mgpu import check_operand, pad_tokens_to_8, supported_operand
from pallas_kernels.int8_quant_mgpu import ROWS, bf16_tile_transforms, load_to_smem, wgmma_f32
from pallas_kernels.w8a8_matmul import smem_transforms

BLOCK_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class VtConfig:
  max_concurrent_steps: int = 2  # [256, D] bf16 tiles in flight per CTA


supported = supported_operand  # bf16 [B, S, H, D], D in attention_quant_mgpu.HEAD_DIMS


def permutation_matrix() -> np.ndarray:
  """bf16-exact 0/1 [64, 64]: (T^T Pm)[:, c] = T^T[:, src(c)], permute_kv_tokens on 64 tokens."""
  with jax.ensure_compile_time_eval():  # a constant, also when called under jit
    src = np.asarray(permute_kv_tokens(jnp.arange(ROWS), axis=0))
  pm = np.zeros((ROWS, ROWS), np.float32)
  pm[src, np.arange(ROWS)] = 1.0
  return pm


def transposed_fp8_v_mgpu(v: jax.Array, inv_scale: jax.Array, *, s_pad: int, terms: int = 1,
                          config: VtConfig = VtConfig(), interpret=None) -> jax.Array:
  """See the module docstring. v bf16[B, S, H, D] (D = 64 or 128), inv_scale f32[B, H, D] (1 /
  the per-channel scale), s_pad >= S a multiple of 256, terms 1 or 2. interpret:
  plgpu.InterpretGPUParams."""
  if terms not in (1, 2):
    raise ValueError(f"transposed_fp8_v_mgpu: terms must be 1 or 2, got {terms}")
  check_operand("transposed_fp8_v_mgpu", v, ("s_pad", s_pad), BLOCK_TOKENS,
                ("inv_scale", inv_scale))
  b, s, h, d = v.shape
  interp = interpret is not None
  subs = BLOCK_TOKENS // ROWS
  f8 = jnp.float8_e4m3fn
  v3 = pad_tokens_to_8(v).reshape(b, -1, h * d)
  inv2 = inv_scale.astype(jnp.float32).reshape(b, h * d)
  pm = jnp.asarray(permutation_matrix(), jnp.bfloat16)
  extra = np.zeros((2, V_EXTRA_ROWS, ROWS), np.float32)
  extra[0, 0] = 1.0
  extra = jnp.asarray(extra, f8)  # the rows after hi's D channel rows: ones, then zeros; lo's: 0
  dv = d + V_EXTRA_ROWS
  out_tr = smem_transforms(ROWS, 8)  # 64 one-byte tokens per row
  steps = min(config.max_concurrent_steps, h)

  def attention_vt_kernel(v_g, inv_g, pm_g, extra_g, vt_g, pm_s, extra_s, o_s, bar):
    bi, ti = lax.axis_index("b"), lax.axis_index("t")
    t0 = ti * BLOCK_TOKENS
    load_to_smem(pm_g, pm_s, bar.at[0])
    load_to_smem(extra_g, extra_s, bar.at[1])

    def body(idx, v_s, inv_s):
      (hh,) = idx
      if interp:
        inv = inv_s[...]
      else:
        inv = plgpu.load(inv_s, layout=plgpu.Layout.WGMMA.reduce(1))
      for i in range(subs):
        x = wgmma_f32(v_s.at[pl.ds(i * ROWS, ROWS)].T, pm_s, (d, ROWS))  # [channels, tokens]
        x = x * lax.broadcast_in_dim(inv, (d, ROWS), [0])
        vt = x.astype(f8)
        slot = lax.rem(hh * subs + i, 2)
        # the 2 (hi, extra rows) or 4 (also lo, zero rows) stores that used this slot
        plgpu.wait_smem_to_gmem(2 * terms, wait_read_only=True)
        o_s[terms * slot] = vt
        if terms == 2:
          o_s[terms * slot + 1] = (x - vt.astype(jnp.float32)).astype(f8)
        plgpu.commit_smem()
        cols = pl.ds(t0 + i * ROWS, ROWS)
        for term in range(terms):
          plgpu.copy_smem_to_gmem(o_s.at[terms * slot + term],
                                  vt_g.at[bi, hh, pl.ds(term * dv, d), cols])
          plgpu.copy_smem_to_gmem(extra_s.at[term],
                                  vt_g.at[bi, hh, pl.ds(term * dv + d, V_EXTRA_ROWS), cols])

    plgpu.emit_pipeline(
        body, grid=(h,), max_concurrent_steps=steps,
        in_specs=[plgpu.BlockSpec((BLOCK_TOKENS, d), lambda hh: (0, hh),
                                  transforms=bf16_tile_transforms()),
                  plgpu.BlockSpec((d,), lambda hh: (hh,))],
    )(v_g.at[bi, pl.ds(t0, BLOCK_TOKENS)], inv_g.at[bi])
    plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(
      attention_vt_kernel,
      out_type=jax.ShapeDtypeStruct((b, h, terms * dv, s_pad), f8),
      grid=(b, s_pad // BLOCK_TOKENS), grid_names=("b", "t"),
      scratch_types=[plgpu.SMEM((ROWS, ROWS), jnp.bfloat16, transforms=bf16_tile_transforms()),
                     plgpu.SMEM((2, V_EXTRA_ROWS, ROWS), f8, transforms=out_tr),
                     plgpu.SMEM((2 * terms, d, ROWS), f8, transforms=out_tr),
                     plgpu.Barrier(num_barriers=2)],
      interpret=interpret)
  return f(v3, inv2, pm, extra)
