"""Studies end to end on synthetic data: budget, workers, resume after a killed worker, failures, best.json."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from effcifar.config import build_config
from effcifar.errors import ConfigError
from effcifar.hpo.study import (
    HpoConfig, TrialsFailed, default_holdout, export_trials, load_run, open_study, run_study, select_best,
    trial_values, write_best,
)
from effcifar.studies import open_storage
from effcifar.train import TrainConfig

from conftest import TINY_BASE, TINY_SPACE


def states(run_dir):
    _, study = load_run(run_dir)
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_study_runs_trials_records_attributes_and_best_reloads(tmp_path, files):
    base, space = files
    run = tmp_path / "hpo"
    seen = []
    run_study(HpoConfig(space=str(space), base=str(base), trials=3, sampler_seed=0), run, on_trial=seen.append)
    assert [t.number for t in seen] == [0, 1, 2]
    _, study = load_run(run)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        a = t.user_attrs
        assert set(a) >= {"accuracy", "train_time", "params", "flops", "run_dir", "config"}
        assert t.values == [a["accuracy"]] and list(t.intermediate_values) == [1, 2]
        assert (run / a["run_dir"] / "summary.json").is_file()
        assert a["config"]["peak_lr"] == t.params["peak_lr"] and a["config"]["subset"] == 256
    path, best = write_best(run)
    config = build_config(TrainConfig, path)  # usable as `effcifar train --config best.json`
    assert config.peak_lr == best.params["peak_lr"] and config.dataset == "synthetic"


@pytest.mark.slow
def test_trials_record_the_values_they_trained_with_not_optunas_draws(tmp_path, files):
    """A quniform step and a nested choice: the export and best.json agree with each trial's config."""
    base, space = files
    space.write_text(json.dumps({"layer1": {"_type": "quniform", "_value": [8, 20, 4]},
                                 "shape": {"_type": "choice", "_value": [
                                     {"_name": "wide", "layer2": {"_type": "quniform", "_value": [16, 32, 8]}},
                                     {"_name": "narrow", "layer2": 8}]}}))
    run = tmp_path / "hpo"
    run_study(HpoConfig(space=str(space), base=str(base), trials=3, sampler_seed=1, sampler="random"), run)
    export_trials(run)
    for record, t in zip(json.loads((run / "trials.json").read_text()), load_run(run)[1].get_trials()):
        config = t.user_attrs["config"]
        assert record["param:layer1"] == config["layer1"] in (8, 12, 16, 20)
        assert record["param:layer2"] == config["layer2"] and record["param:shape"] in ("wide", "narrow")
        assert trial_values(t) == {k.removeprefix("param:"): v for k, v in record.items() if k.startswith("param:")}
    assert any(t.params["layer1"] != t.user_attrs["config"]["layer1"] for t in load_run(run)[1].get_trials())


@pytest.mark.slow
def test_budget_counts_across_restarts_and_seed_reproduces(tmp_path, files):
    base, space = files
    cfg = HpoConfig(space=str(space), base=str(base), trials=2, sampler_seed=7, sampler="random")
    run_study(cfg, tmp_path / "a")
    run_study(cfg, tmp_path / "a")  # nothing left to do
    assert len(states(tmp_path / "a")) == 2
    run_study(HpoConfig(**{**cfg.__dict__, "trials": 3}), tmp_path / "a")
    assert states(tmp_path / "a") == [TrialState.COMPLETE] * 3
    run_study(cfg, tmp_path / "b")
    params = lambda run: [t.params for t in load_run(run)[1].get_trials()[:2]]  # noqa: E731
    assert params(tmp_path / "a") == params(tmp_path / "b")


@pytest.fixture(scope="module")
def one_trial_study(tmp_path_factory):
    """(run directory of a finished one-trial study, its config, a folder of other files)."""
    files = tmp_path_factory.mktemp("files")
    (files / "base.json").write_text(json.dumps(TINY_BASE))
    (files / "space.json").write_text(json.dumps(TINY_SPACE))
    (files / "other_base.json").write_text(json.dumps({**TINY_BASE, "label_smoothing": 0.1}))
    (files / "other_space.json").write_text(json.dumps({**TINY_SPACE, "cutout": {"_type": "choice", "_value": [0]}}))
    config = HpoConfig(space=str(files / "space.json"), base=str(files / "base.json"), trials=1, sampler_seed=7,
                       sampler="random", pruner="none")
    run = tmp_path_factory.mktemp("study") / "hpo"
    run_study(config, run)
    return run, config, files


@pytest.mark.parametrize("change, changed", [
    ({"sampler": "tpe"}, "sampler"),
    ({"pruner": "median"}, "pruner"),
    ({"sampler_seed": 8}, "seed"),
    ({"objective": "acc,time"}, "objective"),
    ({"dataset": "synthetic100"}, "base.dataset"),
    ({"base": "other_base.json"}, "base.label_smoothing"),
    ({"space": "other_space.json"}, "space.cutout._value"),
])
def test_resume_with_another_setup_is_refused_naming_what_changed(one_trial_study, tmp_path, change, changed):
    original, config, files = one_trial_study
    run = tmp_path / "hpo"
    shutil.copytree(original, run)  # a copied run directory resumes its own study
    before = (run / "hpo.yaml").read_bytes()
    change = {k: str(files / v) if k in ("base", "space") else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=rf"the study was made with another .*\({re.escape(changed)} changed\)"):
        run_study(dataclasses.replace(config, trials=2, **change), run)
    assert states(run) == [TrialState.COMPLETE] and (run / "hpo.yaml").read_bytes() == before


@pytest.mark.slow
def test_resume_may_change_the_budget_tie_timeout_and_workers(one_trial_study, tmp_path):
    original, config, _ = one_trial_study
    run = tmp_path / "renamed"  # another name: the study name recorded in hpo.yaml is used
    shutil.copytree(original, run)
    run_study(dataclasses.replace(config, trials=2, tie=0.5, timeout=600.0, workers=1), run)
    loaded_config, study = load_run(run)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert study.study_name == original.name == loaded_config.study and loaded_config.tie == 0.5
    assert optuna.study.get_all_study_names(open_storage(loaded_config, run)) == [original.name]


@pytest.mark.slow
def test_a_renamed_run_directory_is_read_from_its_own_study(one_trial_study, tmp_path):
    original, config, _ = one_trial_study
    run = tmp_path / "moved"
    shutil.copytree(original, run)
    journal = (run / "study.journal").read_bytes()
    r = subprocess.run([sys.executable, "-m", "effcifar", "hpo", "status", str(run)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"study {original.name}: 1 trials (1 complete)" in r.stdout
    assert (run / "study.journal").read_bytes() == journal  # read-only: no new study, nothing appended


@pytest.mark.slow
@pytest.mark.parametrize("action", ["status", "best", "export"])
def test_read_only_commands_never_create_a_study(one_trial_study, tmp_path, action):
    original, _, _ = one_trial_study
    run = tmp_path / "no-study"
    run.mkdir()
    shutil.copy(original / "hpo.yaml", run / "hpo.yaml")  # a study that never started
    r = subprocess.run([sys.executable, "-m", "effcifar", "hpo", action, str(run)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"effcifar hpo: error: {run}: no study yet (no study.journal)"
    assert sorted(p.name for p in run.iterdir()) == ["hpo.yaml"]


def test_another_study_name_for_a_run_directory_is_refused(one_trial_study, tmp_path):
    original, config, _ = one_trial_study
    run = tmp_path / "hpo"
    shutil.copytree(original, run)
    with pytest.raises(ConfigError, match=f"holds the study '{original.name}'; --study 'other' names another"):
        run_study(dataclasses.replace(config, study="other"), run)


@pytest.mark.slow
def test_failed_trial_is_recorded_with_reason_and_study_goes_on(tmp_path, files):
    base, _ = files
    space = tmp_path / "explode.json"
    space.write_text(json.dumps({"peak_lr": {"_type": "choice", "_value": [1e30, 0.1]}}))
    run_study(HpoConfig(space=str(space), base=str(base), trials=3, sampler="random", sampler_seed=0, max_failures=10),
              tmp_path / "hpo")
    _, study = load_run(tmp_path / "hpo")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and len(trials) == 3 + len(failed)  # failures do not eat the budget of 3
    assert all(t.params["peak_lr"] == 1e30 and "TrainingDiverged: train loss is nan" in t.user_attrs["fail_reason"]
               for t in failed)


@pytest.mark.slow
def test_two_workers_share_the_budget_without_duplicates(tmp_path, files):
    base, space = files
    run_study(HpoConfig(space=str(space), base=str(base), trials=4, workers=2, sampler_seed=0), tmp_path / "hpo")
    _, study = load_run(tmp_path / "hpo")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({(t.params["peak_lr"], t.params["cutout"]) for t in trials}) == 4  # workers do not repeat each other
    path, best = write_best(tmp_path / "hpo")
    assert build_config(TrainConfig, path).peak_lr == best.params["peak_lr"]


@pytest.mark.slow
def test_trial_of_a_dead_worker_is_failed_and_retried(tmp_path, files):
    base, space = files
    cfg = HpoConfig(space=str(space), base=str(base), trials=2, sampler_seed=0)
    run = tmp_path / "hpo"
    run.mkdir()
    study = open_study(cfg, open_storage(cfg, run))
    orphan = study.ask({"peak_lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True)})
    orphan.set_user_attr("worker_host", socket.gethostname())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan.set_user_attr("worker_pid", dead.pid)
    run_study(cfg, run)
    trials = load_run(run)[1].get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["worker_lost"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["peak_lr"] == trials[0].params["peak_lr"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_reaches_the_budget(tmp_path, files):
    base, space = files
    run = tmp_path / "hpo"
    slow = {**TINY_BASE, "subset": 2048, "epochs": 4}
    base.write_text(json.dumps(slow))
    cmd = [sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--config", str(base),
           "--trials", "2", "--sampler-seed", "0", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first trial has finished an epoch
        if list(run.glob("trials/0000/logs.tsv")):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = states(run).count(TrialState.RUNNING)
    assert killed == 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    final = states(run)
    assert final.count(TrialState.COMPLETE) == 2 and final.count(TrialState.FAIL) == killed


def test_tie_rule_prefers_less_training_work_whatever_the_clock_says():
    def trial(number, acc, work, time_):
        t = optuna.trial.create_trial(value=acc, user_attrs={"accuracy": acc, "work": work, "train_time": time_})
        t.number = number
        return t

    # trial 1 ran on a slower machine: more seconds, less work
    trials = [trial(0, 0.800, 9e12, 100.0), trial(1, 0.7995, 6e12, 150.0), trial(2, 0.790, 1e12, 10.0)]
    assert select_best(trials, tie=0.1).number == 1  # within 0.1 points of the best, and less work
    assert select_best(trials, tie=0.0).number == 0
    assert select_best(trials, tie=1.0).number == 2
    with pytest.raises(ConfigError, match="tie: expected"):
        select_best(trials, tie=float("nan"))


@pytest.mark.slow
def test_trials_record_their_training_work_and_hold_out_training_images(tmp_path, files):
    base, space = files
    run_study(HpoConfig(space=str(space), base=str(base), trials=1, sampler_seed=0), tmp_path / "hpo")
    _, study = load_run(tmp_path / "hpo")
    (t,) = study.get_trials()
    a = t.user_attrs
    assert a["config"]["holdout"] == default_holdout(256) == 25
    summary = json.loads((tmp_path / "hpo" / a["run_dir"] / "summary.json").read_text())
    assert summary["dataset"]["valid_split"] == "holdout"
    assert a["work"] == a["flops"] * 256 * 2 and a["train_images"] == 256


@pytest.mark.slow
def test_select_on_test_keeps_the_test_set_only_when_asked(tmp_path, files):
    base, space = files
    run_study(HpoConfig(space=str(space), base=str(base), trials=1, sampler_seed=0, select_on_test=True),
              tmp_path / "hpo")
    _, study = load_run(tmp_path / "hpo")
    assert study.get_trials()[0].user_attrs["config"]["holdout"] == 0


def test_a_study_whose_trials_all_fail_raises_with_the_first_reason(tmp_path, files):
    base, _ = files
    space = tmp_path / "explode.json"
    space.write_text(json.dumps({"peak_lr": {"_type": "choice", "_value": [1e30]}}))
    with pytest.raises(TrialsFailed, match="2 failed trial.*TrainingDiverged: train loss is nan"):
        run_study(HpoConfig(space=str(space), base=str(base), trials=5, max_failures=2, sampler_seed=0),
                  tmp_path / "hpo")
    assert states(tmp_path / "hpo") == [TrialState.FAIL] * 2  # the bound stopped it, not the budget of 5


@pytest.mark.slow
def test_accuracy_and_time_objective_gives_a_pareto_front(tmp_path, files):
    base, space = files
    study = run_study(HpoConfig(space=str(space), base=str(base), trials=3, objective="acc,time", sampler_seed=0,
                                sampler="nsga2"), tmp_path / "hpo")
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    assert all(t.values[1] == t.user_attrs["train_time"] for t in trials)
    front = study.best_trials
    assert front and all(t in trials for t in front)
    # no trial on the front is beaten on both accuracy and time by another trial
    for f in front:
        assert not any(t.values[0] > f.values[0] and t.values[1] < f.values[1] for t in trials)


def test_the_table_of_a_study_shows_a_trial_cut_before_its_time_was_recorded():
    """A killed trial keeps the accuracy it reported but has no train time: a blank cell, not a crash."""
    from rich.console import Console

    from effcifar import hpo
    from effcifar.cli import print_study

    study = optuna.create_study(direction="maximize")
    done = {"accuracy": 0.5, "train_time": 3.0, "epochs": 2, "params": 1000, "config": {}}
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=done))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"accuracy": 0.7}))
    console = Console(record=True, width=120)
    print_study(study, 0.1, console, hpo.study)
    text = console.export_text()
    assert "2 trials (1 complete, 1 fail)" in text and "70.00%" in text and "3.0 s" in text


def test_status_and_best_show_sampled_values_and_why_optuna_differs():
    from rich.console import Console

    from effcifar import hpo
    from effcifar.cli import print_best, print_study

    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(0.01, 0.5, log=True)
    for acc, work, value in ((0.800, 9e12, 0.31), (0.7995, 3e12, 0.12)):
        study.add_trial(optuna.trial.create_trial(
            value=acc, params={"peak_lr": value}, distributions={"peak_lr": lr},
            user_attrs={"accuracy": acc, "work": work, "train_time": 5.0, "epochs": 2, "params": 1000}))
    console = Console(record=True, width=160)
    print_study(study, 0.1, console, hpo.study)
    best = select_best(study.trials, 0.1)
    print_best(study, best, 0.1, Path("best.json"), console, hpo.study)
    text = " ".join(console.export_text().split())
    assert "1* COMPLETE peak_lr=0.12" in text and "peak_lr=0.31" in text and "9 TFLOP" in text
    assert "best by the tie rule: trial 1 (peak_lr=0.12)" in text
    assert "Optuna's best_trial: trial 0 (peak_lr=0.31)" in text
    assert "prefers trial 1: within 0.1 points of its accuracy with 0.33x its training work" in text
