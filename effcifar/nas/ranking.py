"""Ranking quality of a supernet: does its accuracy order subnets the way standalone training does?

`RankingReport.compute(supernet_acc, standalone_acc)` gives Kendall's tau-b, Spearman's rho and
the overlap of the top 20%; `scatter_plot` draws one against the other. Tau and rho are SciPy's
(tau-b, average ranks for ties); a constant input has no order, so its tau and rho are NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from effcifar.atomic import atomic_write_with


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Two finite float arrays of one length >= 2, or a ValueError saying what is wrong."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"expected two flat sequences of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a ranking needs at least 2 points, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("accuracies must be finite numbers (no NaN or infinity)")
    return x, y


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b: pair agreement of the two orders, corrected for ties (NaN if one input is constant)."""
    x, y = paired(a, b)
    with warnings.catch_warnings():  # a constant input warns and gives NaN: that NaN is the answer
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.kendalltau(x, y, variant="b").statistic)


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (NaN if one input is constant)."""
    x, y = paired(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic)


def top_overlap(a: Sequence[float], b: Sequence[float], fraction: float = 0.2) -> float:
    """Share of a's best k that are also b's best k, k = max(1, round(fraction * n)); ties go to the earlier point."""
    x, y = paired(a, b)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * len(x)))
    best = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731
    return len(best(x) & best(y)) / k


@dataclass(frozen=True)
class RankingReport:
    """How well supernet accuracy predicts standalone accuracy over n subnets."""

    n: int
    tau: float
    rho: float
    top_overlap: float  # of the top 20%

    @classmethod
    def compute(cls, supernet_acc: Sequence[float], standalone_acc: Sequence[float]) -> RankingReport:
        """All three measures for one paired sample."""
        x, y = paired(supernet_acc, standalone_acc)
        return cls(len(x), kendall_tau(x, y), spearman_rho(x, y), top_overlap(x, y))


def scatter_plot(supernet_acc: Sequence[float], standalone_acc: Sequence[float], path: str | Path, *,
                 title: str = "") -> None:
    """Write a PNG of standalone against supernet accuracy, annotated with tau and rho, atomically."""
    report = RankingReport.compute(supernet_acc, standalone_acc)
    figure = Figure(figsize=(5, 4.5), layout="constrained")  # no pyplot: no global figure state
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(supernet_acc, standalone_acc, s=18, alpha=0.8)
    ax.set_xlabel("supernet accuracy")
    ax.set_ylabel("standalone accuracy")
    ax.set_title(title or f"ranking of {report.n} subnets")
    ax.text(0.03, 0.97, f"Kendall τ = {report.tau:.3f}\nSpearman ρ = {report.rho:.3f}", transform=ax.transAxes,
            va="top", ha="left", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.grid(alpha=0.3)
    atomic_write_with(path, lambda f: figure.savefig(f, format="png", dpi=120))
