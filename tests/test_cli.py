"""The effcifar command as users run it: a real subprocess, real files, one-line errors."""

import json
import os
import re
import resource
import subprocess
import sys

import pytest

from conftest import TINY_BASE

TINY = ["--dataset", "synthetic", "--subset", "256", "--batch-size", "64", "--epochs", "1", "--peak-epoch", "0.5",
        "--prep", "8", "--layer1", "8", "--layer2", "16", "--layer3", "16"]


def effcifar(*args, cwd=None, env=None):
    """Run the installed console script's module form (same entry point) and capture output."""
    return subprocess.run([sys.executable, "-m", "effcifar", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_train_runs_and_prints_the_final_table(tmp_path):
    out = tmp_path / "run"
    r = effcifar("train", *TINY, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "epoch   1" in r.stdout and "test accuracy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["layer3"] == 16 and summary["epochs_run"] == 1


@pytest.mark.slow
def test_config_file_and_option_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("peak_lr: 0.05\ncutout: 4\n")
    out = tmp_path / "run"
    r = effcifar("train", "--config", str(cfg), *TINY, "--cutout", "6", "--no-flip", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    resolved = json.loads((out / "summary.json").read_text())["config"]
    assert (resolved["peak_lr"], resolved["cutout"], resolved["flip"]) == (0.05, 6, False)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "field 'epochs': expected a positive integer, got 0"),
    (["--epochs", "4", "--peak-epoch", "5"], "field 'peak_epoch': expected a number in [0, epochs=4]"),
    (["--layer2", "-8"], "field 'layer2': expected a positive integer"),
    (["--cutout", "33"], "field 'cutout': expected an integer in [0, 32], got 33"),
    (["--dataset", "imagenet"], "field 'dataset': expected one of cifar10, cifar100, synthetic"),
    (["--peak-lr", "fast"], "field 'peak_lr': expected a value of type float, got 'fast'"),
    (["--config", "missing.yaml"], "missing.yaml: cannot read config file"),
])
@pytest.mark.slow
def test_bad_values_give_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    r = effcifar("train", "--dataset", "synthetic", *args, "--out", str(out))
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_missing_dataset_without_network_is_one_line(tmp_path):
    out = tmp_path / "run"
    r = effcifar("train", "--dataset", "cifar100", "--out", str(out),
                 env={"EFFCIFAR_DATA": str(tmp_path / "cache"), "EFFCIFAR_MIRROR": "http://127.0.0.1:9/"})
    assert r.returncode == 2
    assert "http://127.0.0.1:9/cifar-100-python.tar.gz" in r.stderr and "EFFCIFAR_DATA" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.slow
def test_data_info_on_synthetic():
    r = effcifar("data", "info", "--dataset", "synthetic100")
    assert r.returncode == 0, r.stderr
    assert "10000 / 2000" in r.stdout and "100: class_0" in r.stdout


@pytest.mark.slow
def test_help_lists_every_config_field():
    r = effcifar("train", "--help", env={"COLUMNS": "200"})  # no line break inside an option's name
    for option in ("--peak-lr", "--base-wd", "--logits-weight", "--peak-epoch", "--cutout", "--epochs",
                   "--prep", "--layer1", "--res-layer1", "--extra-layer3", "--tta", "--compile", "--data-dir"):
        assert option in r.stdout
    assert "without --peak-epoch, the peak (and airbench's whiten_bias_epochs) keeps its fraction of the run" in \
        " ".join(r.stdout.split())


def test_train_help_groups_each_recipes_own_fields(capsys, monkeypatch):
    from effcifar import cli

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    shared, resnet9 = text.index("TrainConfig fields"), text.index("recipe resnet9 only (with --recipe resnet9)")
    airbench = text.index("recipe airbench only (with --recipe airbench)")
    assert shared < text.index("--peak-epoch", shared) < resnet9 < text.index("--res-layer1", shared) < airbench
    assert text.index("--whiten,", shared) > airbench and text.index("--no-lookahead", shared) > airbench
    assert "--total-epoch" not in text and "--recipe-fields" not in text


def test_no_lookahead_is_an_airbench_option_only(tmp_path, capsys):
    from effcifar import cli

    assert cli.main(["train", *TINY, "--no-lookahead", "--out", str(tmp_path / "run")]) == 2
    assert "field 'lookahead': expected no value with recipe resnet9 (a field of recipe airbench)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_epochs_alone_is_accepted_and_moves_the_peak(tmp_path):
    out = tmp_path / "run"
    r = effcifar("train", *[a for a in TINY if a not in ("--peak-epoch", "0.5")], "--epochs", "2", "--out", str(out),
                 "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["config"]["peak_epoch"] == pytest.approx(2 * 5 / 24)


@pytest.mark.slow
def test_a_full_disk_while_saving_the_model_is_one_line_and_leaves_no_part_of_a_file(tmp_path):
    out = tmp_path / "run"
    assert effcifar("train", *TINY, "--out", str(out), "--quiet").returncode == 0
    limit = (out / "model.pt").stat().st_size - 1  # the logs and the config still fit; the model does not (EFBIG)
    # a second run writing over the first one, as a pipeline stage does through the API (the command itself
    # refuses an --out that holds a run: its check is switched off here)
    code = ("import sys; from effcifar import cli; cli.rundir_files = lambda out: set(); "
            "sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "train", *TINY, "--seed", "1", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{out / 'model.pt'}: disk full (File too large); the previous file, if any, is kept" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".kind", "config.yaml", "logs.tsv"]  # an unfinished run:
    # no temp file, no lock, and not the first run's model and summary beside the second run's config


def test_train_into_a_run_directory_is_refused_unless_overwrite(tmp_path, capsys):
    from effcifar.cli import main

    out = tmp_path / "run"
    tiny = [*TINY, "--threads", "1", "--precision", "fp32", "--subset", "128"]
    mine = tmp_path / "mine"  # a folder of the user's own is never emptied, --overwrite or not
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("precious")
    assert main(["train", *tiny, "--out", str(mine), "--quiet", "--overwrite"]) == 2
    assert f"{mine}: holds files that are not a training run" in capsys.readouterr().err
    assert (mine / "important.txt").read_text() == "precious" and (mine / "sub").is_dir()
    assert sorted(p.name for p in mine.iterdir()) == ["important.txt", "sub"]
    assert main(["train", *tiny, "--seed", "0", "--out", str(out), "--quiet"]) == 0
    model = (out / "model.pt").read_bytes()
    assert main(["train", *tiny, "--seed", "1", "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{out}: holds a run already" in error and "--overwrite" in error and len(error.splitlines()) == 1
    assert (out / "model.pt").read_bytes() == model
    (out / "stale.txt").write_text("from before")
    assert main(["train", *tiny, "--seed", "1", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1 and not (out / "stale.txt").exists()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".kind"}
    # a replacement that fails (here it diverges) leaves the old run as it was, with none of its own files
    assert main(["train", *tiny, "--seed", "2", "--epochs", "2", "--peak-lr", "1e30", "--out", str(out), "--quiet",
                 "--overwrite"]) == 2
    assert "train loss is" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".kind"} == kept
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []


def test_old_option_names_still_work_with_one_notice_each(capsys):
    from effcifar.cli import build_parser
    from effcifar import config

    config._warned.clear()
    args = build_parser("search").parse_args(["search", "runs/s", "--out", "o", "--evaluations", "7", "--top-k", "3",
                                               "--top-k-export", "2", "--seed", "5", "--evaluations", "8"])
    assert (args.trials, args.parents, args.export, args.sampler_seed) == ("8", "3", "2", "5")
    assert build_parser("nas-eval").parse_args(["nas-eval", "runs/sn", "--sample", "4"]).trials == 4
    assert build_parser("retrain").parse_args(["retrain", "runs/s", "--top", "2"]).best == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and "effcifar: warning: option --evaluations is deprecated" in lines[0]
    assert lines[0].endswith("use --trials")
    with pytest.raises(SystemExit):
        build_parser("search").parse_args(["search", "--help"])
    help_text = capsys.readouterr().out
    assert "--evaluations" not in help_text and "--trials" in help_text and "--sampler-seed" in help_text


def test_hpo_run_seed_is_the_trials_training_seed(tmp_path):
    from effcifar.cli import build_parser, hpo_config_from_args
    from effcifar.hpo import study as hpo

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"peak_lr": {"_type": "uniform", "_value": [0.1, 0.2]}}))
    args = build_parser("hpo").parse_args(["hpo", "run", "--space", str(space), *TINY, "--seed", "3",
                                           "--sampler-seed", "9", "--out", str(tmp_path / "hpo")])
    config, _, base, _ = hpo_config_from_args(args, hpo)
    assert config.sampler_seed == 9 and base.seed == 3


@pytest.mark.slow
def test_data_download_of_a_generated_dataset_is_refused():
    r = effcifar("data", "download", "--dataset", "synthetic")
    assert r.returncode == 2
    assert "--dataset: expected one of cifar10, cifar100 to download, got 'synthetic'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EFFCIFAR_DATA", "").endswith(".npz"), reason="needs EFFCIFAR_DATA=<cifar10 .npz>")
def test_data_verify_and_info_on_the_real_copy():
    r = effcifar("data", "verify", "--dataset", "cifar10")
    assert r.returncode == 0, r.stderr
    assert "50000 train / 10000 test images, 10 classes" in r.stdout
    r = effcifar("data", "info", "--dataset", "cifar10")
    assert r.returncode == 0, r.stderr
    assert "airplane" in r.stdout and "5000" in r.stdout


@pytest.mark.slow
def test_hpo_run_from_nni_v2_config_then_status_best_export(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(TINY_BASE))
    config = tmp_path / "config.yml"
    config.write_text(
        "experimentName: tiny\n"
        "trialCommand: python3 main.py\n"
        "trialConcurrency: 1\n"
        "maxTrialNumber: 2\n"
        "searchSpace:\n"
        "  peak_lr: {_type: loguniform, _value: [0.01, 0.5]}\n"
        "  cutout: {_type: choice, _value: [0, 8]}\n"
        "tuner:\n  name: Random\n  classArgs: {optimize_mode: maximize, seed: 3}\n"
        "trainingService: {platform: local}\n")
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--config", str(config), "--base", str(base), "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "trialCommand" in r.stderr and "trainingService" in r.stderr  # ignored keys are named
    assert r.stdout.count("COMPLETE") >= 2 and "2 trials (2 complete)" in r.stdout
    r = effcifar("hpo", "status", str(run))
    assert r.returncode == 0 and "top 2 trials" in r.stdout
    r = effcifar("hpo", "best", str(run))
    assert r.returncode == 0, r.stderr
    r = effcifar("train", "--config", str(run / "best.json"), "--epochs", "1", "--peak-epoch", "1",
                 "--out", str(tmp_path / "retrain"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = effcifar("hpo", "export", str(run))
    assert r.returncode == 0
    rows = (run / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("number,state,accuracy")
    assert len(json.loads((run / "trials.json").read_text())) == 2


@pytest.mark.slow
def test_space_option_wins_over_an_experiments_inline_space_and_no_input_file_is_written(tmp_path):
    base, space, experiment = tmp_path / "base.json", tmp_path / "space.json", tmp_path / "config.yml"
    base.write_text(json.dumps(TINY_BASE))
    space.write_text(json.dumps({"peak_lr": {"_type": "choice", "_value": [0.1]}}))
    experiment.write_text("searchSpace:\n  cutout: {_type: choice, _value: [0, 4]}\n  bogus: {_type: choice, _value: [1]}\n"
                          "maxTrialNumber: 1\n")
    before = space.read_bytes()
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--experiment", str(experiment), "--space", str(space), "--config", str(base),
                 "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "peak_lr=0.1" in r.stdout and "cutout" not in r.stdout  # the --space file's parameter was searched
    assert space.read_bytes() == before and not (run / "search_space.json").exists()


@pytest.mark.parametrize("space, message", [
    ({"peak_lr": {"_type": "loguniform", "_value": [0.4, 0.1]}}, "key 'peak_lr'"),
    ({"peak_lrr": {"_type": "uniform", "_value": [0.1, 0.4]}}, "peak_lr"),
    ({"cutout": {"_type": "gaussian", "_value": [1, 2]}}, "key 'cutout'"),
    ({"holdout": {"_type": "choice", "_value": [0]}}, "key 'holdout': the data every trial is measured on"),
    ({"subset": {"_type": "choice", "_value": [256, 512]}}, "key 'subset': the data every trial is measured on"),
])
@pytest.mark.slow
def test_hpo_bad_space_is_one_line_and_writes_nothing(tmp_path, space, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--space", str(path), "--dataset", "synthetic", "--out", str(run))
    assert r.returncode == 2
    assert str(path) in r.stderr and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not run.exists()


def help_entries(*command):
    """(option, help text) of each option of a command's --help, help text joined over its lines."""
    r = effcifar(*command, "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    entries, current = [], None
    for line in r.stdout.splitlines():
        if line.startswith("  -"):
            option, _, text = line.strip().partition("  ")
            current = [option, text.strip()]
            entries.append(current)
        elif current is not None and line.startswith("    "):
            current[1] = f"{current[1]} {line.strip()}".strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [("train",), ("hpo", "run"), ("supernet", "train"), ("search",), ("select",)])
def test_every_option_explains_itself(command):
    entries = help_entries(*command)
    assert len(entries) > 20
    for option, text in entries:
        assert text and not text.startswith("(default"), f"{' '.join(command)} {option}: no help text"
        assert text.count("(default") <= 1, f"{option}: {text}"
    texts = dict(entries)
    if command == ("train",):
        assert "one of auto, fp32, bf16, fp16" in texts["--precision STR"]
        assert "one of resnet9, airbench" in texts["--recipe STR"]
    if command == ("hpo", "run"):
        assert "one of tpe, random, cmaes, nsga2" in texts["--sampler STR"]
    if command == ("search",):
        assert "one of evolution, random, nsga2" in texts["--strategy STR"]
    if command == ("select",):
        assert "one of search, random" in texts["--proposals STR"]


def test_version():
    r = effcifar("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"effcifar {effcifar_version()}"


def effcifar_version():
    import effcifar as package

    return package.__version__


def tiny_space(tmp_path, values=(0.01, 0.5)):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"peak_lr": {"_type": "loguniform", "_value": list(values)},
                                "cutout": {"_type": "choice", "_value": [0, 8]}}))
    return path


@pytest.mark.slow
def test_hpo_run_takes_training_options_and_selects_on_held_out_images(tmp_path):
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path)), *TINY, "--trials", "1", "--seed", "0",
                 "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "trials validate on 25 held-out training images" in r.stdout
    assert re.search(r"trial +0 +COMPLETE +peak_lr=[0-9.]+ cutout=[08] +valid acc", r.stdout)
    (trial,) = (run / "trials").iterdir()
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["dataset"]["valid_split"] == "holdout" and summary["config"]["layer3"] == 16
    assert summary["config"]["holdout"] == 25 and summary["epochs_run"] == 1
    r = effcifar("hpo", "best", str(run))
    assert r.returncode == 0, r.stderr
    assert re.search(r"best by the tie rule: trial 0 \(peak_lr=[0-9.]+ cutout=[08]\)", r.stdout)
    assert "Optuna's best_trial is the same trial" in r.stdout
    r = effcifar("hpo", "best", str(run), "--tie", "nan")
    assert r.returncode == 2 and "tie: expected" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a study can start from a previous result: best.json (or any run's config.yaml) as --config
    again = tmp_path / "again"
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path)), "--config", str(run / "best.json"),
                 "--trials", "1", "--out", str(again))
    assert r.returncode == 0, r.stderr
    (trial,) = (again / "trials").iterdir()
    assert json.loads((trial / "summary.json").read_text())["config"]["layer3"] == 16


@pytest.mark.slow
def test_hpo_run_on_the_test_set_needs_saying_so(tmp_path):
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path)), *TINY, "--holdout", "0", "--out", str(run))
    assert r.returncode == 2 and "--select-on-test" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not run.exists()
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path)), *TINY, "--holdout", "0", "--select-on-test",
                 "--trials", "1", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "trials validate on the test set" in r.stderr
    (trial,) = (run / "trials").iterdir()
    assert json.loads((trial / "summary.json").read_text())["dataset"]["valid_split"] == "test"


@pytest.mark.slow
def test_hpo_run_whose_trials_all_fail_exits_with_the_reason(tmp_path):
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path, (1e30, 1e31))), *TINY, "--trials", "5",
                 "--max-failures", "2", "--out", str(run))
    assert r.returncode != 0
    assert "2 trials (2 fail)" in r.stdout
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("effcifar hpo: error: 2 failed trial") and "TrainingDiverged" in error
    assert "Traceback" not in r.stderr


def test_hpo_run_whose_trials_all_failed_runs_afresh_with_a_corrected_space(tmp_path):
    """The failures were the old space's: the corrected command is not refused, nor ended by them (max_failures)."""
    run = tmp_path / "hpo"
    r = effcifar("hpo", "run", "--space", str(tiny_space(tmp_path, (1e30, 1e31))), *TINY, "--trials", "2",
                 "--max-failures", "2", "--out", str(run))
    assert r.returncode == 2 and "2 trials (2 fail)" in r.stdout
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    r = effcifar("hpo", "run", "--space", str(tiny_space(fixed, (0.05, 0.2))), *TINY, "--trials", "2",
                 "--max-failures", "2", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "4 trials (2 complete, 2 fail)" in r.stdout


@pytest.mark.parametrize("command", [["retrain", "runs/s"], ["nas-eval", "runs/n"], ["select", "runs/s"]])
def test_commands_that_choose_the_networks_take_no_arch(command):
    r = effcifar(*command, "--arch", "a.json")
    assert r.returncode == 2 and "unrecognized arguments: --arch" in r.stderr


@pytest.mark.parametrize("command", [["train"], ["hpo", "run", "--out", "x"], ["report", "runs/x"]])
def test_an_unknown_option_is_named_with_its_commands_usage(command):
    r = effcifar(*command, "--bogus")
    name = " ".join(w for w in command if not w.startswith("-") and w not in ("x", "runs/x"))
    assert r.returncode == 2 and r.stderr.startswith(f"usage: effcifar {name} "), r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"effcifar {name}: error: unrecognized arguments: --bogus"


def test_a_train_refused_by_its_data_prints_its_error_alone(tmp_path):
    """Refused after the live view has started (only the data tells the batch is too large): no line on stdout."""
    r = effcifar("train", *TINY, "--batch-size", "100000", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stdout == "" and "field 'batch_size'" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("experiment, message", [
    ("authorName: me\nsearchSpaceFile: missing.json\n", "missing.json"),  # the ignored key's warning is not shown
    ("authorName: me\nuseAnnotation: true\n", "config.yml: no search space (expected searchSpaceFile"),
])
def test_a_refused_nni_experiment_prints_its_error_alone(tmp_path, experiment, message):
    (tmp_path / "config.yml").write_text(experiment)
    r = effcifar("hpo", "run", "--experiment", str(tmp_path / "config.yml"), "--dataset", "synthetic", "--out",
                 str(tmp_path / "hpo"))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert message in r.stderr and not (tmp_path / "hpo").exists()


def test_a_refused_hpo_run_prints_its_error_alone(tmp_path):
    r = effcifar("hpo", "run", "--space", str(tmp_path / "missing.json"), "--dataset", "synthetic", "--out",
                 str(tmp_path / "hpo"))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
