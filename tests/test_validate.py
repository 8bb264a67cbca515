"""The shared argument check: one rule, one message shape."""

import pytest

from cogview.validate import check_int


def test_check_int_accepts_ints_in_range_and_names_the_rest():
    assert check_int("n", 3) == 3 and check_int("k", 0, 0) == 0 and check_int("c", 8, 1, 8) == 8
    for value in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=rf"n={value!r} must be an int >= 1"):
            check_int("n", value)
    with pytest.raises(ValueError, match=r"c=9 must be an int in 1\.\.8 \(codebook entries\)"):
        check_int("c", 9, 1, 8, meaning="codebook entries")
