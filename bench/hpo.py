"""Hyper-parameter search benchmarks: per-trial overhead, and a small real study (TPE vs random).

    python bench/hpo.py overhead [--storage postgresql://USER@HOST/DB]   # journal, and PostgreSQL if given
    EFFCIFAR_DATA=.cache/cifar10.npz python bench/hpo.py study --trials 20

overhead: a study is pre-filled with 100 finished trials of the original series' space, then 10 more trials
run through the real worker loop (budget lock, sampling, storage writes, one tiny training run
each). Overhead per trial = wall time per trial - the training run's own total time.
study: the original series' space without its epoch and width choices (1 epoch of narrow networks, 16/32/64/
128, batch 128, on a 10,000-image subset of the training set, validated on a 5,000-image hold-out), TPE vs
random with the same seed; best validation accuracy after 10 and 20 trials.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from effcifar.hpo.study import HpoConfig, load_space, open_study, run_study

SEED_SPACE = Path(__file__).resolve().parent.parent / "examples" / "search_space.json"
TINY = {"dataset": "synthetic", "subset": 128, "batch_size": 64, "prep": 8, "layer1": 8, "layer2": 8, "layer3": 8,
        "epochs": 1, "peak_epoch": 0.5, "eval_batch_size": 1000}


def prefill(config: HpoConfig, run_dir: Path, n: int) -> None:
    """Add n finished trials with random values of the space (as if they had run)."""
    study = open_study(config, run_dir)
    space = load_space(config)
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng = random.Random(0)
    for _ in range(n):
        trial = sampler_study.ask()
        space.suggest(trial)
        acc = rng.uniform(0.3, 0.8)
        study.add_trial(optuna.trial.create_trial(
            params=trial.params, distributions=trial.distributions, value=acc,
            user_attrs={"accuracy": acc, "train_time": rng.uniform(10, 20)}))


def overhead(storage: str | None, work: Path) -> dict[str, float]:
    """Median overhead per trial at 100 finished trials."""
    run_dir = work / f"overhead-{'pg' if storage else 'journal'}"
    base = work / "tiny.json"
    base.write_text(json.dumps(TINY))
    config = HpoConfig(space=str(SEED_SPACE), base=str(base), trials=110, pruner="none", sampler_seed=0,
                       storage=storage,
                       study=f"overhead-{uuid.uuid4().hex[:8]}")
    # the original series' widths and epochs are pinned by a space of its other hyper-parameters
    space = {k: v for k, v in json.loads(SEED_SPACE.read_text()).items()
             if k in ("peak_lr", "base_wd", "logits_weight", "cutout")}
    (work / "space.json").write_text(json.dumps(space))
    config.space = str(work / "space.json")
    run_dir.mkdir(parents=True)
    prefill(config, run_dir, 100)
    stamps: list[tuple[float, float]] = []
    run_study(config, run_dir, on_trial=lambda t: stamps.append((time.perf_counter(), t.user_attrs["train_time"])))
    summaries = sorted(run_dir.glob("trials/*/summary.json"))
    train_totals = [json.loads(p.read_text())["total_time"] for p in summaries]
    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    per_trial = [w - t for w, t in zip(walls, train_totals[1:])]
    return {"trials": len(summaries), "wall": statistics.median(walls), "train": statistics.median(train_totals),
            "overhead": statistics.median(per_trial)}


def small_study(trials: int, work: Path) -> None:
    """TPE vs random on real data; best validation accuracy after 10 and `trials` trials."""
    base = work / "base.json"
    base.write_text(json.dumps({"prep": 16, "layer1": 32, "layer2": 64, "layer3": 128, "epochs": 1,
                                "peak_epoch": 0.25, "subset": 10000, "holdout": 5000, "batch_size": 128,
                                "threads": 2}))
    space = {k: v for k, v in json.loads(SEED_SPACE.read_text()).items()
             if k in ("peak_lr", "base_wd", "logits_weight", "cutout")}
    (work / "space.json").write_text(json.dumps(space))
    print(f"{'sampler':<8}{'best@10':>9}{'best@' + str(trials):>9}{'median trial s':>16}")
    for sampler in ("tpe", "random"):
        config = HpoConfig(space=str(work / "space.json"), base=str(base), trials=trials, sampler=sampler,
                           pruner="none", sampler_seed=0)
        study = run_study(config, work / f"study-{sampler}")
        accs = [t.user_attrs.get("accuracy", 0.0) for t in study.get_trials()]
        times = [t.duration.total_seconds() for t in study.get_trials() if t.duration]
        print(f"{sampler:<8}{max(accs[:10]):>9.2%}{max(accs):>9.2%}{statistics.median(times):>16.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "study"])
    parser.add_argument("--storage", help="also measure this PostgreSQL database (overhead)")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.what == "study":
            small_study(args.trials, work)
            return
        print(f"{'storage':<12}{'trials timed':>13}{'wall/trial s':>14}{'train s':>9}{'overhead s':>12}")
        for storage in [None] + ([args.storage] if args.storage else []):
            r = overhead(storage, work)
            print(f"{'postgresql' if storage else 'journal':<12}{r['trials']:>13}{r['wall']:>14.3f}"
                  f"{r['train']:>9.3f}{r['overhead']:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
