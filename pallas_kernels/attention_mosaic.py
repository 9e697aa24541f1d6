"""Flash attention forward for Hopper in Pallas Mosaic GPU: plain bf16, or SageAttention-style
INT8 QK^T + FP8 PV.

Derived from JAX's FA3 example (jax/experimental/pallas/ops/gpu/attention_mgpu.py, Apache-2.0):
same warp specialization (2 compute warpgroups of `block_q` query rows each, 1 TMA warpgroup
streaming K/V blocks through a `max_concurrent_steps`-deep ring) and ping-pong schedule barrier.
Changes against the example, each for a reason:
  * softmax scale 1/sqrt(D) is applied (the example computes softmax(QK^T) without it, which is
    why it differed from jax.nn.dot_product_attention by O(1));
  * the SMEM buffers take the operand dtype (the example hard-codes float16 scratch, so bf16
    inputs were reinterpreted as f16);
  * any sequence length: the caller pads to the block grid and the kernel masks key columns
    >= kv_len in the last KV block only (the full blocks run an unmasked loop);
  * precision="int8": S = (Q8 K8^T) on s8 wgmma with an int32 accumulator, dequantized by one
    scalar per (query block, key block) = q_scale * k_scale (softmax scale and log2(e) folded into
    q_scale); P is quantized to FP8 e4m3 (times 448, so it uses the whole e4m3 range) and fed to an
    fp8 wgmma straight from registers, against V^T in FP8 with per-channel scales (`v_scale`,
    applied in the epilogue). The fp8 wgmma result of every KV block is added to the fp32 output
    accumulator on the CUDA cores ("promotion"), so Hopper's reduced-precision FP8 accumulator
    only ever sums one block of 128 products.

8-bit wgmma wants its register A operand in the WGMMA_LAYOUT_8BIT fragment (each thread holds 4
consecutive K columns), while the softmax produces P in the accumulator fragment (2 + 2 columns
8 apart). Instead of shuffling P between threads we reinterpret the registers in place: that is a
fixed permutation of the K index inside every 16-column group, and the caller stores V^T with its
token axis permuted the same way (`permute_kv_tokens`), so P' V' = P V exactly.

Shapes (T padded to the block grid by the caller, see mpqjax.attention):
  bf16: q [B, Tq, H, D], k, v [B, Tk, H, D] (bf16) -> out [B, Tq, H, D] bf16
  int8: q8 [B, Tq, H, D] s8, k8 [B, Tk, H, D] s8, vt8 [B, H, D, Tk] f8e4m3 (token-permuted),
        q_scale [B, H, Tq/block_q] f32, k_scale [B, H, Tk/block_kv] f32
        -> out [B, Tq, H, D] bf16 equal to softmax(QK^T/sqrt(D)) (V / v_scale), or with
        v_scale f32 [B, H, D] given, softmax(QK^T/sqrt(D)) V rounded to bf16 once
  q_len (optional, <= Tq): the output keeps only the first q_len query rows (the TMA stores
  drop the padded rows; when q_len % 8 != 0 the last < 8 are cropped after the kernel).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
P_SCALE = 448.0  # P in [0, 1] is stored as P * 448 in e4m3 (max finite 448).
_LOG2_P_SCALE = math.log2(P_SCALE)
PRECISIONS = ("bf16", "int8")
PV_DTYPES = ("float8_e4m3fn", "bfloat16")  # int8: the P and V^T operands of the PV product
_MAGIC = 12582912.0  # 1.5 * 2^23: float(bits(_MAGIC) + i) == _MAGIC + i for |i| < 2^22
_MAGIC_BITS = 0x4B400000
V_EXTRA_ROWS = 8  # int8: V^T carries a row of ones (then zeros) so PV also sums P8.


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static kernel configuration.

  precision: "bf16" or "int8" (INT8 QK^T, then PV in pv_dtype).
  pv_dtype (int8 only): "float8_e4m3fn" (P x 448 and per-channel-scaled V in e4m3, fp8 wgmma,
    promoted to fp32 per block) or "bfloat16" (P and V in bf16, the accumulator stays in the
    wgmma: full fp32 accumulation, no promotion needed; 2x the PV tensor-core time of fp8).
  block_q: query rows per compute warpgroup (a CTA handles 2 * block_q rows); multiple of 64.
  block_kv: keys per pipeline step; multiple of 64 (of 128 for int8: one fp8 wgmma K group).
  max_concurrent_steps: depth of the K/V SMEM ring (>= 2).
  int8_convert: how the int32 scores become f32: "cvt" (I2F, a quarter-rate conversion on
    Hopper), "magic" (integer-add 0x4B400000 and reinterpret: exact for |s| < 2^22, which
    |q8 . k8| <= 127^2 * 128 guarantees; the 1.5 * 2^23 offset is folded into the softmax max)
    or "magic_init" (the same value with no per-element op: the int32 wgmma accumulator starts
    at 0x4B400000; interpret mode, which cannot run pl.run_state, does the add instead).
  pingpong: the two compute warpgroups take turns on the tensor cores (one's softmax overlaps
    the other's wgmmas, as in the example and FA3); False lets them run freely.
  v_terms (int8 with fp8 PV): 1, or 2 when V^T holds V as the sum of two e4m3 terms (rows
    [0, D + 8) and [D + 8, 2 D + 16), see prepare_vt): the PV step then issues a second fp8
    wgmma with the same P registers, which cuts V's rounding error from 2^-4 to ~2^-8.
  interpret: run through Mosaic GPU's interpret mode (CPU tests).
  """
  precision: str = "bf16"
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2
  int8_convert: str = "magic"
  interpret: bool = False
  pv_dtype: str = "float8_e4m3fn"
  pingpong: bool = True
  v_terms: int = 1

  def __post_init__(self):
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
    if self.block_q != 64:
      raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
    if self.block_kv % (128 if self.precision == "int8" else 64):
      raise ValueError(f"block_kv={self.block_kv} must be a multiple of "
                       f"{128 if self.precision == 'int8' else 64} for precision {self.precision}")
    if self.int8_convert not in ("cvt", "magic", "magic_init"):
      raise ValueError(f"int8_convert must be 'cvt', 'magic' or 'magic_init', "
                       f"got {self.int8_convert!r}")
    if self.pv_dtype not in PV_DTYPES:
      raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {self.pv_dtype!r}")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")
    if self.v_terms not in (1, 2) or (self.v_terms == 2 and (
        self.precision != "int8" or jnp.dtype(self.pv_dtype).itemsize != 1)):
      raise ValueError(f"v_terms must be 1, or 2 for int8 with fp8 PV; got {self.v_terms} "
                       f"({self.precision}, {self.pv_dtype})")

  @property
  def q_multiple(self) -> int:
    """The query length must be padded to a multiple of this."""
    return 2 * self.block_q


def permute_kv_tokens(x: jax.Array, axis: int) -> jax.Array:
  """Permutes `axis` (length a multiple of 16) inside each group of 16 the way the int8 kernel
  reinterprets P's registers: new[16j + 4t + 2h + l] = old[16j + 8h + 2t + l]."""
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % 16:
    raise ValueError(f"permute_kv_tokens: axis length {n} is not a multiple of 16")
  shp = x.shape
  y = x.reshape(*shp[:axis], n // 16, 2, 4, 2, *shp[axis + 1:])
  y = jnp.swapaxes(y, axis + 1, axis + 2)
  return y.reshape(shp)


def prepare_vt(v8: jax.Array, terms: int = 1) -> jax.Array:
  """V [B, S, H, terms * D] in the PV dtype (FP8 e4m3 or bf16; with terms = 2, V as the sum of
  two e4m3 terms, concatenated along the last axis) -> the int8 kernel's V^T operand
  [B, H, terms * (D + 8), S]: per term, transposed (8-bit wgmma needs B K-major) and 8 extra
  rows, for the first term a row of ones then zeros (PV then also yields sum(P), the softmax
  denominator), zeros for the second; for FP8 the tokens are permuted by `permute_kv_tokens`
  (bf16 P is already a wgmma operand). S must be a multiple of 16."""
  b, s, h, _ = v8.shape
  parts = []
  for i, v_term in enumerate(jnp.split(v8, terms, axis=-1)):
    extra = jnp.zeros((b, h, V_EXTRA_ROWS, s), v8.dtype)
    parts += [jnp.transpose(v_term, (0, 2, 3, 1)), extra.at[:, :, 0].set(1) if i == 0 else extra]
  vt = jnp.concatenate(parts, axis=2)
  return permute_kv_tokens(vt, axis=-1) if jnp.dtype(v8.dtype).itemsize == 1 else vt


def _p_as_wgmma_operand(p8: jax.Array, interpret: bool) -> jax.Array:
  """Reinterprets fp8 P [64, N] held in the accumulator fragment as an 8-bit wgmma A operand.

  The logical result is P with its columns permuted by `permute_kv_tokens`. On the GPU this is
  free (registers are only regrouped); interpret mode has no register layouts, so there we apply
  the same permutation to the logical array.
  """
  if interpret:
    return permute_kv_tokens(p8, axis=1)
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  import numpy as np

  m, n = p8.shape

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct((m, n), p8.dtype, layout=plgpu.Layout.WGMMA_8BIT),
  )
  def regroup(ctx, x):
    del ctx
    assert x.layout == fa.WGMMA_LAYOUT, x.layout
    src = x.registers  # [1, n/8, 1, 1, 2, 1, 1, 1, 1] of vector<2xf8>
    dst_shape = fa.WGMMA_LAYOUT_8BIT.registers_shape((m, n))  # [1, n/16, 1, 1, 2, 1, ...]
    dst = np.empty(dst_shape, dtype=object)
    for idx in np.ndindex(dst_shape):
      lo = (idx[0], 2 * idx[1], *idx[2:])
      hi = (idx[0], 2 * idx[1] + 1, *idx[2:])
      dst[idx] = mgpu_utils.vector_concat([src[lo], src[hi]])
    return mgpu.FragmentedArray(_registers=dst, _layout=fa.WGMMA_LAYOUT_8BIT,
                                _is_signed=x.is_signed)

  return regroup(p8)


def _smem_transforms(minor_elems: int, itemsize: int):
  swizzle = min(128, minor_elems * itemsize)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def flash_attention(*operands, kv_len: int, config: AttentionConfig,
                    v_scale: jax.Array | None = None, q_len: int | None = None) -> jax.Array:
  """Runs the kernel on padded operands (see the module docstring); returns [B, q_len, H, D]
  bf16 (q_len defaults to the padded Tq).

  kv_len: number of valid keys (<= padded Tk); keys at positions >= kv_len are masked out.
  v_scale: int8 only, f32 [B, H, D]: V's per-channel scales, multiplied in before the output's
  bf16 rounding.
  """
  cfg = config
  quant = cfg.precision == "int8"
  if quant:
    q, k, vt, q_scale, k_scale = operands
    batch_size, q_len_p, num_heads, head_dim = q.shape
    kv_len_p = k.shape[1]
    if (q.dtype, k.dtype, vt.dtype) != (jnp.int8, jnp.int8, jnp.dtype(cfg.pv_dtype)):
      raise ValueError(f"int8 attention wants s8 q, k and {cfg.pv_dtype} v^T, got {q.dtype}, "
                       f"{k.dtype}, {vt.dtype}")
    want = (batch_size, num_heads, cfg.v_terms * (head_dim + V_EXTRA_ROWS), kv_len_p)
    if vt.shape != want:
      raise ValueError(f"v^T shape {vt.shape} != {want} (see prepare_vt)")
    if q_scale.shape != (batch_size, num_heads, q_len_p // cfg.block_q):
      raise ValueError(f"q_scale shape {q_scale.shape} does not match q {q.shape}")
    if k_scale.shape != (batch_size, num_heads, kv_len_p // cfg.block_kv):
      raise ValueError(f"k_scale shape {k_scale.shape} does not match k {k.shape}")
  else:
    q, k, v = operands
    batch_size, q_len_p, num_heads, head_dim = q.shape
    kv_len_p = k.shape[1]
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"bf16 attention wants q, k, v of one 16-bit float dtype, got {q.dtype}, "
                       f"{k.dtype}, {v.dtype}")
    if v.shape != k.shape:
      raise ValueError(f"k shape {k.shape} != v shape {v.shape}")
  if k.shape != (batch_size, kv_len_p, num_heads, head_dim):
    raise ValueError(f"k shape {k.shape} does not match q {q.shape}")
  if head_dim not in (64, 128):
    raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
  if q_len_p % cfg.q_multiple or kv_len_p % cfg.block_kv:
    raise ValueError(f"padded lengths {q_len_p}, {kv_len_p} must be multiples of "
                     f"{cfg.q_multiple}, {cfg.block_kv}")
  if not 0 < kv_len <= kv_len_p:
    raise ValueError(f"kv_len={kv_len} must be in (0, {kv_len_p}]")
  q_len = q_len_p if q_len is None else q_len
  if not 0 < q_len <= q_len_p:
    raise ValueError(f"q_len={q_len} must be in (0, {q_len_p}]")
  scale_v = v_scale is not None
  if scale_v:
    if not quant:
      raise ValueError("v_scale is for precision='int8' (the bf16 kernel's V is not scaled)")
    if v_scale.shape != (batch_size, num_heads, head_dim) or v_scale.dtype != jnp.float32:
      raise ValueError(f"v_scale must be f32 {(batch_size, num_heads, head_dim)}, got "
                       f"{v_scale.dtype} {v_scale.shape}")
    operands = (*operands, v_scale)

  block_q, block_kv = cfg.block_q, cfg.block_kv
  kv_steps = pl.cdiv(kv_len, block_kv)
  full_steps = kv_len // block_kv
  has_tail = kv_steps > full_steps
  steps = min(cfg.max_concurrent_steps, kv_steps)
  in_dtype = q.dtype
  out_dtype = jnp.bfloat16 if quant else q.dtype
  acc_dtype = jnp.int32 if quant else jnp.float32
  sm_scale_log2 = head_dim ** -0.5 * LOG2E
  # int8: the PV product also yields the softmax denominator (V^T's extra row of ones).
  dv = head_dim + V_EXTRA_ROWS if quant else head_dim
  magic = quant and cfg.int8_convert in ("magic", "magic_init")
  magic_init = quant and cfg.int8_convert == "magic_init" and not cfg.interpret
  pv_dtype = jnp.dtype(cfg.pv_dtype) if quant else in_dtype
  fp8_pv = quant and pv_dtype.itemsize == 1

  def kernel(*refs):
    if quant:
      q_ref, k_ref, v_ref, qs_ref, ks_ref, *vs_ref, out_ref, scoped = refs
    else:
      q_ref, k_ref, v_ref, out_ref, scoped = refs
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg_idx = lax.axis_index("wg")
    (q_smem2, o_smem2, k_smem, v_smem, p_smem2), (k_barriers, v_barriers, q_barriers), \
        (k_consumed, v_consumed), schedule_barrier = scoped

    def perform_schedule_barrier():
      if cfg.pingpong:
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(schedule_barrier)

    def kv_slice(step):
      return pl.ds(step * block_kv, block_kv)

    @pl.when(wg_idx < 2)
    def _compute_wg():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg_idx]
      o_smem = o_smem2.at[wg_idx] if quant else q_smem
      q_seq_base = lax.axis_index("q_seq") * (2 * block_q) + wg_idx * block_q
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_seq_base, block_q), head], q_smem,
                              q_barriers.at[wg_idx])
      if quant:
        # q_scale carries 1/sqrt(D) * log2(e) too.
        c_q = qs_ref[batch, head, lax.div(q_seq_base, jnp.int32(block_q))]
      else:
        c_q = sm_scale_log2
      plgpu.barrier_wait(q_barriers.at[wg_idx])

      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((block_q, dv), 0, jnp.float32), plgpu.Layout.WGMMA)
      if magic_init:
        s_init = plgpu.layout_cast(jnp.full((block_q, block_kv), _MAGIC_BITS, jnp.int32),
                                   plgpu.Layout.WGMMA)

      plgpu.barrier_wait(k_barriers.at[0])
      pl.when(wg_idx == 1)(perform_schedule_barrier)

      def kv_loop(kv_step, carry, masked: bool = False):
        acc, m_i, l_i, *k_scale_now = carry
        slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
        if quant:
          # The next block's K scale is loaded a step ahead, off the critical path.
          k_scale_next = [ks_ref[batch, head, jnp.minimum(kv_step + 1, kv_steps - 1)]]
          c = c_q * k_scale_now[0]
        else:
          k_scale_next = []
          c = c_q

        if magic_init:
          # The int32 accumulator starts at the bits of 1.5 * 2^23, so its result reinterpreted
          # as f32 is exactly 1.5 * 2^23 + s: int -> float for free (no I2F, no IADD).
          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            perform_schedule_barrier()
          s = pl.run_state(compute_qk)(plgpu.ACC.init(s_init))
        else:
          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            perform_schedule_barrier()
            return acc_ref[...]
          s = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), acc_dtype))
          if magic:  # The same value by an integer add.
            s = s + jnp.int32(_MAGIC_BITS)
        plgpu.barrier_arrive(k_consumed.at[slot])
        if magic:
          # s_f = s + 1.5 * 2^23 exactly; the offset cancels in s * c - m below (m carries it).
          s = lax.bitcast_convert_type(s, jnp.float32)
        elif quant:
          s = s.astype(jnp.float32)
        if masked:
          kv_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                          layout=plgpu.Layout.WGMMA)
          s = jnp.where(kv_ids + kv_step * block_kv < kv_len, s, -jnp.inf)

        # Online softmax in base 2; c > 0 folds the softmax scale (and int8 dequantization).
        if magic:
          m_ij = jnp.maximum(m_i, (s.max(axis=1) - _MAGIC) * c)
          bias = m_ij + _MAGIC * c
        else:
          m_ij = jnp.maximum(m_i, s.max(axis=1) * c)
          bias = m_ij
        if quant:  # exp2(x + log2(448)) = 448 * exp2(x): P comes out pre-scaled for e4m3.
          bias = bias - _LOG2_P_SCALE
        alpha = jnp.exp2(m_i - m_ij)
        m_i = m_ij
        p = jnp.exp2(s * c - lax.broadcast_in_dim(bias, s.shape, [0]))
        if fp8_pv:
          p_op = _p_as_wgmma_operand(p.astype(jnp.float8_e4m3fn), cfg.interpret)
        elif quant:  # 16-bit P is a wgmma register operand as it is; acc stays in the wgmma.
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          p_op = p.astype(pv_dtype)
        else:
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          l_i = l_i * alpha + p.sum(axis=1)
          p_op = p.astype(in_dtype)

        def end_softmax_barriers():
          if cfg.pingpong:
            plgpu.barrier_arrive(schedule_barrier)  # Done with softmax.
          plgpu.barrier_wait(v_barriers.at[slot])
          if cfg.pingpong:
            plgpu.barrier_wait(schedule_barrier)  # Wait until the tensor cores are free.
        # The example found this ordering matters for speed at head_dim <= 128.
        acc, l_i, m_i, alpha, p_op = lax.optimization_barrier((acc, l_i, m_i, alpha, p_op))
        end_softmax_barriers()

        def wait_next_k():
          wait_step = kv_step + 1
          wait_slot = lax.rem(wait_step, jnp.array(steps, kv_step.dtype))

          @pl.when(wait_step < kv_steps)
          def _wait():
            plgpu.barrier_wait(k_barriers.at[wait_slot])

        if quant:
          v_op = v_smem.at[slot].transpose((1, 0))  # V^T in SMEM is K-major (8-bit needs it).
        else:
          v_op = v_smem.at[slot]
        if fp8_pv or cfg.interpret:
          # Fresh accumulator per block: for fp8 this is the fp32 promotion (the tensor cores
          # only ever sum one block); interpret mode cannot run pl.run_state.
          if cfg.interpret:
            # The interpreter's wgmma reads A from SMEM only.
            p_smem2.at[wg_idx][...] = p_op
            p_op = p_smem2.at[wg_idx]

          def compute_pv(acc_ref):
            for term in range(cfg.v_terms):  # the same P registers against each V term
              plgpu.wgmma(acc_ref, p_op, v_op if cfg.v_terms == 1 else
                          v_smem.at[slot, pl.ds(term * dv, dv)].transpose((1, 0)))
            wait_next_k()
            return acc_ref[...]
          pv = pl.run_scoped(compute_pv, plgpu.ACC((block_q, dv), jnp.float32))
          if fp8_pv:
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          acc = acc + pv
        else:
          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p_op, v_op)
            wait_next_k()
          acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return (acc, m_i, l_i, *k_scale_next)

      carry = (acc, m_i, l_i, *([ks_ref[batch, head, 0]] if quant else []))
      if full_steps:
        carry = lax.fori_loop(0, full_steps, kv_loop, carry)
      if has_tail:  # A loop of one step keeps kv_step a traced value (run_state needs it).
        carry = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_loop, masked=True),
                              carry)
      acc, m_i, l_i = carry[:3]
      pl.when(wg_idx == 0)(perform_schedule_barrier)

      if quant:  # Column head_dim holds sum(P) (448x the f32 sum), the rest of the extra 0.
        l_i = acc[:, head_dim:].sum(axis=1)
        acc = acc[:, :head_dim]
      acc /= lax.broadcast_in_dim(l_i, (block_q, head_dim), [0])
      if scale_v:  # V's channel scales: one rounding to bf16 for the whole product
        vs = vs_ref[0].at[batch, head]
        vs = vs[...] if cfg.interpret else plgpu.load(vs, layout=plgpu.Layout.WGMMA.reduce(0),
                                                      optimized=False)
        acc *= lax.broadcast_in_dim(vs, (block_q, head_dim), [1])
      o_smem[...] = acc.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, pl.ds(q_seq_base, block_q), head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg_idx == 2)
    def _memory_wg():
      plgpu.set_max_registers(40, action="decrease")

      def issue(step, slot):
        plgpu.copy_gmem_to_smem(k_ref.at[batch, kv_slice(step), head], k_smem.at[slot],
                                k_barriers.at[slot])
        v_src = (v_ref.at[batch, head, :, kv_slice(step)] if quant
                 else v_ref.at[batch, kv_slice(step), head])
        plgpu.copy_gmem_to_smem(v_src, v_smem.at[slot], v_barriers.at[slot])

      for i in range(steps):
        issue(i, i)

      @pl.loop(0, kv_steps - steps)
      def _kv_loop(kv_step):
        tma_step = kv_step + steps
        tma_slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
        plgpu.barrier_wait(k_consumed.at[tma_slot])
        plgpu.copy_gmem_to_smem(k_ref.at[batch, kv_slice(tma_step), head], k_smem.at[tma_slot],
                                k_barriers.at[tma_slot])
        plgpu.barrier_wait(v_consumed.at[tma_slot])
        v_src = (v_ref.at[batch, head, :, kv_slice(tma_step)] if quant
                 else v_ref.at[batch, kv_slice(tma_step), head])
        plgpu.copy_gmem_to_smem(v_src, v_smem.at[tma_slot], v_barriers.at[tma_slot])

      if cfg.interpret:
        # The interpreter insists that every completed barrier phase is observed: wait for
        # the consumption of the last ring's worth of steps too (on the GPU a phase nobody
        # waits for is harmless, so the kernel does not spend the waits there).
        @pl.loop(max(kv_steps - steps, 0), kv_steps)
        def _drain(kv_step):
          slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
          plgpu.barrier_wait(k_consumed.at[slot])
          plgpu.barrier_wait(v_consumed.at[slot])

  itemsize = jnp.dtype(in_dtype).itemsize
  qk_t = _smem_transforms(head_dim, itemsize)
  q_scratch = plgpu.SMEM((2, block_q, head_dim), in_dtype, transforms=qk_t)
  k_scratch = plgpu.SMEM((steps, block_kv, head_dim), in_dtype, transforms=qk_t)
  if quant:
    v_scratch = plgpu.SMEM((steps, cfg.v_terms * dv, block_kv), pv_dtype,
                           transforms=_smem_transforms(block_kv, pv_dtype.itemsize))
    o_scratch = plgpu.SMEM((2, block_q, head_dim), out_dtype,
                           transforms=_smem_transforms(head_dim, 2))
  else:
    v_scratch = plgpu.SMEM((steps, block_kv, head_dim), in_dtype, transforms=qk_t)
    o_scratch = None  # The output reuses the Q buffer.

  p_scratch = None
  if cfg.interpret:
    p_dtype = pv_dtype
    p_scratch = plgpu.SMEM((2, block_q, block_kv), p_dtype,
                           transforms=_smem_transforms(block_kv, jnp.dtype(p_dtype).itemsize))

  def entry(*refs):
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        (q_scratch, o_scratch, k_scratch, v_scratch, p_scratch),
        (plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps),
         plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  # swizzled TMA stores need whole 8-row tiles: keep up to 7 padded rows, crop them below
  out_len = min(q_len_p, -(-q_len // 8) * 8)
  kwargs = {}
  if cfg.interpret:
    from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params
    kwargs["interpret"] = interpret_params.InterpretGPUParams()
  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch_size, out_len, num_heads, head_dim), out_dtype),
      grid=(num_heads, q_len_p // (2 * block_q), batch_size),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(*operands)
  return out if out_len == q_len else out[:, :q_len]


def reference(*operands, kv_len: int, config: AttentionConfig,
              v_scale: jax.Array | None = None, q_len: int | None = None) -> jax.Array:
  """jnp reference taking the kernel's exact (padded) inputs (and its v_scale / q_len); f32 math
  with a materialized S.

  int8: the kernel's softmax numerics (e4m3 P against the running max of each block of
  config.block_kv keys) come from mpqjax.attention.int8_probabilities, the one copy shared with
  the xla path; the products of the quantized values are exact in f32.
  """
  hi = lax.Precision.HIGHEST
  f32 = jnp.float32
  if config.precision == "int8":
    from mpqjax.attention import int8_probabilities
    q8, k8, vt8, qs, ks = operands
    p8 = int8_probabilities(q8, k8, qs, ks, kv_len=kv_len, block_q=config.block_q,
                            block_kv=config.block_kv, p_dtype=config.pv_dtype)
    if jnp.dtype(config.pv_dtype).itemsize == 1:  # V^T's tokens are permuted (prepare_vt)
      p8 = permute_kv_tokens(p8, axis=-1)
    # V^T's row of ones makes the denominator sum(P8) (column d of the product).
    o = jnp.einsum("bhts,bhds->bthd", p8, vt8.astype(f32), precision=hi)
    o = o.reshape(*o.shape[:-1], config.v_terms, -1).sum(axis=-2)  # the V terms add up
    d = o.shape[-1] - V_EXTRA_ROWS
    o = o[..., :d] / o[..., d:d + 1]
    if v_scale is not None:
      o = o * v_scale[:, None]
    return o[:, :q_len].astype(jnp.bfloat16)
  q, k, v = operands
  s = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k.astype(f32), precision=hi)
  s = s * (q.shape[-1] ** -0.5 * LOG2E)
  s = jnp.where(jnp.arange(s.shape[-1]) < kv_len, s, -jnp.inf)
  p = jnp.exp2(s - s.max(axis=-1, keepdims=True))
  o = jnp.einsum("bhts,bshd->bthd", p, v.astype(f32), precision=hi)
  o = o / jnp.moveaxis(p.sum(axis=-1), 1, 2)[..., None]
  return o[:, :q_len].astype(q.dtype)
