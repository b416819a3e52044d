"""Benchmark tables: published ground-truth accuracies of a space's architectures (NAS-Bench-Macro's format).

A table is a JSON object with one entry per architecture. Its key has one digit per choice key of
the space, in declared order: digit i is the index of the chosen candidate of the i-th key. Each
value holds `mean_acc` and `test_acc` (accuracy in %, the mean and one value per training seed),
`params` and `flops`. `BenchmarkTable.load` checks the file against the space, so a table made for
another space is a one-line error rather than a silent mis-ranking.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable, pick_stratified
from effcifar.nas.space import Arch, ArchSpace, network_key

# NAS-Bench-Macro's CIFAR-10 table (Su et al., CVPR 2021; Apache-2.0, see tables/NOTICE), shipped with the package.
BUILTIN_TABLES = {"nas-bench-macro": Path(__file__).with_name("tables") / "nas-bench-macro_cifar10.json.gz"}


@dataclass(frozen=True)
class TableRow:
    """One architecture's entry: its key, mean and per-seed accuracy (fractions, not %), parameters, FLOPs."""

    key: str
    mean_acc: float
    seed_accs: tuple[float, ...]
    params: int
    flops: int  # in the table's own unit (NAS-Bench-Macro: multiply-accumulates)


class BenchmarkTable:
    """The rows of a table file, and the architectures of `space` their keys name."""

    def __init__(self, path: Path, space: ArchSpace, rows: dict[str, TableRow]):
        self.path, self.space, self.rows = path, space, rows
        self.keys = list(space.choices())

    @classmethod
    def load_named(cls, table: str | Path, space: ArchSpace) -> BenchmarkTable:
        """A built-in table by name (BUILTIN_TABLES: 'nas-bench-macro'), else a table file."""
        return cls.load(BUILTIN_TABLES.get(str(table), table), space)

    @classmethod
    def load(cls, path: str | Path, space: ArchSpace) -> BenchmarkTable:
        """Read and check a table (.json or .json.gz): every key must name an architecture of `space`."""
        path = Path(path)
        raw = read_table_json(path)
        if not isinstance(raw, dict) or len(raw) < 2:
            raise ConfigError(f"{path}: expected a JSON object of at least 2 architectures, got {type(raw).__name__}")
        choices = list(space.choices().values())
        rows = {}
        for key, value in raw.items():
            if len(key) != len(choices) or not all(c.isdigit() and int(c) < len(cands) for c, cands in zip(key, choices)):
                sizes = "".join(str(len(c)) for c in choices)
                raise ConfigError(
                    f"{path}: key {key!r} does not name an architecture of this space (expected {len(choices)} digits, "
                    f"digit i below the number of candidates of the space's i-th key: {sizes})")
            rows[key] = _row(path, key, value)
        return cls(path, space, rows)

    def arch(self, key: str) -> Arch:
        """The architecture a table key names."""
        return {name: self.space.choices()[name][int(digit)] for name, digit in zip(self.keys, key)}

    def key_of(self, arch: Mapping[str, str]) -> str:
        """The table key of an architecture of the space."""
        return table_key(self.space, arch)

    def networks(self) -> dict[str, list[str]]:
        """Distinct standalone networks (`network_key`) -> the table keys that build them, in table order."""
        out: dict[str, list[str]] = {}
        for key in self.rows:
            out.setdefault(network_key(self.space, self.arch(key)), []).append(key)
        return out

    def sample(self, count: int, seed: int) -> list[str]:
        """`count` keys of distinct networks, stratified over FLOPs (all networks if count is 0 or too large).

        The networks are sorted by FLOPs and cut into `count` strata (`pick_stratified`); one
        network is drawn from each, and one of its keys. The result is sorted by FLOPs.
        """
        rng = random.Random(seed)
        groups = sorted(self.networks().values(), key=lambda keys: (self.rows[keys[0]].flops, keys[0]))
        return [rng.choice(keys) for keys in pick_stratified(groups, count, rng)]

    def flops_ratio(self, costs: CostTable) -> float:
        """Our FLOPs over the table's, as one factor when it is the same for every row (else NaN).

        NAS-Bench-Macro counts multiply-accumulates, we count 2 FLOPs per multiply-add: 2.0.
        """
        ratios = {costs.flops_of(self.arch(key)) / row.flops for key, row in self.rows.items() if row.flops > 0}
        return ratios.pop() if len(ratios) == 1 else math.nan

    def params_mismatches(self, costs: CostTable) -> list[str]:
        """Keys whose table `params` differ from the parameters of our standalone network."""
        return [key for key, row in self.rows.items() if costs.params_of(self.arch(key)) != row.params]

    def best_under(self, max_flops: float) -> TableRow | None:
        """The most accurate architecture with at most `max_flops` (table units), or None."""
        feasible = [row for row in self.rows.values() if row.flops <= max_flops]
        return max(feasible, key=lambda row: (row.mean_acc, -row.flops), default=None)

    def largest_under(self, max_flops: float) -> TableRow | None:
        """The "largest network under the limit" heuristic: most FLOPs within `max_flops` (ties: most parameters)."""
        feasible = [row for row in self.rows.values() if row.flops <= max_flops]
        return max(feasible, key=lambda row: (row.flops, row.params), default=None)


def table_key(space: ArchSpace, arch: Mapping[str, str]) -> str:
    """An architecture's key in a table of `space`: digit i is the index of its candidate of the i-th key."""
    wide = [name for name, candidates in space.choices().items() if len(candidates) > 10]
    if wide:
        raise ConfigError(f"key {wide[0]!r} has more than 10 candidates: a benchmark table has one digit per key")
    return "".join(str(candidates.index(arch[name])) for name, candidates in space.choices().items())


def read_table_json(path: Path) -> Any:
    """The parsed JSON of a table file (.json, or .json.gz as shipped), unchecked; a one-line error if unreadable."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            return json.loads(file.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such table file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not a JSON table ({type(e).__name__}: {str(e)[:120]})") from None


def _row(path: Path, key: str, value: Any) -> TableRow:
    def fail(field: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{path}: {key}: field '{field}': expected {expected}, got {got!r}")

    if not isinstance(value, Mapping):
        raise fail("(entry)", "an object with mean_acc, test_acc, params, flops", value)

    def number(field: str, low: float, high: float) -> float:
        got = value.get(field)
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not low <= got <= high:
            raise fail(field, f"a number in [{low:g}, {high:g}]", got)
        return float(got)

    seeds = value.get("test_acc")
    if not isinstance(seeds, list) or not seeds:
        raise fail("test_acc", "a list of per-seed accuracies in %", seeds)
    accs = []
    for i, acc in enumerate(seeds):
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 100:
            raise fail(f"test_acc[{i}]", "an accuracy in % in [0, 100]", acc)
        accs.append(acc / 100)
    return TableRow(key, number("mean_acc", 0, 100) / 100, tuple(accs),
                    int(number("params", 0, math.inf)), int(number("flops", 0, math.inf)))
