"""NVFP4 / INT8 / Hadamard: bit-exact against tests/reference_formats.py (ml_dtypes casts)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpqjax import formats
from mpqjax.qlinear import quantize_linear
from tests import reference_formats as ref

E4M3_FINITE_POSITIVE = np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # 0x7F is NaN


def check_nvfp4_bits(x):
  t = jax.jit(formats.quantize_nvfp4)(jnp.asarray(x))
  codes, scales, g = ref.nvfp4(x)
  assert np.asarray(t.global_scale).view(np.uint32) == np.float32(g).view(np.uint32)
  np.testing.assert_array_equal(np.asarray(t.scales).view(np.uint8), scales)
  np.testing.assert_array_equal(np.asarray(t.codes), ref.pack(codes))
  deq = np.asarray(formats.dequantize_nvfp4(t))
  np.testing.assert_array_equal(deq.view(np.uint32), ref.nvfp4_dequant(codes, scales, g).view(np.uint32))
  return codes, scales


@pytest.mark.parametrize("shape", [(16,), (3, 64), (2, 5, 128), (7, 1024)])
def test_nvfp4_bit_exact_random_with_outliers(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32) * rng.lognormal(0, 2, shape[:-1] + (1,)).astype(np.float32)
  x.reshape(-1)[rng.choice(x.size, max(1, x.size // 50), replace=False)] *= 300.0
  codes, _ = check_nvfp4_bits(x)
  if x.size >= 1024:
    assert set(np.unique(codes)) == set(range(16))  # every code occurs


def test_nvfp4_every_finite_scale_byte_and_ties(rng):
  # One block per finite positive e4m3 value s (and per midpoint between neighbours, the
  # round-to-nearest-even ties). Fix g by a block holding the tensor amax 6*448*g.
  g = np.float32(2.0 ** rng.integers(-6, 6))
  targets = E4M3_FINITE_POSITIVE.astype(np.float32)
  mids = (targets[:-1] + targets[1:]) / 2
  s_wanted = np.concatenate([targets, mids]).astype(np.float32)
  blocks = rng.uniform(-1, 1, (s_wanted.size, 16)).astype(np.float32) * (6 * s_wanted[:, None] * g)
  blocks[:, 0] = 6 * s_wanted * g  # the block amax
  top = np.full((1, 16), 6 * 448 * g, np.float32)
  _, scales = check_nvfp4_bits(np.concatenate([top, blocks]).reshape(-1))
  got = set(scales[1:targets.size + 1].tolist())
  assert got == set(E4M3_FINITE_POSITIVE.view(np.uint8).tolist())


def test_nvfp4_all_codes_ties_and_saturation():
  # The tensor amax 2688 = 6 * 448 makes g = 1, and a block with amax 6 gets s = 1, so its
  # elements encode as themselves: every e2m1 value and every tie, with both signs.
  vals = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 5.5, 6], np.float32)
  sat = np.full(16, 0.1, np.float32)
  sat[0] = 6.2  # s = e4m3(6.2 / 6) = 1, so 6.2 itself lies beyond 6 and saturates
  x = np.concatenate([vals, -vals, sat, np.full(16, 2688, np.float32)])
  codes, scales = check_nvfp4_bits(x)
  one = np.float32(1).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
  np.testing.assert_array_equal(scales[:3], [one, one, one])
  expect = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 7]  # RNE: a tie goes to the even code
  np.testing.assert_array_equal(codes[:16], expect)
  np.testing.assert_array_equal(codes[16:32], [e | 8 for e in expect])  # -0 keeps its sign
  assert codes[32] == 7 and not codes[33:48].any()


def test_nvfp4_block_scale_clips_at_448():
  # With a given tensor scale g = 1, amax_block / (6 g) = 460.8 clips to 448, and
  # x / (s g) = 6.17 saturates to code 7.
  t = formats.quantize_nvfp4(jnp.full(16, 2764.8, jnp.float32), global_scale=jnp.float32(1))
  assert np.asarray(t.scales).view(np.uint8)[0] == np.float32(448).astype(
      ml_dtypes.float8_e4m3fn).view(np.uint8)
  assert set(np.asarray(formats.unpack_nibbles(t.codes)).tolist()) == {7}


def test_nvfp4_zero_blocks_and_zero_tensor(rng):
  x = rng.standard_normal(64).astype(np.float32)
  x[16:32] = 0.0
  codes, scales = check_nvfp4_bits(x)
  assert scales[1] == 0 and not codes[16:32].any()
  t = formats.quantize_nvfp4(jnp.zeros(32))
  assert float(t.global_scale) == 1.0 and not np.asarray(t.codes).any()
  # a block so small next to the tensor amax that its scale underflows to 0 encodes zeros
  y = rng.standard_normal(32).astype(np.float32)
  y[:16] *= 1e-12
  codes, scales = check_nvfp4_bits(y)
  assert scales[0] == 0 and not codes[:16].any()


def test_e2m1_decode_every_code():
  codes = np.arange(16, dtype=np.uint8)
  got = np.asarray(formats.e2m1_decode(jnp.asarray(codes)))
  np.testing.assert_array_equal(got.view(np.uint32), ref.e2m1_value(codes).view(np.uint32))


def test_nvfp4_packing_low_nibble_first():
  t = formats.quantize_nvfp4(jnp.asarray([0.5, 6.0] + [0.0] * 14), global_scale=jnp.float32(1 / 448))
  assert int(t.codes[0]) == 1 | (7 << 4)
  assert formats.NVFP4Tensor(*t).shape == (16,)


@pytest.mark.parametrize("axis", [-1, 0])
def test_int8_bit_exact(rng, axis):
  x = rng.standard_normal((33, 48)).astype(np.float32) * 3
  x[5] = 0.0
  x[:, 7] *= 50
  x[3, 3] = 127 * 0.5 / 127  # exercise a .5 tie after scaling on some rows
  t = jax.jit(formats.quantize_int8, static_argnums=1)(jnp.asarray(x), axis)
  q, scale = ref.int8(x, axis)
  np.testing.assert_array_equal(np.asarray(t.values), q)
  np.testing.assert_array_equal(np.asarray(t.scales), scale)
  assert t.scales.shape == scale.shape and t.values.dtype == jnp.int8


def test_int8_round_half_even():
  x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0]], np.float32)
  t = formats.quantize_int8(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(t.values), [[127, 0, 2, 2, 0, -2, 126, -127]])


# (64, 256): XLA:CPU's vectorized max drops a NaN from arrays this size.
@pytest.mark.parametrize("shape", [(4, 32), (64, 256)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_poisons_inside_jit(rng, bad, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  x[1, 5] = bad
  d_fp4 = np.asarray(jax.jit(lambda a: formats.dequantize_nvfp4(formats.quantize_nvfp4(a)))(x))
  assert np.isnan(d_fp4[1, 5]) and not np.isfinite(d_fp4).any()
  d_i8 = np.asarray(jax.jit(lambda a: formats.dequantize_int8(formats.quantize_int8(a)))(x))
  assert np.isnan(d_i8[1, 5]) and not np.isfinite(d_i8[1]).any()
  np.testing.assert_array_equal(np.isfinite(np.delete(d_i8, 1, axis=0)), True)  # other tokens unaffected


def test_quantize_linear_rejects_non_finite_and_names_it(rng):
  w = rng.standard_normal((8, 32)).astype(np.float32)
  w[2, 3] = np.nan
  with pytest.raises(ValueError, match="blocks.3.attn.to_q"):
    quantize_linear(w, name="blocks.3.attn.to_q", hadamard=False)
  b = np.ones(8, np.float32)
  b[0] = np.inf
  with pytest.raises(ValueError, match=r"to_k \(bias\)"):
    quantize_linear(rng.standard_normal((8, 32)), b, name="to_k", hadamard=False)


def test_shape_errors_name_the_shape(rng):
  with pytest.raises(ValueError, match=r"\(3, 40\)"):
    formats.quantize_nvfp4(jnp.ones((3, 40)))
  with pytest.raises(ValueError, match=r"\(2, 96\)"):
    formats.hadamard(jnp.ones((2, 96)), 128)
  with pytest.raises(ValueError, match=r"\(8, 96\)"):
    quantize_linear(rng.standard_normal((8, 96)), hadamard=True)
  with pytest.raises(ValueError, match="power of two"):
    formats.hadamard_matrix(96)


@pytest.mark.parametrize("block", [16, 64, 128])
def test_hadamard_orthonormal(rng, block):
  h = formats.hadamard_matrix(block).astype(np.float64)
  np.testing.assert_allclose(h @ h.T, np.eye(block), atol=1e-6)
  np.testing.assert_allclose(h, h.T)
  x = rng.standard_normal((3, 4 * block)).astype(np.float32)
  y = np.asarray(formats.hadamard(jnp.asarray(x), block))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(formats.hadamard(jnp.asarray(y), block)), x, atol=1e-5)
  expect = (x.reshape(3, 4, block).astype(np.float64) @ h).reshape(x.shape)
  np.testing.assert_allclose(y, expect, atol=1e-5)
