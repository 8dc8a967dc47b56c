"""Results do not move under refactoring: each case of tests/golden.py gives the tokens and float32
coefficients recorded in tests/fixtures/golden.json, bit for bit (recorded at 9a1e649, before the
thin-toolkit layout)."""
import json

import pytest

import golden

CASES = json.loads(golden.FILE.read_text())


def _check(case, hf_home):
    want = CASES[case]
    got = golden.compute(case)
    assert got["token_ids"] == want["token_ids"]
    assert got["tokens"] == want["tokens"]
    assert got["coefficients"] == want["coefficients"]  # exact: float32 values round-trip through JSON


@pytest.mark.parametrize("case", golden.CASES)
def test_decomposition_is_bit_identical_to_the_recorded_one(case, fake_hub):
    _check(case, fake_hub)


@pytest.mark.slow
@pytest.mark.parametrize("case", golden.SLOW_CASES)
def test_toy_profile_fruit_is_bit_identical(case, fake_hub):
    _check(case, fake_hub)
