"""One profiled run of our airbench recipe and of the public airbench94: where the GPU time goes.

    python bench/gpu/profile_recipes.py --pack .cache/gpu/cifar10_jpeg.npz --reference .cache/gpu/airbench-0.1.8.tar.gz --out OUT
    python bench/gpu/profile_recipes.py --device cpu --tiny --out OUT     # CPU dry run of our side (synthetic data; tests)

Each recipe runs once to warm up (torch.compile, cuDNN autotuning; its timed region is reported as
the first run's), then once under torch.profiler. Per recipe it records the regions both recipes
have, timed with CUDA events on a GPU (wall clock on CPU): the whitening init, each epoch's training
(ours without the evaluation that follows each epoch), the evaluations between epochs (ours;
airbench94 with verbose=False makes none) and the final TTA evaluation; the GPU's idle share between
its first and last kernel (time the host kept it waiting); and host-device synchronisations per
training step (on a GPU the CUDA runtime's `*Synchronize` calls; on CPU the `.item()` calls). Files in
OUT: `ops_<recipe>.txt` (the profiler's op and kernel table), `regions.json` (every figure) and
`summary.md` (the table for docs/benchmarks.md); `--trace` adds chrome traces. The regions are
labelled by wrapping functions of each recipe (ours: `effcifar.train.train_epoch`, the recipe's
`evaluate`, `patch_whitening`; airbench94: `init_whitening_conv`, `evaluate` and the training
loader's iteration).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import effcifar.airbench as ours_airbench
import effcifar.train as ours_train
from effcifar.data import load_dataset

# Events that wait for the device, by name (substring): on a GPU the CUDA runtime's *Synchronize calls (an `.item()`
# of a GPU tensor makes one; airbench94's `.item()` of a CPU tensor makes none); on CPU, where nothing waits, the
# `.item()` calls themselves, which would wait on a GPU.
SYNC_OPS = {"cuda": "Synchronize", "cpu": "aten::_local_scalar_dense"}


class Regions:
    """Named time regions of one run: CUDA events on a GPU (read after the run), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list[Any]] = defaultdict(list)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        with record_function(name):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:  # a generator closed early (a loop's break) ends its region too
                    end.record()
                    self.spans[name].append((start, end))
            else:
                start = time.perf_counter()
                try:
                    yield
                finally:
                    self.spans[name].append(time.perf_counter() - start)

    def seconds(self) -> dict[str, list[float]]:
        """Each region's durations in seconds, in the order they ran."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: [s.elapsed_time(e) / 1e3 for s, e in v] for k, v in self.spans.items()}
        return dict(self.spans)

    def wrap(self, owner: Any, attribute: str, name: Callable[..., str | None]) -> contextlib.AbstractContextManager:
        """Patch `owner.attribute` so each call runs in the region `name(*args, **kwargs)` (None: no region)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs)
            if label is None:
                return original(*args, **kwargs)
            with self.region(label):
                return original(*args, **kwargs)

        return patched(owner, attribute, wrapped)


@contextlib.contextmanager
def patched(owner: Any, attribute: str, value: Any) -> Iterator[None]:
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def idle_share(spans: list[tuple[float, float]]) -> float | None:
    """The share of time between the first start and the last end of `spans` that no span covers (None if none)."""
    if not spans:
        return None
    spans = sorted(spans)
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, start = busy + end - start, s
        end = max(end, e)
    busy += end - start
    total = max(e for _, e in spans) - spans[0][0]
    return 1 - busy / total if total else 0.0


def gpu_idle_share(prof: profile) -> float | None:
    """The GPU's idle share between its first and last kernel (None without kernels: a CPU run)."""
    return idle_share([(e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA])


def sync_count(prof: profile, device: torch.device) -> int:
    """Host-side calls that wait for the device (SYNC_OPS)."""
    return sum(1 for e in prof.events() if SYNC_OPS[device.type] in e.name)


def region_row(run: Run, regions: Regions) -> dict[str, Any]:
    """A finished run's regions in seconds, and `timed_s`: the time both recipes are compared by.

    The timed region is airbench94's own (its `train` with verbose=True): the whitening init, each
    epoch's training and the final TTA evaluation; the evaluations between epochs are outside it.
    """
    seconds = regions.seconds()
    epochs, evaluations, tta = seconds.get("epoch", []), seconds.get("evaluation", []), seconds.get("tta", [])
    if run.epoch_holds_evaluation:  # ours: an epoch region ends with the evaluation after it; count that once
        epochs = [e - v for e, v in zip(epochs, evaluations + tta)]
    whitening = sum(seconds.get("whitening", []))
    return {"steps": run.steps, "test_acc": run.test_acc, "whitening_s": whitening, "epochs_s": epochs,
            "evaluation_s": sum(evaluations), "tta_s": sum(tta), "timed_s": whitening + sum(epochs) + sum(tta)}


def profiled(name: str, run: Callable[[Regions], Run], device: torch.device, out: Path, trace: bool) -> dict[str, Any]:
    """Warm up, then profile one run; write ops_<name>.txt (and trace_<name>.json); return its figures.

    `cold_timed_s` is the warm-up's timed region: what a user's first run in a fresh process costs
    (torch.compile, cuDNN's autotuning), which the warm timings leave out.
    """
    cold = Regions(device)
    cold_timed = region_row(run(cold), cold)["timed_s"]
    regions = Regions(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        result = run(regions)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (out / f"ops_{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    if trace:
        prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    syncs = sync_count(prof, device)
    return {**region_row(result, regions), "cold_timed_s": cold_timed, "syncs": syncs,
            "syncs_per_step": syncs / result.steps if result.steps else None, "gpu_idle_share": gpu_idle_share(prof)}


@dataclass
class Run:
    """What one run reports besides its regions."""

    steps: int  # training steps
    test_acc: float  # with the recipe's own final TTA
    epoch_holds_evaluation: bool  # whether its epoch region also holds the evaluation after the epoch (ours)


def run_ours(config: ours_train.TrainConfig, data: Any, out: Path) -> Callable[[Regions], Run]:
    runs = iter(range(1_000))

    def run(regions: Regions) -> Run:
        def evaluate_label(self: Any, model: Any, loader: Any, autocast: Any, final: bool) -> str:
            return "tta" if final else "evaluation"

        with (regions.wrap(ours_train, "train_epoch", lambda *a, **k: "epoch"),
              regions.wrap(type(ours_train.recipe_for(config)), "evaluate", evaluate_label),
              regions.wrap(ours_airbench, "patch_whitening", lambda *a, **k: "whitening")):
            summary = ours_train.train(config, out / f"run_{next(runs)}", data=data).summary
        steps = summary["epochs_run"] * (summary["dataset"]["train_images"] // config.batch_size)
        return Run(steps, summary["test_acc"], epoch_holds_evaluation=True)

    return run


def run_reference(airbench: Any, work: Path, seed: int) -> Callable[[Regions], Run]:
    utils = sys.modules[airbench.train94.__module__.replace("lib_airbench94", "utils")]

    def run(regions: Regions) -> Run:
        loader_class, iterate = utils.CifarLoader, utils.CifarLoader.__iter__
        steps = 0

        def epoch_iter(self: Any) -> Iterator[Any]:  # the training loader's pass is one epoch's training
            nonlocal steps
            if not self.train:
                yield from iterate(self)
                return
            with regions.region("epoch"):
                for batch in iterate(self):
                    steps += 1
                    yield batch

        torch.manual_seed(seed)
        with (contextlib.chdir(work), patched(loader_class, "__iter__", epoch_iter),
              regions.wrap(utils, "init_whitening_conv", lambda *a, **k: "whitening"),
              regions.wrap(utils, "evaluate", lambda m, l, tta_level=0: "tta" if tta_level else "evaluation")):
            loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024, aug={"flip": True, "translate": 2},
                                          altflip=True)
            model = airbench.train94(loader, verbose=False)
            acc = utils.evaluate(model, airbench.CifarLoader("cifar10", train=False, batch_size=2000), tta_level=2)
        return Run(steps, acc, epoch_holds_evaluation=False)

    return run


def summary_table(card: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"| recipe ({card}) | timed s | first run's timed s | whitening s | training s (epochs) | final TTA s | "
             "evaluations s (not timed) | GPU idle | syncs per step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        idle = "n/a" if r["gpu_idle_share"] is None else f"{r['gpu_idle_share']:.1%}"
        per_step = "n/a" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.2f}"
        lines.append(f"| {name} | {r['timed_s']:.3f} | {r['cold_timed_s']:.3f} | {r['whitening_s']:.3f} | "
                     f"{sum(r['epochs_s']):.3f} ({len(r['epochs_s'])}) | {r['tta_s']:.3f} | {r['evaluation_s']:.3f} | {idle} | {per_step} |")
    return "\n".join(lines) + "\n"


def gpu_parser(doc: str, out: str, tiny: str) -> argparse.ArgumentParser:
    """The options both GPU scripts take: the copied files, the output folder, the device and the CPU dry run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=Path(".cache/gpu/cifar10_jpeg.npz"))
    parser.add_argument("--reference", type=Path, default=Path(".cache/gpu/airbench-0.1.8.tar.gz"))
    parser.add_argument("--work", type=Path, default=Path(".cache/gpu/work"))
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help=tiny)
    return parser


def main() -> None:
    parser = gpu_parser(__doc__, ".cache/gpu/profile", "synthetic data, tiny widths, one epoch: a CPU dry run")
    parser.add_argument("--trace", action="store_true", help="also write chrome traces (large)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import decode_pack, install_reference

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    common: dict[str, Any] = {"device": args.device}
    if args.tiny:
        data = load_dataset("synthetic")
        common.update(dataset="synthetic", subset=1024, epochs=1, peak_epoch=0.5, layer1=8, layer2=16, layer3=16,
                      eval_batch_size=1000, threads=1)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        data = load_dataset("cifar10", decode_pack(args.pack, args.work / "cifar10.npz"))
        common.update(dataset="cifar10")
    config = ours_train.TrainConfig.for_recipe("airbench", **common)
    rows = {"ours": profiled("ours", run_ours(config, data, args.out / "runs"), device, args.out, args.trace)}
    if device.type == "cuda" and args.reference.is_file():
        airbench = install_reference(args.reference, args.work, data.x_train, data.y_train, data.x_test,
                                     data.y_test, data.classes)
        rows["airbench94"] = profiled("airbench94", run_reference(airbench, args.work, 0), device, args.out,
                                      args.trace)
    else:
        print("airbench94: not profiled (it needs CUDA and the copied sdist)", flush=True)
    (args.out / "regions.json").write_text(json.dumps({"device": card, "torch": torch.__version__, **rows},
                                                      indent=2) + "\n")
    table = summary_table(card, rows)
    (args.out / "summary.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
