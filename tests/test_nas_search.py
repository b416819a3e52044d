"""Architecture search over a tiny supernet: limits, the evaluation cache, resume, export/import, the CLI."""

import json
import os
import subprocess
import sys

import optuna
import torch
import pytest
from optuna.trial import TrialState

import effcifar.nas.search as search_lib
from effcifar.config import build_config
from effcifar.errors import ConfigError
from effcifar.nas.search import CandidateEvaluator, SearchConfig, export_top, run_search
from effcifar.nas.space import ArchSpace, arch_key, load_arch
from effcifar.rundir import LOCK_FILE, locked
from effcifar.studies import open_storage

# Small generations so that a few trials reach mutation and crossover.
SMALL = dict(population=4, parents=2, mutations=1, crossovers=1, precision="fp32", threads=1, export=3)


def config(**changes) -> SearchConfig:
    return SearchConfig(**{**SMALL, **changes})


def complete(study):
    return [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


@pytest.mark.parametrize("strategy", ["evolution", "nsga2"])
def test_no_candidate_over_a_limit_is_evaluated(supernet_run, tmp_path, evaluations, strategy):
    evaluator = CandidateEvaluator.from_run(supernet_run, config())
    limit = (evaluator.costs.flops_of(evaluator.costs.extreme(False)) + evaluator.costs.flops_of(
        evaluator.costs.extreme(True))) / 2
    study = run_search(config(strategy=strategy, trials=8, max_flops=limit), supernet_run, tmp_path / "s")
    assert len(study.trials) == 8 and evaluations
    assert all(evaluator.costs.flops_of(arch) <= limit for arch in evaluations)
    assert all(t.user_attrs["flops"] <= limit for t in complete(study))
    # The evaluator itself refuses a candidate over a limit.
    limited = CandidateEvaluator.from_run(supernet_run, config(max_flops=limit))
    with pytest.raises(ValueError, match="over the limits"):
        limited.evaluate(limited.costs.extreme(True))
    assert limited.evaluated == []


def test_impossible_limits_are_a_config_error_before_any_file(supernet_run, tmp_path):
    with pytest.raises(ConfigError, match="no architecture within"):
        run_search(config(max_params=10), supernet_run, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cache_shares_architectures_that_differ_only_in_inactive_convs(supernet_run):
    evaluator = CandidateEvaluator.from_run(supernet_run, config())
    arch = {k: c[0] for k, c in evaluator.space.choices().items()} | {"stage1.skip": "zero"}
    other = arch | {"stage1.conv2": evaluator.space.choices()["stage1.conv2"][-1]}  # inactive with skip=zero
    assert arch != other and arch_key(evaluator.space, arch) == arch_key(evaluator.space, other)
    first, cached = evaluator.evaluate(arch)
    assert not cached and 0 < first.accuracy < first.top5  # 10 classes: top-5 takes more than top-1
    again, cached = evaluator.evaluate(other)
    assert cached and again == first and len(evaluator.evaluated) == 1


@pytest.mark.slow
def test_resumed_study_reuses_the_cache_and_never_re_evaluates(supernet_run, tmp_path, evaluations):
    out = tmp_path / "s"
    run_search(config(strategy="random", trials=5), supernet_run, out)
    assert len(evaluations) == 5
    study = run_search(config(strategy="random", trials=9), supernet_run, out)  # the same command resumes
    keys = [t.user_attrs["arch_key"] for t in complete(study)]
    assert len(study.trials) == 9 and len(evaluations) == len(set(keys))
    # A fresh evaluator synced from the study has every key cached.
    evaluator = CandidateEvaluator.from_run(supernet_run, config())
    evaluator.sync(study.get_trials())
    assert all(evaluator.evaluate(t.params)[1] for t in complete(study)) and evaluator.evaluated == []
    with pytest.raises(ConfigError, match=r"another supernet run, evaluation setup or objectives \(bn_batches chan"):
        run_search(config(strategy="random", trials=10, bn_batches=1), supernet_run, out)
    moved = tmp_path / "moved"  # a renamed search directory keeps its study (the name search.yaml records)
    out.rename(moved)
    study = run_search(config(strategy="random", trials=10), supernet_run, moved)
    assert study.study_name == "s" and len(study.trials) == 10
    assert optuna.study.get_all_study_names(open_storage(config(), moved)) == ["s"]
    # resumed under a FLOPs limit: the trials above it stay in the study, but none is exported
    flops = sorted(t.user_attrs["flops"] for t in complete(study))
    limit = flops[len(flops) // 2]
    run_search(config(strategy="random", trials=10, max_flops=limit), supernet_run, moved)
    exported = [json.loads(p.read_text()) for p in (moved / "arch").glob("top_*.json")]
    assert exported and all(r["flops"] <= limit for r in exported)
    assert json.loads((moved / "architecture_final.json").read_text())["flops"] <= limit


@pytest.mark.slow
def test_a_search_directory_in_use_is_refused(supernet_run, tmp_path):
    with locked(tmp_path / "s", "search"):
        result = cli(str(supernet_run), "--trials", "2", "--out", str(tmp_path / "s"))
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".kind", LOCK_FILE]  # the refused search wrote nothing
    assert result.returncode == 2 and f"{tmp_path / 's'}: in use by another effcifar process (PID {os.getpid()})" \
        in result.stderr


def test_export_then_import_round_trip(supernet_run, tmp_path):
    out = tmp_path / "s"
    study = run_search(config(strategy="evolution", trials=6), supernet_run, out)
    space = ArchSpace.seed()
    records = export_top(study, out, 3)
    assert [r["loss"] for r in records] == sorted(r["loss"] for r in records)  # best first, by loss (the default)
    assert [r["rank"] for r in records] == [1, 2, 3]  # ranks as users see them, in files too
    for record in records:
        saved = json.loads((out / "arch" / f"top_{record['rank']}.json").read_text())
        assert set(saved) >= {"arch", "rank", "accuracy", "top5", "flops", "params"} and saved == record
        assert load_arch(out / "arch" / f"top_{record['rank']}.json", space) == study.trials[record["trial"]].params
    assert json.loads((out / "architecture_final.json").read_text()) == records[0]
    (out / "arch" / "top_0.json").write_text("{}")  # an export numbered from 0, as before
    export_top(study, out, 1)  # fewer: the stale files go
    assert sorted(p.name for p in (out / "arch").iterdir()) == ["top_1.json"]
    plain = tmp_path / "nni.json"
    plain.write_text(json.dumps(records[0]["arch"]))
    assert load_arch(plain, space) == records[0]["arch"]
    plain.write_text(json.dumps({k: [v] for k, v in records[0]["arch"].items()}))  # NNI's one-element lists
    assert load_arch(plain, space) == records[0]["arch"]


BAD_ARCH_FILES = {"{not json": "not valid JSON", "[1, 2]": "expected a mapping",
                  '{"stage1.conv1": "conv3_pool"}': "does not match the space"}


def test_bad_architecture_file_is_a_config_error_naming_it(tmp_path):
    for i, (content, message) in enumerate(BAD_ARCH_FILES.items()):
        (tmp_path / f"arch{i}.json").write_text(content)
        with pytest.raises(ConfigError, match=message) as info:
            load_arch(tmp_path / f"arch{i}.json", ArchSpace.seed())
        assert str(tmp_path / f"arch{i}.json") in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_arch(tmp_path / "missing.json", ArchSpace.seed())


def test_config_checks_and_missing_supernet(tmp_path):
    with pytest.raises(ConfigError, match="field 'strategy': expected one of evolution, random, nsga2"):
        build_config(SearchConfig, None, {"strategy": "bayes"})
    with pytest.raises(ConfigError, match="field 'population'"):
        build_config(SearchConfig, None, {"population": 10, "mutations": 8, "crossovers": 8})
    with pytest.raises(ConfigError, match="not a finished supernet run"):
        run_search(SearchConfig(), tmp_path / "nothing", tmp_path / "out")
    assert SearchConfig().trials == 50 * 20


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effcifar", "search", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_end_to_end_tiny_search(supernet_run, tmp_path):
    out = tmp_path / "cli"
    result = cli(str(supernet_run), "--strategy", "nsga2", "--trials", "5", "--population", "4",
                 "--mutations", "1", "--crossovers", "1", "--export", "2", "--precision", "fp32",
                 "--threads", "1", "--workers", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "best 2 of 5 trials, ranked by held-out loss" in " ".join(result.stdout.split())
    assert "Pareto front (held-out loss vs flops)" in result.stdout
    assert sorted(p.name for p in (out / "arch").iterdir()) == ["top_1.json", "top_2.json"]
    final = json.loads((out / "architecture_final.json").read_text())
    assert load_arch(out / "architecture_final.json", ArchSpace.seed()) == final["arch"]
    study = optuna.load_study(study_name="cli", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    assert len(study.trials) == 5 and len(study.directions) == 2


@pytest.mark.parametrize("args, message", [
    (["--strategy", "bayes"], "field 'strategy': expected one of evolution, random, nsga2, got 'bayes'"),
    (["--trials", "many"], "field 'trials': expected a value of type int"),
])
@pytest.mark.slow
def test_cli_bad_input_is_one_line(supernet_run, tmp_path, args, message):
    result = cli(str(supernet_run), *args, "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli(str(tmp_path / "missing"), "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "not a finished supernet run" in result.stderr
    assert not (tmp_path / "s").exists()


def test_bn_recalibration_restores_a_subnet_whose_statistics_are_stale(supernet_run):
    from effcifar.nas.evaluation import accuracy

    evaluator = CandidateEvaluator.from_run(supernet_run, config())
    net, loader, autocast = evaluator.net, evaluator.loader, evaluator.autocast
    arch = evaluator.costs.extreme(True, evaluator.space)  # the largest subnet
    calibrated = evaluator.evaluate(arch)[0].accuracy
    scramble = torch.Generator().manual_seed(0)  # the same stale statistics whatever ran before in this process
    for module in net.modules():  # statistics from another path, or none at all: far from this path's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-3, 3, generator=scramble)
            module.running_var.fill_(0.01)
    stale = accuracy(net, loader, autocast)[0]
    restored = search_lib.evaluate_subnet(net, arch, evaluator.bn_batches, loader, autocast)[0]
    assert calibrated > 0.12 and stale < calibrated, (calibrated, stale)  # 10 classes: chance is 0.1 (deterministic on CPU)
    assert restored == calibrated


@pytest.mark.slow
def test_joint_width_and_op_space_trains_and_searches(tmp_path):
    """The supernet of seed-widths trains its sandwich (widest and narrowest path by FLOPs), then a search runs on it."""
    from conftest import NARROW
    from effcifar.nas.supernet import SupernetConfig
    from effcifar.nas.trainer import train_supernet

    run = tmp_path / "supernet"
    train_supernet(SupernetConfig.of(space="seed-widths", dataset="synthetic", subset=500, holdout=100, batch_size=50,
                                     bn_batches=2, panel_random=0, eval_batch_size=100, precision="fp32", threads=1,
                                     epochs=1, **NARROW), run, warn=lambda message: None)
    study = run_search(config(strategy="random", trials=4), run, tmp_path / "search")
    evaluator = CandidateEvaluator.from_run(run, config())
    widest, narrowest = evaluator.costs.extreme(True), evaluator.costs.extreme(False)
    assert widest["stage2.width"] == "1x" and narrowest["stage2.width"] == "0.5x"
    trials = complete(study)
    assert len(trials) == 4 and all(0 <= t.user_attrs["accuracy"] <= 1 for t in trials)
    assert all(t.user_attrs["flops"] == evaluator.costs.flops_of(t.params) for t in trials)
    assert len({t.params["stage1.width"] for t in trials} | {t.params["stage3.width"] for t in trials}) > 1
    final = json.loads((tmp_path / "search" / "architecture_final.json").read_text())
    assert "stage1.width" in final["arch"]
