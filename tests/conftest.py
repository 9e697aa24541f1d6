import zlib

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
