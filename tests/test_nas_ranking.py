"""Ranking quality measures against hand-computed values, and the scatter plot file."""

import math

import numpy as np
import pytest
from PIL import Image

from effcifar.nas.ranking import RankingReport, kendall_tau, scatter_plot, spearman_rho, top_overlap

A = [1, 2, 3, 4, 5]
B = [1, 2, 2, 4, 3]  # one tie, one swapped pair


def test_tau_b_with_a_tie_matches_hand_computation():
    # 10 pairs: 8 concordant, 1 discordant (4, 3), 1 tied in B -> 7 / sqrt(10 * 9)
    assert kendall_tau(A, B) == pytest.approx(7 / math.sqrt(90))
    assert kendall_tau(B, A) == pytest.approx(7 / math.sqrt(90))


def test_tau_b_with_ties_in_both():
    # x = [1, 1, 2], y = [1, 2, 2]: pairs (0,1) tied in x, (1,2) tied in y, (0,2) concordant -> 1 / sqrt(2 * 2)
    assert kendall_tau([1, 1, 2], [1, 2, 2]) == pytest.approx(0.5)


def test_spearman_uses_average_ranks_for_ties():
    # ranks of B: 1, 2.5, 2.5, 5, 4; centred dot product 8.5, norms sqrt(10) and sqrt(9.5)
    assert spearman_rho(A, B) == pytest.approx(8.5 / math.sqrt(95))


@pytest.mark.parametrize("measure", [kendall_tau, spearman_rho])
def test_perfect_and_reversed_orders_give_plus_and_minus_one(measure):
    x = [0.61, 0.64, 0.70, 0.52, 0.66]
    assert measure(x, [10 * v for v in x]) == pytest.approx(1.0)
    assert measure(x, [-v for v in x]) == pytest.approx(-1.0)


def test_constant_input_has_no_order():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(spearman_rho([1, 2, 3], [5, 5, 5]))


def test_top_overlap_examples():
    x = list(range(10))
    assert top_overlap(x, x) == 1.0  # k = 2
    assert top_overlap(x, [-v for v in x]) == 0.0
    assert top_overlap(x, [0, 1, 2, 3, 4, 5, 6, 7, 9, 100]) == 1.0
    assert top_overlap(x, [0, 1, 2, 3, 4, 5, 6, 100, 8, 7]) == 0.5  # a's best {8, 9}, b's best {7, 8}
    assert top_overlap(x, x[::-1], fraction=0.5) == 0.0
    assert top_overlap([1, 2, 3], [3, 2, 1]) == 0.0  # k = max(1, round(0.6)) = 1


def test_report_collects_all_measures():
    r = RankingReport.compute(np.array(A, dtype=float), B)
    assert r.n == 5 and r.tau == pytest.approx(kendall_tau(A, B)) and r.rho == pytest.approx(spearman_rho(A, B))
    assert r.top_overlap == 0.0  # k = 1: a's best is index 4, b's best index 3


@pytest.mark.parametrize("a, b, match", [
    ([1, 2, 3], [1, 2], "same length"),
    ([1], [1], "at least 2"),
    ([], [], "at least 2"),
    ([1, float("nan")], [1, 2], "finite"),
])
@pytest.mark.parametrize("measure", [kendall_tau, spearman_rho, top_overlap, RankingReport.compute])
def test_bad_inputs_are_value_errors(measure, a, b, match):
    with pytest.raises(ValueError, match=match):
        measure(a, b)


def test_top_overlap_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        top_overlap([1, 2], [1, 2], fraction=0)


def test_scatter_plot_writes_a_png_atomically(tmp_path):
    path = tmp_path / "plots" / "ranking.png"
    scatter_plot([0.50, 0.55, 0.61, 0.58], [0.70, 0.74, 0.78, 0.79], path, title="CIFAR-10 supernet")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["ranking.png"]  # no temporary file left


def test_scatter_plot_checks_inputs_before_writing(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        scatter_plot([0.5, 0.6], [0.7], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
