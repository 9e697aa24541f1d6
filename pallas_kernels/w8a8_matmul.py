"""W8A8 matmul for Hopper (Mosaic GPU): s8[M, K] x s8[N, K] -> s32, fused scale/bias epilogue.

  y[m, n] = bf16(f32(sum_k a[m, k] * b[n, k]) * row_scale[m] * col_scale[n] + bias[n])

which is exactly mpqjax.qlinear_xla's INT8 arithmetic (int32 accumulation, f32 epilogue).
The same kernel takes bf16 operands (f32 accumulation; `bf16_matmul`): the NVFP4 paths at
large M multiply the exactly decoded bf16 weight with it, so that their f32 scale and bias
stay in the epilogue (XLA's dot would write an f32 [M, N] for a separate epilogue pass).

Structure (after jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py): a persistent grid of
one CTA per SM walks the output tiles; each CTA has one TMA producer warpgroup and two wgmma
consumer warpgroups (warp-specialised pipeline over K, `max_concurrent_steps` stages deep).
The weight B is K-major ([N, K] as stored), which is what s8 wgmma requires. The row scales,
column scales and bias of a tile are fetched by TMA while its K loop runs. A CTA's tiles chain
their K pipelines (`chain_tiles`): the TMA warpgroup fetches the next tile's first steps while
the consumers run this tile's epilogue. From 1024 rows, where the CTA tile is 256 wide in N,
CTAs pair up in 2-CTA clusters along M (`cluster_dimension`) that share each weight tile
through one TMA multicast.

Split-K (`k_splits > 1`, for small M where the tile grid is smaller than the SM count):
the kernel writes raw partial sums [k_splits, M, N] (int32, or f32 for bf16); `w8a8_matmul`
adds them (exactly, in int32) and applies the same epilogue in XLA. `out_dtype=jnp.int32` with
one split returns the raw accumulator (used to test the int32 path bit for bit).

M need not be a multiple of the tile: TMA zero-fills out-of-bounds loads and drops
out-of-bounds stores (M % 8 != 0 is padded to a multiple of 8 first: swizzled TMA stores need it).
"""
from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from mpqjax import qlinear_xla


class Dim(enum.IntEnum):
  M = 0
  N = 1


@dataclasses.dataclass(frozen=True)
class W8A8Config:
  """Tiling of one kernel launch.

  tile_m x tile_n is one consumer warpgroup's accumulator; the CTA tile doubles it along
  `wg_dimension`. tile_k is in elements: 128 int8 or 64 bf16 = one 128-byte swizzle row.
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 4
  epi_tile_n: int = 32
  epi_tile_m: int = 64
  grid_minor_dim: Dim = Dim.N
  grid_tile_width: int = 8
  wg_dimension: Dim = Dim.N
  k_splits: int = 1
  # 2-CTA clusters: the two CTAs take neighbouring tiles along this dimension and share the
  # other operand's tile through one TMA multicast (half its L2 -> SMEM traffic). None: off.
  cluster_dimension: Dim | None = None
  # Chain the tiles' K pipelines (Pallas' PipelinePipeline): the TMA warpgroup runs on into the
  # next tile while the consumers do this one's epilogue, instead of draining the ring per
  # tile. Applied where every CTA has >= 2 tiles and the stages divide the K steps.
  chain_tiles: bool = True

  @property
  def cluster_size(self) -> int:
    return 1 if self.cluster_dimension is None else 2

  @property
  def cta_tile_m(self) -> int:
    return self.tile_m * (2 if self.wg_dimension == Dim.M else 1)

  @property
  def cta_tile_n(self) -> int:
    return self.tile_n * (2 if self.wg_dimension == Dim.N else 1)


def num_sms() -> int:
  return jax.devices()[0].core_count if jax.default_backend() == "gpu" else 132


def pick_config(m: int, n: int, k: int, sms: int | None = None,
                dtype=jnp.int8) -> W8A8Config:
  """Heuristic tile choice (see pallas_kernels/NOTES.md for the measurements behind it).
  dtype: the operands' (int8, or bfloat16 with half the tile_k)."""
  sms = sms or num_sms()
  bf16 = jnp.dtype(dtype) == jnp.bfloat16
  if m >= 1024 or bf16:
    cfg = W8A8Config(tile_k=64 if bf16 else 128)  # 128-byte K rows either way
    if not bf16:  # int8: 3 stages and 64-wide epilogue tiles, 2-3% faster at M = 35552 and
      # 0.5-1.4% at 8192^3 than 4 stages x 32 (H200; kernels-NVIDIA_H200.tune16.json, run1-7)
      cfg = dataclasses.replace(cfg, max_concurrent_steps=3, epi_tile_n=64)
    if n % cfg.cta_tile_n:  # e.g. N=1920: split the CTA tile along M instead (256 x 128)
      cfg = dataclasses.replace(cfg, wg_dimension=Dim.M)
    cfg = _chainable_stages(cfg, k)
    if m < 1024:  # bf16 below 1024 rows (not a path qlinear takes): K split to fill the SMs
      return with_k_splits(cfg, m, n, k, sms)
    return _with_clusters(cfg, k, bf16)
  # Memory-bound: weight streaming. Small tiles along N, split K until the SMs are busy.
  # Above 128 rows the two warpgroups split M (CTA 128 x 64): each weight tile is read half as
  # often (M = 256: 9.2 -> 8.7 us at K = N = 3072, 29.6 -> 25.3 us at N = 12288, H200,
  # kernels-NVIDIA_H200.smallm8.json).
  cfg = W8A8Config(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=6,
                   epi_tile_n=64, epi_tile_m=64, grid_minor_dim=Dim.M, grid_tile_width=1,
                   wg_dimension=Dim.M if m > 128 else Dim.N)
  return with_k_splits(cfg, m, n, k, sms)


def _with_clusters(cfg: W8A8Config, k: int, bf16: bool) -> W8A8Config:
  """Large M: 2-CTA clusters along M (the weight tile multicast) where the CTA tile is
  256 wide in N. H100, benchmarks/gemm_clusters.py (s13c/d), against the same config without:
  int8 (with 16-wide grid snake) 1-3% faster at all five such shapes; bf16 4.6% at 5B K3072
  N12288, 2.5% at 2B K1920 N7680 (3.8% with 64-wide epilogue tiles, which 3 stages leave room
  for), 0.6% at 8192^3, tied at 5B K3072 N3072, but 1.2% slower at K = 12288 (left out). Along M
  at N = 1920 (CTA 256 x 128) clusters were 4-14% slower."""
  if cfg.wg_dimension != Dim.N or (bf16 and k // cfg.tile_k > 128):
    return cfg
  cfg = dataclasses.replace(cfg, cluster_dimension=Dim.M)
  if not bf16:
    return dataclasses.replace(cfg, grid_tile_width=16)
  return dataclasses.replace(cfg, epi_tile_n=64) if cfg.max_concurrent_steps == 3 else cfg


def _chainable_stages(cfg: W8A8Config, k: int) -> W8A8Config:
  """cfg with a stage count that divides its K steps, so that chain_tiles applies: the
  default, else 3 or 4 stages (4 int8 stages with 32-wide epilogue tiles, to fit the SMEM)."""
  k_iters = k // (cfg.tile_k * cfg.k_splits)
  if k_iters % cfg.max_concurrent_steps == 0:
    return cfg
  for steps in (3, 4):
    if k_iters % steps == 0:
      epi_n = 32 if steps == 4 else cfg.epi_tile_n
      return dataclasses.replace(cfg, max_concurrent_steps=steps, epi_tile_n=epi_n)
  return cfg


def with_k_splits(cfg: W8A8Config, m: int, n: int, k: int, sms: int) -> W8A8Config:
  """cfg with K split in powers of two until the (M, N) tiles x splits fill the SMs."""
  tiles = pl.cdiv(m, cfg.cta_tile_m) * pl.cdiv(n, cfg.cta_tile_n)
  k_iters = k // cfg.tile_k
  splits = 1
  while tiles * splits * 2 <= sms and k_iters % (splits * 2) == 0 and k_iters // (splits * 2) >= 2:
    splits *= 2
  return dataclasses.replace(cfg, k_splits=splits)


_OPERAND_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16))


def acc_dtype(dtype):
  """The wgmma accumulator (and raw output) dtype for an operand dtype."""
  return jnp.int32 if jnp.dtype(dtype) == jnp.int8 else jnp.float32


def _check(a, b, cfg: W8A8Config):
  if a.dtype != b.dtype or a.dtype not in _OPERAND_DTYPES:
    raise ValueError(f"w8a8_matmul needs two int8 or two bfloat16 operands, got {a.dtype} "
                     f"and {b.dtype}")
  (_, k), (n, k2) = a.shape, b.shape  # any M: TMA handles ragged tiles
  if k != k2:
    raise ValueError(f"w8a8_matmul: a is {a.shape} but b is {b.shape}; K must match")
  if n % cfg.cta_tile_n:
    raise ValueError(f"w8a8_matmul: N={n} must be a multiple of the CTA tile {cfg.cta_tile_n}")
  if cfg.cluster_dimension is not None and cfg.k_splits > 1:
    raise ValueError(f"w8a8_matmul: clusters need k_splits == 1: {cfg}")
  if cfg.cluster_dimension == Dim.N and n % (2 * cfg.cta_tile_n):
    raise ValueError(f"w8a8_matmul: N={n} must be a multiple of 2 CTA tiles "
                     f"({2 * cfg.cta_tile_n}) with clusters along N")
  if k % (cfg.tile_k * cfg.k_splits):
    raise ValueError(f"w8a8_matmul: K={k} must be a multiple of tile_k*k_splits="
                     f"{cfg.tile_k * cfg.k_splits}")
  if cfg.tile_m % cfg.epi_tile_m or cfg.tile_n % cfg.epi_tile_n:
    raise ValueError(f"epilogue tile must divide the warpgroup tile: {cfg}")


def smem_transforms(minor_bytes: int, bits: int):
  """Tiling + swizzle for an SMEM tile whose minor dimension spans minor_bytes of bits-wide
  elements (the widest swizzle that divides it)."""
  swizzle = plgpu.find_swizzle(minor_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def persistent_tile(lin, m_iters: int, n_iters: int, cfg):
  """(mi, ni, split) of the persistent loop's linear tile index `lin`: the K split varies
  fastest, then the M x N tiles in cfg.grid_minor_dim snake order (cfg: W8A8Config or
  NVFP4MatmulConfig, which share these fields)."""
  mn, split = lax.div(lin, cfg.k_splits), lax.rem(lin, cfg.k_splits)
  mi, ni = plgpu.planar_snake(mn, (m_iters, n_iters), int(cfg.grid_minor_dim),
                              cfg.grid_tile_width)
  return mi, ni, split


def tiles_chain(tiles: int, ctas: int, k_steps: int, stages: int) -> bool:
  """Whether a persistent kernel's tiles can chain their K pipelines: every CTA has >= 2
  tiles (one tile would need the START and STOP states at once) and the stages divide the K
  steps."""
  return tiles >= 2 * ctas and k_steps % stages == 0


def chained_pipeline_state(info):
  """The pipeline_state of the persistent loop's tile `info` (plgpu.nd_loop's) when a CTA's
  tiles chain their K pipelines: its first tile starts the ring, its last one drains it."""
  local, last = info.local_index, info.num_local_steps - 1
  return jnp.where(local == 0, int(plgpu.PipelinePipeline.START),
                   jnp.where(local == last, int(plgpu.PipelinePipeline.STOP),
                             int(plgpu.PipelinePipeline.STEADY)))


def _kernel_call(a, b, row_scale, col_scale, bias, cfg: W8A8Config, out_dtype, interpret,
                 sms: int):
  """One launch. out_dtype = the accumulator's (int32 or f32) -> raw partial sums
  [k_splits, M, N]; else the epilogue."""
  (m, k), (n, _) = a.shape, b.shape
  acc_type = acc_dtype(a.dtype)
  raw = jnp.dtype(out_dtype) == jnp.dtype(acc_type)
  tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_m, cta_n = cfg.cta_tile_m, cfg.cta_tile_n
  m_iters, n_iters = pl.cdiv(m, cta_m), n // cta_n
  splits = cfg.k_splits
  k_per_split = k // splits
  k_iters = k_per_split // tile_k
  epi_m, epi_n = cfg.epi_tile_m, cfg.epi_tile_n
  out_bits = jnp.dtype(out_dtype).itemsize * 8
  in_bits = jnp.dtype(a.dtype).itemsize * 8
  in_tr = smem_transforms(tile_k * in_bits // 8, in_bits)
  out_tr = smem_transforms(epi_n * out_bits // 8, out_bits)
  n_epi = (tile_m // epi_m) * (tile_n // epi_n)
  num_slots = min(2, n_epi)
  wg_m_dim = cfg.wg_dimension == Dim.M
  cluster_m, cluster_n = cfg.cluster_dimension == Dim.M, cfg.cluster_dimension == Dim.N
  # tiles the persistent loop walks: CTA tiles, or pairs of them with clusters (an odd M tile
  # count leaves the last pair's second CTA out of bounds: TMA zero-fills its loads and drops
  # its stores)
  loop_m_iters = pl.cdiv(m_iters, 2) if cluster_m else m_iters
  loop_n_iters = n_iters // 2 if cluster_n else n_iters

  total = loop_m_iters * loop_n_iters * splits
  grid_size = min(sms // cfg.cluster_size, total)
  chain = cfg.chain_tiles and tiles_chain(total, grid_size, k_iters, cfg.max_concurrent_steps)

  def w8a8_matmul_kernel(a_g, b_g, rs_g, cs_g, bias_g, out_g):
    def get_pipeline(body, ctx, state=None):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=in_tr,
                              memory_space=plgpu.SMEM,
                              collective_axes=("cluster",) if cluster_n else ()),
              plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=in_tr,
                              memory_space=plgpu.SMEM,
                              collective_axes=("cluster",) if cluster_m else ()),
          ],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.max_concurrent_steps,
          compute_context=ctx, pipeline_state=state)

    ignore = lambda *_, **__: None
    scratch = dict(
        allocs=get_pipeline(ignore, ignore).get_allocations(a_g, b_g),
        out_smem=plgpu.SMEM((2, num_slots, epi_m, epi_n), out_dtype, transforms=out_tr),
    )
    if not raw:
      scratch.update(
          rs_smem=plgpu.SMEM((2, tile_m), jnp.float32),
          cs_smem=plgpu.SMEM((2, tile_n), jnp.float32),
          bias_smem=plgpu.SMEM((2, tile_n), jnp.float32),
          bar=plgpu.Barrier(num_arrivals=3, num_barriers=2))

    @functools.partial(pl.run_scoped, collective_axes="wg", **scratch)
    def _scope(allocs, out_smem, rs_smem=None, cs_smem=None, bias_smem=None, bar=None):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((loop_m_iters * loop_n_iters * splits,), collective_axes="sm")
      def _tile_loop(info):
        mi, ni, split = persistent_tile(info.index[0], loop_m_iters, loop_n_iters, cfg)
        if cfg.cluster_dimension is not None:
          cta = lax.axis_index("cluster")
          mi, ni = (mi * 2 + cta, ni) if cluster_m else (mi, ni * 2 + cta)
        wg_m0 = mi * cta_m + (wg * tile_m if wg_m_dim else 0)
        wg_n0 = ni * cta_n + (0 if wg_m_dim else wg * tile_n)
        k_slice = pl.ds(split * k_per_split, k_per_split)

        def ctx(eval_pipeline):
          if not raw:  # fetch this tile's scales while the K loop runs
            plgpu.copy_gmem_to_smem(rs_g.at[pl.ds(wg_m0, tile_m)], rs_smem.at[wg], bar.at[wg])
            plgpu.copy_gmem_to_smem(cs_g.at[pl.ds(wg_n0, tile_n)], cs_smem.at[wg], bar.at[wg])
            plgpu.copy_gmem_to_smem(bias_g.at[pl.ds(wg_n0, tile_n)], bias_smem.at[wg],
                                    bar.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), acc_type))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...]
            if not raw:
              plgpu.barrier_wait(bar.at[wg])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for ei in range(tile_m // epi_m):
              for ej in range(tile_n // epi_n):
                ms, ns = slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n)
                part = acc[ms, ns]
                if not raw:
                  rs = rs_smem[wg, ms]
                  cs = cs_smem[wg, ns]
                  bb = bias_smem[wg, ns]
                  shape = (epi_m, epi_n)
                  y = part.astype(jnp.float32) * lax.broadcast_in_dim(rs, shape, [0])
                  y = y * lax.broadcast_in_dim(cs, shape, [1]) + lax.broadcast_in_dim(bb, shape, [1])
                  part = y.astype(out_dtype)
                slot = (ei * (tile_n // epi_n) + ej) % num_slots
                plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
                out_smem[wg, slot] = part
                plgpu.commit_smem()
                dst = out_g.at[split] if raw else out_g
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg, slot],
                    dst.at[pl.ds(wg_m0 + ei * epi_m, epi_m), pl.ds(wg_n0 + ej * epi_n, epi_n)])

        def mma(_, a_s, b_s, acc_ref):
          if wg_m_dim:
            a_op, b_op = a_s.at[pl.ds(wg * tile_m, tile_m)], b_s
          else:
            a_op, b_op = a_s, b_s.at[pl.ds(wg * tile_n, tile_n)]
          plgpu.wgmma(acc_ref, a_op, b_op.transpose((1, 0)))
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(mma, ctx, chained_pipeline_state(info) if chain else None)(
            a_g.at[pl.ds(mi * cta_m, cta_m), k_slice],
            b_g.at[pl.ds(ni * cta_n, cta_n), k_slice],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_shape = (splits, m, n) if raw else (m, n)
  clusters = {} if cfg.cluster_dimension is None else dict(cluster=(2,), cluster_names=("cluster",))
  f = plgpu.kernel(
      w8a8_matmul_kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(grid_size,), grid_names=("sm",), num_threads=3,
      thread_name="wg", **clusters,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret)
  return f(a, b, row_scale, col_scale, bias)


def w8a8_matmul(a: jax.Array, b: jax.Array, row_scale: jax.Array, col_scale: jax.Array,
                bias: jax.Array | None = None, *, config: W8A8Config | None = None,
                out_dtype=jnp.bfloat16, interpret=None, sms: int | None = None) -> jax.Array:
  """a s8[M, K], b s8[N, K] (or both bf16), row_scale f32[M], col_scale f32[N], bias f32[N] | None.

  Returns out_dtype[M, N] = (a @ b.T) * row_scale[:, None] * col_scale + bias, or with
  out_dtype = the accumulator's dtype (int32 for int8, float32 for bf16) the raw a @ b.T
  (scales and bias ignored). interpret: a plgpu.InterpretGPUParams to run on CPU.
  """
  m, k = a.shape
  n = b.shape[0]
  cfg = config or pick_config(m, n, k, sms, a.dtype)
  _check(a, b, cfg)
  sms = sms or num_sms()
  if m % 8:  # TMA stores of the swizzled output tiles need M % 8 == 0: pad, then slice
    pad = 8 - m % 8
    out = w8a8_matmul(jnp.pad(a, ((0, pad), (0, 0))), b, jnp.pad(row_scale.reshape(m), (0, pad)),
                      col_scale, bias, config=cfg, out_dtype=out_dtype, interpret=interpret,
                      sms=sms)
    return out[:m]
  row_scale = row_scale.reshape(m).astype(jnp.float32)
  col_scale = col_scale.reshape(n).astype(jnp.float32)
  bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.reshape(n).astype(jnp.float32)
  acc_type = acc_dtype(a.dtype)
  raw = jnp.dtype(out_dtype) == jnp.dtype(acc_type)
  if raw or cfg.k_splits > 1:
    parts = _kernel_call(a, b, row_scale, col_scale, bias, cfg, acc_type, interpret, sms)
    acc = parts.sum(axis=0, dtype=acc_type)  # exact in int32
    if raw:
      return acc
    y = acc.astype(jnp.float32) * row_scale[:, None] * col_scale + bias
    return y.astype(out_dtype)
  return _kernel_call(a, b, row_scale, col_scale, bias, cfg, out_dtype, interpret, sms)


def bf16_matmul(a: jax.Array, b: jax.Array, col_scale: jax.Array, bias: jax.Array | None = None,
                *, config: W8A8Config | None = None, interpret=None,
                sms: int | None = None) -> jax.Array:
  """a bf16[M, K], b bf16[N, K], col_scale f32[N] or scalar, bias f32[N] | None ->
  bf16[M, N] = bf16(f32(a @ b.T) * col_scale + bias): XLA's bf16 dot with the epilogue fused."""
  m, n = a.shape[0], b.shape[0]
  col_scale = jnp.broadcast_to(jnp.asarray(col_scale, jnp.float32).reshape(-1), (n,))
  return w8a8_matmul(a, b, jnp.ones((m,), jnp.float32), col_scale, bias, config=config,
                     interpret=interpret, sms=sms)


def reference(a, b, row_scale, col_scale, bias=None, out_dtype=jnp.bfloat16):
  """The same function in plain jnp (XLA's int dot, or its bf16 dot with f32 accumulation)."""
  if a.dtype == jnp.int8:
    acc = qlinear_xla.dot_int8(a, b)
  else:
    acc = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if jnp.dtype(out_dtype) == acc.dtype:
    return acc
  y = acc.astype(jnp.float32) * row_scale.reshape(-1, 1) * col_scale.reshape(1, -1)
  if bias is not None:
    y = y + bias.reshape(1, -1)
  return y.astype(out_dtype)
