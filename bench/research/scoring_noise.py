"""Scoring noise: how far a supernet's ranking owes to the held-out images it was judged on.

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/research/scoring_noise.py RUN --table OUT/top10.json --sample 200

Scores `--sample` architectures of a table (stratified over FLOPs, seed 0: the ones `nas-eval
--table` and bench/nas_bench_macro.py score) on two disjoint samples of the run's held-out split,
each `--eval-images` images: A is the sample search and nas-eval use, B the next images of the same
seeded draw. Each path is BN-recalibrated once (the run's calibration batches), then judged on A
and on B by mean loss. Prints the supernet's Kendall tau against the table on A, on B and on both
together (2x the images), and A against B: the scores' own agreement, the ceiling that more held-out
images could lift, beside the table's seed-vs-seed agreement. Writes the scores to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from effcifar.allocator import configure_allocator
from effcifar.atomic import atomic_write
from effcifar.errors import ConfigError, EffcifarError
from effcifar.nas.evaluation import accuracy, evaluate_subnet
from effcifar.nas.ranking import compare_rankers, kendall_tau, null_tau_sd
from effcifar.nas.search import CandidateEvaluator, SearchConfig, load_supernet_config
from effcifar.nas.table import BenchmarkTable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for nas_bench_macro
from nas_bench_macro import count  # noqa: E402 (the bench's own "whole number >= 0" argparse type)


def score_on_two_samples(args: argparse.Namespace) -> tuple[list[str], BenchmarkTable, dict[str, list[float]], float]:
    """(keys, table, mean losses on samples A and B per key, start time) for `args.sample` of the table's networks."""
    search = SearchConfig(eval_images=0, bn_batches=args.bn_batches, precision=args.precision, threads=args.threads)
    search.validate()
    evaluator = CandidateEvaluator.from_run(args.run, search)
    held_out, seed = evaluator.loader, load_supernet_config(args.run).seed
    if not 1 <= args.eval_images <= len(held_out.labels) // 2:
        raise ConfigError(f"--eval-images: expected 1 to {len(held_out.labels) // 2} (two disjoint samples of the run's "
                          f"{len(held_out.labels)} held-out images), got {args.eval_images}")
    halves = {"A": held_out.subset(args.eval_images, seed), "B": held_out.subset(args.eval_images, seed, skip=args.eval_images)}
    table = BenchmarkTable.load_named(args.table, evaluator.space)
    keys = table.sample(args.sample, 0)
    losses: dict[str, list[float]] = {"A": [], "B": []}
    started = time.perf_counter()
    for i, key in enumerate(keys):
        arch = table.arch(key)
        # A as search scores it (select, recalibrate, judge); B on the same recalibrated path
        losses["A"].append(evaluate_subnet(evaluator.net, arch, evaluator.bn_batches, halves["A"],
                                           evaluator.autocast).loss)
        losses["B"].append(accuracy(evaluator.net, halves["B"], evaluator.autocast).loss)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(keys)} scored ({time.perf_counter() - started:.0f} s)", flush=True)
    return keys, table, losses, started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished supernet run directory")
    parser.add_argument("--table", default="nas-bench-macro", help="a table file or a shipped table's name")
    parser.add_argument("--sample", type=count, default=200, help="table architectures scored (0: every network)")
    parser.add_argument("--eval-images", type=int, default=1000, help="held-out images in each of the two samples")
    parser.add_argument("--bn-batches", type=int, default=None, help="default: the run's")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="scores as JSON (default: RUN/scoring_noise-TABLE-SAMPLE.json)")
    args = parser.parse_args()
    configure_allocator()  # as the effcifar command does at start-up, before any tensor
    try:
        keys, table, losses, started = score_on_two_samples(args)
    except EffcifarError as e:  # a bad run, table or setting: one line, nothing written
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    rows = [table.rows[key] for key in keys]
    truth = [row.mean_acc for row in rows]
    rankers = {"supernet, A": [-x for x in losses["A"]], "supernet, B": [-x for x in losses["B"]],
               "supernet, A+B": [-(a + b) for a, b in zip(losses["A"], losses["B"])],  # equal sizes: the mean
               "FLOPs": [row.flops for row in rows]}
    qualities = compare_rankers(truth, rankers, np.array([row.seed_accs for row in rows]))
    agreement = kendall_tau(losses["A"], losses["B"])
    out = args.out or args.run / f"scoring_noise-{Path(str(args.table)).stem}-{len(keys)}.json"
    atomic_write(out, json.dumps({"table": str(table.path), "keys": keys, "eval_images": args.eval_images,
                                  "loss_A": losses["A"], "loss_B": losses["B"], "tau_A_vs_B": agreement,
                                  "rankers": [asdict(q) for q in qualities],
                                  "seconds": time.perf_counter() - started}, indent=1) + "\n")
    print(f"\n{len(keys)} architectures of {table.path.name} (null s.d. of tau {null_tau_sd(len(keys)):.3f}), "
          f"{args.eval_images} held-out images per sample; {out}")
    print("\n| ranker | tau vs the table | rho | tau in its top 10% |\n|---|---|---|---|")
    for q in qualities:
        print(f"| {q.name} | {q.tau:.3f} | {q.rho:.3f} | {q.tau_top:.3f} |")
    print(f"| supernet A vs supernet B (scoring noise) | {agreement:.3f} | | |")


if __name__ == "__main__":
    main()
