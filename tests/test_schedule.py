"""The per-iteration learning rate: linear warm-up from 0, then cosine to 0."""
import math

import pytest

from optim import learning_rate

LR, WARM, TOTAL = 0.1, 5 * 196, 500 * 196  # the benchmark: 5 warm-up epochs of 196 steps, 500 epochs


def test_starts_at_zero():
    assert learning_rate(0, LR, WARM, TOTAL) == 0.0


def test_warm_up_is_linear():
    assert learning_rate(WARM // 2, LR, WARM, TOTAL) == pytest.approx(LR * (WARM // 2) / WARM)
    assert learning_rate(WARM - 1, LR, WARM, TOTAL) == pytest.approx(LR * (WARM - 1) / WARM)


def test_peak_at_end_of_warm_up():
    assert learning_rate(WARM, LR, WARM, TOTAL) == pytest.approx(LR)


def test_half_way_through_the_cosine_is_half_the_peak():
    middle = WARM + (TOTAL - WARM) // 2
    assert learning_rate(middle, LR, WARM, TOTAL) == pytest.approx(LR / 2)


def test_ends_at_zero():
    assert learning_rate(TOTAL, LR, WARM, TOTAL) == pytest.approx(0.0, abs=1e-15)
    last = learning_rate(TOTAL - 1, LR, WARM, TOTAL)
    assert 0 < last < 1e-9 and last == pytest.approx(LR * (1 + math.cos(math.pi * (TOTAL - 1 - WARM) / (TOTAL - WARM))) / 2)


def test_constant_after_warm_up():
    assert learning_rate(TOTAL - 1, LR, WARM, TOTAL, decay="constant") == LR


def test_no_warm_up():
    assert learning_rate(0, LR, 0, TOTAL) == LR
