"""NNI search spaces on Optuna: every type's support, nested choices, validation errors, the examples."""

import json
import math
import statistics
from pathlib import Path

import optuna
import pytest
import yaml

from effcifar.config import build_config, field_types
from effcifar.errors import ConfigError
from effcifar.hpo.space import SearchSpace
from effcifar.train import TrainConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TYPES = field_types(TrainConfig)
NAMES = list(TYPES)  # the keys a config may set: fields, recipe fields (flat), old names

optuna.logging.set_verbosity(optuna.logging.WARNING)


def draws(spec, n, fields=None, seed=0):
    """n samples of a space with Optuna's random sampler."""
    space = SearchSpace.from_dict(spec, fields=fields)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.suggest(study.ask()) for _ in range(n)]


def values(spec, n=300, **kwargs):
    """The sampled values of a one-parameter space named x."""
    return [d["x"] for d in draws({"x": spec}, n, **kwargs)]


def test_choice_hits_every_option():
    got = values({"_type": "choice", "_value": [1, "a", 2.5, None, True]}, 200)
    assert set(map(repr, got)) == {"1", "'a'", "2.5", "None", "True"}


def test_randint_excludes_high():
    got = values({"_type": "randint", "_value": [2, 5]})
    assert set(got) == {2, 3, 4} and all(isinstance(v, int) for v in got)


def test_uniform_and_loguniform_support():
    assert all(0.5 <= v <= 1.5 for v in values({"_type": "uniform", "_value": [0.5, 1.5]}))
    got = values({"_type": "loguniform", "_value": [1e-5, 1e-1]}, 400)
    assert all(1e-5 <= v <= 1e-1 for v in got)
    assert {math.floor(math.log10(v)) for v in got} == {-5, -4, -3, -2}  # spread across the decades


def test_quniform_rounds_to_q_and_clips_to_the_bounds():
    got = values({"_type": "quniform", "_value": [1, 11, 3]})
    assert set(got) == {1, 3, 6, 9, 11}  # round(1.2 / 3) * 3 = 0 -> 1; round(10.8 / 3) * 3 = 12 -> 11


def test_qloguniform_multiples_of_q_within_bounds():
    got = values({"_type": "qloguniform", "_value": [0.01, 1.0, 0.05]}, 400)
    assert all(0.01 <= v <= 1.0 for v in got) and 0.01 in got
    assert all(v == 0.01 or abs(v / 0.05 - round(v / 0.05)) < 1e-9 for v in got)


def test_normal_matches_mu_and_sigma():
    got = values({"_type": "normal", "_value": [3.0, 2.0]}, 2000)
    assert abs(statistics.fmean(got) - 3.0) < 0.15 and abs(statistics.stdev(got) - 2.0) < 0.15


def test_qnormal_lognormal_qlognormal():
    assert all(v % 0.5 == 0 for v in values({"_type": "qnormal", "_value": [0, 3, 0.5]}))
    logs = [math.log(v) for v in values({"_type": "lognormal", "_value": [1.0, 0.5]}, 2000)]
    assert abs(statistics.fmean(logs) - 1.0) < 0.05 and abs(statistics.stdev(logs) - 0.5) < 0.05
    got = values({"_type": "qlognormal", "_value": [2.0, 1.0, 2]})
    assert all(v >= 0 and v % 2 == 0 for v in got)


def test_int_fields_get_ints_and_float_fields_floats():
    spec = {"prep": {"_type": "quniform", "_value": [16, 64, 16]}, "layer1": {"_type": "choice", "_value": [64.0, 128]},
            "res_prep": {"_type": "qnormal", "_value": [2, 1, 1]}, "peak_lr": {"_type": "randint", "_value": [1, 3]}}
    for d in draws(spec, 50, fields=TYPES):
        assert type(d["prep"]) is int and d["prep"] in (16, 32, 48, 64)
        assert type(d["layer1"]) is int and type(d["res_prep"]) is int and type(d["peak_lr"]) is float


NESTED = {
    "arch": {"_type": "choice", "_value": [
        {"_name": "small", "prep": 16, "layer1": {"_type": "choice", "_value": [32, 64]}},
        {"_name": "deep", "res_layer1": {"_type": "randint", "_value": [1, 4]},
         "widths": {"_type": "choice", "_value": [
             {"_name": "narrow", "layer2": 128, "layer3": {"_type": "quniform", "_value": [128, 256, 64]}},
             {"_name": "wide", "layer2": {"_type": "choice", "_value": [256, 512]}}]}}]},
    "peak_lr": {"_type": "loguniform", "_value": [0.01, 1.0]},
}


def test_nested_choice_two_levels():
    space = SearchSpace.from_dict(NESTED, fields=TYPES)
    assert space.names() == ["prep", "layer1", "res_layer1", "layer2", "layer3", "peak_lr"]
    seen = set()
    for d in draws(NESTED, 200, fields=TYPES):
        assert set(d) <= set(NAMES) and "peak_lr" in d
        seen.add(tuple(sorted(d)))
        build_config(TrainConfig, overrides=d)
    assert seen == {("layer1", "peak_lr", "prep"), ("layer2", "layer3", "peak_lr", "res_layer1"),
                    ("layer2", "peak_lr", "res_layer1")}


def test_nested_choice_runs_under_tpe():
    space = SearchSpace.from_dict(NESTED, fields=TYPES)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    study.optimize(lambda t: sum(float(v) for v in space.suggest(t).values()), n_trials=50)
    distributions: dict = {}
    for trial in study.trials:
        for name, dist in trial.distributions.items():
            assert distributions.setdefault(name, dist) == dist
    assert {"arch", "arch/deep/widths", "arch/deep/widths/narrow/layer3"} <= set(distributions)


def test_suggest_nni_gives_nni_nested_parameters_where_siblings_share_keys():
    """Two layers that each choose an op with the same keys (NNI's nested-space example): with any names the space
    loads, `suggest_nni` gives each layer its own {"_name", keys}, and the flat `suggest` says where to look."""
    op = {"_type": "choice", "_value": [{"_name": "empty"},
                                        {"_name": "conv", "kernel": {"_type": "choice", "_value": [1, 3, 5]}},
                                        {"_name": "pool", "size": {"_type": "choice", "_value": [2, 3]}}]}
    space = SearchSpace.from_dict({"layer0": op, "layer1": op, "lr": {"_type": "uniform", "_value": [0.1, 0.2]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        params = space.suggest_nni(study.ask())
        assert set(params) == {"layer0", "layer1", "lr"} and 0.1 <= params["lr"] <= 0.2
        for layer in ("layer0", "layer1"):
            chosen = params[layer]
            seen.add(chosen["_name"])
            assert set(chosen) == {"_name"} | {"empty": set(), "conv": {"kernel"}, "pool": {"size"}}[chosen["_name"]]
    assert seen == {"empty", "conv", "pool"}
    clash = next(t for t in iter(study.ask, None) if t.suggest_categorical("layer0", ["empty", "conv", "pool"]) ==
                 t.suggest_categorical("layer1", ["empty", "conv", "pool"]) == "conv")
    with pytest.raises(ConfigError, match="sets 'kernel', which another parameter of this trial set too"):
        space.suggest(clash)


def check_error(spec, *parts, fields=TYPES):
    """The space is rejected with a one-line message naming the source and these parts."""
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_dict(spec, "space.json", fields)
    message = str(e.value)
    assert message.startswith("space.json: ") and "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("spec,parts", [
    ([1, 2], ["expected a mapping"]),
    ({"peak_lr": 0.1}, ["'peak_lr'", "_type and _value"]),
    ({"peak_lr": {"_value": [1, 2]}}, ["'peak_lr'", "missing _type"]),
    ({"peak_lr": {"_type": "uniform"}}, ["'peak_lr'", "missing _value"]),
    ({"peak_lr": {"_type": "uniform", "_value": [0.1, 1], "_default": 0.4}}, ["'peak_lr'", "'_default'"]),
    ({"peak_lr": {"_type": "gaussian", "_value": [0, 1]}}, ["'peak_lr'", "choice, randint", "qlognormal"]),
    ({"peak_lr": {"_type": "uniform", "_value": 0.4}}, ["'peak_lr'", "[low, high]"]),
    ({"peak_lr": {"_type": "uniform", "_value": [0.1, 0.2, 0.3]}}, ["'peak_lr'", "[low, high]"]),
    ({"peak_lr": {"_type": "uniform", "_value": ["a", 1]}}, ["'peak_lr'", "numbers"]),
    ({"peak_lr": {"_type": "uniform", "_value": [0.4, 0.1]}}, ["'peak_lr'", "low < high", "[0.4, 0.1]"]),
    ({"prep": {"_type": "randint", "_value": [1.5, 4]}}, ["'prep'", "integers"]),
    ({"prep": {"_type": "randint", "_value": [4, 4]}}, ["'prep'", "low < high"]),
    ({"peak_lr": {"_type": "loguniform", "_value": [0, 1]}}, ["'peak_lr'", "0 < low"]),
    ({"peak_lr": {"_type": "qloguniform", "_value": [-1, 1, 0.1]}}, ["'peak_lr'", "0 < low"]),
    ({"peak_lr": {"_type": "quniform", "_value": [0.1, 1, 0]}}, ["'peak_lr'", "q > 0"]),
    ({"peak_lr": {"_type": "normal", "_value": [1, 0]}}, ["'peak_lr'", "sigma > 0"]),
    ({"peak_lr": {"_type": "qlognormal", "_value": [1, -1, 1]}}, ["'peak_lr'", "sigma > 0"]),
    ({"peak_lr": {"_type": "choice", "_value": []}}, ["'peak_lr'", "non-empty"]),
    ({"peak_lr": {"_type": "choice", "_value": [[0.1], [0.2]]}}, ["'peak_lr'", "numbers, strings"]),
    ({"prep": {"_type": "choice", "_value": [16, 2.5]}}, ["'prep'", "of type int", "2.5"]),
    ({"prep": {"_type": "uniform", "_value": [16, 64]}}, ["'prep'", "type int", "randint"]),
    ({"prep": {"_type": "quniform", "_value": [16, 64, 0.5]}}, ["'prep'", "type int"]),
    ({"device": {"_type": "uniform", "_value": [0, 1]}}, ["'device'", "type str"]),
    ({"peak_lrr": {"_type": "uniform", "_value": [0.1, 1]}}, ["'peak_lrr'", "not a TrainConfig field", "peak_lr"]),
    ({"zzz": {"_type": "uniform", "_value": [0.1, 1]}}, ["'zzz'", "not a TrainConfig field"]),
    ({"arch": {"_type": "choice", "_value": [{"_name": "a"}, 3]}}, ["'arch'", "mix"]),
    ({"arch": {"_type": "choice", "_value": [{"prep": 16}]}}, ["'arch'", "_name"]),
    ({"arch": {"_type": "choice", "_value": [{"_name": "a"}, {"_name": "a"}]}}, ["'arch'", "duplicate _name 'a'"]),
    ({"arch": {"_type": "choice", "_value": [{"_name": "wide", "layer1": {"_type": "choice", "_value": [1, 2.5]}}]}},
     ["'arch/wide/layer1'", "2.5"]),
    ({"arch": {"_type": "choice", "_value": [{"_name": "wide", "layer1": "big"}]}}, ["'arch/wide/layer1'", "type int"]),
    ({"arch": {"_type": "choice", "_value": [{"_name": "a", "b": {"_type": "choice", "_value": [
        {"_name": "c", "layr2": {"_type": "randint", "_value": [1, 2]}}]}}]}}, ["'arch/a/b/c/layr2'", "layer2"]),
    ({"prep": {"_type": "choice", "_value": [16]}, "arch": {"_type": "choice", "_value": [{"_name": "a", "prep": 32}]}},
     ["'arch'", "field 'prep'", "'prep' also sets"]),
])
def test_validation_errors(spec, parts):
    check_error(spec, *parts)


def test_names_only_fields_check_names_but_not_types():
    check_error({"peak_lrr": {"_type": "uniform", "_value": [0.1, 1]}}, "did you mean peak_lr", fields=NAMES)
    space = SearchSpace.from_dict({"prep": {"_type": "uniform", "_value": [1, 2]}}, fields=NAMES)
    assert space.names() == ["prep"]
    assert SearchSpace.from_dict({"anything": {"_type": "uniform", "_value": [1, 2]}}).names() == ["anything"]


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.json"):
        SearchSpace.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        SearchSpace.from_file(bad)


@pytest.mark.parametrize("name", ["search_space.json", "search_space_arch.json"])
def test_examples_build_valid_train_configs(name):
    space = SearchSpace.from_file(EXAMPLES / name, TYPES)
    assert SearchSpace.from_file(EXAMPLES / name, NAMES).names() == space.names()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        sampled = space.suggest(study.ask())
        assert set(sampled) == set(space.names())
        build_config(TrainConfig, overrides=sampled)


def test_a_space_over_the_old_name_total_epoch_still_sets_epochs():
    space = SearchSpace.from_dict({"total_epoch": {"_type": "choice", "_value": [2, 3]}}, fields=TYPES)
    sampled = space.suggest(optuna.create_study().ask())
    assert build_config(TrainConfig, overrides=sampled).epochs == sampled["total_epoch"]


def test_seed_table():
    space = SearchSpace.from_file(EXAMPLES / "search_space.json", TYPES)
    assert space.names() == ["peak_lr", "base_wd", "logits_weight", "peak_epoch", "cutout", "epochs",
                             "prep", "layer1", "layer2", "layer3"]
    assert space.spec["peak_lr"] == {"_type": "loguniform", "_value": [4e-5, 4e-1]}
    assert space.spec["layer3"]["_value"] == [256, 320, 384, 448, 512]
    arch = SearchSpace.from_file(EXAMPLES / "search_space_arch.json", TYPES).names()
    assert len(arch) == 12 and {"res_layer3", "extra_prep", "layer1"} <= set(arch)


def test_yaml_and_json_give_the_same_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(NESTED))
    from_yaml = SearchSpace.from_file(path, TYPES)
    from_json = SearchSpace.from_file(write_json(tmp_path, NESTED), TYPES)
    assert from_yaml.spec == from_json.spec and from_yaml.nodes == from_json.nodes


def write_json(tmp_path, spec):
    """The space written as a JSON file."""
    path = tmp_path / "space.json"
    path.write_text(json.dumps(spec))
    return path
