"""Selection against its controls on finished pipeline directories: what the NAS answer is worth.

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/selection.py runs/quick-c10-s0 runs/quick-c10-s1 ...

For each pipeline directory (its search, select and hpo_best stages finished), two controls at the
selection's own budget are trained into PIPELINE/controls/ (resumable: finished runs are reused):
- `random`: the same successive halving over as many random networks under the same limit as the
  selection had proposals, plus the same incumbent (random search with early stopping), its answer
  retrained on all images;
- `top1`: the supernet's top-1 under the limit retrained at the final budget (the answer without a
  selection).
Prints one Markdown row per directory: the test accuracy of the HPO best, the selection's answer and
both controls, which candidate won, and the compute behind each NAS figure (supernet + search +
selection seconds from the stage markers; the selection's training work in image-epochs) beside HPO's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from effcifar.config import build_config, read_json
from effcifar.data import load_dataset
from effcifar.nas.retrain import train_once
from effcifar.nas.select import SelectConfig, read_selection, select_from_search
from effcifar.pipeline import load_pipeline_config
from effcifar.train import TrainConfig


def seconds(pipeline: Path, stage: str) -> float:
    return read_json(pipeline / stage / "stage.json").get("seconds", 0.0)


def controls(pipeline: Path) -> dict[str, Any]:
    """Train both controls of one pipeline directory (reusing finished runs) and return its row."""
    config = load_pipeline_config("quick", pipeline / "pipeline.yaml")
    select_config = build_config(SelectConfig, pipeline / "select" / "select.yaml")
    base = build_config(TrainConfig, pipeline / "hpo_best" / "config.yaml")  # the candidates train as the HPO best
    out = pipeline / "controls"
    random_config = dataclasses.replace(select_config, proposals="random", study=None, storage=None,
                                        proposal_seed=config.seed)
    random_result = select_from_search(random_config, pipeline / "search", out / "random_select", base,
                                       incumbent_run=pipeline / "hpo_best")
    data = load_dataset(base.dataset, base.data_dir)
    random_final = train_once(dataclasses.replace(base, arch=str((out / "random_select" / "answer.json").resolve())),
                              out / "random_answer", data)
    top1 = train_once(dataclasses.replace(base, arch=str((pipeline / "search" / "arch" / "top_1.json").resolve())),
                      out / "top1", data)
    results = {r["name"]: r for r in read_json(pipeline / "results.json")}
    selection = read_selection(pipeline / "select")
    hpo_trials = read_json(pipeline / "hpo" / "stage.json")
    return {
        "pipeline": str(pipeline), "seed": config.seed, "hpo_test": results["hpo"]["test_acc"],
        "nas_test": results["nas"]["test_acc"], "nas_answer": selection.answer, "nas_flops": results["nas"]["flops"],
        "random_test": random_final["test_acc"], "random_answer": random_result.answer,
        "top1_test": top1["test_acc"], "top1_flops": top1["flops"],
        "nas_seconds": seconds(pipeline, "supernet") + seconds(pipeline, "search") + seconds(pipeline, "select"),
        "select_image_epochs": selection.image_epochs, "random_image_epochs": random_result.image_epochs,
        "hpo_seconds": hpo_trials.get("seconds", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", type=Path, help="finished pipeline directories")
    args = parser.parse_args()
    rows = [controls(p) for p in args.pipelines]
    print("| seed | HPO best | NAS (selection) | answer | random + halving | supernet top-1 | NAS s (supernet+search+select) "
          "| selection image-epochs | HPO s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['hpo_test']:.2%} | {r['nas_test']:.2%} | {r['nas_answer']} | {r['random_test']:.2%} "
              f"({r['random_answer']}) | {r['top1_test']:.2%} ({r['top1_flops'] / 1e6:.1f} MFLOPs) | {r['nas_seconds']:.0f} "
              f"| {r['select_image_epochs']:,} | {r['hpo_seconds']:.0f} |")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
