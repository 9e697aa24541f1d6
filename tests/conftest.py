import os
import zlib

# Mosaic GPU's interpreter (the kernels' CPU tests) runs every warpgroup of every CTA as its
# own XLA computation on the CPU client's thread pool, whose size defaults to the core count,
# and barrier waits hold their pool thread: with 2 cores, 3 warpgroups deadlock whenever the
# producer's computation is not scheduled (the interpreter's "random stalls", NOTES.md
# "Session 15"). The pool must have a thread per interpreted warpgroup; set before JAX starts.
os.environ.setdefault("PJRT_NPROC", "32")

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A fresh generator per test, seeded from the test's id so a failure reproduces."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def model():
  """The generate tests' tiny CogVideoX (tests/generate_tiny.py); modules may override it."""
  from tests import generate_tiny
  return generate_tiny.build_model()


@pytest.fixture(scope="module")
def text():
  from tests import generate_tiny
  return generate_tiny.build_text()
