"""Skip conditions shared by the test files (`from tests.markers import needs_hopper`), one
definition each."""
import pytest

from pallas_kernels import hopper_unavailable_reason

# the Mosaic GPU kernels run natively only here (qlinear_mosaic.MOSAIC.available() is this test)
ON_HOPPER = hopper_unavailable_reason() is None
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (H100/H200)")
