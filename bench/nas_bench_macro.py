"""NAS-Bench-Macro: does the supernet rank like real training, and does the search find the table's best?

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/nas_bench_macro.py --out runs/bench-macro \\
        --variant uniform:sampling=uniform --variant sandwich:sampling=sandwich --regret

Each variant is NAME or NAME:FIELD=VALUE,FIELD=VALUE (SupernetConfig fields over the common
settings, `--set FIELD=VALUE` changes those). For each: train a supernet on the NAS-Bench-Macro
space (an existing run directory is resumed or reused), score `--sample` table architectures
(stratified over FLOPs; the same ones for every variant) and, with `--regret`, search it under the
table's 30 M and 50 M FLOPs (our count is 2x the table's multiply-accumulates) with `--seeds`
evolution seeds. Regret is the table's best accuracy under the limit minus the table accuracy of
the search's top-1; `best_rank` is where a table-best network sits in the search's own ranking (by
supernet score, among the distinct architectures it evaluated; null: never evaluated); a pool counts
distinct standalone networks, of which there are fewer, so a pool of that size would have held it. With `--select`, each search's answer is checked by
training, as `effcifar select` does it: its `--pool` best distinct networks trained standalone with successive halving
on held-out images (no incumbent or width curve: the ResNet-9 is not in this space), beside the
control of as many random networks under the limit through the same halving; the regret of
each answer is read from the table. `--top-sample N` also scores N architectures (stratified over FLOPs) of the
table's best 10% (OUT/top10.json): the tau among the best networks over the main sample's 30 has
a null standard deviation of 0.13, too wide to tell the supernet from FLOPs there.
Prints one markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from effcifar.allocator import configure_allocator
from effcifar.atomic import atomic_write
from effcifar.config import build_config, flat_values
from effcifar.errors import EffcifarError
from effcifar.nas.ranking import ranker_quality
from effcifar.nas.retrain import rank_against_table
from effcifar.nas.search import SearchConfig, ranked_results, run_search
from effcifar.nas.select import SelectConfig, choose, select_from_search
from effcifar.nas.space import ArchSpace, read_arch_file
from effcifar.nas.supernet import SupernetConfig, read_run_config
from effcifar.nas.table import BenchmarkTable, read_table_json
from effcifar.nas.trainer import train_supernet
from effcifar.train import TrainConfig
from measure import parse_assignment, parse_variant

COMMON = {"space": "nas-bench-macro", "dataset": "cifar10", "subset": 10000, "holdout": 2000, "batch_size": 256,
          "epochs": 30, "peak_lr": 0.1, "lr_factor": 1.0, "schedule": "cosine", "label_smoothing": 0.1, "cutout": 0,
          "precision": "bf16", "threads": 2, "panel_random": 1, "bn_batches": 4, "eval_batch_size": 500}
MARGINS = (0.0, 1.0, 2.0)  # the selection's margins whose answers are read from each selection's results
LIMITS = (30e6, 50e6)  # table FLOPs (multiply-accumulates): the two limits the search benchmark uses


def selection_base(config: SupernetConfig, args: argparse.Namespace) -> TrainConfig:
    """How the selection trains a candidate: the supernet's images, batch and augmentation, a standalone schedule
    (a linear warm-up to `--select-lr` over one epoch, then linear decay over `--select-epochs`)."""
    values = flat_values(config)
    shared = {f: values[f] for f in ("dataset", "data_dir", "subset", "holdout", "batch_size", "crop_pad", "flip",
                                     "cutout", "label_smoothing", "seed", "threads")}
    return build_config(TrainConfig, None, {**shared, "space": "nas-bench-macro", "epochs": args.select_epochs,
                                            "peak_epoch": 1, "peak_lr": args.select_lr, "precision": args.precision})


def select(search_dir: Path, out: Path, limit: float, seed: int, proposals: str, base: TrainConfig,
           table: BenchmarkTable, args: argparse.Namespace) -> dict[str, Any]:
    """One selection over a search's results (or random proposals): its answer's and its pool's table accuracies."""
    config = SelectConfig(pool=args.pool, proposals=proposals, incumbent=False, width_curve="",
                          min_epochs=args.min_epochs, reduction=args.reduction, max_flops=limit, proposal_seed=seed)
    result = select_from_search(config, search_dir, out, base)
    table_acc = {r["name"]: table.rows[table.key_of(r["arch"])].mean_acc for r in result.rows}
    by_margin = {margin: table_acc[choose(result.rows, margin, base.holdout)["name"]] for margin in MARGINS}
    return {"answer_table_acc": table_acc[result.answer], "answer_table_acc_by_margin": by_margin,
            "pool_table_accs": list(table_acc.values()),
            "holdout_accs": [r["holdout_acc"] for r in result.rows], "image_epochs": result.image_epochs,
            "train_seconds": result.train_seconds}


def regret(supernet_dir: Path, out: Path, table: BenchmarkTable, ratio: float, args: argparse.Namespace) -> dict:
    """Per limit: each seed's top-1 table accuracy (and, with --select, the checked answer's and the random
    control's), the median regrets, and the reference points."""
    rows = {}
    base = selection_base(read_run_config(supernet_dir), args)
    for limit in LIMITS:
        best, largest = table.best_under(limit), table.largest_under(limit)
        accs, best_ranks, checked, random = [], [], [], []
        for seed in range(args.seeds):
            config = SearchConfig(strategy="evolution", trials=args.evaluations, population=args.population,
                                  parents=args.population // 4, mutations=args.population // 2,
                                  crossovers=args.population // 2, max_flops=limit * ratio, sampler_seed=seed,
                                  bn_batches=args.bn_batches, eval_images=args.eval_images, precision=args.precision,
                                  threads=2, export=1)
            search_dir = out / f"search-{limit / 1e6:.0f}M-seed{seed}"
            study = run_search(config, supernet_dir, search_dir)
            arch = read_arch_file(search_dir / "arch" / "top_1.json")["arch"]
            accs.append(table.rows[table.key_of(arch)].mean_acc)
            ranking = [table.rows[table.key_of(record["arch"])].mean_acc
                       for _, record in ranked_results(study.get_trials(deepcopy=False))]
            best_ranks.append(next((rank for rank, acc in enumerate(ranking, 1) if acc >= best.mean_acc), None))
            if args.select:
                controls = (("random", random),) if seed < args.control_seeds else ()
                for proposals, into in (("search", checked), *controls):
                    into.append(select(search_dir, out / f"select-{proposals}-{limit / 1e6:.0f}M-seed{seed}",
                                       limit * ratio, seed, proposals, base, table, args))
        row = {"top0_table_acc": accs, "best_rank": best_ranks,
               "regret_median": best.mean_acc - statistics.median(accs),
               "best": best.mean_acc, "largest_under_limit": largest.mean_acc}
        for name, runs in (("selection", checked), ("random", random)):
            if runs:
                row[name] = runs
                row[f"{name}_regret_median"] = best.mean_acc - statistics.median(r["answer_table_acc"] for r in runs)
        rows[f"{limit / 1e6:.0f}M"] = row
    return rows


def count(text: str) -> int:
    """An argparse type: a whole number >= 0; a negative count is a usage error, not a silent "every network"."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def write_top_table(table: BenchmarkTable, path: Path, fraction: float = 0.1) -> Path:
    """The table's rows with the best `fraction` of mean accuracies, as a table file of the same format."""
    raw = read_table_json(table.path)
    best = sorted(raw, key=lambda key: -table.rows[key].mean_acc)[:round(len(raw) * fraction)]
    atomic_write(path, json.dumps({key: raw[key] for key in best}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-macro"))
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME or NAME:FIELD=VALUE,...")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[],
                        help="FIELD=VALUE over the common settings")
    parser.add_argument("--data-dir", help="CIFAR-10 (default: $EFFCIFAR_DATA)")
    parser.add_argument("--sample", type=count, default=150, help="table architectures scored per variant")
    parser.add_argument("--eval-images", type=int, default=2000, help="held-out images per score (0: all)")
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--score", default="loss", help="what the supernet ranks by: loss or accuracy")
    parser.add_argument("--top-sample", type=count, default=0,
                        help="also score this many architectures of the table's best 10%% (0: don't)")
    parser.add_argument("--regret", action="store_true", help="also search under 30M and 50M table FLOPs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--population", type=int, default=40)
    parser.add_argument("--select", action="store_true",
                        help="with --regret: check each search's answer by training, beside random proposals")
    parser.add_argument("--control-seeds", type=int, default=3,
                        help="the random control runs for the first this many search seeds")
    parser.add_argument("--pool", type=int, default=6, help="networks each selection trains")
    parser.add_argument("--select-epochs", type=int, default=6, help="the selection's last rung, in epochs")
    parser.add_argument("--min-epochs", type=int, default=2, help="the selection's first rung, in epochs")
    parser.add_argument("--reduction", type=int, default=3, help="successive halving's reduction factor")
    parser.add_argument("--select-lr", type=float, default=0.1, help="the candidates' peak learning rate")
    args = parser.parse_args()
    configure_allocator()  # as the effcifar command does at start-up, before any tensor
    common = {**COMMON, **dict(args.set)}
    if args.data_dir:
        common["data_dir"] = args.data_dir
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    table = BenchmarkTable.load_named("nas-bench-macro", ArchSpace.load("nas-bench-macro"))
    configs = {}
    for name, fields in args.variant:  # every variant checked before the first one trains for hours
        if name in configs:
            parser.error(f"--variant {name}: named twice (each variant's run directory is OUT/NAME)")
        try:
            configs[name] = build_config(SupernetConfig, None, {k: str(v) for k, v in {**common, **fields}.items()},
                                         overrides_from_text=True)
        except EffcifarError as error:
            parser.error(f"--variant {name}: {error}")
    for name, config in configs.items():
        run = args.out / name
        started = time.perf_counter()
        if not (run / "supernet.pt").is_file():
            train_supernet(config, run, resume=(run / "checkpoints").is_dir(), warn=print,
                           on_epoch=lambda row: print(f"{name} epoch {row['epoch']}: panel {row['valid_panel_mean']:.3f}",
                                                      flush=True))
        summary = json.loads((run / "summary.json").read_text())
        search = SearchConfig(bn_batches=args.bn_batches, eval_images=args.eval_images, precision=args.precision,
                              threads=2, score=args.score)
        ranking = rank_against_table(run, "nas-bench-macro", args.sample, 0, run / "nas_eval_table", search)
        by_accuracy = ranker_quality("supernet (accuracy)", ranking["supernet_acc"], ranking["standalone_acc"])
        row: dict[str, Any] = {"config": asdict(config), "train_time": summary["train_time"],
                               "rankers": ranking["rankers"], "tau_vs_flops": ranking["tau_vs_flops"],
                               "by_accuracy": asdict(by_accuracy), "score_seconds": ranking["score_seconds"],
                               "n": ranking["n"], "score": args.score}
        if args.top_sample:
            top = rank_against_table(run, write_top_table(table, args.out / "top10.json"), args.top_sample, 0,
                                     run / "nas_eval_top10", search)
            row["top10"] = {key: top[key] for key in ("n", "rankers", "tau_vs_flops", "score_seconds")}
        if args.regret:
            row["regret"] = regret(run, run, table, ranking["flops_ratio"], args)
        row["wall_seconds"] = time.perf_counter() - started
        results[name] = row
        atomic_write(args.out / "results.json", json.dumps(results, indent=2) + "\n")  # a kill mid-write keeps the old rows
        print(f"{name}: {ranking['verdict']}", flush=True)
    print("\n| variant | n | tau (score) | tau top 10% | top-10% overlap | tau (accuracy) | train s | score s | "
          "regret 30M | regret 50M |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        r, acc = row["rankers"][0], row.get("by_accuracy", {}).get("tau", float("nan"))
        regrets = [f"{row['regret'][k]['regret_median'] * 100:.2f}" if "regret" in row else "" for k in ("30M", "50M")]
        print(f"| {name} | {row['n']} | {r['tau']:.3f} ({row.get('score', 'accuracy')}) | {r['tau_top']:.3f} | "
              f"{r['top_overlap']:.2f} | {acc:.3f} | {row['train_time']:.0f} | {row['score_seconds']:.0f} | "
              f"{regrets[0]} | {regrets[1]} |")
    flops = results[next(iter(results))]["rankers"][1]
    print(f"| FLOPs (reference) | | {flops['tau']:.3f} | {flops['tau_top']:.3f} | {flops['top_overlap']:.2f} | | | | | |")
    tops = {name: row["top10"] for name, row in results.items() if "top10" in row}
    if tops:
        print("\n| among the table's best 10% | n | tau | rho | lead over FLOPs (± s.e.) | score s |")
        print("|---|---|---|---|---|---|")
        for name, top in tops.items():
            r, lead = top["rankers"][0], top["tau_vs_flops"]
            print(f"| {name} | {top['n']} | {r['tau']:.3f} | {r['rho']:.3f} | {lead['difference']:+.3f} ± {lead['se']:.3f} | "
                  f"{top['score_seconds']:.0f} |")
        for ranker in next(iter(tops.values()))["rankers"][1:]:
            print(f"| {ranker['name']} (reference) | | {ranker['tau']:.3f} | {ranker['rho']:.3f} | | |")

    for name, row in results.items():
        if any("selection" in r for r in row.get("regret", {}).values()):
            print_selection(name, row["regret"])


def print_selection(name: str, regrets: dict[str, Any]) -> None:
    """The checked answers beside the supernet's top-1 and the random control, as table accuracies per seed."""
    pct = lambda accs: " / ".join(f"{a * 100:.2f}" for a in accs)  # noqa: E731
    print(f"\n{name}: the search's answer checked by training (table accuracy %, per search seed)\n")
    print("| limit | table's best | supernet top-1 | where the best ranked | checked answer | best in its pool | "
          "random + halving | median regret: top-1 / checked / random | selection work (image-epochs, s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for limit, row in regrets.items():
        checked, random = row.get("selection", []), row.get("random", [])
        work = " / ".join(f"{r['image_epochs'] / 1e3:,.0f}k, {r['train_seconds']:.0f}" for r in checked)
        ranks = " / ".join("never" if rank is None else str(rank) for rank in row.get("best_rank", []))
        print(f"| {limit} | {row['best'] * 100:.2f} | {pct(row['top0_table_acc'])} | {ranks} | "
              f"{pct(r['answer_table_acc'] for r in checked)} | {pct(max(r['pool_table_accs']) for r in checked)} | "
              f"{pct(r['answer_table_acc'] for r in random)} | {row['regret_median'] * 100:.2f} / "
              f"{row.get('selection_regret_median', float('nan')) * 100:.2f} / "
              f"{row.get('random_regret_median', float('nan')) * 100:.2f} | {work} |")


if __name__ == "__main__":
    main()
