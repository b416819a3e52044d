"""The pipeline: settings and their errors, a tiny real run end to end, kill -9 anywhere and resume, the README's command."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from effcifar.errors import ConfigError
from effcifar.pipeline import STAGES, load_pipeline_config, nest
from effcifar.pipeline.plan import PRESETS, WIDTHS
from effcifar.rundir import LOCK_FILE

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "pipeline_tiny.yaml"
# Files whose bytes are deterministic (CPU runs are bitwise reproducible; times are not compared).
SAME_BYTES = ["hpo/best.json", "baseline/model.pt", "hpo_best/model.pt", "supernet/supernet.pt",
              "search/arch/top_1.json", "search/arch/top_2.json", "select/answer.json",
              "select/trials/resnet_0.5x/model.pt"]


def effcifar(*args: str, **kwargs) -> subprocess.Popen:
    """The CLI in a child process of its own group (so kill -9 reaches every process it started)."""
    return subprocess.Popen([sys.executable, "-m", "effcifar", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def pipeline(out: Path, *extra: str) -> subprocess.Popen:
    return effcifar("pipeline", "--config", str(TINY), "--quiet", "--out", str(out), *extra)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def kill_when(process: subprocess.Popen, ready) -> None:
    """kill -9 the run as soon as `ready()` holds; it must still have been running."""
    deadline = time.time() + 300
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def accuracies(out: Path) -> list[tuple]:
    """The final table without the times."""
    return [(r["name"], r["test_acc"], r["params"], r["flops"], r["run"]) for r in json.loads((out / "results.json").read_text())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    return out, finish(pipeline(out))


# ---- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_check_every_stage(preset):
    config = load_pipeline_config(preset)
    assert config.dataset == ("cifar10" if preset == "gpu" else "cifar100")
    assert config.hpo["space"] and config.plan.select.pool >= 1
    assert config.baseline_config().holdout == config.final_holdout == (config.holdout if config.subset else 0)
    assert config.trial_base().holdout == config.holdout


def test_medium_preset_keeps_quicks_widths_at_larger_budgets_on_the_split_with_a_measured_truth():
    """The seed space's measured truth (bench/tables/seed-quick-cifar10.json: 20,000 images, 2,000 held out) ranks
    medium's supernet; quick trains on fewer images to finish in its 12 minutes."""
    quick, medium = load_pipeline_config("quick"), load_pipeline_config("medium")
    assert (medium.subset, medium.holdout, medium.seed) == (20000, 2000, quick.seed) and quick.subset < medium.subset
    assert medium.plan.select.curve_fractions() == [0.5, 0.75] and medium.plan.select.pool > quick.plan.select.pool
    assert [medium.train[w] for w in WIDTHS] == [quick.train[w] for w in WIDTHS]
    assert medium.hpo["space"] == quick.hpo["space"]
    for section, field in (("train", "epochs"), ("hpo", "trials"), ("supernet", "epochs"),
                           ("search", "trials")):
        assert getattr(medium, section)[field] > getattr(quick, section)[field], (section, field)
    assert medium.trial_base().epochs > quick.trial_base().epochs


def test_gpu_preset_is_full_cifar10_at_cifar10_fasts_widths_and_budget_with_the_joint_space():
    config = load_pipeline_config("gpu")
    assert (config.dataset, config.subset, config.holdout) == ("cifar10", 0, 5000)
    baseline = config.baseline_config()
    assert (baseline.epochs, [getattr(baseline, w) for w in WIDTHS]) == (24, [64, 128, 256, 512])
    assert config.trial_base().epochs == 8 and config.supernet["space"] == "seed-widths"
    assert config.plan.select.curve_fractions() == [0.5, 0.75] and config.plan.select.min_epochs == 3


def test_full_preset_is_the_seeds_scale():
    config = load_pipeline_config("full")
    assert config.hpo["trials"] >= 100 and config.supernet["epochs"] == 200 and config.subset == 0
    assert config.search["trials"] == config.search["population"] * 20 and config.train["epochs"] == 24
    assert config.trial_base().epochs == 24 and config.supernet_config({}, "none").lr_factor == 0.3


def test_layers_file_over_preset_and_command_line_over_file(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("subset: 5000\nsearch: {trials: 50}\nhpo: {trial: {epochs: 3}}\n")
    config = load_pipeline_config("quick", file, {"search.population": "12", "hpo.trial.peak_epoch": "1"})
    assert config.subset == 5000 and config.search["trials"] == 50 and config.search["population"] == 12
    assert config.search["strategy"] == "evolution"  # kept from the preset
    assert config.hpo["trial"] == {"epochs": 3, "peak_epoch": 1.0}
    assert config.trial_base().epochs == 3 and config.baseline_config().epochs == 4
    # the HPO best goes back to the baseline's budget for the fields hpo.trial shortened
    best = {**vars(config.trial_base()), "peak_lr": 0.7}
    final = config.final_config(best, "best.json")
    assert (final.epochs, final.peak_epoch, final.peak_lr, final.holdout) == (4, 1.0, 0.7, config.holdout)


def test_the_top_level_wins_over_the_hpo_best_and_widths_come_from_the_supernet():
    config = load_pipeline_config("quick", None, {"device": "cpu"})
    best = {**vars(config.trial_base()), "device": "cuda", "subset": 7, "layer1": 48}
    final = config.final_config(best, "best.json")
    assert (final.device, final.subset, final.layer1) == ("cpu", config.subset, 48)
    supernet = config.supernet_config(best, "best.json")
    assert supernet.widths.layer1 == 48 and supernet.hparams == "best.json" and supernet.holdout == config.holdout
    assert config.retrain_base(final, supernet).layer1 == 48


@pytest.mark.parametrize("overrides, message", [
    ({"search.trails": "3"}, "command line: field 'search.trails': unknown (known: storage, heartbeat, study, "
                             "strategy, trials"),
    ({"search.trials": "0"}, "command line, section search: field 'trials': expected a positive integer, got 0"),
    ({"train.epochs": "x"}, "command line: field 'train.epochs': expected a value of type int, got 'x'"),
    ({"train.subset": "3"}, "field 'train.subset': set 'subset' at the top level"),
    ({"supernet.hparams": "b.json"}, "field 'supernet.hparams': set by the pipeline itself"),
    ({"select.pool": "0"}, "section select: field 'pool': expected a positive integer, got 0"),
    ({"select.min_epochs": "9"}, "min_epochs: the first rung must fit the training budget; expected at most "
                                 "epochs = 4, got 9"),
    ({"select.max_flops": "1e6"}, "field 'select.max_flops': set by the pipeline itself"),
    ({"nas_eval.trials": "1"}, "field 'nas_eval.trials': expected 0 (skip) or at least 2"),
    ({"seeds": "0"}, "command line: field 'seeds': expected a positive number of training seeds, got 0"),
    ({"hpo.trial.epochs": "0"}, "section hpo.trial: field 'epochs': expected a positive integer"),
    ({"hpo.space": "x"}, "field 'hpo.space': set the search space in a --config file"),
    ({"nonsense": "1"}, "command line: unknown field 'nonsense'"),
    ({"select.front": "12e6,x"}, "command line: field 'select.front': expected comma-separated FLOPs limits "
                                 "(distinct, positive)"),
    ({"select.front": "1e5"}, "command line: field 'select.front': no network of the supernet's space is within "
                              "100,000 FLOPs; the smallest has"),
    ({"select.front": "30e6", "search.max_flops": "none"}, "field 'select.front': a front needs the search's FLOPs "
                                                           "limit, and search.max_flops is none"),
])
def test_bad_settings_are_one_line_errors_naming_source_and_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_pipeline_config("quick", None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_values_in_a_file_name_the_file(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("supernet: {epochs: -1}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml, section supernet: field 'epochs': expected a positive integer"):
        load_pipeline_config("quick", file)
    file.write_text("hpo: {space: {peak_lr: {_type: uniform, _value: [1]}}}\n")
    with pytest.raises(ConfigError, match="peak_lr"):
        load_pipeline_config("quick", file)
    with pytest.raises(ConfigError, match="--preset: expected one of quick, medium, gpu, full"):
        load_pipeline_config("huge")


def test_top_level_seed_seeds_the_samplers_and_old_section_names_still_work(tmp_path, capsys):
    config = load_pipeline_config("quick", None, {"seed": "5"})
    assert (config.plan.hpo.sampler_seed, config.plan.search.sampler_seed, config.plan.baseline.seed) == (5, 5, 5)
    assert load_pipeline_config("quick", None, {"seed": "5", "search.sampler_seed": "2"}).plan.search.sampler_seed == 2
    file = tmp_path / "old.yaml"
    file.write_text("search: {evaluations: 50, top_k: 3}\nnas_eval: {sample: 4}\n")
    config = load_pipeline_config("quick", file)
    assert (config.search["trials"], config.search["parents"], config.plan.nas_eval_trials) == (50, 3, 4)
    error = capsys.readouterr().err
    assert "field 'search.evaluations' is deprecated (it still works for now): use 'search.trials'" in error
    assert "field 'nas_eval.sample' is deprecated" in error


def test_final_runs_with_several_training_seeds(tmp_path):
    from effcifar.pipeline import Pipeline
    from effcifar.pipeline.stages import TrainingStage

    from effcifar.data import make_synthetic

    config = load_pipeline_config("quick", TINY, {"seeds": "2", "train.epochs": "1", "subset": "256",
                                                  "holdout": "44", "train.batch_size": "64", "threads": "1",
                                                  "precision": "fp32"})
    pipeline = Pipeline(config, tmp_path / "p")
    pipeline.data = make_synthetic(n_train=300, n_test=200)  # a small stand-in, loaded once
    stage = pipeline.execute(TrainingStage(pipeline, "baseline", config.plan.baseline))
    assert sorted(p.name for p in (tmp_path / "p" / "baseline").iterdir() if p.is_dir()) == ["seed_0", "seed_1"]
    row = stage.result("baseline")
    assert row["seeds"] == [0, 1] and len(row["test_accs"]) == 2 and row["test_acc"] == pytest.approx(
        sum(row["test_accs"]) / 2) and "test_acc_sd" in row
    resumed = Pipeline(config, tmp_path / "p")
    resumed.data = pipeline.data
    again = resumed.execute(TrainingStage(resumed, "baseline", config.plan.baseline))
    assert again.result("baseline") == row  # finished: loaded, not trained again


def test_a_front_adds_limits_to_the_default_one_and_the_search_runs_under_the_largest(tmp_path):
    config = load_pipeline_config("quick", TINY, {"select.front": "2.5e6, 6e6"})
    assert config.plan.front == (2.5e6, 6e6)
    assert config.select_limits(3_000_000) == [2.5e6, 3e6, 6e6] and config.select_limits(6_000_000) == [2.5e6, 6e6]
    assert config.search_limits(3_000_000)["max_flops"] == 6e6
    fixed = load_pipeline_config("quick", TINY, {"select.front": "6e6", "search.max_flops": "4e6"})
    assert fixed.default_limit(3_000_000) == 4e6 and fixed.search_limits(3_000_000)["max_flops"] == 6e6
    plain = load_pipeline_config("quick", TINY)
    assert plain.select_limits(3_000_000) == [3e6] and plain.search_limits(3_000_000)["max_flops"] == 3e6
    file = tmp_path / "front.yaml"  # as pipeline.yaml keeps it: a list of numbers
    file.write_text(yaml.safe_dump(config.to_dict()))
    assert load_pipeline_config("quick", file).plan.front == (2.5e6, 6e6)


def test_trial_counts_name_failed_and_pruned_trials():
    from types import SimpleNamespace

    from effcifar.pipeline.stages import trial_counts

    trials = [SimpleNamespace(state=SimpleNamespace(name=n)) for n in ("COMPLETE", "FAIL", "PRUNED", "COMPLETE")]
    assert trial_counts(trials) == "4 trials (1 failed, 1 pruned)"
    assert trial_counts(trials[:1]) == "1 trial"


def test_nest():
    assert nest({"a.b": "1", "a.c.d": "2", "e": "3"}) == {"a": {"b": "1", "c": {"d": "2"}}, "e": "3"}


@pytest.mark.slow
def test_cli_bad_setting_exits_2_with_one_line_and_writes_nothing(tmp_path):
    process = effcifar("pipeline", "--set", "search.trials=0", "--out", str(tmp_path / "run"))
    output = finish_failing(process)
    assert output.count("\n") == 1 and "error: command line, section search: field 'trials'" in output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_stage_that_failed_before_writing_anything_takes_the_corrected_settings(tmp_path):
    """A value only the data can refuse (a batch larger than the training images) stops the baseline at its start;
    the corrected command then runs there, instead of being refused as a resume with other settings."""
    out = tmp_path / "run"
    output = finish_failing(effcifar("pipeline", "--config", str(TINY), "--set", "train.batch_size=5000", "--quiet",
                                     "--out", str(out)))
    assert "field 'batch_size': expected at most the number of training images" in output
    output = resume_until(out, "[2/8] hpo")  # the baseline ran with the corrected settings
    assert "other settings" not in output and (out / "baseline" / "summary.json").is_file()


@pytest.mark.slow
def test_an_hpo_stage_whose_trials_all_failed_takes_the_corrected_settings(tmp_path):
    """Its trials diverged (a learning-rate range far too high): no result to protect, so the corrected command
    resumes the pipeline there, its baseline kept, instead of being refused as a resume with other settings."""
    out, failing = tmp_path / "run", tmp_path / "failing.yaml"
    failing.write_text(TINY.read_text().replace("[0.05, 1.0]", "[1.0e+29, 1.0e+30]"))
    output = finish_failing(effcifar("pipeline", "--config", str(failing), "--quiet", "--out", str(out)))
    assert "failed trial" in output and "TrainingDiverged" in output
    baseline = (out / "baseline" / "model.pt").read_bytes()
    output = resume_until(out, "[3/8]")  # the HPO stage finished with the corrected space
    assert "other settings" not in output and (out / "hpo" / "best.json").is_file()
    assert (out / "baseline" / "model.pt").read_bytes() == baseline


def resume_until(out: Path, text: str) -> str:
    """Run the tiny pipeline in `out` until a line holds `text`, then kill it; its output so far."""
    process = pipeline(out)
    try:
        lines: list[str] = []
        while not lines or text not in lines[-1]:
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return "".join(lines)


def finish_failing(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "Traceback" not in output
    return output


@pytest.mark.slow
def test_show_config_prints_every_setting_loadable_again(tmp_path):
    output = finish(effcifar("pipeline", "--preset", "quick", "--set", "search.trials=77", "--show-config"))
    settings = yaml.safe_load(output)
    assert settings["search"]["trials"] == 77 and settings["hpo"]["space"]["peak_lr"]["_type"] == "loguniform"
    file = tmp_path / "shown.yaml"
    file.write_text(output)
    assert load_pipeline_config("quick", file).to_dict() == settings


# ---- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> tuple[Path, str, dict[str, bytes]]:
    """The tiny pipeline with a second FLOPs limit below the default one, killed once the selection under the
    smaller limit has finished and resumed: (its directory, the resumed run's output, that selection's files as
    they were before the kill)."""
    out = tmp_path_factory.mktemp("front") / "run"
    first = out / "select" / "flops_2.5M"
    kill_when(pipeline(out, "--front", "2.5e6"), lambda: (first / "select.json").is_file())
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(first.glob("trials/*/model.pt"))}
    return out, finish(pipeline(out, "--front", "2.5e6")), before


@pytest.mark.slow
def test_tiny_pipeline_writes_every_stage_and_the_report(uninterrupted):
    out, output = uninterrupted
    for stage in STAGES:
        marker = json.loads((out / stage / "stage.json").read_text())
        assert marker["stage"] == stage and marker["finished"] and marker["seconds"] > 0
    assert [row[0] for row in accuracies(out)] == ["baseline", "hpo", "nas"]
    runs = {name: run for name, _, _, _, run in accuracies(out)}  # results.json: what each run measured
    assert runs["baseline"] == "baseline" and runs["hpo"] == "hpo_best" and runs["nas"].startswith(("hpo_best", "retrain/answer", "select/trials/"))
    for name, test_acc, params, _, run in accuracies(out):
        summary = json.loads((out / run / "summary.json").read_text())
        assert (test_acc, params) == (summary["test_acc"], summary["params"])
    assert (out / "search" / "architecture_final.json").is_file() and (out / "nas_eval" / "ranking.png").is_file()
    assert (out / "retrain" / "retrain.json").is_file() and (out / "hpo" / "best.json").is_file()
    # everything is scored on held-out training images after each epoch and tested once at the end; the searches and
    # the selection choose on the held-out images, never on the test set
    for run in ("baseline", "hpo_best", runs["nas"]):
        assert json.loads((out / run / "summary.json").read_text())["dataset"]["valid_split"] == "holdout"
    # the search's default limit is the HPO best network's own cost, and the incumbent (that network) is in the pool:
    # the HPO best's own run, replayed to the selection's pruner, not trained again
    hpo_best = json.loads((out / "hpo_best" / "summary.json").read_text())
    assert yaml.safe_load((out / "search" / "search.yaml").read_text())["max_flops"] == hpo_best["flops"]
    selection = json.loads((out / "select" / "select.json").read_text())
    incumbent = selection["rows"][0]
    assert incumbent["name"] == "incumbent" and incumbent["run"] == str(out / "hpo_best")
    assert not (out / "select" / "trials" / "incumbent").exists() and incumbent["image_epochs"] == 0
    assert (incumbent["params"], incumbent["flops"]) == (hpo_best["params"], hpo_best["flops"])
    assert incumbent["holdout_acc"] == hpo_best["final_valid_acc"] and incumbent["test_acc"] == hpo_best["test_acc"]
    assert all(r["flops"] <= hpo_best["flops"] for r in selection["rows"])
    nas = json.loads((out / "results.json").read_text())[2]
    assert nas["answer"] == selection["answer"] and nas["verdict"] == selection["sentence"]
    assert (nas["run"] == "hpo_best") == (selection["answer"] == "incumbent")
    trial = json.loads((out / "hpo" / "trials" / "0000" / "summary.json").read_text())
    assert trial["dataset"]["valid_split"] == "holdout" and trial["config"]["epochs"] == 1
    assert yaml.safe_load((out / "supernet" / "config.yaml").read_text())["hparams"] == str(out / "hpo" / "best.json")
    assert "[8/8] nas_eval" in output and "test accuracy" in output and "selection: " in output
    html = (out / "report" / "report.html").read_text()
    assert "Not (yet) available" not in html and "Final results" in html
    for section in ("What each step bought", "HPO best against the baseline", "Wall time per stage"):
        assert section in html
    assert "3 trials" in output and "search done in" in output  # the study stages count their trials
    assert nas["seeds"] == [0] and nas["test_images"] == hpo_best["dataset"]["test_images"] == 2000  # the test set, not the held-out images
    assert load_pipeline_config("quick", out / "pipeline.yaml").to_dict() == load_pipeline_config("quick", TINY).to_dict()


@pytest.mark.slow
def test_a_searched_answer_is_its_selection_run_not_trained_again(tmp_path):
    """Without the incumbent and the width curve a proposal wins; it trained in the selection exactly as the retrain
    stage would train it, so that run is the NAS row's."""
    out = tmp_path / "run"
    finish(pipeline(out, "--set", "select.incumbent=false", "--set", "select.width_curve=", "--set", "hpo.trials=1",
                    "--set", "nas_eval.trials=0"))
    selection = json.loads((out / "select" / "select.json").read_text())
    nas = json.loads((out / "results.json").read_text())[2]
    assert selection["answer"].startswith("proposal_") and nas["run"] == f"select/trials/{selection['answer']}"
    summary = json.loads((out / nas["run"] / "summary.json").read_text())
    assert nas["test_acc"] == summary["test_acc"] and not (out / "retrain" / "answer").exists()
    assert "run in the selection" in nas["how"]


@pytest.mark.slow
def test_a_front_answers_under_each_limit_and_the_final_table_keeps_the_default_limits_answer(front):
    out, output, _ = front
    hpo_best = json.loads((out / "hpo_best" / "summary.json").read_text())
    answers = json.loads((out / "select" / "front.json").read_text())
    assert [a["max_flops"] for a in answers] == [2.5e6, hpo_best["flops"]]  # the default limit is one of them
    assert all(a["flops"] <= a["max_flops"] for a in answers)
    assert yaml.safe_load((out / "search" / "search.yaml").read_text())["max_flops"] == hpo_best["flops"]
    default = out / "select" / f"flops_{hpo_best['flops'] / 1e6:g}M"
    selection = json.loads((default / "select.json").read_text())
    nas = json.loads((out / "results.json").read_text())[2]
    assert nas["answer"] == selection["answer"] == answers[1]["name"] and nas["max_flops"] == hpo_best["flops"]
    assert (out / "select" / "answer.json").read_bytes() == (default / "answer.json").read_bytes()
    assert (nas["run"] == "hpo_best") == (selection["answer"] == "incumbent")
    assert "front: " in output and "at the default limit, " in output


@pytest.mark.slow
def test_a_front_resumes_after_its_first_limit_without_training_it_again(front):
    out, output, before = front
    assert "[6/8] select (resumed: 4 of 9 candidates done)" in output
    assert "under 2.5 MFLOPs: " not in output and "under 3.24435 MFLOPs: incumbent: complete" in output
    assert before and all((out / name).read_bytes() == data for name, data in before.items())


@pytest.mark.slow
def test_the_report_says_what_nas_bought_under_each_limit(front):
    from effcifar.report import FRONT_TITLE, make_report

    out, _, _ = front
    section = {s.title: s for s in make_report(out, out / "again").sections}[FRONT_TITLE]
    sentences = [note for note in section.notes if note.startswith("Under ")]
    assert [s.split(":")[0] for s in sentences] == ["Under 2.5 MFLOPs", "Under 3.244 MFLOPs"]
    for sentence in sentences:
        assert ("vs HPO best" in sentence) != ("the baseline stands" in sentence)
        assert "Held out at the last rung (epoch 2): " in sentence
    assert [row[0] for row in section.table] == ["FLOPs limit (M)", "2.5", "3.244"]
    assert section.images == ["select_front.png"] and FRONT_TITLE in (out / "report" / "report.html").read_text()


@pytest.mark.slow
def test_a_front_limit_nothing_meets_is_a_one_line_error_before_anything_trains(tmp_path):
    output = finish_failing(pipeline(tmp_path / "run", "--front", "1e5,30e6"))
    assert output.count("\n") == 1 and "error: command line: field 'select.front': no network of the supernet's " \
        "space is within 100,000 FLOPs; the smallest has 958,784" in output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_running_again_skips_every_finished_stage(uninterrupted, tmp_path):
    out, _ = uninterrupted
    before = {f: (out / f).read_bytes() for f in SAME_BYTES}
    output = finish(pipeline(out))
    assert output.count("skipped (finished)") == len(STAGES)
    assert all((out / f).read_bytes() == b for f, b in before.items())
    moved = tmp_path / "moved"  # a pipeline directory copied elsewhere resumes there too
    shutil.copytree(out, moved)
    assert finish(pipeline(moved)).count("skipped (finished)") == len(STAGES)


@pytest.mark.slow
def test_another_setting_is_refused_for_a_finished_stage(uninterrupted):
    out, _ = uninterrupted
    output = finish_failing(pipeline(out, "--set", "search.trials=7"))
    assert f"{out / 'search'}: stage 'search' was run with other settings (settings.trials differ)" in output
    output = finish_failing(pipeline(out, "--set", "hpo.trials=4"))
    assert "stage 'hpo' was run with other settings (settings.hpo.trials differ)" in output


@pytest.mark.slow
def test_kill_anywhere_then_resume_ends_with_the_same_files(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "run"
    # killed during the second HPO trial, after the first supernet epoch, and between two selection candidates
    for ready in (lambda: (out / "hpo" / "trials" / "0001").is_dir(),
                  lambda: any((out / "supernet" / "checkpoints").glob("*")),
                  lambda: (out / "select" / "trials" / "resnet_0.5x" / "summary.json").is_file()):
        kill_when(pipeline(out), ready)
    output = finish(pipeline(out))
    assert "[1/8] baseline: skipped (finished)" in output and "[6/8] select (resumed" in output
    for name in SAME_BYTES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert accuracies(out) == accuracies(reference)
    ranking = [json.loads((run / "nas_eval" / "ranking.json").read_text()) for run in (out, reference)]
    assert ranking[0]["supernet_acc"] == ranking[1]["supernet_acc"]
    assert ranking[0]["standalone_acc"] == ranking[1]["standalone_acc"]
    finish(effcifar("hpo", "export", str(out / "hpo")))
    trials = json.loads((out / "hpo" / "trials.json").read_text())
    lost = [t for t in trials if t["fail_reason"] == "its worker process died"]
    assert len(lost) <= 1 and [t["state"] for t in trials].count("COMPLETE") == 3  # the cut trial retried, none redone


@pytest.mark.slow
def test_a_second_pipeline_on_the_same_directory_is_refused_and_the_first_ends_intact(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "run"
    first = pipeline(out)
    deadline = time.time() + 300
    while not (out / "hpo" / "trials").is_dir():  # the first is in the middle of its study
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    output = finish_failing(pipeline(out))
    assert output.count("\n") == 1 and f"{out}: in use by another effcifar process (PID {first.pid})" in output
    finish(first)
    for name in SAME_BYTES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert accuracies(out) == accuracies(reference) and not (out / LOCK_FILE).exists()


def test_readme_main_job_command_is_the_pipeline_command():
    """`make demo` (the README's main-job command) runs `effcifar pipeline` (which the tests above run)."""
    result = subprocess.run(["make", "-n", "-s", "demo", "-o", ".venv/.effcifar-installed", "DATASET=synthetic",
                             "DEMO_ARGS=--quiet", "DEMO_OUT=runs/x"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("effcifar pipeline --preset quick --dataset synthetic --quiet --out runs/x")


def test_live_view_shows_stage_units_time_left_and_best(tmp_path):
    from rich.console import Console
    from rich.progress import Progress

    from effcifar.cli import LineMonitor, pipeline_columns, RichMonitor

    console = Console(record=True, force_terminal=True, width=140)
    with Progress(*pipeline_columns(), console=console, auto_refresh=False) as progress:
        monitor = RichMonitor(progress, 7)
        monitor.stage_skipped("baseline", 1, "finished")
        monitor.stage_started("hpo", 2, True, "trials", 6, 2)
        monitor.advance(3, 6, "best 41.00%")
        progress.refresh()
        shown = console.export_text(clear=False)
        monitor.line("trial 3: complete valid acc 41.00%")
        monitor.stage_finished("hpo", 12.0, "best: trial 3")
    text = console.export_text()
    for expected in ("[1/7] baseline: skipped (finished)", "[2/7] hpo (resumed)", "trial 3: complete", "hpo done in 12 s"):
        assert expected in text
    assert "3/6" in shown and "trials" in shown and "best 41.00%" in shown and "left" in shown
    lines = []
    monitor = LineMonitor(7)
    monitor.print = lines.append
    monitor.stage_started("search", 5, True, "trials", 30, 12)
    assert lines == ["[5/7] search (resumed: 12 of 30 trials done)"]


@pytest.mark.slow
def test_out_that_is_a_file_is_a_one_line_error(tmp_path):
    file = tmp_path / "taken"
    file.write_text("mine")
    output = finish_failing(pipeline(file))
    assert f"error: {file}: expected a run directory, got a file" in output and file.read_text() == "mine"
