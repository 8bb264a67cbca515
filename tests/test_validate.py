"""The shared argument check: one rule, one message shape."""

import numpy as np
import pytest

from cogview.callbacks.monitor import NaNMonitor
from cogview.data.stream import TokenShardStream
from cogview.validate import check_int, grid_side


def test_check_int_accepts_ints_in_range_and_names_the_rest():
    assert check_int("n", 3) == 3 and check_int("k", 0, 0) == 0 and check_int("c", 8, 1, 8) == 8
    for value in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=rf"n={value!r} must be an int >= 1"):
            check_int("n", value)
    with pytest.raises(ValueError, match=r"c=9 must be an int in 1\.\.8 \(codebook entries\)"):
        check_int("c", 9, 1, 8, meaning="codebook entries")


def test_check_int_takes_numpy_integers_and_returns_a_python_int():
    value = check_int("size", np.int64(64), 8)
    assert value == 64 and type(value) is int
    with pytest.raises(ValueError, match=r"size=np\.int64\(4\) must be an int >= 8"):
        check_int("size", np.int64(4), 8)
    with pytest.raises(ValueError, match=r"must be an int >= 1"):
        check_int("n", np.float32(3.0))


def test_every_package_check_uses_the_shared_message(tmp_path):
    """Counts from configs and constructors name the key, the value and the range."""
    with pytest.raises(ValueError, match=r"NaNMonitor max_consecutive_skips=0 must be an int >= 1"):
        NaNMonitor(max_consecutive_skips=0)
    with pytest.raises(ValueError, match=r"data\.batch_size=0 must be an int >= 1"):
        TokenShardStream([str(tmp_path / "a.tar")], None, batch_size=0)


def test_grid_side_names_counts_that_are_not_square():
    assert grid_side(64) == 8 and grid_side(1024) == 32
    for value in (0, 63, -4, 64.0, True):
        with pytest.raises(ValueError, match=rf"image_tokens={value!r} must be a positive square"):
            grid_side(value)
