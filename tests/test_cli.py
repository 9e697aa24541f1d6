"""The `mpqjax` console script: --help, --version, exit codes, the demo."""
import subprocess
import sys

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
