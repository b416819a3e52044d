"""NNI experiment configs (v1 and v2) read as study settings: values, warnings, errors."""

from pathlib import Path

import pytest
import yaml

from effcifar.errors import ConfigError
from effcifar.hpo.experiment import load_experiment, parse_duration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
V2 = {"searchSpaceFile": "space.json", "trialConcurrency": 2, "maxTrialNumber": 10,
      "tuner": {"name": "TPE", "classArgs": {"optimize_mode": "maximize"}}}


def write(tmp_path, data, name="config.yml"):
    """An experiment config file in tmp_path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["config.yml", "config_v2.yml"])
def test_examples(name):
    exp = load_experiment(EXAMPLES / name)
    assert (exp.trials, exp.timeout, exp.workers, exp.sampler, exp.direction) == (5000, 360000.0, 1, "tpe", "maximize")
    assert Path(exp.search_space_file) == EXAMPLES / "search_space.json" and exp.search_space is None
    assert exp.name == "example_pytorch_cifar100" and exp.seed is None
    ignored = {w.split(":")[0] for w in exp.warnings}
    if name == "config.yml":
        assert ignored == {"authorName", "trainingServicePlatform", "useAnnotation", "localConfig",
                           "trial.command", "trial.codeDir", "trial.gpuNum"}
    else:
        assert ignored == {"trialCommand", "trialCodeDirectory", "trialGpuNumber", "trainingService"}
    assert all("ignored" in w for w in exp.warnings)


def test_inline_space_seed_lowercase_tuner_and_assessor(tmp_path):
    space = {"peak_lr": {"_type": "loguniform", "_value": [0.01, 1]}}
    data = {"searchSpace": space, "maxExperimentDuration": "2.5h",
            "tuner": {"name": "evolution", "classArgs": {"optimize_mode": "maximize", "seed": 3, "population_size": 8}},
            "assessor": {"name": "Medianstop"}}
    exp = load_experiment(write(tmp_path, data))
    assert (exp.search_space, exp.search_space_file, exp.timeout) == (space, None, 9000.0)
    assert (exp.sampler, exp.seed) == ("nsga2", 3)
    assert any(w.startswith("assessor:") and "--pruner" in w for w in exp.warnings)
    assert any(w.startswith("tuner.classArgs.population_size:") for w in exp.warnings)


def test_absolute_space_path_and_our_sampler_names(tmp_path):
    exp = load_experiment(write(tmp_path, {"searchSpacePath": "/abs/space.json", "tuner": {"name": "cmaes"}}))
    assert (exp.search_space_file, exp.sampler) == ("/abs/space.json", "cmaes")
    assert (exp.trials, exp.timeout, exp.workers) == (None, None, None)


@pytest.mark.parametrize("text,seconds", [("100h", 360000.0), ("30m", 1800.0), ("45s", 45.0), ("1d", 86400.0),
                                          ("2.5h", 9000.0), (90, 90.0), (1.5, 1.5), ("600", 600.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["abc", "10w", "", "-5m", 0, True, None, "1h30m"])
def test_parse_duration_errors(text):
    with pytest.raises(ConfigError, match=r"^--timeout: expected a duration"):
        parse_duration(text, "--timeout")


@pytest.mark.parametrize("change,parts", [
    ({"tuner": {"name": "SMAC"}}, ["'tuner.name'", "'SMAC'", "TPE, Random, Evolution", "tpe, random, cmaes, nsga2"]),
    ({"tuner": {"builtinTunerName": "Anneal"}}, ["'tuner.builtinTunerName'", "'Anneal'", "TPE, Random, Evolution"]),
    ({"tuner": {"name": "TPE", "classArgs": {"optimize_mode": "minimize"}}}, ["optimize_mode", "maximize", "accuracy"]),
    ({"tuner": {"className": "MyTuner", "codeDir": "."}}, ["custom tuner"]),
    ({"tuner": {"name": "TPE", "clasArgs": {}}}, ["'tuner.clasArgs'", "classArgs"]),
    ({"tuner": {"classArgs": {}}}, ["'tuner'", "builtinTunerName"]),
    ({"tuner": "TPE"}, ["'tuner'", "mapping"]),
    ({"tuner": {"name": "TPE", "classArgs": {"seed": "1"}}}, ["classArgs.seed", "integer"]),
    ({"maxTrialNumbr": 5}, ["unknown key 'maxTrialNumbr'", "did you mean maxTrialNumber", "known keys"]),
    ({"searchSpace": {}}, ["searchSpaceFile and searchSpace", "only one"]),
    ({"searchSpaceFile": 3}, ["'searchSpaceFile'", "file path"]),
    ({"trialConcurrency": 0}, ["'trialConcurrency'", "positive integer"]),
    ({"trialConcurrency": 1.5}, ["'trialConcurrency'", "positive integer"]),
    ({"maxTrialNumber": "ten"}, ["'maxTrialNumber'", "positive integer"]),
    ({"maxExperimentDuration": "soon"}, ["'maxExperimentDuration'", "duration"]),
    ({"experimentName": 7}, ["'experimentName'", "string"]),
    ({"advisor": {"name": "BOHB"}}, ["'advisor'", "--pruner hyperband"]),
    ({"trial": "python3 main.py"}, ["'trial'", "mapping"]),
    ({"trialConcurrency": 10_000}, ["'trialConcurrency'", "worker processes on this machine"]),
    ({"experimentType": "nas"}, ["'experimentType'", "expected hpo"]),
    ({"max_trial_number": 3}, ["'max_trial_number'", "given twice"]),
])
def test_errors(tmp_path, change, parts):
    path = write(tmp_path, {**V2, **change})
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in parts:
        assert part in message, message


def test_keys_in_any_case_and_with_underscores_as_nni_v2_reads_them(tmp_path):
    data = {"experiment_name": "x", "max_trial_number": 3, "MaxExperimentDuration": "1H", "experimentType": "hpo",
            "search_space_file": "space.json", "description": "notes",
            "tuner": {"Name": "Random", "class_args": {"optimize_mode": "maximize", "seed": 4},
                      "includeIntermediateResults": True}}
    exp = load_experiment(write(tmp_path, data))
    assert (exp.name, exp.trials, exp.timeout, exp.sampler, exp.seed) == ("x", 3, 3600.0, "random", 4)
    assert {w.split(":")[0] for w in exp.warnings} == {"description", "tuner.includeIntermediateResults"}


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yml"):
        load_experiment(tmp_path / "nothere.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("tuner: [")
    with pytest.raises(ConfigError, match="bad.yml: not valid YAML"):
        load_experiment(bad)
