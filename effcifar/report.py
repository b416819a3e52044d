"""The HTML report of a run directory: PNG plots (matplotlib) and one self-contained report.html.

`write_report("runs/NAME")` looks at what the directory holds, draws every section it can and
writes `runs/NAME/report/report.html` beside its PNGs (referenced by relative path; no script,
stylesheet or font from elsewhere, so the folder opens offline). It works on a partial run:
what exists is drawn, and what is missing is named with the command that produces it.

What a directory can be (checked in this order):
- a pipeline directory: any of the subdirectories `baseline`, `hpo`, `hpo_best`, `supernet`,
  `search`, `select`, `retrain`, `nas_eval`, or `results.json`. Each subdirectory is one of the kinds
  below; `retrain` holds the NAS answer's run in `answer/` (or only `retrain.json` when the incumbent
  won and the HPO best's run is the answer). `results.json` is the
  final table: `[{"name": "baseline"|"hpo"|"nas", "test_acc": float, "train_time": float,
  "params": int, "flops": int}, ...]` (accuracy as a fraction, train time in seconds).
- a ranking result: `ranking.json` holding `{"supernet_acc": [float, ...], "standalone_acc":
  [float, ...]}`, the same subnets in the same order (supernet accuracy after BN recalibration,
  accuracy trained from scratch); other keys (e.g. "archs") are allowed and ignored.
- an HPO run: `hpo.yaml` and its study (`effcifar hpo run`).
- a search run: `search.yaml` and its study (`effcifar search`).
- a supernet run: `logs.tsv` with a `valid_panel_mean` column (`effcifar supernet train`).
- a training run: `logs.tsv` with a `valid_acc` column; `summary.json` (with `test_acc`) once it
  has finished (`effcifar train`).
Anything else is a one-line ConfigError, and so is a file of a single run that cannot be read (not
UTF-8, not JSON, a logs.tsv without its columns); in a pipeline directory such a part becomes a
remark in the report. The output directory is locked while the report is written (studies are
opened read-only: a report never creates one).
"""

from __future__ import annotations

import collections
import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from effcifar.atomic import atomic_write, atomic_write_with
from effcifar.config import build_config, read_json, read_text
from effcifar.errors import ConfigError, EffcifarError
from effcifar.nas.ranking import RankingReport, scatter_plot
from effcifar.nas.samplers import GENERATION_ATTR
from effcifar.rundir import locked

# Pipeline stages in report order: (subdirectory, title, command that produces it).
STAGES = (
    ("baseline", "Baseline training", "effcifar train --out {run}/baseline"),
    ("hpo", "Hyper-parameter search", "effcifar hpo run --out {run}/hpo"),
    ("hpo_best", "HPO best, retrained", "effcifar train --config {run}/hpo/best.json --holdout 0 --out {run}/hpo_best"),
    ("supernet", "Supernet training", "effcifar supernet train --out {run}/supernet"),
    ("search", "Architecture search", "effcifar search {run}/supernet --out {run}/search"),
    ("select", "Selection by real training", "effcifar select {run}/search --out {run}/select"),
    ("retrain", "The NAS answer, retrained", "effcifar train --arch {run}/select/answer.json --out {run}/retrain/answer"),
    ("nas_eval", "Supernet ranking quality", "effcifar nas-eval {run}"),
)
RESULTS = "results.json"
RESULTS_COMMAND = "effcifar pipeline"
TRAINING_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc")  # of logs.tsv, drawn
SUPERNET_COLUMNS = ("epoch", "train_loss", "valid_panel_mean", "space_size")
DPI = 100


@dataclass
class Section:
    """One part of the report: PNGs beside report.html, an optional table, and remarks."""

    title: str
    source: Path
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # header row first
    error: str | None = None  # why the section could not be drawn


@dataclass
class Report:
    """What write_report produced: the page, its sections, and what is missing (name, command)."""

    path: Path
    sections: list[Section]
    missing: list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# Reading run directories


def read_tsv(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """A logs.tsv as rows of numbers ([] if absent); a ConfigError names the file if a column is missing or not numeric."""
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(read_text(path, "log")), delimiter="\t")
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{path}: expected the columns {', '.join(columns)}; missing {', '.join(missing)}")
    rows = list(reader)
    for line, row in enumerate(rows, 2):
        for name, value in row.items():
            try:
                row[name] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: line {line}: column '{name}': expected a number, got {value!r}") from None
    return rows


def _tsv_columns(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return read_text(path, "log").partition("\n")[0].split("\t")


def run_kind(run_dir: Path) -> str | None:
    """'pipeline', 'ranking', 'hpo', 'search', 'supernet', 'training', or None for anything else."""
    if (run_dir / RESULTS).is_file() or any((run_dir / name).is_dir() for name, _, _ in STAGES):
        return "pipeline"
    if (run_dir / "ranking.json").is_file():
        return "ranking"
    if (run_dir / "hpo.yaml").is_file():
        return "hpo"
    if (run_dir / "search.yaml").is_file():
        return "search"
    if (run_dir / "select.yaml").is_file():
        return "selection"
    columns = _tsv_columns(run_dir / "logs.tsv")
    if "valid_panel_mean" in columns:
        return "supernet"
    if "valid_acc" in columns:
        return "training"
    return None


def training_runs(run_dir: Path) -> list[Path]:
    """The training runs of a directory: itself, or its subfolders that are (top_0, top_1, ...)."""
    if run_kind(run_dir) == "training":
        return [run_dir]
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and run_kind(p) == "training"),
                  key=lambda p: (len(p.name), p.name))


def load_study(config_cls: type, config_file: Path) -> optuna.Study:
    """The study of an HPO or search run, opened read-only (nothing is created; see `effcifar.studies.load_study`)."""
    from effcifar import studies

    return studies.load_study(build_config(config_cls, config_file), config_file.parent)


# ---------------------------------------------------------------------------------------------
# Figures


def new_figure(width: float = 10, height: float = 4) -> Figure:
    """A figure with its own Agg canvas (no pyplot global state)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_dir: Path, name: str, section: Section) -> None:
    """Write the figure as out_dir/name atomically and add it to the section (epochs, trials: integer ticks)."""
    for ax in figure.axes:
        if ax.get_xlabel() in ("epoch", "trial", "generation"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    atomic_write_with(out_dir / name, lambda f: figure.savefig(f, format="png", dpi=DPI))
    section.images.append(name)


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower x and higher y), sorted by x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -math.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def draw_front(ax: Any, x: Sequence[float], y: Sequence[float], label: str) -> None:
    """All points, and the Pareto front (lower x, higher y) highlighted as a step line."""
    ax.scatter(x, y, s=18, alpha=0.6, label="trials")
    front = pareto_front(x, y)
    ax.step([x[i] for i in front], [y[i] for i in front], where="post", color="tab:red", lw=1.5)
    ax.scatter([x[i] for i in front], [y[i] for i in front], s=40, color="tab:red", label=label, zorder=3)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)


def best_so_far(values: Sequence[float]) -> list[float]:
    """Running maximum."""
    return np.maximum.accumulate(np.asarray(values, dtype=float)).tolist() if len(values) else []


# ---------------------------------------------------------------------------------------------
# Sections


def training_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Loss and accuracy per epoch of one or several training runs, and their summaries."""
    section = Section(title, run_dir)
    runs = training_runs(run_dir)
    if not runs:
        section.notes.append(f"No training run in {run_dir} yet (expected logs.tsv with valid_acc).")
        return section
    figure = new_figure()
    loss_ax, acc_ax = figure.subplots(1, 2)
    section.table.append(["run", "epochs", "test accuracy", "train time (s)", "params", "MFLOPs"])
    for i, run in enumerate(runs):
        rows, color = read_tsv(run / "logs.tsv", TRAINING_COLUMNS), f"C{i}"
        label = run.name if len(runs) > 1 else ""
        epochs = [r["epoch"] for r in rows]
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "--", color=color, label=f"{label} train".strip())
            ax.plot(epochs, [r[f"valid_{metric}"] for r in rows], "-o", ms=3, color=color,
                    label=f"{label} valid".strip())
        summary_file = run / "summary.json"
        summary = read_json(summary_file) if summary_file.is_file() else {}
        if "test_acc" not in summary:
            section.notes.append(f"{run.name}: no summary.json yet (the run has not finished); "
                                 f"curves show {len(rows)} epochs.")
            continue
        section.table.append([run.name, str(summary.get("epochs_run", len(rows))), f"{summary['test_acc']:.2%}",
                              f"{summary['train_time']:.1f}", f"{summary['params']:,}",
                              f"{summary['flops'] / 1e6:,.1f}"])
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"{title}: training curves")
    save_figure(figure, out_dir, f"{prefix}_curves.png", section)
    if len(section.table) == 1:
        section.table = []
    return section


def hpo_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """History, accuracy against train time, parameter importances and parallel coordinates of a study."""
    from effcifar.hpo.study import HpoConfig

    section = Section(title, run_dir)
    trials = load_study(HpoConfig, run_dir / "hpo.yaml").get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and "accuracy" in t.user_attrs]
    counts = collections.Counter(t.state.name.lower() for t in trials)
    states = ", ".join(f"{n} {state}" for state, n in counts.items())
    section.notes.append(f"{len(trials)} trials: {states or 'none yet'}.")
    if not complete:
        section.notes.append("No complete trial yet: nothing to plot.")
        return section

    figure = new_figure(7, 4)
    ax = figure.add_subplot()
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "accuracy" in t.user_attrs]
    ax.scatter([t.number for t in complete], [t.user_attrs["accuracy"] for t in complete], s=20, label="complete")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.user_attrs["accuracy"] for t in pruned], s=20, marker="x",
                   color="gray", label="pruned (last epoch)")
    ax.step([t.number for t in complete], best_so_far([t.user_attrs["accuracy"] for t in complete]), where="post",
            color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="validation accuracy", title=f"{title}: history")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(figure, out_dir, f"{prefix}_history.png", section)

    figure = new_figure(7, 4)
    ax = figure.add_subplot()
    draw_front(ax, [t.user_attrs["train_time"] for t in complete], [t.user_attrs["accuracy"] for t in complete],
               "Pareto front")
    ax.set(xlabel="train time (s)", ylabel="validation accuracy", title=f"{title}: accuracy vs train time")
    save_figure(figure, out_dir, f"{prefix}_pareto.png", section)

    importances, reason = param_importances(complete)
    if importances:
        figure = new_figure(7, 0.6 + 0.4 * len(importances))
        ax = figure.add_subplot()
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance for accuracy (PED-ANOVA, normalised)", title=f"{title}: parameter importances")
        ax.grid(alpha=0.3, axis="x")
        save_figure(figure, out_dir, f"{prefix}_importance.png", section)
    else:
        section.notes.append(f"Parameter importances not drawn: {reason}.")

    if any(t.params for t in complete):
        parallel_coordinates(complete, title, out_dir, f"{prefix}_parallel.png", section)
    return section


def param_importances(complete: list[FrozenTrial]) -> tuple[dict[str, float], str]:
    """PED-ANOVA importances of the parameters for accuracy, or ({}, why not).

    PED-ANOVA needs nothing beyond Optuna (fANOVA would need scikit-learn).
    """
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials, there is {len(complete)}"
    study = optuna.create_study(directions=["maximize"])  # in memory: importances for accuracy alone
    for t in complete:
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                  value=t.user_attrs["accuracy"]))
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return optuna.importance.get_param_importances(study, evaluator=evaluator), ""
    except (ValueError, RuntimeError, ImportError) as e:
        return {}, str(e).splitlines()[0] if str(e) else type(e).__name__


def normalised(t: FrozenTrial, name: str, values: list[Any]) -> float:
    """A parameter's position in [0, 1] among the trials' values (log axis for log distributions)."""
    distribution = t.distributions[name]
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        choices = list(distribution.choices)
        return choices.index(t.params[name]) / max(1, len(choices) - 1)
    scale = np.log if getattr(distribution, "log", False) else (lambda v: v)
    low, high = scale(min(values)), scale(max(values))
    return float((scale(t.params[name]) - low) / (high - low)) if high > low else 0.5


def parallel_coordinates(complete: list[FrozenTrial], title: str, out_dir: Path, name: str, section: Section) -> None:
    """One polyline per trial over its normalised parameters, coloured by accuracy."""
    names = sorted({n for t in complete for n in t.params})
    trials = [t for t in complete if all(n in t.params for n in names)]
    values = {n: [t.params[n] for t in trials] for n in names}
    accs = [t.user_attrs["accuracy"] for t in trials]
    norm = Normalize(min(accs), max(accs) if max(accs) > min(accs) else min(accs) + 1e-9)
    cmap = "viridis"
    figure = new_figure(max(6, 1.6 * len(names) + 2), 4)
    ax = figure.add_subplot()
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    for t, acc in sorted(zip(trials, accs), key=lambda pair: pair[1]):  # best drawn last, on top
        ax.plot(range(len(names)), [normalised(t, n, values[n]) for n in names], color=mappable.to_rgba(acc),
                marker="o", ms=3, alpha=0.8)
    labels = []
    for n in names:
        distribution = trials[0].distributions[n]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            labels.append(f"{n}\n{{{', '.join(map(str, distribution.choices))}}}")
        else:
            labels.append(f"{n}\n{min(values[n]):.3g} … {max(values[n]):.3g}")
    ax.set_xticks(range(len(names)), labels, fontsize="small")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("normalised value")
    for x in range(len(names)):
        ax.axvline(x, color="gray", lw=0.5)
    figure.colorbar(mappable, ax=ax, label="validation accuracy")
    ax.set_title(f"{title}: parallel coordinates")
    save_figure(figure, out_dir, name, section)


def supernet_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Panel accuracies per epoch (largest, smallest, random subnets, mean) with shrink events marked."""
    section = Section(title, run_dir)
    rows = read_tsv(run_dir / "logs.tsv", SUPERNET_COLUMNS)
    if not rows:
        section.notes.append("No epoch finished yet.")
        return section
    if not (run_dir / "supernet.pt").is_file():
        section.notes.append(f"No supernet.pt yet (training not finished); {len(rows)} epochs logged.")
    epochs = [r["epoch"] for r in rows]
    figure = new_figure()
    panel_ax, loss_ax = figure.subplots(1, 2)
    for column in [c for c in rows[0] if c.startswith("valid_") and c != "valid_panel_mean"]:
        style = "-" if column in ("valid_largest", "valid_smallest") else ":"
        panel_ax.plot(epochs, [r[column] for r in rows], style, lw=1, label=column.removeprefix("valid_"))
    panel_ax.plot(epochs, [r["valid_panel_mean"] for r in rows], "-o", color="black", lw=2, ms=4, label="panel mean")
    shrinks = read_json(run_dir / "shrink_log.json") if (run_dir / "shrink_log.json").is_file() else []
    for i, event in enumerate(shrinks):
        panel_ax.axvline(event["epoch"], color="tab:red", ls="--", lw=1, label="space shrunk" if i == 0 else None)
    if shrinks:
        section.notes.append("Space shrunk after epoch " + ", ".join(str(e["epoch"]) for e in shrinks)
                             + f"; size now {int(rows[-1]['space_size']):,} architectures.")
    panel_ax.set(xlabel="epoch", ylabel="held-out accuracy (BN recalibrated)", title="reference panel")
    panel_ax.legend(fontsize="small")
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "-o", ms=3)
    loss_ax.set(xlabel="epoch", ylabel="train loss (sampled paths)", title="training loss")
    for ax in (panel_ax, loss_ax):
        ax.grid(alpha=0.3)
    figure.suptitle(f"{title}: panel curves")
    save_figure(figure, out_dir, f"{prefix}_panel.png", section)
    return section


def search_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Evolution progress (per generation, or best so far per trial) and accuracy vs FLOPs of the candidates."""
    from effcifar.nas.search import SearchConfig

    section = Section(title, run_dir)
    trials = load_study(SearchConfig, run_dir / "search.yaml").get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and {"accuracy", "flops"} <= set(t.user_attrs)]
    section.notes.append(f"{len(trials)} trials, {len(complete)} evaluated candidates, "
                         f"{len({t.user_attrs.get('arch_key') for t in complete})} distinct architectures.")
    if not complete:
        section.notes.append("No evaluated candidate yet: nothing to plot.")
        return section

    figure = new_figure(7, 4)
    ax = figure.add_subplot()
    generations: dict[int, list[float]] = {}
    for t in complete:
        if GENERATION_ATTR in t.system_attrs:
            generations.setdefault(t.system_attrs[GENERATION_ATTR], []).append(t.user_attrs["accuracy"])
    if generations:
        gens = sorted(generations)
        ax.plot(gens, [max(generations[g]) for g in gens], "-o", label="best of generation")
        ax.plot(gens, [float(np.mean(generations[g])) for g in gens], "-s", label="mean of generation")
        ax.plot(gens, best_so_far([max(generations[g]) for g in gens]), "--", color="tab:red", label="best so far")
        ax.set(xlabel="generation", title=f"{title}: evolution progress")
    else:
        ax.scatter([t.number for t in complete], [t.user_attrs["accuracy"] for t in complete], s=16, label="candidate")
        ax.step([t.number for t in complete], best_so_far([t.user_attrs["accuracy"] for t in complete]),
                where="post", color="tab:red", label="best so far")
        ax.set(xlabel="trial", title=f"{title}: progress")
    ax.set_ylabel("supernet accuracy (held out)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(figure, out_dir, f"{prefix}_progress.png", section)

    figure = new_figure(7, 4)
    ax = figure.add_subplot()
    draw_front(ax, [t.user_attrs["flops"] / 1e6 for t in complete], [t.user_attrs["accuracy"] for t in complete],
               "Pareto front")
    ax.set(xlabel="MFLOPs per image", ylabel="supernet accuracy (held out)", title=f"{title}: accuracy vs FLOPs")
    save_figure(figure, out_dir, f"{prefix}_flops.png", section)
    return section


def ranking_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Standalone against supernet accuracy, with Kendall's tau and Spearman's rho (ranking.json)."""
    section = Section(title, run_dir)
    path = run_dir / "ranking.json"
    if not path.is_file():
        section.notes.append(f"No ranking.json in {run_dir} yet.")
        return section
    data = read_json(path)
    if not isinstance(data, dict) or not {"supernet_acc", "standalone_acc"} <= set(data):
        raise ConfigError(f"{path}: expected {{\"supernet_acc\": [...], \"standalone_acc\": [...]}}")
    try:
        scores = data.get("supernet_score", data["supernet_acc"])  # what the supernet ranked by (accuracy or -loss)
        report = RankingReport.compute(scores, data["standalone_acc"])
        scatter_plot(scores, data["standalone_acc"], out_dir / f"{prefix}_ranking.png",
                     title=f"{title}: supernet vs standalone")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    section.images.append(f"{prefix}_ranking.png")
    if "rankers" in data:  # nas-eval --table: the supernet beside FLOPs, parameters and the seed-to-seed ceiling
        number = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        section.table = [["ranker", "Kendall τ", "Spearman ρ", "τ in top 10%", "top-10% overlap"]] + [
            [str(r.get("name")), *(number(r.get(k)) for k in ("tau", "rho", "tau_top", "top_overlap"))]
            for r in data["rankers"]]
        section.notes.append(f"{report.n} architectures of {data.get('table')}, stratified over FLOPs; the Kendall τ "
                             f"of two random orders has a standard deviation of {data.get('null_tau_sd', 0):.3f}.")
        section.notes.append(str(data.get("verdict", "")))
        return section
    section.notes.append(f"{report.n} subnets: Kendall τ = {report.tau:.3f}, Spearman ρ = {report.rho:.3f}, "
                         f"top-20% overlap {report.top_overlap:.0%}.")
    return section


def selection_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Every candidate's held-out accuracy by epoch (rungs marked), the table of candidates, and the answer."""
    from effcifar.nas.select import FIXED_ARMS, INCUMBENT, read_selection

    section = Section(title, run_dir)
    if not (run_dir / "select.json").is_file():
        section.notes.append(f"No select.json in {run_dir} yet (the selection has not finished).")
        return section
    result = read_selection(run_dir)
    section.notes.append(result.sentence)
    section.notes.append(f"Candidates trained on the held-out split; held-out accuracy chose, test accuracy is only "
                         f"reported. Training work: {result.image_epochs:,} image-epochs, {result.train_seconds:.0f} s.")
    figure = new_figure(10, 4)
    curves, costs = figure.subplots(1, 2)
    percent = lambda v: "—" if v is None else f"{v:.2%}"  # noqa: E731
    section.notes.append("'Supernet weights': the candidate's held-out accuracy with the supernet's weights and "
                         "recalibrated BN, untrained, as the search judged it; beside it, the accuracy from scratch.")
    section.table.append(["candidate", "source", "state", "supernet weights", "held out by epoch", "held out (final)",
                          "vs width curve", "test", "MFLOPs"])
    points = lambda v: "—" if v is None else f"{v * 100:+.2f}"  # noqa: E731
    for i, r in enumerate(result.rows):
        style = dict(color="black", lw=2.5) if r["name"] == INCUMBENT else dict(color=f"C{i % 10}", lw=1.2)
        epochs = list(range(1, len(r["accuracies"]) + 1))
        curves.plot(epochs, r["accuracies"], "-o", ms=3, label=r["name"], **style)
        if r["holdout_acc"] is not None:
            costs.scatter(r["flops"] / 1e6, r["holdout_acc"], s=60 if r["name"] == result.answer else 25,
                          marker="*" if r["name"] == result.answer else "o", color=style["color"], zorder=3)
            costs.annotate(r["name"], (r["flops"] / 1e6, r["holdout_acc"]), fontsize="x-small",
                           xytext=(4, 4), textcoords="offset points")
        mark = " (answer)" if r["name"] == result.answer else ""
        section.table.append([r["name"] + mark, r["source"], r["state"].lower(), percent(r.get("inherited_acc")),
                              " ".join(f"{v:.1%}" for v in r["accuracies"]), percent(r["holdout_acc"]),
                              points(None if r["holdout_acc"] is None or r.get("curve_acc") is None
                                     else r["holdout_acc"] - r["curve_acc"]),
                              percent(r["test_acc"]), f"{r['flops'] / 1e6:,.1f}"])
    curve = sorted((r["flops"] / 1e6, r["holdout_acc"]) for r in result.rows
                   if r["source"] in FIXED_ARMS and r["holdout_acc"] is not None)
    if len(curve) > 1:
        costs.plot(*zip(*curve), "--", color="black", lw=1, label="ResNet-9 at scaled widths")
        costs.legend(fontsize="x-small", loc="lower right")
    for rung in result.rungs[:-1]:
        curves.axvline(rung, color="grey", ls=":", lw=1)
    curves.set(xlabel="epoch (dotted: rungs)", ylabel="held-out accuracy", title="successive halving")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.legend(fontsize="x-small", loc="lower right")
    costs.set(xlabel="MFLOPs", ylabel="held-out accuracy (final)", title="finished candidates (star: the answer)",
              xscale="log")
    for ax in (curves, costs):
        ax.grid(alpha=0.3)
    save_figure(figure, out_dir, f"{prefix}_selection.png", section)
    return section


def retrain_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """The NAS answer's final run, or the note that the incumbent won and the HPO best's run is the answer."""
    if training_runs(run_dir):
        return training_section(title, run_dir, out_dir, prefix)
    section = Section(title, run_dir)
    rows = read_json(run_dir / "retrain.json", "retraining results")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        section.notes.append(f"{rows[0].get('how', '')}: test accuracy {rows[0].get('test_acc', 0):.2%} "
                             f"({rows[0].get('run', '')}).")
    return section


def results_section(run_dir: Path) -> Section:
    """The final table of results.json: accuracy, train time, params and FLOPs per method."""
    path = run_dir / RESULTS
    section = Section("Final results", path)
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: expected a list of {{name, test_acc, train_time, params, flops}} objects")

    def cell(row: dict[str, Any], key: str, fmt: Callable[[Any], str]) -> str:
        value = row.get(key)
        return fmt(value) if isinstance(value, (int, float)) else "—"

    section.table.append(["method", "test accuracy", "train time (s)", "params", "MFLOPs"])
    for r in rows:
        section.table.append([str(r.get("name", "?")), cell(r, "test_acc", lambda v: f"{v:.2%}"),
                              cell(r, "train_time", lambda v: f"{v:.1f}"), cell(r, "params", lambda v: f"{v:,.0f}"),
                              cell(r, "flops", lambda v: f"{v / 1e6:,.1f}")])
    by_name = {r.get("name"): r for r in rows}
    nas, hpo = by_name.get("nas", {}), by_name.get("hpo", {})
    if isinstance(nas.get("test_acc"), (int, float)) and isinstance(hpo.get("test_acc"), (int, float)):
        verdict = str(nas.get("verdict", ""))
        section.notes.append(f"NAS answer {nas.get('answer', 'nas')}: {nas['test_acc']:.2%} test at "
                             f"{nas.get('flops', 0) / 1e6:,.1f} MFLOPs vs HPO best {hpo['test_acc']:.2%} at "
                             f"{hpo.get('flops', 0) / 1e6:,.1f}: {(nas['test_acc'] - hpo['test_acc']) * 100:+.2f} points "
                             f"(one training seed each; chosen on held-out images). {verdict[:1].upper() + verdict[1:]}")
    return section


SECTIONS: dict[str, Callable[[str, Path, Path, str], Section]] = {
    "training": training_section, "hpo": hpo_section, "supernet": supernet_section, "search": search_section,
    "ranking": ranking_section, "selection": selection_section, "retrain": retrain_section,
}
TITLES = {"training": "Training run", "hpo": "Hyper-parameter search", "supernet": "Supernet training",
          "search": "Architecture search", "ranking": "Supernet ranking quality",
          "selection": "Selection by real training", "retrain": "The NAS answer, retrained"}


def guarded(build: Callable[..., Section], title: str, source: Path, *args: Any) -> Section:
    """build(*args); an unreadable part becomes a remark in the report instead of stopping it."""
    try:
        return build(*args)
    except EffcifarError as e:
        return Section(title, source, notes=[f"Could not be drawn: {e}"], error=str(e))


def pipeline_sections(run_dir: Path, out_dir: Path) -> tuple[list[Section], list[tuple[str, str]]]:
    """Every stage present in a pipeline directory, and the missing ones with their commands."""
    sections, missing = [], []
    if (run_dir / RESULTS).is_file():
        sections.append(guarded(results_section, "Final results", run_dir / RESULTS, run_dir))
    else:
        missing.append((f"final results table ({RESULTS})", RESULTS_COMMAND))
    for name, title, command in STAGES:
        stage = run_dir / name
        kind = run_kind(stage) if stage.is_dir() else None
        if name == "retrain" and stage.is_dir() and (training_runs(stage) or (stage / "retrain.json").is_file()):
            kind = "retrain"
        if kind is None or kind == "pipeline":
            missing.append((f"{title} ({name}/)", command.format(run=run_dir)))
            continue
        sections.append(guarded(SECTIONS[kind], title, stage, title, stage, out_dir, name))
    return sections, missing


# ---------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .3em .8em; }
td { text-align: right; } td:first-child { text-align: left; } th { background: #f3f3f3; }
.source { color: #777; font-size: .9em; } .missing { background: #fff6e0; padding: .6em 1em; border-radius: 4px; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def render_html(run_dir: Path, sections: list[Section], missing: list[tuple[str, str]]) -> str:
    """The report page: sections in order, PNGs by relative path, no script or external resource."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>effcifar report: {e(run_dir.name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>effcifar report: {e(run_dir.name)}</h1>", f'<p class="source">{e(str(run_dir.resolve()))}</p>']
    if missing:
        items = "".join(f"<li>{e(what)}: run <code>{e(command)}</code></li>" for what, command in missing)
        parts.append(f'<div class="missing"><p><strong>Not (yet) available:</strong></p><ul>{items}</ul></div>')
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts.append(f'<p class="source">{e(str(s.source))}</p>')
        parts += [f"<p>{e(note)}</p>" for note in s.notes]
        if s.table:
            header, *rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                         + "</table>")
        parts += [f'<img src="{e(name)}" alt="{e(name)}">' for name in s.images]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Draw every section the run directory allows; write the PNGs and report.html into out_dir."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir) if run_dir.is_dir() else None
    if kind is None:
        raise ConfigError(f"{run_dir}: not a run directory (expected a training, HPO, supernet, search or "
                          f"ranking run, or a pipeline directory with {', '.join(n for n, _, _ in STAGES)})")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    with locked(out, "report"):
        if kind == "pipeline":  # a part that cannot be drawn becomes a remark
            sections, missing = pipeline_sections(run_dir, out)
        else:  # the run is the whole report: what cannot be drawn is a one-line error
            sections, missing = [SECTIONS[kind](TITLES[kind], run_dir, out, kind)], []
        path = out / "report.html"
        atomic_write(path, render_html(run_dir, sections, missing))
    return Report(path, sections, missing)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html and its PNGs (default: run_dir/report/); return the path of report.html."""
    return make_report(run_dir, out_dir).path
