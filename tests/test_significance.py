"""The significance of a grid's comparisons, against cases computed by hand."""

import math

import pytest

from sweeps.significance import holm, seeds_for, sign_flip_floor, sign_flip_p, t_p_value


def test_holm_multiplies_the_kth_smallest_p_by_m_minus_k_plus_one_and_keeps_the_order():
    # m = 4: 0.01·4 = 0.04, 0.02·3 = 0.06, 0.03·2 = 0.06, 0.5·1 = 0.5 (given out of order)
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # monotone: a later adjusted p never falls below an earlier one (0.012·3 = 0.036 < 0.011·4 = 0.044)
    assert holm([0.011, 0.012, 0.2, 0.9]) == pytest.approx([0.044, 0.044, 0.4, 0.9])
    adjusted = holm([0.2, math.nan, 0.6])  # NaN stays NaN and is not a comparison: m = 2
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 0.8 · 2 capped at 1, and 0.9 · 1 may not fall below it


def test_the_sign_flip_test_counts_the_sign_patterns_at_least_as_extreme():
    # pairs +1, +2, +3: of the 8 patterns only all-plus and all-minus reach |mean| 2 -> 2/8
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # +1, +2, -3: |mean| 0; every pattern is at least as extreme
    assert sign_flip_p([1.0, 2.0, -3.0]) == pytest.approx(1.0)
    # +3, +1, -1: |mean| 1; patterns with |±3 ±1 ±1| >= 3: (3,1,-1),(3,-1,1),(3,1,1) and their negatives -> 6/8
    assert sign_flip_p([3.0, 1.0, -1.0]) == pytest.approx(0.75)
    assert sign_flip_p([0.05, 0.04]) == pytest.approx(0.5)  # two pairs can never go below 0.5
    assert math.isnan(sign_flip_p([]))


def test_the_sign_flip_floor_says_how_many_seeds_a_grid_needs():
    assert [sign_flip_floor(n) for n in (1, 2, 5, 6)] == pytest.approx([1.0, 0.5, 0.0625, 0.03125])
    assert seeds_for(0.05) == 6 and seeds_for(0.01) == 8


def test_the_t_p_value_is_students_two_sided_tail():
    # t = 2 on 1 degree of freedom: 2 · (1/2 − atan(2)/π) = 0.2952; on infinite ones the normal's 0.0455
    assert t_p_value(0.02, 0.01, 1) == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-9)
    assert t_p_value(-0.02, 0.01, math.inf) == pytest.approx(0.0455, abs=1e-4)
    assert math.isnan(t_p_value(0.02, math.nan, 3)) and math.isnan(t_p_value(0.02, 0.01, 0))
