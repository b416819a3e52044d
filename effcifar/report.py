"""The HTML report of a run directory: PNG plots (matplotlib) and one self-contained report.html.

`write_report("runs/NAME")` looks at what the directory holds, draws every section it can and
writes `runs/NAME/report/report.html` beside its PNGs (referenced by relative path; no script,
stylesheet or font from elsewhere, so the folder opens offline). It works on a partial run:
what exists is drawn, and what is missing is named with the command that produces it.

What a directory can be (checked in this order):
- a pipeline directory: any of the subdirectories `baseline`, `hpo`, `hpo_best`, `supernet`,
  `search`, `select`, `retrain`, `nas_eval`, or `results.json`. Each subdirectory is one of the kinds
  below; `select` holds one selection, or a front (one per FLOPs limit in `flops_<M>M/`, `front.json`),
  drawn per limit beside the final results ("What NAS bought, per FLOPs limit"); `retrain` holds the
  NAS answer's run in `answer/` (or only `retrain.json` when the incumbent won and the HPO best's
  run is the answer). A final run trained with several seeds holds one
  training run per seed (`baseline/seed_0/`, ...). `results.json` is the
  final table: `[{"name": "baseline"|"hpo"|"nas", "test_acc": float, "train_time": float,
  "params": int, "flops": int}, ...]` (accuracy as a fraction, train time in seconds; optionally
  `test_accs` and `seeds`, per training seed, and `test_images`). Beside it the report shows what
  each step bought (the differences with their spread), the HPO best's values beside the
  baseline's (`hpo/best.json`, `hpo/search_space.json`) and each stage's wall time (`stage.json`).
- a ranking result: `ranking.json` holding `{"supernet_acc": [float, ...], "standalone_acc":
  [float, ...]}`, the same subnets in the same order (supernet accuracy after BN recalibration,
  accuracy trained from scratch); other keys (e.g. "archs") are allowed and ignored.
- an HPO run: `hpo.yaml` and its study (`effcifar hpo run`).
- a search run: `search.yaml` and its study (`effcifar search`).
- a selection (`select.yaml`, `effcifar select`) or a front of them (`effcifar select --front`).
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
from effcifar.config import build_config, read_config_file, read_json, read_text
from effcifar.errors import ConfigError, EffcifarError
from effcifar.nas.ranking import RankingReport, null_tau_sd, scatter_plot, score_label
from effcifar.nas.samplers import GENERATION_ATTR
from effcifar.rundir import locked, recorded_kind

# Pipeline stages in report order: (subdirectory, title, command that produces it).
STAGES = (
    ("baseline", "Baseline training", "effcifar train --out {run}/baseline"),
    ("hpo", "Hyper-parameter search", "effcifar hpo run --out {run}/hpo"),
    ("hpo_best", "HPO best, retrained", "effcifar train --config {run}/hpo/best.json --out {run}/hpo_best"),
    ("supernet", "Supernet training", "effcifar supernet train --out {run}/supernet"),
    ("search", "Architecture search", "effcifar search {run}/supernet --out {run}/search"),
    ("select", "Selection by real training", "effcifar select {run}/search --out {run}/select"),
    ("retrain", "The NAS answer, retrained", "effcifar pipeline --out {run}"),
    ("nas_eval", "Supernet ranking quality", "effcifar nas-eval {run}/supernet --trials 20 --epochs 10"),
)
RESULTS = "results.json"
RESULTS_COMMAND = "effcifar pipeline"
TRAINING_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc")  # of logs.tsv, drawn
SUPERNET_COLUMNS = ("epoch", "train_loss", "valid_panel_mean", "space_size")
DPI = 100
FEW = 20  # below this many trials or networks, importances and rank correlations are noisy


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
    """'pipeline', 'ranking', 'hpo', 'search', 'selection', 'front', 'retrain', 'supernet', 'training', or None for
    anything else.

    A directory that records another command's kind (`effcifar.rundir`) is not a pipeline even when it holds
    folders named like stages: `select`, `retrain` and `nas-eval` write into the search or supernet they read.
    """
    if recorded_kind(run_dir) in (None, "pipeline") and (
            (run_dir / RESULTS).is_file() or any((run_dir / name).is_dir() for name, _, _ in STAGES)):
        return "pipeline"
    if (run_dir / "ranking.json").is_file():
        return "ranking"
    if (run_dir / "hpo.yaml").is_file():
        return "hpo"
    if (run_dir / "search.yaml").is_file():
        return "search"
    if (run_dir / "select.yaml").is_file():
        return "selection"
    if (run_dir / "front.json").is_file() or any(run_dir.glob("flops_*M/select.yaml")):
        return "front"
    if (run_dir / "retrain.json").is_file():  # `effcifar retrain`: the search's best, trained from scratch
        return "retrain"
    columns = _tsv_columns(run_dir / "logs.tsv")
    if "valid_panel_mean" in columns:
        return "supernet"
    if "valid_acc" in columns:
        return "training"
    return None


def training_runs(run_dir: Path, depth: int = 2) -> list[Path]:
    """The training runs of a directory: itself, or those among its subfolders (top_1, top_2, ...; seed_0,
    seed_1, ... of a final run with several training seeds), `depth` levels down."""
    if run_kind(run_dir) == "training":
        return [run_dir]
    if depth == 0:
        return []
    folders = sorted((p for p in run_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    return [run for folder in folders for run in training_runs(folder, depth - 1)]


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


def pareto_front(x: Sequence[float], y: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats (lower x and better y), sorted by x."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(x)), key=lambda i: (x[i], -sign * y[i]))
    front, best = [], -math.inf
    for i in order:
        if sign * y[i] > best:
            front.append(i)
            best = sign * y[i]
    return front


def legend_outside(ax: Any, **kwargs: Any) -> None:
    """The axes' legend to the right of the plot, where it covers no data point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small", **kwargs)


def draw_front(ax: Any, x: Sequence[float], y: Sequence[float], label: str, higher_is_better: bool = True) -> None:
    """All points, and the Pareto front (lower x, better y) highlighted as a step line."""
    ax.scatter(x, y, s=18, alpha=0.6, label="trials")
    front = pareto_front(x, y, higher_is_better)
    ax.step([x[i] for i in front], [y[i] for i in front], where="post", color="tab:red", lw=1.5)
    ax.scatter([x[i] for i in front], [y[i] for i in front], s=40, color="tab:red", label=label, zorder=3)
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
        label = str(run.relative_to(run_dir)) if len(runs) > 1 else ""
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
        section.table.append([str(run.relative_to(run_dir)) if run != run_dir else run.name,
                              str(summary.get("epochs_run", len(rows))), f"{summary['test_acc']:.2%}",
                              f"{summary['train_time']:.1f}", f"{summary['params']:,}",
                              f"{summary['flops'] / 1e6:,.1f}"])
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    legend_outside(acc_ax)
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
    legend_outside(ax)
    save_figure(figure, out_dir, f"{prefix}_history.png", section)

    figure = new_figure(7, 4)
    ax = figure.add_subplot()
    draw_front(ax, [t.user_attrs["train_time"] for t in complete], [t.user_attrs["accuracy"] for t in complete],
               "Pareto front")
    legend_outside(ax)
    ax.set(xlabel="train time (s)", ylabel="validation accuracy", title=f"{title}: accuracy vs train time")
    save_figure(figure, out_dir, f"{prefix}_pareto.png", section)

    importances, reason = param_importances(complete)
    if importances:
        figure = new_figure(7, 0.6 + 0.4 * len(importances))
        ax = figure.add_subplot()
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance for accuracy (PED-ANOVA, normalised)",
               title=f"{title}: parameter importances ({len(complete)} trials)")
        ax.grid(alpha=0.3, axis="x")
        save_figure(figure, out_dir, f"{prefix}_importance.png", section)
        section.notes.append(f"Parameter importances are estimated from {len(complete)} complete trials"
                             + (f": with fewer than {FEW} they are noisy, a hint rather than a measurement."
                                if len(complete) < FEW else "."))
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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
    legend_outside(panel_ax)
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "-o", ms=3)
    loss_ax.set(xlabel="epoch", ylabel="train loss (sampled paths)", title="training loss")
    for ax in (panel_ax, loss_ax):
        ax.grid(alpha=0.3)
    figure.suptitle(f"{title}: panel curves")
    save_figure(figure, out_dir, f"{prefix}_panel.png", section)
    return section


def search_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Search progress and score against FLOPs of the candidates, by the score that ranks them (held-out loss or
    accuracy), with the search's best (rank 1, exported as top_1) and, in a pipeline, the selected answer marked."""
    from effcifar.nas.search import SCORES, SearchConfig, ranked_results

    section = Section(title, run_dir)
    config = build_config(SearchConfig, run_dir / "search.yaml")
    trials = load_study(SearchConfig, run_dir / "search.yaml").get_trials(deepcopy=False)
    attribute = SCORES[config.score]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and {attribute, "flops"} <= set(t.user_attrs)]
    section.notes.append(f"{len(trials)} trials, {len(complete)} evaluated candidates, "
                         f"{len({t.user_attrs.get('arch_key') for t in complete})} distinct architectures, ranked "
                         f"by held-out {'accuracy' if config.score == 'accuracy' else 'loss'} (the search's score).")
    if not complete:
        section.notes.append("No evaluated candidate yet: nothing to plot.")
        return section
    by_loss = config.score == "loss"
    plotted = (lambda t: t.user_attrs["loss"]) if by_loss else (lambda t: t.user_attrs["accuracy"])  # noqa: E731
    ylabel = "held-out loss (lower is better)" if by_loss else "held-out accuracy"
    best_of = min if by_loss else max

    figure = new_figure(8, 4)
    ax = figure.add_subplot()
    generations: dict[int, list[float]] = {}
    for t in complete:
        if GENERATION_ATTR in t.system_attrs:
            generations.setdefault(t.system_attrs[GENERATION_ATTR], []).append(plotted(t))
    if generations:
        gens = sorted(generations)
        bests = [best_of(generations[g]) for g in gens]
        ax.plot(gens, bests, "-o", label="best of generation")
        ax.plot(gens, [float(np.mean(generations[g])) for g in gens], "-s", label="mean of generation")
        ax.plot(gens, [best_of(bests[:i + 1]) for i in range(len(bests))], "--", color="tab:red",
                label="best so far")
        ax.set(xlabel="generation", title=f"{title}: evolution progress")
    else:
        values = [plotted(t) for t in complete]
        ax.scatter([t.number for t in complete], values, s=16, label="candidate")
        ax.step([t.number for t in complete], [best_of(values[:i + 1]) for i in range(len(values))],
                where="post", color="tab:red", label="best so far")
        ax.set(xlabel="trial", title=f"{title}: progress")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save_figure(figure, out_dir, f"{prefix}_progress.png", section)

    figure = new_figure(8, 4)
    ax = figure.add_subplot()
    flops = [t.user_attrs["flops"] / 1e6 for t in complete]
    draw_front(ax, flops, [plotted(t) for t in complete], "Pareto front", higher_is_better=not by_loss)
    best = ranked_results(complete)[0][0]  # rank 1: what the search exports as top_1.json
    ax.scatter([best.user_attrs["flops"] / 1e6], [plotted(best)], s=220, marker="*", color="gold",
               edgecolors="black", zorder=4, label=f"rank 1 (trial {best.number})")
    answer = selected_trial(run_dir, complete)
    if answer is not None:
        ax.scatter([answer.user_attrs["flops"] / 1e6], [plotted(answer)], s=140, marker="D", facecolors="none",
                   edgecolors="tab:green", linewidths=2, zorder=5, label=f"selected answer (trial {answer.number})")
    legend_outside(ax)
    ax.set(xlabel="MFLOPs per image", ylabel=ylabel, title=f"{title}: {'loss' if by_loss else 'accuracy'} vs FLOPs")
    save_figure(figure, out_dir, f"{prefix}_flops.png", section)
    section.notes.append(f"Rank 1 (star): trial {best.number}, held-out {score_text(best, by_loss)} at "
                         f"{best.user_attrs['flops'] / 1e6:,.1f} MFLOPs.")
    return section


def score_text(t: FrozenTrial, by_loss: bool) -> str:
    """A candidate's held-out figures, the ranking one first."""
    accuracy = f"accuracy {t.user_attrs['accuracy']:.2%}"
    return f"loss {t.user_attrs['loss']:.4f} ({accuracy})" if by_loss else accuracy


def selected_trial(search_dir: Path, complete: list[FrozenTrial]) -> FrozenTrial | None:
    """In a pipeline directory, the search trial whose architecture the selection chose (select/answer.json), if
    the answer is one of the search's networks."""
    answer_file = search_dir.parent / "select" / "answer.json"
    if search_dir.name != "search" or not answer_file.is_file():
        return None
    try:
        arch = read_json(answer_file, "selection answer").get("arch")
    except (ConfigError, AttributeError):
        return None
    return next((t for t in complete if dict(t.params) == arch), None)


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
                     title=f"{title}: supernet vs standalone", xlabel=score_label(data.get("score", "accuracy")))
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
    section.notes.append(f"A τ over {report.n} networks has a noise floor: two random orders of {report.n} give "
                         f"τ with a standard deviation of {null_tau_sd(report.n):.2f}"
                         + (f"; below {FEW} networks, read it as a rough indication only." if report.n < FEW
                            else "."))
    return section


def selection_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """Every candidate's held-out accuracy by epoch (rungs marked), the table of candidates, and the answer."""
    from effcifar.nas.select import FIXED_ARMS, INCUMBENT, above_curve, read_selection

    section = Section(title, run_dir)
    if not (run_dir / "select.json").is_file():
        section.notes.append(f"No select.json in {run_dir} yet (the selection has not finished).")
        return section
    result = read_selection(run_dir)
    section.notes.append(result.sentence)
    section.notes.append(f"Candidates trained on the training images less the held-out ones; held-out accuracy chose, test accuracy is only "
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
                              points(above_curve(r)),
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
    costs.set(xlabel="MFLOPs", ylabel="held-out accuracy (final)", title="finished candidates (star: the answer)")
    for ax in (curves, costs):
        ax.grid(alpha=0.3)
    save_figure(figure, out_dir, f"{prefix}_selection.png", section)
    return section


def front_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """What NAS bought under each FLOPs limit of a selection or a front (`run_dir`): the verified front against
    FLOPs (each limit's answer, the width curve, the HPO best, the candidates behind them), a table, and one sentence
    per limit. In a pipeline (`run_dir` is its select/), the default limit's sentence takes the final runs' seeds."""
    from effcifar.nas.select import FIXED_ARMS, INCUMBENT, read_front

    section = Section(title, run_dir)
    front = read_front(run_dir)
    if not front:
        section.notes.append(f"No finished selection in {run_dir} yet.")
        return section
    results = run_dir.parent / RESULTS
    final = {r.get("name"): r for r in read_results(results)} if run_dir.name == "select" and results.is_file() else {}
    incumbent = next((r for _, _, result in reversed(front) for r in result.rows
                      if r["name"] == INCUMBENT and r["holdout_acc"] is not None), None)
    default = final.get("nas", {}).get("max_flops", front[0][0] if len(front) == 1 else None)
    section.table.append(["FLOPs limit (M)", "answer", "source", "held out", "test", "MFLOPs", "vs HPO best (points "
                          "held out)", "candidates"])
    for limit, directory, result in front:
        seeds = (final["nas"], final["hpo"]) if limit == default and {"nas", "hpo"} <= set(final) else None
        section.notes.append(front_sentence(limit, result, incumbent, holdout_images(directory, result), seeds))
        chosen = result.chosen
        versus = None if incumbent is None else (chosen["holdout_acc"] - incumbent["holdout_acc"]) * 100
        section.table.append(["none" if limit is None else f"{limit / 1e6:.4g}", chosen["name"], chosen["source"],
                              f"{chosen['holdout_acc']:.2%}", "—" if chosen["test_acc"] is None
                              else f"{chosen['test_acc']:.2%}", f"{chosen['flops'] / 1e6:,.2f}",
                              "—" if versus is None else f"{versus:+.2f}", candidate_counts(result.rows)])
    section.notes.append("Held-out accuracy (the training images set aside) chose every answer; test accuracy is "
                         "only reported.")
    figure = new_figure(8, 4.5)
    ax = figure.add_subplot()
    behind = [r for _, _, result in front for r in result.rows
              if r["holdout_acc"] is not None and r["source"] not in FIXED_ARMS]
    ax.scatter([r["flops"] / 1e6 for r in behind], [r["holdout_acc"] for r in behind], s=18, color="grey",
               alpha=0.6, label="candidates (finished)")
    curve = sorted({r["name"]: (r["flops"] / 1e6, r["holdout_acc"]) for _, _, result in front for r in result.rows
                    if r["source"] in FIXED_ARMS and r["holdout_acc"] is not None}.values())
    if curve:
        ax.plot(*zip(*curve), "--o", color="black", lw=1, ms=4, label="ResNet-9 at scaled widths")
    if incumbent is not None:
        ax.scatter([incumbent["flops"] / 1e6], [incumbent["holdout_acc"]], s=90, marker="s", color="black",
                   zorder=4, label="HPO best (incumbent)")
    answers = [(result.chosen["flops"] / 1e6, result.chosen["holdout_acc"]) for _, _, result in front]
    ax.step(*zip(*answers), where="post", color="tab:red", lw=1.5)
    ax.scatter(*zip(*answers), s=200, marker="*", color="tab:red", edgecolors="black", zorder=5,
               label="each limit's answer")
    for i, (limit, _, _) in enumerate(front):
        if limit is not None:
            ax.axvline(limit / 1e6, color="tab:red", ls=":", lw=1, label="FLOPs limits" if i == 0 else None)
    ax.set(xlabel="MFLOPs per image", ylabel="held-out accuracy (final)", title=f"{title}: the verified front")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save_figure(figure, out_dir, f"{prefix}_front.png", section)
    return section


def candidate_counts(rows: list[dict[str, Any]]) -> str:
    """"5: 3 finished, 1 pruned, 1 failed": what happened to a selection's candidates."""
    counts = collections.Counter("finished" if r["holdout_acc"] is not None else r["state"].lower() for r in rows)
    return f"{len(rows)}: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def holdout_images(selection_dir: Path, result: Any) -> int | None:
    """How many held-out images a selection measured its answer on (from the answer's summary.json), if known."""
    from effcifar.nas.select import TRIALS_DIR

    run = result.chosen.get("run")  # a replayed run (the HPO best's), else the candidate's own
    path = (Path(run) if run else selection_dir / TRIALS_DIR / result.answer) / "summary.json"
    summary = read_json(path, "run summary") if path.is_file() else {}
    images = summary.get("dataset", {}).get("valid_images") if isinstance(summary, dict) else None
    return images if is_number(images) else None


def front_sentence(limit: float | None, result: Any, incumbent: dict[str, Any] | None, images: int | None,
                   seeds: tuple[dict[str, Any], dict[str, Any]] | None) -> str:
    """What NAS bought under one FLOPs limit, in one sentence, with the evidence.

    A searched answer is set against the HPO best (the incumbent): by held-out accuracy ± the sampling error of the
    held-out images, or, where the answer's and the HPO best's final runs (`seeds`: the results rows) were trained
    with several seeds, by their test accuracy ± the standard error of the per-seed differences.
    """
    from effcifar.nas.select import FIXED_ARMS

    where = "With no FLOPs limit" if limit is None else f"Under {limit / 1e6:.4g} MFLOPs"
    chosen = result.chosen
    figure = lambda acc, flops: f"{acc:.2%} at {flops / 1e6:,.2f} MFLOPs"  # noqa: E731
    evidence = " " + rung_evidence(result)
    if chosen["source"] in FIXED_ARMS:
        return (f"{where}: no candidate beat the tuned baseline under this limit: the baseline stands "
                f"({chosen['name']}, {figure(chosen['holdout_acc'], chosen['flops'])} held out)." + evidence)
    accs = [seed_accuracies(row) for row in seeds] if seeds is not None else []
    if accs and len(accs[0]) == len(accs[1]) > 1 and seeds[0].get("seeds") == seeds[1].get("seeds"):
        diffs = [(a - b) * 100 for a, b in zip(*accs)]
        se = float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
        return (f"{where}: NAS network {chosen['name']} {figure(float(np.mean(accs[0])), seeds[0]['flops'])} vs HPO "
                f"best {figure(float(np.mean(accs[1])), seeds[1]['flops'])}: {np.mean(diffs):+.2f} ± {se:.2f} s.e. "
                f"points ({len(diffs)} seeds; test accuracy of the final runs, paired by seed)." + evidence)
    if incumbent is None:
        return (f"{where}: NAS network {chosen['name']} {figure(chosen['holdout_acc'], chosen['flops'])} held out; "
                f"the HPO best was not trained on the held-out images (select.incumbent off): nothing to set it "
                f"against." + evidence)
    x, z = chosen["holdout_acc"], incumbent["holdout_acc"]
    se_x, se_z = sampling_se(x, images), sampling_se(z, images)
    spread = f" ± {math.hypot(se_x, se_z) * 100:.2f} s.e." if se_x is not None and se_z is not None else ""
    return (f"{where}: NAS network {chosen['name']} {figure(x, chosen['flops'])} vs HPO best "
            f"{figure(z, incumbent['flops'])}: {(x - z) * 100:+.2f}{spread} points (1 seed; held-out accuracy, "
            f"± its sampling error on {images or 'the'} held-out images)." + evidence)


def rung_evidence(result: Any) -> str:
    """The candidates' held-out accuracy at the last rung, best first, and how many proposals were pruned at which."""
    finished = sorted((r for r in result.rows if r["holdout_acc"] is not None), key=lambda r: -r["holdout_acc"])
    held = ", ".join(f"{r['name']} {r['holdout_acc']:.2%}" for r in finished)
    pruned = collections.Counter(r["epochs"] for r in result.rows if r["state"] == "PRUNED")
    failed = sum(r["state"] == "FAIL" for r in result.rows)
    cut = "; ".join(f"{n} pruned after epoch {epoch}" for epoch, n in sorted(pruned.items())) or "none pruned"
    return (f"Held out at the last rung (epoch {result.rungs[-1]}): {held or 'none finished'}; proposals: {cut}"
            + (f", {failed} failed" if failed else "") + ".")


def retrain_section(title: str, run_dir: Path, out_dir: Path, prefix: str) -> Section:
    """The NAS answer's final run, or the note that the incumbent won and the HPO best's run is the answer."""
    if training_runs(run_dir):
        return training_section(title, run_dir, out_dir, prefix)
    section = Section(title, run_dir)
    rows = read_json(run_dir / "retrain.json", "retraining results")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        section.notes.append(f"{rows[0].get('how', '')}: test accuracy {accuracy_cell(rows[0])} "
                             f"({rows[0].get('run', '')}).")
    return section


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of results.json, checked to be a list of objects."""
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: expected a list of {{name, test_acc, train_time, params, flops}} objects")
    return rows


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_accuracies(row: dict[str, Any]) -> list[float]:
    """A final run's test accuracy per training seed (one value for rows written before seeds were recorded)."""
    accs = row.get("test_accs")
    if isinstance(accs, list) and accs and all(is_number(a) for a in accs):
        return [float(a) for a in accs]
    return [float(row["test_acc"])] if is_number(row.get("test_acc")) else []


def accuracy_cell(row: dict[str, Any]) -> str:
    """Test accuracy: one seed's, or mean ± s.d. over the seeds."""
    accs = seed_accuracies(row)
    if len(accs) > 1:
        return f"{float(np.mean(accs)):.2%} ± {float(np.std(accs, ddof=1)):.2%} (n={len(accs)})"
    return f"{accs[0]:.2%}" if accs else "—"


def sampling_se(accuracy: float, images: Any) -> float | None:
    """The binomial standard error of a test accuracy measured on `images` images (None if unknown)."""
    return math.sqrt(accuracy * (1 - accuracy) / images) if is_number(images) and images > 0 else None


def difference_row(label: str, a: dict[str, Any], b: dict[str, Any]) -> list[str] | None:
    """[comparison, difference, spread, how] of test accuracy a − b in points, or None if either is missing.

    Several seeds (the same in both): the mean of the per-seed differences ± their s.d. (paired by seed).
    One seed: the difference ± its test-set sampling error alone (1 s.e.), since seeds were not varied.
    """
    accs_a, accs_b = seed_accuracies(a), seed_accuracies(b)
    if not accs_a or not accs_b:
        return None
    if a.get("run") is not None and a.get("run") == b.get("run"):
        return [label, "+0.00", "—", "the same run (the incumbent won the selection)"]
    if len(accs_a) == len(accs_b) > 1 and a.get("seeds") == b.get("seeds"):
        diffs = [(x - y) * 100 for x, y in zip(accs_a, accs_b)]
        return [label, f"{np.mean(diffs):+.2f}", f"± {np.std(diffs, ddof=1):.2f} s.d.",
                f"{len(diffs)} training seeds, paired by seed"]
    mean_a, mean_b = float(np.mean(accs_a)), float(np.mean(accs_b))
    se_a, se_b = sampling_se(mean_a, a.get("test_images")), sampling_se(mean_b, b.get("test_images"))
    spread = f"± {math.hypot(se_a, se_b) * 100:.2f} s.e." if se_a is not None and se_b is not None else "—"
    how = "one seed each: test-set sampling error only" if len(accs_a) == len(accs_b) == 1 else \
        f"means over {len(accs_a)} and {len(accs_b)} seeds (not paired): test-set sampling error only"
    return [label, f"{(mean_a - mean_b) * 100:+.2f}", spread, how]


def results_section(run_dir: Path) -> Section:
    """The final table of results.json: accuracy (mean ± s.d. over training seeds), train time, params, FLOPs."""
    path = run_dir / RESULTS
    section = Section("Final results", path)
    rows = read_results(path)

    def cell(row: dict[str, Any], key: str, fmt: Callable[[Any], str]) -> str:
        value = row.get(key)
        return fmt(value) if is_number(value) else "—"

    section.table.append(["method", "test accuracy", "train time (s)", "params", "MFLOPs"])
    for r in rows:
        name = f"{r.get('name', '?')} ({r['answer']})" if "answer" in r else str(r.get("name", "?"))
        section.table.append([name, accuracy_cell(r), cell(r, "train_time", lambda v: f"{v:.1f}"),
                              cell(r, "params", lambda v: f"{v:,.0f}"), cell(r, "flops", lambda v: f"{v / 1e6:,.1f}")])
    seeds = max((len(seed_accuracies(r)) for r in rows), default=1)
    if seeds == 1:
        section.notes.append("Each final run was trained with one seed: the accuracies carry no seed-to-seed spread "
                             "(run the pipeline with --seeds 3 or more to measure it).")
    else:
        section.notes.append(f"Test accuracy: mean ± standard deviation over {seeds} training seeds of each final "
                             f"run.")
    nas = next((r for r in rows if r.get("name") == "nas"), {})
    if nas.get("verdict"):
        verdict = str(nas["verdict"])
        section.notes.append(f"NAS answer: {verdict[:1].upper() + verdict[1:]}")
    return section


def gains_section(run_dir: Path) -> Section:
    """What each step bought: the test-accuracy differences between the final runs, with their spread."""
    path = run_dir / RESULTS
    section = Section("What each step bought", path)
    by_name = {r.get("name"): r for r in read_results(path)}
    baseline, hpo, nas = (by_name.get(name) for name in ("baseline", "hpo", "nas"))
    section.table.append(["comparison", "test accuracy difference (points)", "spread", "from"])
    for label, a, b in (("HPO best − baseline", hpo, baseline), ("NAS answer − baseline", nas, baseline),
                        ("NAS answer − HPO best", nas, hpo)):
        row = difference_row(label, a, b) if a and b else None
        if row is not None:
            section.table.append(row)
    if len(section.table) == 1:
        section.table = []
        section.notes.append("No two final runs to compare yet.")
        return section
    seeds = max(len(seed_accuracies(r)) for r in by_name.values())
    if seeds == 1:
        section.notes.append("One training seed per final run: a difference below about twice its spread is within "
                             "the noise, and seed-to-seed variation (not measured here) typically adds as much again.")
    else:
        section.notes.append(f"{seeds} training seeds per final run; with fewer than about 5 the standard deviation "
                             f"is itself a rough estimate.")
    return section


def hpo_best_section(run_dir: Path) -> Section:
    """The HPO best's values of the searched hyper-parameters beside the baseline's."""
    best_file = run_dir / "hpo" / "best.json"
    section = Section("HPO best against the baseline", best_file)
    best = read_json(best_file, "HPO best")
    space_file = run_dir / "hpo" / "search_space.json"
    space = read_json(space_file, "search space") if space_file.is_file() else {}
    baseline_runs = training_runs(run_dir / "baseline") if (run_dir / "baseline").is_dir() else []
    baseline = read_config_file(baseline_runs[0] / "config.yaml") if baseline_runs else {}
    names = list(space) or sorted(k for k in best if k in baseline and best[k] != baseline[k])
    section.table.append(["hyper-parameter", "baseline", "HPO best", "searched"])
    for name in names:
        rule = space.get(name, {})
        searched = f"{rule.get('_type', '')} {rule.get('_value', '')}".strip() if isinstance(rule, dict) else ""
        section.table.append([name, shown_value(baseline.get(name, "—")), shown_value(best.get(name, "—")), searched])
    section.notes.append("The HPO best's final run trains at the baseline's budget with these values "
                         "(fields the trials shortened, e.g. epochs, are the baseline's).")
    return section


def shown_value(value: Any) -> str:
    """A hyper-parameter's value in a table cell (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_times_section(run_dir: Path) -> Section:
    """Wall time of every stage from its stage.json (the attempt that finished it)."""
    section = Section("Wall time per stage", run_dir)
    section.table.append(["stage", "wall time", "state"])
    total = 0.0
    for name, _, _ in STAGES:
        marker_file = run_dir / name / "stage.json"
        if not marker_file.is_file():
            continue
        marker = read_json(marker_file, "stage marker")
        seconds = marker.get("seconds") if isinstance(marker, dict) else None
        finished = isinstance(marker, dict) and marker.get("finished") is not None
        if is_number(seconds):
            total += seconds
        section.table.append([name, format_seconds(seconds) if is_number(seconds) else "—",
                              "finished" if finished else "started, not finished"])
    if len(section.table) == 1:
        section.table = []
        section.notes.append("No stage has started yet.")
        return section
    section.table.append(["all stages", format_seconds(total), ""])
    section.notes.append("A stage resumed after an interruption counts the attempt that finished it.")
    return section


def format_seconds(seconds: float) -> str:
    """12.3 s, or 4 min 05 s."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


SECTIONS: dict[str, Callable[[str, Path, Path, str], Section]] = {
    "training": training_section, "hpo": hpo_section, "supernet": supernet_section, "search": search_section,
    "ranking": ranking_section, "selection": selection_section, "retrain": retrain_section, "front": front_section,
}
FRONT_TITLE = "What NAS bought, per FLOPs limit"
TITLES = {"training": "Training run", "hpo": "Hyper-parameter search", "supernet": "Supernet training",
          "search": "Architecture search", "ranking": "Supernet ranking quality",
          "selection": "Selection by real training", "retrain": "Architectures retrained from scratch", "front": FRONT_TITLE}


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
        sections.append(guarded(gains_section, "What each step bought", run_dir / RESULTS, run_dir))
    else:
        missing.append((f"final results table ({RESULTS})", RESULTS_COMMAND))
    select = run_dir / "select"
    if select.is_dir() and run_kind(select) in ("selection", "front"):
        sections.append(guarded(front_section, FRONT_TITLE, select, FRONT_TITLE, select, out_dir, "select"))
    for name, title, command in STAGES:
        stage = run_dir / name
        kind = run_kind(stage) if stage.is_dir() else None
        if name == "retrain" and stage.is_dir() and (training_runs(stage) or (stage / "retrain.json").is_file()):
            kind = "retrain"
        elif kind is None and stage.is_dir() and training_runs(stage):  # a final run's training seeds: seed_S/
            kind = "training"
        if kind is None or kind == "pipeline":
            missing.append((f"{title} ({name}/)", command.format(run=run_dir)))
            continue
        if kind == "front":  # one selection per FLOPs limit (the front itself is drawn beside the final results)
            for limit in sorted(stage.glob("flops_*M/select.yaml"), key=lambda p: float(p.parent.name[6:-1])):
                where = f"{title}, under {limit.parent.name[6:-1]} MFLOPs"
                sections.append(guarded(selection_section, where, limit.parent, where, limit.parent, out_dir,
                                        f"{name}_{limit.parent.name}"))
            continue
        sections.append(guarded(SECTIONS[kind], title, stage, title, stage, out_dir, name))
        if name == "hpo" and (stage / "best.json").is_file():
            sections.append(guarded(hpo_best_section, "HPO best against the baseline", stage / "best.json", run_dir))
    if any((run_dir / name / "stage.json").is_file() for name, _, _ in STAGES):
        sections.append(guarded(stage_times_section, "Wall time per stage", run_dir, run_dir))
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
    if kind is None and recorded_kind(run_dir) is not None:  # e.g. a training run stopped in its first epoch
        recorded = {"train": "training"}.get(recorded_kind(run_dir), recorded_kind(run_dir))
        raise ConfigError(f"{run_dir}: a {recorded} run with nothing to draw yet (no epoch or trial finished)")
    if kind is None:
        raise ConfigError(f"{run_dir}: not a run directory (expected a training, HPO, supernet, search or "
                          f"ranking run, or a pipeline directory with {', '.join(n for n, _, _ in STAGES)})")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out.is_dir() and recorded_kind(out) is None and any(out.iterdir()):  # a folder of the user's own
        raise ConfigError(f"{out}: holds files that are not a report; choose another --out")
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
