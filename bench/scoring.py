"""Candidate scoring cost: what judging one supernet path costs (BN recalibration, then held-out evaluation).

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/scoring.py runs/SUPERNET --archs 8 --eval-images 1000
    python bench/scoring.py runs/SUPERNET --profile      # torch.profiler's top ops of each part, in-process

Search and `nas-eval --table` score hundreds of paths this way (`evaluate_subnet`). Each variant
(malloc as a user runs effcifar, or EFFCIFAR_MALLOC=system; fp32 or bf16) runs as its own child
process, which scores the same `--archs` random architectures of the run's space (seed 0) with
the run's calibration batches and `--eval-images` held-out images, after one untimed warm-up
architecture. Variants run in turn, `--rounds` times (the order alternating); per variant the
median of the rounds: seconds per architecture (calibration, evaluation), CPU seconds in user
mode and in the kernel per architecture (the child's own, over the timed paths), and the child's
peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import run_measured, variant_env

MALLOCS = {"ours": "as a user runs it", "ours-system": "EFFCIFAR_MALLOC=system"}


def paths_to_score(args: argparse.Namespace) -> tuple[Any, list[dict[str, str]]]:
    """(evaluator, `args.archs` + 1 random paths of the run's space, seed 0), set up as an effcifar process is."""
    from effcifar.allocator import configure_allocator

    configure_allocator()  # as every effcifar process does at start-up (EFFCIFAR_MALLOC from the environment)
    import torch  # after the allocator setting, like the command line

    from effcifar.nas.search import CandidateEvaluator, SearchConfig

    torch.set_num_threads(args.threads)
    evaluator = CandidateEvaluator.from_run(args.run, SearchConfig(precision=args.precision, eval_images=args.eval_images,
                                                                   threads=args.threads))
    rng = random.Random(0)
    archs = [{key: rng.choice(list(choices)) for key, choices in evaluator.space.choices().items()}
             for _ in range(args.archs + 1)]
    return evaluator, archs


def score_paths(args: argparse.Namespace) -> dict[str, float]:
    """The child: score the paths with the product's code (`evaluate_subnet`'s two parts); seconds per path by part."""
    from effcifar.nas.evaluation import accuracy, recalibrate_bn

    evaluator, archs = paths_to_score(args)
    parts = {"calibration": 0.0, "evaluation": 0.0}
    for i, arch in enumerate(archs):
        if i == 1:
            before = resource.getrusage(resource.RUSAGE_SELF)
        evaluator.net.set_arch(arch)
        start = time.perf_counter()
        recalibrate_bn(evaluator.net, evaluator.bn_batches, evaluator.autocast)
        middle = time.perf_counter()
        accuracy(evaluator.net, evaluator.loader, evaluator.autocast)
        if i > 0:  # the first is the warm-up
            parts["calibration"] += middle - start
            parts["evaluation"] += time.perf_counter() - middle
    after = resource.getrusage(resource.RUSAGE_SELF)
    parts |= {"user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime}
    return {name: seconds / args.archs for name, seconds in parts.items()} | {
        "calibration_images": sum(len(b) for b in evaluator.bn_batches), "eval_images": len(evaluator.loader.labels)}


def profile_paths(args: argparse.Namespace) -> None:
    """torch.profiler's top operators of calibration and of evaluation over the paths (in this process)."""
    from torch.profiler import ProfilerActivity, profile

    from effcifar.nas.evaluation import accuracy, recalibrate_bn

    evaluator, archs = paths_to_score(args)
    evaluator.evaluate(archs[0])  # warm-up
    for part in ("calibration", "evaluation"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for arch in archs[1:]:
                evaluator.net.set_arch(arch)
                if part == "calibration":
                    recalibrate_bn(evaluator.net, evaluator.bn_batches, evaluator.autocast)
                else:
                    accuracy(evaluator.net, evaluator.loader, evaluator.autocast)
        print(f"{part}, {args.archs} paths, {args.precision}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished supernet run directory")
    parser.add_argument("--archs", type=int, default=8, help="paths scored per child (after one warm-up)")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops (first precision)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON file: score in this process, write there
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.archs < 1 or args.rounds < 1:
        parser.error(f"--archs and --rounds: expected integers >= 1, got {args.archs} and {args.rounds}")
    if args.child:
        Path(args.child).write_text(json.dumps(score_paths(args)))
        return
    precisions = args.precisions.split(",")
    if args.profile:
        args.precision = precisions[0]
        profile_paths(args)
        return
    variants = [(malloc, precision) for precision in precisions for malloc in MALLOCS]
    rows: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))  # the children's results and logs
    for r in range(args.rounds):
        for malloc, precision in variants if r % 2 == 0 else variants[::-1]:
            result = work / f"{malloc}-{precision}.json"
            command = [sys.executable, __file__, args.run, "--child", str(result), "--precision", precision,
                       "--archs", str(args.archs), "--eval-images", str(args.eval_images), "--threads", str(args.threads)]
            m = run_measured(command, work / f"{malloc}-{precision}.log", variant_env(malloc))
            rows[(malloc, precision)].append(json.loads(result.read_text()) | {"rss_mb": m.rss_mb})
    first = rows[variants[0]][0]
    print(f"{args.archs} paths of {args.run} (seed 0), BN recalibrated on {first['calibration_images']} images, "
          f"evaluated on {first['eval_images']} held-out images; {args.threads} threads; median of {args.rounds} rounds.")
    print("CPU seconds: the scoring process's, all threads, over the timed paths; peak RSS: the whole child's.\n")
    print("| precision | malloc | s per path | calibration s | evaluation s | user CPU s per path | system CPU s per path "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (malloc, precision), results in rows.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("calibration", "evaluation", "user", "sys", "rss_mb")}
        print(f"| {precision} | {MALLOCS[malloc]} | {med['calibration'] + med['evaluation']:.2f} | {med['calibration']:.2f} "
              f"| {med['evaluation']:.2f} | {med['user']:.2f} | {med['sys']:.2f} | {med['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
