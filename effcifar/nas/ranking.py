"""Ranking quality of a supernet: does its accuracy order subnets the way standalone training does?

`RankingReport.compute(supernet_acc, standalone_acc)` gives Kendall's tau-b, Spearman's rho and
the overlap of the top 20%; `scatter_plot` draws one against the other. Tau and rho are SciPy's
(tau-b, average ranks for ties); a constant input has no order, so its tau and rho are NaN.

Against a benchmark table, `compare_rankers` scores the supernet next to the rankers it must
beat to be worth its cost (FLOPs, parameters) and the ceiling (one training seed against
another), and `tau_difference` says whether its lead over FLOPs is above the sampling noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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


def score_label(score: str) -> str:
    """The axis label of a supernet score: accuracy, or the negative held-out loss (higher is better for both)."""
    return "supernet accuracy (held out)" if score == "accuracy" else "supernet score: −held-out loss"


def scatter_plot(supernet_acc: Sequence[float], standalone_acc: Sequence[float], path: str | Path, *,
                 title: str = "", ylabel: str = "standalone accuracy", xlabel: str = "supernet accuracy") -> None:
    """Write a PNG of standalone against supernet accuracy, annotated with tau and rho, atomically."""
    report = RankingReport.compute(supernet_acc, standalone_acc)
    figure = Figure(figsize=(5, 4.5), layout="constrained")  # no pyplot: no global figure state
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(supernet_acc, standalone_acc, s=18, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"ranking of {report.n} subnets")
    ax.text(0.03, 0.97, f"Kendall τ = {report.tau:.3f}\nSpearman ρ = {report.rho:.3f}", transform=ax.transAxes,
            va="top", ha="left", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.grid(alpha=0.3)
    atomic_write_with(path, lambda f: figure.savefig(f, format="png", dpi=120))


TOP_FRACTION = 0.1  # "the top 10%": where a search's winner comes from, and where rankers disagree most


@dataclass(frozen=True)
class RankerQuality:
    """How well one ranker orders n architectures against the truth."""

    name: str
    tau: float  # Kendall tau-b over all n
    rho: float  # Spearman rho over all n
    tau_top: float  # Kendall tau-b among the truth's best 10%
    top_overlap: float  # share of the truth's best 10% that are also the ranker's best 10%


def ranker_quality(name: str, scores: Sequence[float], truth: Sequence[float],
                   top_fraction: float = TOP_FRACTION) -> RankerQuality:
    """Kendall tau-b, Spearman rho, tau within the truth's top fraction and top-fraction overlap."""
    x, y = paired(scores, truth)
    top = np.argsort(-y, kind="stable")[:max(2, round(top_fraction * len(y)))]
    return RankerQuality(name, kendall_tau(x, y), spearman_rho(x, y), kendall_tau(x[top], y[top]),
                         top_overlap(x, y, top_fraction))


def seed_ceiling(seed_accs: np.ndarray, top_fraction: float = TOP_FRACTION) -> RankerQuality:
    """One training seed ranking the architectures as judged by another, averaged over every ordered pair of seeds.

    `seed_accs` is n x seeds. No ranker can agree with a retraining better than a retraining
    agrees with itself, so this is the ceiling; NaN when there is only one seed.
    """
    seeds = seed_accs.shape[1]
    pairs = [ranker_quality("seed", seed_accs[:, i], seed_accs[:, j], top_fraction)
             for i in range(seeds) for j in range(seeds) if i != j]
    mean = lambda field: float(np.mean([getattr(q, field) for q in pairs])) if pairs else float("nan")  # noqa: E731
    return RankerQuality("one seed vs another (ceiling)", mean("tau"), mean("rho"), mean("tau_top"), mean("top_overlap"))


def null_tau_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between two independent random orders of n items (the noise floor)."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def tau_difference(a: Sequence[float], b: Sequence[float], truth: Sequence[float], resamples: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """(tau(a) - tau(b), its standard error by a paired bootstrap over the architectures).

    Both rankers are judged on the same architectures, so their taus are correlated: the paired
    bootstrap measures the noise of the difference itself, not of each tau.
    """
    x, y = paired(a, truth)
    z, _ = paired(b, truth)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(y), len(y))
        diffs.append(kendall_tau(x[i], y[i]) - kendall_tau(z[i], y[i]))
    finite = [d for d in diffs if d == d]  # a resample without spread has no tau
    return kendall_tau(x, y) - kendall_tau(z, y), float(np.std(finite)) if len(finite) > 1 else math.nan


def compare_rankers(truth: Sequence[float], rankers: Mapping[str, Sequence[float]],
                    seed_accs: np.ndarray | None = None) -> list[RankerQuality]:
    """Every ranker's quality against the truth, then the seed-vs-seed ceiling when per-seed accuracies are given."""
    rows = [ranker_quality(name, scores, truth) for name, scores in rankers.items()]
    if seed_accs is not None and seed_accs.shape[1] > 1:
        rows.append(seed_ceiling(seed_accs))
    return rows


def verdict(supernet: RankerQuality, flops: RankerQuality, difference: float, se: float) -> str:
    """One sentence: does the supernet rank better than counting FLOPs, beyond the noise (2 standard errors)?"""
    lead = f"Kendall tau {supernet.tau:.3f} vs {flops.tau:.3f} for FLOPs, difference {difference:+.3f} ± {se:.3f}"
    if difference > 2 * se:
        return f"The supernet ranks better than FLOPs ({lead}): it adds information beyond the model's size."
    if difference < -2 * se:
        return (f"The supernet ranks worse than FLOPs ({lead}): sorting by FLOPs would pick better architectures, "
                f"so this supernet adds no information.")
    return f"The supernet does not beat FLOPs ({lead}, within 2 standard errors): it adds no information beyond FLOPs."
