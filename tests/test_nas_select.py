"""Selection by real training: the incumbent, the pool under the limits, successive halving, the answer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from effcifar.errors import ConfigError
from effcifar.models import NetConfig, ResNet, count_flops, count_parameters
from effcifar.nas.retrain import base_config
from effcifar.nas.search import SearchConfig, run_search
from effcifar.nas.select import (
    FRONT_FILE, INCUMBENT, SelectConfig, baseline_costs, choose, curve_accuracy, limit_dir, make_pool, read_selection, resnet9_arch, rungs,
    select_from_search, select_front,
)
from effcifar.nas.costs import CostTable
from effcifar.nas.network import build_standalone
from effcifar.nas.space import ArchSpace, network_key
from effcifar.studies import load_study
import dataclasses

from effcifar.train import TrainConfig, read_logs, train

from conftest import NARROW

ROOT = Path(__file__).resolve().parents[1]
# Candidates trained on the tiny supernet run's synthetic split (100 images held out), three epochs each.
TINY = {"subset": 500, "batch_size": 50, "eval_batch_size": 100, "precision": "fp32", "threads": 1,
        "epochs": 3, "peak_epoch": 1}


@pytest.fixture(scope="module")
def search_run(supernet_run) -> Path:
    """A random search of 12 evaluations over the tiny supernet."""
    search = supernet_run.parent / "search_for_select"
    run_search(SearchConfig(strategy="random", trials=12, precision="fp32", threads=1, export=2),
               supernet_run, search)
    return search


def tiny_base(supernet_run: Path) -> TrainConfig:
    return base_config(supernet_run, overrides=TINY)


def test_the_incumbent_is_resnet9_exactly():
    """The seed space expresses cifar10-fast's ResNet-9: same parameters and FLOPs as models.ResNet."""
    space, widths = ArchSpace.seed(), {"prep": 16, "layer1": 32, "layer2": 64, "layer3": 128}
    arch = resnet9_arch(space, TrainConfig(**widths))
    assert arch["stage1.skip"] == "conv4_input" and arch["stage2.skip"] == "zero" and arch["stage3.skip"] == "conv4_input"
    standalone = build_standalone(space, arch, widths, 10)
    resnet = ResNet(NetConfig(channels=widths, num_classes=10))
    assert count_parameters(standalone) == count_parameters(resnet)
    assert count_flops(standalone) == count_flops(resnet) == CostTable.build(space, widths, 10).flops_of(arch)
    assert sorted(p.shape for p in standalone.parameters()) == sorted(p.shape for p in resnet.parameters())
    # a ResNet the space cannot express (two residual blocks, extra layers) has no incumbent
    assert resnet9_arch(space, TrainConfig(recipe_fields={"res_layer1": 2})) is None
    assert resnet9_arch(space, TrainConfig(recipe_fields={"extra_layer3": 1})) is None
    assert resnet9_arch(ArchSpace.load("nas-bench-macro"), TrainConfig()) is None


def test_the_incumbent_is_the_full_width_path_of_the_joint_space():
    """With width choices ResNet-9 is the full-width path, and no longer the costliest network of the space."""
    space, widths = ArchSpace.load("seed-widths"), {"prep": 16, "layer1": 32, "layer2": 64, "layer3": 128}
    arch = resnet9_arch(space, TrainConfig(**widths))
    assert [arch[f"stage{i}.width"] for i in (1, 2, 3)] == ["1x", "1x", "1x"]
    costs = CostTable.build(space, widths, 10)
    assert costs.flops_of(arch) == count_flops(ResNet(NetConfig(channels=widths, num_classes=10)))
    assert costs.flops_of(costs.extreme(False)) < costs.flops_of(arch) < costs.flops_of(costs.extreme(True))


def test_pool_holds_the_incumbent_and_distinct_proposals_under_the_limit():
    space, base = ArchSpace.seed(), TrainConfig(**NARROW)
    costs = CostTable.build(space, NARROW, 10)
    incumbent = resnet9_arch(space, base)
    limit = costs.flops_of(incumbent)
    ranked = [{"arch": a, "score": -i} for i, a in enumerate(
        [costs.extreme(True, space), incumbent, costs.extreme(False, space), costs.extreme(False, space)])]
    with pytest.raises(ConfigError, match="only 1 besides the incumbent"):  # the largest is over, the rest repeat
        make_pool(SelectConfig(pool=2, max_flops=limit, width_curve=""), space, costs, ranked, base, 10)
    pool = make_pool(SelectConfig(pool=1, max_flops=limit, width_curve=""), space, costs, ranked, base, 10)
    assert [c.name for c in pool] == [INCUMBENT, "proposal_0"]
    assert pool[1].arch == costs.extreme(False, space) and pool[1].supernet_score == -2
    random_pool = make_pool(SelectConfig(pool=5, proposals="random", max_flops=limit, width_curve=""), space, costs, [], base, 10)
    assert len({network_key(space, c.arch) for c in random_pool}) == 6
    assert all(c.flops <= limit for c in random_pool)
    smallest = costs.flops_of(costs.extreme(False, space))
    with pytest.raises(ConfigError, match=f"the smallest has {smallest:,} FLOPs"):
        make_pool(SelectConfig(max_flops=smallest - 1), space, costs, ranked, base, 10)


def test_a_base_network_outside_the_space_is_a_fixed_arm():
    """nas-bench-macro cannot express ResNet-9: the incumbent is the base network itself, at its own exact cost."""
    space, base = ArchSpace.load("nas-bench-macro"), TrainConfig()
    costs = CostTable.build(space, NARROW, 10)
    resnet = ResNet(NetConfig(num_classes=10))
    pool = make_pool(SelectConfig(pool=2, proposals="random", width_curve=""), space, costs, [], base, 10,
                     inherited=lambda arch: 0.5)
    incumbent = pool[0]
    assert (incumbent.name, incumbent.arch, incumbent.source) == (INCUMBENT, None, "baseline")
    assert (incumbent.flops, incumbent.params) == (count_flops(resnet), count_parameters(resnet))
    assert incumbent.inherited_acc is None and [c.inherited_acc for c in pool[1:]] == [0.5, 0.5]
    # under a limit below its own cost the base network is not in the pool
    smaller = make_pool(SelectConfig(pool=2, proposals="random", max_flops=count_flops(resnet) - 1), space, costs, [],
                        base, 10)
    assert INCUMBENT not in [c.name for c in smaller]


def test_the_width_curve_is_the_base_network_scaled():
    """Fixed arms at fractions of the base widths, at their exact costs; only those within the limits."""
    space, base = ArchSpace.seed(), TrainConfig(**NARROW)
    costs = CostTable.build(space, NARROW, 10)
    pool = make_pool(SelectConfig(pool=1, proposals="random", width_curve="0.75, 0.5"), space, costs, [], base, 10)
    assert [c.name for c in pool] == [INCUMBENT, "resnet_0.5x", "resnet_0.75x", "proposal_0"]
    half = pool[1]
    assert half.widths == {"prep": 4, "layer1": 8, "layer2": 12, "layer3": 16} and half.arch is None and half.fixed
    assert half.flops == count_flops(ResNet(NetConfig(channels=half.widths, num_classes=10)))
    limited = make_pool(SelectConfig(pool=1, proposals="random", max_flops=half.flops), space, costs, [], base, 10)
    assert [c.name for c in limited] == ["resnet_0.5x", "proposal_0"]
    for bad in ("1.0", "0.5,0.5", "half", "0"):
        with pytest.raises(ConfigError, match="width_curve"):
            SelectConfig(width_curve=bad).validate()


def test_curve_accuracy_interpolates_in_log_flops():
    curve = [(10, 0.5), (40, 0.7)]
    assert curve_accuracy(curve, 20) == pytest.approx(0.6)
    assert curve_accuracy(curve, 5) is None and curve_accuracy(curve, 80) == 0.7 and curve_accuracy([], 10) is None


def test_a_later_candidate_overturns_an_earlier_one_only_beyond_the_margin():
    def row(name, acc, flops=10):
        return {"name": name, "holdout_acc": acc, "flops": flops, "params": 1}

    rows = [row("incumbent", 0.640), row("proposal_0", None), row("proposal_1", 0.653), row("proposal_2", 0.650)]
    assert choose(rows)["name"] == "proposal_1"  # no margin: the best held-out accuracy
    # 2,000 held-out images: the difference's standard error is ~1.5 points, so 1.3 points is noise at 1 s.e.
    assert choose(rows, margin=1.0, holdout=2000)["name"] == "incumbent"
    assert choose(rows, margin=0.5, holdout=2000)["name"] == "proposal_1"
    assert choose(rows, margin=1.0, holdout=200_000)["name"] == "proposal_1"  # many images: a real lead
    # champion and challengers: the first is overturned only by a real lead, not by whoever is near the best
    rows = [row("proposal_0", 0.674), row("proposal_1", 0.6835), row("proposal_3", 0.672), row("proposal_5", 0.697)]
    assert choose(rows, margin=1.0, holdout=2000)["name"] == "proposal_5"  # leads proposal_0 by 2.3 points
    assert choose(rows, margin=2.0, holdout=2000)["name"] == "proposal_0"
    with pytest.raises(ConfigError, match="margin"):
        SelectConfig(margin=-1).validate()


def test_rungs_fit_the_budget():
    assert rungs(SelectConfig(min_epochs=1, reduction=3), 4) == [1, 3, 4]
    assert rungs(SelectConfig(min_epochs=1, reduction=2), 4) == [1, 2, 4]
    assert rungs(SelectConfig(min_epochs=2, reduction=3), 2) == [2]


@pytest.mark.slow
def test_selection_prunes_at_rungs_keeps_the_incumbent_and_resumes(supernet_run, search_run, tmp_path):
    out = tmp_path / "select"
    base = tiny_base(supernet_run)
    config = SelectConfig(pool=4, min_epochs=1, reduction=2, margin=0)  # the best held-out accuracy wins
    result = select_from_search(config, search_run, out, base)
    rows = {r["name"]: r for r in result.rows}
    assert list(rows) == [INCUMBENT, "resnet_0.5x", "resnet_0.75x", "proposal_0", "proposal_1", "proposal_2",
                          "proposal_3"]
    for name in (INCUMBENT, "resnet_0.5x", "resnet_0.75x"):  # fixed arms: never pruned
        assert rows[name]["state"] == "COMPLETE" and rows[name]["epochs"] == 3 and rows[name]["curve_acc"] is None
    reported = {t.params["candidate"]: t.intermediate_values for t in load_study(config, out).trials}
    assert reported["resnet_0.5x"] == {} and len(reported[INCUMBENT]) == 3  # the curve takes no place at the rungs
    pruned = [r for r in rows.values() if r["state"] == "PRUNED"]
    assert pruned, "successive halving pruned no candidate"
    for r in pruned:  # a pruned arm stops at its rung
        assert r["epochs"] in result.rungs[:-1] and len(r["accuracies"]) == r["epochs"] and r["test_acc"] is None
    complete = [r for r in rows.values() if r["state"] == "COMPLETE"]
    assert result.answer == max(complete, key=lambda r: (r["holdout_acc"], -r["flops"]))["name"]
    assert all(0 <= rows[n]["inherited_acc"] <= 1 for n in rows if n.startswith(("proposal", INCUMBENT)))
    assert all(r["test_acc"] is not None for r in complete)
    images = json.loads((out / "trials" / INCUMBENT / "summary.json").read_text())["dataset"]["train_images"]
    assert result.image_epochs == sum(r["epochs"] for r in rows.values()) * images
    answer = json.loads((out / "answer.json").read_text())
    assert answer["name"] == result.answer and answer["widths"] == rows[result.answer]["widths"]
    if answer["arch"] is not None:  # else a width-curve arm won: the base network at its widths
        assert ArchSpace.from_dict(answer["space"]).check(answer["arch"])
    assert read_selection(out) == result
    # resumed: nothing trains again, the same answer
    again = select_from_search(config, search_run, out, base)
    assert again == result
    # another pool is refused
    with pytest.raises(ConfigError, match="another pool"):
        select_from_search(SelectConfig(pool=3, min_epochs=1, reduction=2), search_run, out, base)


@pytest.mark.slow
def test_a_selection_without_limits_keeps_the_searchs(supernet_run, tmp_path):
    """The search ran under a FLOPs limit below the incumbent's cost: the selection answers under it too."""
    base = tiny_base(supernet_run)
    limit = baseline_costs(base, 10)[0] - 1
    search = tmp_path / "search"
    run_search(SearchConfig(strategy="random", trials=6, precision="fp32", threads=1, export=1, max_flops=limit),
               supernet_run, search)
    result = select_from_search(SelectConfig(pool=1, width_curve="", min_epochs=1, reduction=2), search,
                                tmp_path / "select", dataclasses.replace(base, epochs=1, peak_epoch=0.5))
    assert [r["name"] for r in result.rows] == ["proposal_0"] and result.rows[0]["flops"] <= limit
    assert yaml.safe_load((tmp_path / "select" / "select.yaml").read_text())["max_flops"] == limit


@pytest.mark.slow
def test_the_hpo_best_run_stands_in_for_the_incumbent(supernet_run, search_run, tmp_path):
    """A finished run of the candidates' own training is the incumbent's record: replayed to the pruner epoch by
    epoch, not trained again, its work not counted twice; it matches the incumbent trained in the space."""
    base, run = tiny_base(supernet_run), tmp_path / "hpo_best"
    train(base, run)
    config = SelectConfig(pool=1, min_epochs=1, reduction=2, width_curve="")
    trained = select_from_search(config, search_run, tmp_path / "trained", base)
    replayed = select_from_search(config, search_run, tmp_path / "replayed", base, incumbent_run=run)
    assert not (tmp_path / "replayed" / "trials" / INCUMBENT).exists()
    incumbent = replayed.rows[0]
    assert incumbent["name"] == INCUMBENT and incumbent["run"] == str(run)
    assert incumbent["accuracies"] == [m.valid_acc for m in read_logs(run / "logs.tsv")]
    assert incumbent["accuracies"] == pytest.approx(trained.rows[0]["accuracies"], abs=1e-6)  # the same network
    assert incumbent["test_acc"] == json.loads((run / "summary.json").read_text())["test_acc"]
    reported = {t.params["candidate"]: t.intermediate_values for t in load_study(config, tmp_path / "replayed").trials}
    assert list(reported[INCUMBENT].values()) == incumbent["accuracies"]  # the pruner saw every epoch
    assert incumbent["image_epochs"] == 0 and replayed.image_epochs == replayed.rows[1]["image_epochs"] > 0
    with pytest.raises(ConfigError, match=r"peak_lr differ"):  # trained otherwise: it cannot stand in
        select_from_search(config, search_run, tmp_path / "other", dataclasses.replace(base, peak_lr=0.01),
                           incumbent_run=run)
    assert not (tmp_path / "other").exists()


def test_selection_input_errors(supernet_run, search_run, tmp_path):
    base = tiny_base(supernet_run)
    with pytest.raises(ConfigError, match="holdout"):
        select_from_search(SelectConfig(), search_run, tmp_path / "a", TrainConfig(**{**TINY, "dataset": "synthetic", "holdout": 0}))
    with pytest.raises(ConfigError, match="min_epochs"):
        select_from_search(SelectConfig(min_epochs=4), search_run, tmp_path / "b", base)
    with pytest.raises(ConfigError, match="lower --pool"):
        select_from_search(SelectConfig(pool=50), search_run, tmp_path / "c", base)
    with pytest.raises(ConfigError, match="not a search run"):
        select_from_search(SelectConfig(), supernet_run, tmp_path / "d", base)
    with pytest.raises(ConfigError, match=r"max_latency_ms: no architecture within 1e-09 ms; the fastest takes"):
        select_from_search(SelectConfig(max_latency_ms=1e-9), search_run, tmp_path / "e", base)
    with pytest.raises(ConfigError, match="recipe: .* expected resnet9, got airbench"):
        select_from_search(SelectConfig(), search_run, tmp_path / "f",
                           TrainConfig.for_recipe("airbench", **{**TINY, "dataset": "synthetic", "holdout": 100}))
    unfinished = tmp_path / "unfinished"  # as a search stopped by Ctrl-C leaves it: fewer trials than its budget
    shutil.copytree(search_run, unfinished)
    (unfinished / "search.yaml").write_text((unfinished / "search.yaml").read_text().replace("trials: 12", "trials: 40"))
    with pytest.raises(ConfigError, match=r"the search has not finished \(12 of 40 trials\): run it to the end"):
        select_from_search(SelectConfig(), unfinished, tmp_path / "g", base)
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # nothing written


@pytest.mark.slow
def test_an_interrupted_or_failed_candidate_trains_again_on_resume(supernet_run, search_run, tmp_path, monkeypatch):
    """Ctrl-C during a candidate, then the same command: it trains again (no answer without it); a candidate that
    fails makes the command fail, naming it, and is retried by the next resume."""
    import effcifar.nas.select as select_lib

    base, out = tiny_base(supernet_run), tmp_path / "s"
    config = SelectConfig(pool=1, min_epochs=1, reduction=2, width_curve="")
    real_train = select_lib.train

    def interrupted(config, run_dir, **kwargs):
        if run_dir.name == "proposal_0":
            raise KeyboardInterrupt
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(select_lib, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        select_from_search(config, search_run, out, base)
    assert not (out / "answer.json").exists()

    def failing(config, run_dir, **kwargs):
        if run_dir.name == "proposal_0":
            raise RuntimeError("CUDA out of memory")
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(select_lib, "train", failing)
    with pytest.raises(ConfigError, match=r"1 of 2 candidates failed \(proposal_0: RuntimeError: CUDA out of memory\)"
                                          r"; run the same command again to retry them"):
        select_from_search(config, search_run, out, base)
    assert not (out / "answer.json").exists()
    monkeypatch.setattr(select_lib, "train", real_train)
    result = select_from_search(config, search_run, out, base)
    assert {r["name"]: r["state"] for r in result.rows}["proposal_0"] in ("COMPLETE", "PRUNED")
    assert (out / "answer.json").is_file() and "did not finish" not in result.sentence


@pytest.mark.slow
def test_a_front_has_one_answer_per_limit(supernet_run, search_run, tmp_path):
    """Two FLOPs limits, two selections, each answer within its own limit; a rerun trains nothing."""
    base, out = tiny_base(supernet_run), tmp_path / "front"
    config = SelectConfig(pool=1, min_epochs=1, reduction=2, width_curve="0.5")
    incumbent_flops = select_from_search(config, search_run, tmp_path / "one", base).rows[0]["flops"]
    limits = [incumbent_flops, incumbent_flops * 0.6]
    results = select_front(config, search_run, out, base, limits)
    front = json.loads((out / FRONT_FILE).read_text())
    assert [row["max_flops"] for row in front] == sorted(limits)
    for row, result in zip(front, results):
        assert row["name"] == result.answer and row["flops"] <= row["max_flops"]
        assert all(r["flops"] <= row["max_flops"] for r in result.rows)
        assert (limit_dir(out, row["max_flops"]) / "select.json").is_file()
    assert INCUMBENT not in [r["name"] for r in results[0].rows]  # the ResNet is over the smaller limit
    assert select_front(config, search_run, out, base, limits) == results
    with pytest.raises(ConfigError, match=r"distinct, positive"):
        select_front(config, search_run, tmp_path / "bad", base, [1e6, 1e6])


@pytest.mark.slow
def test_select_cli(supernet_run, search_run, tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "effcifar", "select", str(search_run), "--pool", "2", "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "incumbent" in result.stdout and "vs width curve" in result.stdout and (out / "select.json").is_file()
    # the command it prints trains the answer's own network at its widths (not the default ones)
    command = result.stdout.split("effcifar train ", 1)[1].split("\n", 1)[0].split()
    assert command[-4:] == ["--holdout", "0", "--subset", "0"]  # on every training image: the answer trained on 500
    again = subprocess.run([*args[:3], "train", *command, "--subset", "500", "--epochs", "1", "--out",
                            str(tmp_path / "again"), "--quiet"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    answer = json.loads((out / "answer.json").read_text())
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert (summary["params"], summary["flops"]) == (answer["params"], answer["flops"])
    assert {k: summary["config"][k] for k in answer["widths"]} == answer["widths"]
    bad = subprocess.run([*args[:-len(TINY)], "--reduction", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "reduction" in bad.stderr and "Traceback" not in bad.stderr
    front = subprocess.run([*args, "--front", "12e6,lots"], capture_output=True, text=True, env=env, timeout=60)
    assert front.returncode != 0 and "--front: expected comma-separated FLOPs limits" in front.stderr
    assert "Traceback" not in front.stderr
