"""Which candidates does a supernet over- or under-rate? Read from a ranking against a benchmark table.

    python bench/research/candidate_bias.py runs/macro300/sandwich/nas_eval_table/ranking.json [more ranking.json ...]

For each `ranking.json` that `effcifar nas-eval --table` (or bench/nas_bench_macro.py) wrote: every
architecture's misplacement (its rank by the supernet's score minus its rank by the table's accuracy,
over n; positive: the supernet rates it above the table) and, for each candidate position (the
i-th choice of a key), the Pearson correlation of the misplacement with how many of the
architecture's keys chose it. A position is named by its op where every key lists the same op there,
else by the ops it stands for (`conv3_pool|conv3|zero` in the seed space). A sampling that trains one
candidate less than the others shows up as a negative correlation for that candidate.

With `--by-key`, the same correlation per key: for each key, with whether the architecture chose each
of its candidates there (a candidate no architecture or every architecture chose there prints as "-").
It shows where in the network a supernet's error lies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import pearsonr, rankdata


def misplacement(ranking: dict) -> list[float]:
    """Each architecture's rank by the supernet's score minus its rank by the table's accuracy, over n."""
    n = len(ranking["keys"])
    return list((rankdata(ranking["supernet_score"]) - rankdata(ranking["standalone_acc"])) / n)


def candidate_bias(ranking: dict) -> dict[str, float]:
    """{candidate name: correlation of the misplacement with the count of that candidate}."""
    keys, missed, space = ranking["keys"], misplacement(ranking), ranking["space"]
    return {position_name(space, i): float(pearsonr([key.count(str(i)) for key in keys], missed)[0])
            for i in range(max(map(len, space.values())))}


def key_bias(ranking: dict) -> dict[str, dict[str, float | None]]:
    """{key: {candidate: correlation of the misplacement with choosing it at that key}}; None where constant."""
    keys, missed = ranking["keys"], misplacement(ranking)
    out: dict[str, dict[str, float | None]] = {}
    for digit, (key, candidates) in enumerate(ranking["space"].items()):
        out[key] = {}
        for i, candidate in enumerate(candidates):
            chosen = [float(arch[digit] == str(i)) for arch in keys]
            out[key][candidate] = float(pearsonr(chosen, missed)[0]) if 0 < sum(chosen) < len(keys) else None
    return out


def position_name(space: dict[str, list[str]], i: int) -> str:
    """The op(s) that candidate position i stands for across the keys ("a|b" where keys list different ops)."""
    ops = dict.fromkeys(candidates[i].removesuffix("_stride2") for candidates in space.values() if i < len(candidates))
    return "|".join(ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ranking", nargs="+", help="ranking.json files of nas-eval --table")
    parser.add_argument("--by-key", action="store_true", help="the correlation per key and candidate")
    args = parser.parse_args()
    for path in args.ranking:
        ranking = json.loads(Path(path).read_text())
        bias = ", ".join(f"{name} {r:+.2f}" for name, r in candidate_bias(ranking).items())
        print(f"{path} (n = {len(ranking['keys'])}): {bias}")
        if args.by_key:
            for key, by_candidate in key_bias(ranking).items():
                print(f"  {key}: " + ", ".join(f"{c} {'-' if r is None else f'{r:+.2f}'}"
                                              for c, r in by_candidate.items()))


if __name__ == "__main__":
    main()
