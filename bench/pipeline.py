"""The pipeline benchmark: run a preset end to end and tabulate wall time per stage and the final accuracies.

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/pipeline.py --dataset cifar10 --out runs/bench-pipeline-quick
    python bench/pipeline.py --table-only --out runs/bench-pipeline-quick     # the table of a finished run

Runs `effcifar pipeline --preset PRESET --quiet` in a child process (a fresh --out, so nothing
is skipped; its output in OUT.log), measuring the whole command (wall, CPU and system time, peak RSS),
then reads each stage's `stage.json` (the seconds the stage took) and `results.json`. Prints a
Markdown table for docs/benchmarks.md. To time another source tree, set PYTHONPATH to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from effcifar.pipeline import STAGES
from measure import run_measured


def stage_table(out: Path) -> list[str]:
    """Markdown rows: each stage's wall time, then the final accuracies."""
    rows = ["| stage | wall time | result |", "|---|---|---|"]
    summaries = {"baseline": "baseline/summary.json", "hpo_best": "hpo_best/summary.json"}
    for stage in STAGES:
        marker = out / stage / "stage.json"
        if not marker.is_file():
            rows.append(f"| {stage} | skipped | |")
            continue
        seconds = json.loads(marker.read_text()).get("seconds")
        if seconds is None:  # stage.json is written when a stage starts, its seconds when it finishes
            rows.append(f"| {stage} | unfinished | |")
            continue
        detail = ""
        if stage in summaries:
            detail = f"test {json.loads((out / summaries[stage]).read_text())['test_acc']:.2%}"
        elif stage == "hpo":
            best = json.loads((out / "hpo" / "best.json").read_text())
            detail = f"best: peak_lr {best['peak_lr']:.3g}, base_wd {best['base_wd']:.3g}, logits_weight {best['logits_weight']}, cutout {best['cutout']}"
        elif stage == "supernet":
            panel = json.loads((out / "supernet" / "summary.json").read_text())["final_panel"]
            detail = f"held-out panel mean {panel['valid_panel_mean']:.2%} (largest {panel['valid_largest']:.2%})"
        elif stage == "search":
            top = json.loads((out / "search" / "arch" / "top_1.json").read_text())
            detail = f"best held-out (supernet) {top['accuracy']:.2%}, {top['flops'] / 1e6:.1f} MFLOPs"
        elif stage == "select":
            detail = json.loads((out / "select" / "select.json").read_text())["sentence"]
        elif stage == "retrain":
            answer = json.loads((out / "retrain" / "retrain.json").read_text())[0]
            detail = f"{answer['how']}: test {answer['test_acc']:.2%}"
        elif stage == "nas_eval":
            ranking = json.loads((out / "nas_eval" / "ranking.json").read_text())
            detail = f"Kendall tau {ranking['tau']:.3f} over {len(ranking['archs'])} subnets"
        rows.append(f"| {stage} | {seconds:.0f} s | {detail} |")
    if not (out / "results.json").is_file():
        return rows
    rows += ["", "| method | test accuracy | train time | params | MFLOPs |", "|---|---|---|---|---|"]
    for r in json.loads((out / "results.json").read_text()):
        rows.append(f"| {r['name']} | {r['test_acc']:.2%} | {r['train_time']:.1f} s | {r['params']:,} | "
                    f"{r['flops'] / 1e6:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--out", required=True, help="a new pipeline directory")
    parser.add_argument("--table-only", action="store_true", help="only print the table of a finished run")
    parser.add_argument("--config", help="passed on to effcifar pipeline (a YAML file over the preset)")
    parser.add_argument("--set", action="append", default=[], help="passed on to effcifar pipeline")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table_only:
        if out.exists():
            sys.exit(f"{out} exists: the benchmark needs a fresh directory (nothing skipped)")
        command = [sys.executable, "-m", "effcifar", "pipeline", "--preset", args.preset, "--dataset", args.dataset,
                   "--quiet", "--out", str(out), *(["--config", args.config] if args.config else []),
                   *(f"--set={s}" for s in args.set)]
        out.parent.mkdir(parents=True, exist_ok=True)
        m = run_measured(command, out.parent / f"{out.name}.log", dict(os.environ))
        env = [f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "EFFCIFAR_MALLOC", "GLIBC_TUNABLES") if k in os.environ]
        print(f"whole command: {m.wall:.0f} s, CPU {m.user:.0f} s user + {m.sys:.0f} s system, peak RSS "
              f"{m.rss_mb:.0f} MiB, load average {os.getloadavg()[0]:.1f} at the end ({' '.join(env + command[1:])})")
    print("\n".join(stage_table(out)))


if __name__ == "__main__":
    main()
