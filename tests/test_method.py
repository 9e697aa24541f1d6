"""Unit tests of the method's pieces against float64 numpy: Γ, the predictor's routing rules,
the least-squares fit and τ selection, the TDC decision and update formulas, the calibration file."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mpqjax import formats
from mpqjax.errors import UserInputError
from mpqjax.method import calibration, predictor, tdc
from mpqjax.method.knobs import make_knobs
from mpqjax.qlinear import Mode

ROUTED = np.array([False, True, True, True, True, False, True, True])


def _l1(a):
  return np.abs(np.asarray(a, np.float64)).sum()


def test_block_divergence_matches_float64(rng):
  xv, yv = rng.standard_normal((2, 2, 7, 16)).astype(np.float32)
  xt, yt = rng.standard_normal((2, 2, 3, 16)).astype(np.float32)
  got = float(predictor.block_divergence(*map(jnp.asarray, (xv, xt, yv, yt))))
  want = (_l1(yv.astype(np.float64) - xv) + _l1(yt.astype(np.float64) - xt)) / (_l1(xv) + _l1(xt))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_modes_rules(rng):
  alpha = rng.uniform(0.5, 2, 8).astype(np.float32)
  beta = rng.uniform(-0.1, 0.1, 8).astype(np.float32)
  gamma = np.float32(rng.uniform(0.1, 1))
  pred = alpha.astype(np.float64) * gamma + beta
  tau = np.float32(np.median(pred[ROUTED]))
  got = np.asarray(predictor.predict_modes(gamma, True, alpha, beta, tau, ROUTED))
  want = np.where(pred > tau, int(Mode.INT8), int(Mode.NVFP4))
  want[~ROUTED] = int(Mode.BF16)
  np.testing.assert_array_equal(got, want)
  assert {int(Mode.INT8), int(Mode.NVFP4)} <= set(got[ROUTED].tolist())
  # no fresh Γ (first step / after a skip): INT8 for any finite τ, NVFP4 only at τ = +inf
  for t in (np.float32(1e30), tau, -np.inf):
    got = np.asarray(predictor.predict_modes(gamma, False, alpha, beta, t, ROUTED))
    assert (got[ROUTED] == int(Mode.INT8)).all() and (got[~ROUTED] == int(Mode.BF16)).all()
  got = np.asarray(predictor.predict_modes(gamma, False, alpha, beta, np.inf, ROUTED))
  assert (got[ROUTED] == int(Mode.NVFP4)).all()
  got = np.asarray(predictor.predict_modes(gamma, True, alpha, beta, -np.inf, ROUTED))
  assert (got[ROUTED] == int(Mode.INT8)).all()


def test_fit_linear_matches_numpy(rng):
  x = rng.uniform(0, 1, 200)
  y = 0.3 * x + 0.05 + 0.02 * rng.standard_normal(200)
  a, b, r = predictor.fit_linear(x, y)
  a_ref, b_ref = np.polyfit(x, y, 1)
  np.testing.assert_allclose([a, b], [a_ref, b_ref], rtol=1e-9)
  np.testing.assert_allclose(r, np.corrcoef(x, y)[0, 1], rtol=1e-9)
  a, b, r = predictor.fit_linear(np.full(5, 0.2), rng.standard_normal(5))
  assert a == 0.0 and np.isnan(r)


@pytest.mark.parametrize("target", [4.0, 5.0, 6.0, 7.2, 8.0])
def test_tau_for_target_bits(rng, target):
  pred = rng.standard_normal(400)
  forced = 40
  tau = predictor.tau_for_target_bits(pred, target, forced_int8=forced)
  int8 = int((pred > tau).sum()) + forced
  bits = (8 * int8 + 4 * (pred.size + forced - int8)) / (pred.size + forced)
  assert abs(bits - max(target, 4 + 4 * forced / 440)) <= 4 / 440 + 1e-12
  with pytest.raises(ValueError, match="target bits"):
    predictor.tau_for_target_bits(pred, 9.0)


def _state(rng, *, change, e_acc, skips, count=3):
  dv = rng.standard_normal((2, 5, 8)).astype(np.float32)
  dt = rng.standard_normal((2, 3, 8)).astype(np.float32)
  return tdc.BlockState(gamma=jnp.float32(0.3), change=jnp.float32(change),
                        e_acc=jnp.float32(e_acc), skips=jnp.int32(skips), count=jnp.int32(count),
                        delta_video=jnp.asarray(dv), delta_text=jnp.asarray(dt))


def test_should_skip_conditions(rng):
  knobs = make_knobs(1, 8, tdc_threshold=0.1, tdc_error_bound=0.25, tdc_max_skips=2,
                     tdc_warmup=3)
  S = 10
  ok = dict(change=0.05, e_acc=0.1, skips=1)
  assert bool(tdc.should_skip(_state(rng, **ok), 5, S, knobs))
  cases = [(dict(ok, change=0.1), 5),          # change not below τ_tdc
           (dict(ok, e_acc=0.2), 5),           # E_acc + c = 0.25 not below the bound
           (dict(ok, skips=2), 5),             # N_max consecutive skips reached
           (ok, 2),                            # warm-up
           (ok, S - 1),                        # last step
           (dict(ok, change=np.inf), 5)]       # fewer than two computations
  for kw, i in cases:
    assert not bool(tdc.should_skip(_state(rng, **kw), i, S, knobs)), (kw, i)
  zero = make_knobs(1, 8, tdc_threshold=0.0, tdc_error_bound=np.inf, tdc_max_skips=99,
                    tdc_warmup=0)
  assert not bool(tdc.should_skip(_state(rng, change=0.0, e_acc=0.0, skips=0), 5, S, zero))


def test_skip_and_compute_updates(rng):
  s = _state(rng, change=0.04, e_acc=0.03, skips=1)
  xv = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
  xt = jnp.asarray(rng.standard_normal((2, 3, 8)).astype(np.float32))
  yv, yt, s2 = tdc.skip(s, xv, xt)
  np.testing.assert_array_equal(np.asarray(yv), np.asarray(xv) + np.asarray(s.delta_video))
  np.testing.assert_array_equal(np.asarray(yt), np.asarray(xt) + np.asarray(s.delta_text))
  np.testing.assert_allclose(float(s2.e_acc), 0.07, rtol=1e-6)
  assert int(s2.skips) == 2 and float(s2.change) == pytest.approx(0.04)

  yv = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
  yt = jnp.asarray(rng.standard_normal((2, 3, 8)).astype(np.float32))
  s3 = tdc.computed(s2, xv, xt, yv, yt, jnp.float32(0.7), tdc=True)
  dv = np.asarray(yv, np.float64) - np.asarray(xv)
  dt = np.asarray(yt, np.float64) - np.asarray(xt)
  want = (_l1(dv - np.asarray(s.delta_video)) + _l1(dt - np.asarray(s.delta_text))) / (
      _l1(s.delta_video) + _l1(s.delta_text))
  np.testing.assert_allclose(float(s3.change), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s3.delta_video), dv, rtol=1e-6, atol=1e-6)
  assert int(s3.skips) == 0 and float(s3.e_acc) == 0 and int(s3.count) == 4
  assert float(s3.gamma) == pytest.approx(0.7)
  first = tdc.computed(_state(rng, change=0.0, e_acc=0.0, skips=0, count=0), xv, xt, yv, yt,
                       jnp.float32(0.1), tdc=True)
  assert float(first.change) == np.inf  # no previous Δ to compare against


def test_state_bytes():
  st = tdc.init_state(3, (2, 10, 16), (2, 4, 16), jnp.bfloat16, tdc=True)
  nb = tdc.state_nbytes(st)
  assert nb["tdc_cache_bytes"] == 3 * 2 * (10 + 4) * 16 * 2
  assert nb["state_bytes"] == nb["tdc_cache_bytes"] + 3 * (4 * 3 + 4 * 2)
  off = tdc.init_state(3, (2, 10, 16), (2, 4, 16), jnp.bfloat16, tdc=False)
  assert tdc.state_nbytes(off)["tdc_cache_bytes"] == 0


class _Cfg:
  num_layers, inner_dim, num_attention_heads, text_embed_dim = 2, 64, 1, 32


NAMES = ("a", "b", "c")


def _calib(rng):
  return calibration.Calibration(
      model=calibration.model_signature(_Cfg, NAMES), alpha=rng.standard_normal((2, 3)),
      beta=rng.standard_normal((2, 3)), tau=0.123, target_bits=6.0,
      pearson_r=rng.uniform(-1, 1, (2, 3)), pearson_r_overall=0.5, extra={"steps": 4})


def test_calibration_roundtrip_and_errors(rng, tmp_path):
  c = _calib(rng)
  c.alpha[0, 0] = np.nan
  path = tmp_path / "c.json"
  c.save(path)
  back = calibration.Calibration.load(path)
  np.testing.assert_array_equal(back.alpha, c.alpha)
  np.testing.assert_array_equal(back.beta, c.beta)
  assert back.tau == c.tau and back.extra["steps"] == 4
  back.check_model(_Cfg, NAMES)

  class Other(_Cfg):
    num_layers = 3
  with pytest.raises(UserInputError, match="another model.*num_layers"):
    back.check_model(Other, NAMES)
  d = json.loads(path.read_text())
  d["version"] = 99
  path.write_text(json.dumps(d))
  with pytest.raises(UserInputError, match="version 99"):
    calibration.Calibration.load(path)
  path.write_text("{not json")
  with pytest.raises(UserInputError, match="not valid JSON"):
    calibration.Calibration.load(path)
  with pytest.raises(FileNotFoundError):
    calibration.Calibration.load(tmp_path / "missing.json")


def test_int8_cache_skip_and_compute(rng):
  """The "int8" cache: a skip adds the dequantized Δ; a computation stores the new Δ as INT8
  per token (within half a step of it) and measures c against the dequantized cached Δ."""
  s = _state(rng, change=0.04, e_acc=0.03, skips=1)
  qv, qt = formats.quantize_int8(s.delta_video), formats.quantize_int8(s.delta_text)
  s8 = dataclasses.replace(s, delta_video=qv.values, video_scale=qv.scales,
                           delta_text=qt.values, text_scale=qt.scales)
  deq_v = np.asarray(qv.values, np.float64) * np.asarray(qv.scales)
  deq_t = np.asarray(qt.values, np.float64) * np.asarray(qt.scales)
  xv = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
  xt = jnp.asarray(rng.standard_normal((2, 3, 8)).astype(np.float32))
  yv, yt, s2 = tdc.skip(s8, xv, xt)
  np.testing.assert_allclose(np.asarray(yv), np.asarray(xv) + deq_v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(yt), np.asarray(xt) + deq_t, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(yv) - np.asarray(xv) - np.asarray(s.delta_video)).max() > 0
  assert int(s2.skips) == 2 and s2.delta_video.dtype == jnp.int8

  yv = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
  yt = jnp.asarray(rng.standard_normal((2, 3, 8)).astype(np.float32))
  s3 = tdc.computed(s2, xv, xt, yv, yt, jnp.float32(0.7), tdc=True)
  dv = np.asarray(yv, np.float64) - np.asarray(xv)
  dt = np.asarray(yt, np.float64) - np.asarray(xt)
  want = (_l1(dv - deq_v) + _l1(dt - deq_t)) / (_l1(deq_v) + _l1(deq_t))
  np.testing.assert_allclose(float(s3.change), want, rtol=1e-5)
  assert s3.delta_video.dtype == jnp.int8 and s3.video_scale.shape == (2, 5, 1)
  new_v = np.asarray(s3.delta_video, np.float64) * np.asarray(s3.video_scale)
  assert (np.abs(new_v - dv) <= np.asarray(s3.video_scale) * 0.5 + 1e-6).all()
  np.testing.assert_allclose(np.asarray(s3.video_scale)[..., 0],
                             np.abs(dv).max(axis=-1) / 127, rtol=1e-6)


def test_int8_cache_state_bytes():
  st = tdc.init_state(3, (2, 10, 16), (2, 4, 16), jnp.bfloat16, tdc=True, cache="int8")
  assert st.delta_video.dtype == jnp.int8 and st.video_scale.shape == (3, 2, 10, 1)
  assert tdc.state_nbytes(st)["tdc_cache_bytes"] == 3 * 2 * (10 + 4) * (16 + 4)
  with pytest.raises(ValueError, match="TDC cache"):
    tdc.init_state(3, (2, 10, 16), (2, 4, 16), jnp.bfloat16, tdc=True, cache="fp8")
