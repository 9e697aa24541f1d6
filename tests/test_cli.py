"""The `mpqjax` console script: --help, --version, exit codes, the demo; the package's lazy
top-level names (so that --help does not import jax)."""
import subprocess
import sys
import textwrap

import pytest

from mpqjax import __version__
from mpqjax.cli import SUBCOMMANDS, main


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mpqjax", *args], capture_output=True, text=True,
                        timeout=300)


def test_version_and_help():
  r = run_cli("--version")
  assert r.returncode == 0 and r.stdout.strip() == f"mpqjax {__version__}"
  r = run_cli("--help")
  assert r.returncode == 0
  for name in SUBCOMMANDS:
    assert name in r.stdout


def run_python(code):
  """Runs `code` in a fresh interpreter (so nothing is imported yet); returns its stdout."""
  r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_help_does_not_import_jax():
  # build_parser() imports every subcommand module (for their arguments), as --help does
  out = run_python("""
      import sys
      from mpqjax import cli
      try:
        cli.main(["--help"])
      except SystemExit as e:
        assert e.code == 0, e.code
      heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))
      assert not heavy, heavy[:5]
      print("ok")
      """)
  assert out.splitlines()[-1] == "ok"


def test_lazy_top_level_names_resolve():
  out = run_python("""
      import sys, types
      import mpqjax
      assert "jax" not in sys.modules
      assert mpqjax.quantize_int8 is mpqjax.formats.quantize_int8
      assert "jax" in sys.modules
      # importing the submodule mpqjax.qlinear first must not shadow the exported function
      import mpqjax.qlinear
      from mpqjax import qlinear
      assert qlinear is mpqjax.qlinear is sys.modules["mpqjax.qlinear"].qlinear
      assert mpqjax.Mode is sys.modules["mpqjax.qlinear"].Mode
      # attention stays the (callable) module
      import mpqjax.attention
      assert mpqjax.attention is sys.modules["mpqjax.attention"]
      assert isinstance(mpqjax.attention, types.ModuleType) and callable(mpqjax.attention)
      assert mpqjax.load_transformer is sys.modules["mpqjax.loading"].load_transformer
      assert set(mpqjax.__all__) <= set(dir(mpqjax))
      for name in mpqjax.__all__:
        getattr(mpqjax, name)
      try:
        mpqjax.no_such_name
      except AttributeError as e:
        assert "no_such_name" in str(e)
      else:
        raise AssertionError("no AttributeError")
      print("ok")
      """)
  assert out.splitlines()[-1] == "ok"


def test_no_command_and_unknown_command_exit_2(capsys):
  assert main([]) == 2
  with pytest.raises(SystemExit) as e:
    main(["frobnicate"])
  assert e.value.code == 2


def test_demo_runs_and_reports_all_modes():
  r = run_cli("demo", "--tokens", "32", "--in-features", "256", "--out-features", "128")
  assert r.returncode == 0, r.stderr
  assert "NVFP4" in r.stdout and "INT8" in r.stdout and "BF16" in r.stdout
  assert "one compilation served all modes: True" in r.stdout


def test_demo_bad_flag_is_a_message_not_a_traceback():
  r = run_cli("demo", "--in-features", "100")
  assert r.returncode == 2
  assert "in-features" in r.stderr and "Traceback" not in r.stderr
