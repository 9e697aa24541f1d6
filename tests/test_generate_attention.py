"""generate(attention_precision="int8"): the INT8/FP8 attention chosen per block and per step
through lax.switch (issue 10 §2), on the tiny model of tests/test_generate.py, CPU."""
import numpy as np
import pytest

from mpqjax import cli
from mpqjax import generate as G
from tests.generate_tiny import CFG, STEPS, run as _run
from mpqjax.testing import rel_err as rel


def test_int8_attention_off_at_edge_steps_and_close_to_bf16(model, text):
  base = _run(model, text, precision="int8", tdc=False)
  q = _run(model, text, precision="int8", tdc=False, attention_precision="int8")
  att = q.stats["attention"]
  assert att.shape == (STEPS, CFG.num_layers)
  np.testing.assert_array_equal(att[0], 0)
  np.testing.assert_array_equal(att[-1], 0)
  np.testing.assert_array_equal(att[1:-1], 1)
  np.testing.assert_array_equal(base.stats["attention"], 0)
  assert q.summary["attention_int8_fraction"] == pytest.approx((STEPS - 2) / STEPS)
  assert q.summary["attention_precision"] == "int8"
  err = rel(q.latents, base.latents)
  assert 0 < err < 0.1, err


def test_attention_knobs_do_not_recompile_and_select_blocks(model, text):
  base = _run(model, text, precision="int8", tdc=False)
  _run(model, text, precision="int8", tdc=False, attention_precision="int8")
  traces = G.trace_count()
  only1 = _run(model, text, precision="int8", tdc=False, attention_precision="int8",
               attention_blocks=[1], attention_edge_steps=0)
  none = _run(model, text, precision="int8", tdc=False, attention_precision="int8",
              attention_blocks=[])
  assert G.trace_count() == traces
  np.testing.assert_array_equal(only1.stats["attention"][:, 0], 0)
  np.testing.assert_array_equal(only1.stats["attention"][:, 1], 1)
  # with no block selected the switch always takes the bf16 branch: same result as bf16
  np.testing.assert_array_equal(none.stats["attention"], 0)
  np.testing.assert_allclose(none.latents, base.latents, rtol=0, atol=1e-6)


def test_skipped_blocks_report_no_attention(model, text):
  r = _run(model, text, precision="int8", tdc=True, tdc_threshold=1e9, tdc_error_bound=1e9,
           attention_precision="int8")
  skipped = ~r.stats["computed"].astype(bool)
  assert skipped.any()
  np.testing.assert_array_equal(r.stats["attention"][skipped], -1)


def test_bad_attention_arguments(model, text, capsys):
  with pytest.raises(ValueError, match="attention precision"):
    _run(model, text, attention_precision="fp4")
  with pytest.raises(ValueError, match="out of range"):
    _run(model, text, precision="int8", attention_precision="int8", attention_blocks=[5])
  assert cli.main(["generate", "--prompt-embeds", "x.npy", "--attention-edge-steps", "-1"]) == 2
  assert "--attention-edge-steps" in capsys.readouterr().err


def test_attention_pv_reaches_the_int8_attention(model, text, capsys):
  """attention_pv picks the INT8 attention's PV format: fp8x2 (two e4m3 terms of V) gives other
  latents than fp8, both near bf16 attention; a bad value is a clear error (API and CLI)."""
  base = _run(model, text, precision="int8", tdc=False)
  fp8 = _run(model, text, precision="int8", tdc=False, attention_precision="int8")
  x2 = _run(model, text, precision="int8", tdc=False, attention_precision="int8",
            attention_pv="fp8x2")
  assert (fp8.summary["attention_pv"], x2.summary["attention_pv"]) == ("fp8", "fp8x2")
  assert 0 < rel(x2.latents, fp8.latents) < 0.1
  assert 0 < rel(x2.latents, base.latents) < 0.1
  with pytest.raises(ValueError, match="attention_pv"):
    _run(model, text, attention_precision="int8", attention_pv="fp4")
  with pytest.raises(SystemExit) as exit_info:  # argparse rejects the choice: exit code 2
    cli.main(["generate", "--prompt-embeds", "x.npy", "--attention-pv", "fp4"])
  assert exit_info.value.code == 2
  assert "--attention-pv" in capsys.readouterr().err


def test_forward_takes_the_attention_pv(model):
  """cog.forward passes attention_pv to every block's INT8 attention (xla path on CPU)."""
  import jax.numpy as jnp
  from models.cogvideox import model as cog
  rng = np.random.default_rng(3)
  lat = jnp.asarray(rng.standard_normal((1, 2, CFG.in_channels, CFG.sample_height,
                                         CFG.sample_width)), jnp.float32)
  txt = jnp.asarray(rng.standard_normal((1, CFG.max_text_seq_length, CFG.text_embed_dim)),
                    jnp.float32)
  t = jnp.asarray([500])
  outs = {pv: np.asarray(cog.forward(model.params, lat, t, txt, config=CFG,
                                     attention_precision="int8", attention_pv=pv), np.float32)
          for pv in ("fp8", "fp8x2")}
  bf16 = np.asarray(cog.forward(model.params, lat, t, txt, config=CFG), np.float32)
  assert np.all(np.isfinite(outs["fp8x2"]))
  assert 0 < rel(outs["fp8x2"], outs["fp8"]) < 0.1
  assert 0 < rel(outs["fp8x2"], bf16) < 0.1
