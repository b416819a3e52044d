"""Forward latency of subnets on the search's device: a per-choice lookup table, checked against whole networks.

Like `CostTable`, the table holds the fixed parts (stem and head) and one figure per candidate
of each choice key, each op timed standalone at the input shape it has in the network (stride
and pooling as in the space), so a subnet's latency is the fixed part plus its active keys and
limits can be applied to sampled paths without building them. A non-zero skip costs its
addition. Each figure is the median of `repeats` forwards after `warmup` ones, in eval mode
without gradients, on the target device with its autocast dtype and memory format, waiting for
the GPU after each forward. Latency is per forward of `batch` images (default 1: one image at a
time, as a deployed classifier runs).

Summing ops ignores what a whole network shares or overlaps (caches, Python dispatch between
ops, kernel launch queues): on the project's CPU the raw sum ran 6-36% under whole networks.
So `measure` also times `calibrate + check` whole standalone networks of distinct random
architectures, in a random order of the two sets (the load on a shared machine drifts), fits
one scale `measured = scale * raw sum` by least squares on the `calibrate` ones, and reports
the raw and the calibrated error on the `check` held-out ones (mean and max absolute %, and the
mean signed % as the bias). A scale alone predicted held-out networks as well as adding an
intercept or a per-op term, which fit the noise with 10 networks (see docs/benchmarks.md), and
it keeps the table per-choice: the fastest subnet and the ranking are those of the raw sum.
`latency_of` is the calibrated prediction, `raw_latency_of` the sum.

The table is saved as JSON; `load_or_measure` reuses a saved one only if it was made for the
same device, torch version, precision, memory format, batch, space, widths and classes, and by
this version of the method (older files are measured again).

With width choices an op's time depends on its stage's width and the previous one's, so the
table also holds every op at every pair of channels it can run at (`sized`, keyed
"key candidate c_in c_out") and the fixed parts at every last-stage width (`bases`); `ms` and
`base_ms` are then the figures at the widest, and a subnet sums the figures at its own widths.
"""

from __future__ import annotations

import functools
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from effcifar.atomic import atomic_write
from effcifar.config import read_json
from effcifar.errors import ConfigError
from effcifar.nas.costs import IMAGE_SIZE, extreme_arch, extreme_over_widths, op_channels, sites
from effcifar.nas.network import build_standalone
from effcifar.nas.ops import make_head, make_op
from effcifar.nas.space import Arch, ArchSpace, distinct_random_archs, resolve_width

LATENCY_FILE = "latency_table.json"
VERSION = 2  # 2: calibrated against whole networks (1: the raw sum)
REPEATS, WARMUP, CALIBRATE, CHECK = 30, 5, 10, 10


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name: what the latency was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu: {model or platform.processor() or platform.machine()}"


@dataclass(frozen=True)
class Target:
    """Where and how forwards are timed: device, autocast dtype (None: fp32), memory format, images per forward."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    batch: int = 1

    def setup(self) -> dict[str, Any]:
        """What the timings depend on besides the network (a saved table is reused only if this matches)."""
        return {"device": device_name(self.device), "torch": torch.__version__,
                "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
                "channels_last": self.channels_last, "batch": self.batch}

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module on the target, in eval mode, in its memory format."""
        module = module.to(self.device).eval()
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def input(self, channels: int, size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A random activation as the network would hand it on (autocast dtype inside, fp32 images)."""
        x = torch.randn(self.batch, channels, size, size, device=self.device, dtype=dtype or self.amp_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def median_ms(self, forward: Callable[[], Any], repeats: int, warmup: int) -> float:
        """Median wall time of one call in milliseconds, after warm-up, without gradients, under autocast.

        Our own loop, not torch.utils.benchmark.Timer: the table's figures are medians of single
        calls after a fixed warm-up; Timer.timeit adds warm-up runs to every measurement and
        blocked_autorange times blocks of calls until a minimum run time, which would change what
        the table (and docs/benchmarks.md) measure, and Timer runs on one thread unless told.
        """
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        times = []
        with torch.no_grad(), autocast:
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                forward()
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of the fixed parts and of each candidate on one target; see the module docstring."""

    setup: dict[str, Any]  # Target.setup() plus the space, widths, classes and VERSION
    base_ms: float
    ms: dict[str, dict[str, float]]
    scale: float  # whole-network ms per ms of the raw sum (fitted on the calibration networks)
    validation: dict[str, Any]  # the whole-network timings, and the raw and calibrated held-out errors
    build_seconds: float  # timing the ops (the whole-network check is timed in `validation`)
    threads: int  # torch CPU threads while measuring (not part of the setup: workers use fewer)
    sized: dict[str, float] = field(default_factory=dict)  # with width choices: "key candidate c_in c_out" -> ms
    bases: dict[str, float] = field(default_factory=dict)  # with width choices: last stage's channels -> fixed ms

    @functools.cached_property
    def space(self) -> ArchSpace:
        """The space the table covers (parsed once: latency_of runs for every proposal)."""
        return ArchSpace.from_dict(self.setup["space"], LATENCY_FILE)

    @classmethod
    def measure(cls, space: ArchSpace, channels: Mapping[str, int], num_classes: int, target: Target,
                repeats: int = REPEATS, warmup: int = WARMUP, calibrate: int = CALIBRATE, check: int = CHECK,
                seed: int = 0) -> LatencyTable:
        """Time every op once at its input shape, then calibrate on whole random networks and check on others."""
        started = time.perf_counter()
        sized: dict[str, float] = {}
        for site in sites(space, channels):
            x = target.input(site.c_in, site.size)
            if site.key.endswith(".skip"):
                ms = 0.0 if site.name == "zero" else target.median_ms(lambda x=x: x + x, repeats, warmup)
            else:
                op = target.prepare(make_op(site.name, site.c_in, site.c_out))
                ms = target.median_ms(lambda op=op, x=x: op(x), repeats, warmup)
            sized[site_key(site.key, site.name, site.c_in, site.c_out)] = ms
        c_stem, size = resolve_width(space.stem_width, channels), IMAGE_SIZE >> len(space.stages)
        stem = target.prepare(make_op(space.stem_op, 3, c_stem))
        images = target.input(3, IMAGE_SIZE, torch.float32)
        stem_ms = target.median_ms(lambda: stem(images), repeats, warmup)
        bases = {}
        for c_last in sorted({s.c_out for s in sites(space, channels) if s.key.startswith(f"{space.stages[-1].name}.")}):
            head, features = target.prepare(make_head(space.head, c_last, num_classes)), target.input(c_last, size)
            bases[str(c_last)] = stem_ms + target.median_ms(lambda: head(features), repeats, warmup)
        widest = [s.max_channels(channels) for s in space.stages]
        table: dict[str, dict[str, float]] = {key: {} for key in space.choices()}
        for key, c_in, c_out in op_channels(space, widest, c_stem):
            table[key] = {name: sized[site_key(key, name, c_in, c_out)] for name in space.choices()[key]}
        setup = table_setup(space, channels, num_classes, target)
        built = time.perf_counter() - started
        elastic = space.has_widths()
        raw = cls(setup, bases[str(widest[-1])], table, 1.0, {}, built, torch.get_num_threads(),
                  sized if elastic else {}, bases if elastic else {})
        scale, validation = raw.calibrate(channels, num_classes, target, calibrate, check, repeats, warmup, seed)
        return replace(raw, scale=scale, validation=validation)

    def raw_latency_of(self, arch: Mapping[str, str]) -> float:
        """The sum of separately timed parts (fixed part plus active keys), before calibration: for diagnostics."""
        if not self.sized:
            return self.base_ms + sum(self.ms[key][arch[key]] for key in self.space.active_keys(arch))
        channels = self.setup["channels"]
        widths = [s.channels_of(arch, channels) for s in self.space.stages]
        active = set(self.space.active_keys(arch))
        return self.bases[str(widths[-1])] + sum(
            self.sized[site_key(key, arch[key], c_in, c_out)]
            for key, c_in, c_out in op_channels(self.space, widths, resolve_width(self.space.stem_width, channels))
            if key in active)

    def latency_of(self, arch: Mapping[str, str]) -> float:
        """Predicted milliseconds of one forward of the whole subnet (the calibrated sum)."""
        return self.scale * self.raw_latency_of(arch)

    def fastest(self, space: ArchSpace | None = None) -> Arch:
        """The subnet of `space` (default: the table's) with the smallest predicted latency."""
        space = space or self.space
        if not space.has_widths():
            return extreme_arch(self.ms, space, largest=False)
        return extreme_over_widths(space, self.setup["channels"], lambda *site: self.sized[site_key(*site)],
                                   self.raw_latency_of, largest=False)

    def calibrate(self, channels: Mapping[str, int], num_classes: int, target: Target, calibrate: int, check: int,
                  repeats: int = REPEATS, warmup: int = WARMUP, seed: int = 0) -> tuple[float, dict[str, Any]]:
        """The scale fitted on `calibrate` whole random networks, and the raw and scaled error on `check` others."""
        rng, started = random.Random(seed), time.perf_counter()
        archs = distinct_archs(self.space, calibrate + check, rng)
        held_out = set(rng.sample(range(len(archs)), check))  # both sets spread over the timing (drifting load)
        images = target.input(3, IMAGE_SIZE, torch.float32)
        pairs = []
        for arch in archs:
            net = target.prepare(build_standalone(self.space, arch, channels, num_classes))
            pairs.append({"arch": arch, "table_ms": self.raw_latency_of(arch),
                          "measured_ms": target.median_ms(lambda net=net: net(images), repeats, warmup)})
        fit = [p for i, p in enumerate(pairs) if i not in held_out]
        checked = [p for i, p in enumerate(pairs) if i in held_out]
        scale = fit_scale([p["table_ms"] for p in fit], [p["measured_ms"] for p in fit])
        return scale, {"calibration": fit, "held_out": checked, "raw": pct_errors(checked, 1.0),
                       "calibrated": pct_errors(checked, scale), "seconds": time.perf_counter() - started}

    def summary(self) -> str:
        """One line: where it was measured, its scale, and its held-out error (and the raw sum's)."""
        v = self.validation
        calibrated, raw = v["calibrated"], v["raw"]
        error = (f"x{self.scale:.2f} from {len(v['calibration'])} whole networks; held-out error over "
                 f"{calibrated['networks']} others: mean |error| {calibrated['mean_abs_pct']:.1f}% "
                 f"(raw sum {raw['mean_abs_pct']:.1f}%), max {calibrated['max_abs_pct']:.1f}% "
                 f"({raw['max_abs_pct']:.1f}%), bias {calibrated['bias_pct']:+.1f}% ({raw['bias_pct']:+.1f}%)"
                 if calibrated["networks"] else f"x{self.scale:.2f}, not checked on held-out networks")
        return (f"latency table ({self.setup['device']}, batch {self.setup['batch']}, {self.setup['precision']}, "
                f"{self.threads} threads, built in {self.build_seconds:.1f}s): {error}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`from_dict` reads it back)."""
        widths = {"sized": self.sized, "bases": self.bases} if self.sized else {}
        return {"setup": self.setup, "threads": self.threads, "build_seconds": self.build_seconds,
                "base_ms": self.base_ms, "ms": self.ms, "scale": self.scale, "validation": self.validation, **widths}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        """The table of `to_dict`."""
        return cls(data["setup"], data["base_ms"], data["ms"], data["scale"], data["validation"],
                   data["build_seconds"], data["threads"], data.get("sized", {}), data.get("bases", {}))

    def save(self, path: str | Path) -> None:
        """Write the table as JSON atomically."""
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """A saved table; a missing or unreadable file is a ConfigError naming it."""
        data = read_json(path, "latency table")
        try:
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a latency table ({e})") from None


def site_key(key: str, name: str, c_in: int, c_out: int) -> str:
    """The JSON key of one op's figure at its channels: "stage1.conv1 conv3_pool 8 16"."""
    return f"{key} {name} {c_in} {c_out}"


def fit_scale(table_ms: list[float], measured_ms: list[float]) -> float:
    """Least-squares `scale` in `measured = scale * table` (through the origin: a network of no ops takes no time)."""
    if not table_ms:
        raise ValueError("calibrating the latency table needs at least one whole network")
    return sum(t * m for t, m in zip(table_ms, measured_ms)) / sum(t * t for t in table_ms)


def pct_errors(pairs: list[dict[str, Any]], scale: float) -> dict[str, Any]:
    """Mean and max absolute % error and mean signed % (bias) of `scale * table_ms` against `measured_ms`."""
    errors = [100 * (scale * p["table_ms"] - p["measured_ms"]) / p["measured_ms"] for p in pairs]
    return {"networks": len(errors), "mean_abs_pct": statistics.fmean(map(abs, errors)) if errors else None,
            "max_abs_pct": max(map(abs, errors), default=None),
            "bias_pct": statistics.fmean(errors) if errors else None}


def distinct_archs(space: ArchSpace, count: int, rng: random.Random) -> list[Arch]:
    """`count` random architectures that are different networks, so none is both fitted and held out."""
    archs = distinct_random_archs(space, count, rng)
    if len(archs) < count:
        raise ConfigError(f"latency table: the space has fewer than {count} distinct networks to time")
    return archs


def table_setup(space: ArchSpace, channels: Mapping[str, int], num_classes: int, target: Target) -> dict[str, Any]:
    """What a table's timings depend on: the target's setup, the space, the widths, the classes and the method."""
    return {**target.setup(), "space": space.to_dict(), "channels": dict(channels), "num_classes": num_classes,
            "version": VERSION}


def load_or_measure(path: str | Path | None, space: ArchSpace, channels: Mapping[str, int], num_classes: int,
                    target: Target) -> LatencyTable:
    """The table saved at `path` if it was made for this target, space, widths and classes; else a new one."""
    if path is not None and Path(path).is_file():
        try:
            table = LatencyTable.load(path)
        except ConfigError:  # unreadable: measured again, and the caller overwrites it
            pass
        else:
            if table.setup == table_setup(space, channels, num_classes, target):
                return table
    return LatencyTable.measure(space, channels, num_classes, target)
