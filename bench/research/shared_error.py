"""Is a supernet's error among the best networks noise or a bias every supernet shares?

    python bench/research/shared_error.py RUN [RUN ...] [--cells stage2.conv3=identity,stage3.conv1=identity_stride2]

Each RUN is a bench/nas_bench_macro.py variant directory scored with `--top-sample`, so that
RUN/nas_eval_top10/ranking.json holds the same networks for every RUN. Prints each supernet's Kendall
tau against the table, every pair's agreement with each other, and the tau of their mean rank: if the
supernets agree with each other far better than with the table and their mean ranks no better than
the best of them, the error is shared, not noise that more supernets would average away.

With `--cells` (key=candidate, comma-separated): how much a score shift for networks that choose
those cells could move the ranking. Per RUN, the shifts (a grid of ±1.5 s.d. of the scores, 31 steps
per cell) that rank RUN/nas_eval_table (the 300, minus networks shared with the 200) best, carried
over to the 200; and the shifts fitted on the 200 themselves — in-sample, an optimistic bound, beside
the same fit on the cell columns shuffled over the networks (`--shuffles` times: what 2 fitted
parameters gain by chance). Diagnostic only: the shifts are fitted on the table's answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from effcifar.nas.ranking import kendall_tau


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def cell_matrix(ranking: dict, cells: list[tuple[str, str]]) -> np.ndarray:
    """networks x cells: 1 where the network chose that candidate at that key (a key's digit indexes its candidates)."""
    space = ranking["space"]  # key -> candidates, in the table's digit order
    digits = [(list(space).index(key), str(space[key].index(candidate))) for key, candidate in cells]
    return np.array([[float(arch[i] == d) for i, d in digits] for arch in ranking["keys"]])


def best_shift(scores: np.ndarray, truth: np.ndarray, cells: np.ndarray) -> tuple[float, np.ndarray]:
    """(tau, shift per cell) of the grid point whose shifted scores rank `truth` best."""
    grid = np.linspace(-1.5, 1.5, 31) * scores.std()
    return max(((kendall_tau(truth, scores + cells @ np.array(shift)), np.array(shift))
                for shift in itertools.product(grid, repeat=cells.shape[1])), key=lambda t: t[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="bench/nas_bench_macro.py variant directories")
    parser.add_argument("--cells", default="", help="key=candidate,... to fit score shifts for (a diagnostic)")
    parser.add_argument("--shuffles", type=int, default=20, help="shuffled-cells fits per run (the chance gain)")
    args = parser.parse_args()
    top = {run.name: load(run / "nas_eval_top10" / "ranking.json") for run in args.runs}
    first = next(iter(top.values()))
    if any(r["keys"] != first["keys"] for r in top.values()):
        parser.error("the runs' nas_eval_top10 rankings hold different networks")
    truth = np.array(first["standalone_acc"])
    scores = {name: np.array(r["supernet_score"]) for name, r in top.items()}
    print(f"{len(truth)} networks; tau against the table:")
    for name, score in scores.items():
        print(f"  {name}: {kendall_tau(truth, score):.3f}")
    for a, b in itertools.combinations(scores, 2):
        print(f"  {a} vs {b}: {kendall_tau(scores[a], scores[b]):.3f}")
    mean_rank = sum(rankdata(score) for score in scores.values())
    print(f"  mean rank of all {len(scores)}: {kendall_tau(truth, mean_rank):.3f}")
    if not args.cells:
        return
    space = first["space"]
    cells = [tuple(cell.split("=", 1)) for cell in args.cells.split(",")]
    for cell in cells:
        if len(cell) != 2 or cell[0] not in space or cell[1] not in space[cell[0]]:
            parser.error(f"--cells: {'='.join(cell)} is not key=candidate of the space "
                         f"(keys: {', '.join(space)})")
    for run in args.runs:
        wide = load(run / "nas_eval_table" / "ranking.json")
        outside = [i for i, key in enumerate(wide["keys"]) if key not in set(first["keys"])]
        w_scores, w_truth = np.array(wide["supernet_score"])[outside], np.array(wide["standalone_acc"])[outside]
        w_tau, shift = best_shift(w_scores, w_truth, cell_matrix(wide, cells)[outside])
        t_cells = cell_matrix(top[run.name], cells)
        carried = kendall_tau(truth, scores[run.name] + t_cells @ shift)
        in_sample, _ = best_shift(scores[run.name], truth, t_cells)
        rng = np.random.default_rng(0)
        chance = [best_shift(scores[run.name], truth, t_cells[rng.permutation(len(truth))])[0]
                  for _ in range(args.shuffles)]
        base = kendall_tau(truth, scores[run.name])
        print(f"{run.name}: over {len(outside)} of the wide sample {kendall_tau(w_truth, w_scores):.3f} -> "
              f"{w_tau:.3f} (shift / s.d. {', '.join(f'{s / w_scores.std():+.2f}' for s in shift)}); "
              f"the 200 {base:.3f} -> {carried:.3f} carried over, {in_sample:.3f} fitted in-sample"
              + (f" (shuffled cells: +{np.mean(chance) - base:.3f} on average, +{max(chance) - base:.3f} at most)"
                 if chance else ""))


if __name__ == "__main__":
    main()
