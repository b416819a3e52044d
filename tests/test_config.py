"""Config files and overrides: types, unknown keys and range errors name their source."""

import dataclasses
import json
import re

import pytest
import torch

from effcifar import config as config_lib
from effcifar.airbench import AirbenchFields
from effcifar.config import build_config, read_config_file, save_config
from effcifar.device import resolve_device
from effcifar.errors import ConfigError
from effcifar.nas.search import SearchConfig
from effcifar.train import ResNet9Fields, TrainConfig


def test_defaults_are_the_cifar10_fast_recipe():
    c = build_config(TrainConfig)
    assert (c.batch_size, c.peak_lr, c.peak_epoch, c.epochs, c.base_wd) == (512, 0.4, 5, 24, 5e-4)
    assert (c.momentum, c.nesterov, c.label_smoothing, c.cutout, c.logits_weight) == (0.9, True, 0.2, 8, 0.125)
    assert (c.prep, c.layer1, c.layer2, c.layer3) == (64, 128, 256, 512)
    depths = c.recipe_fields
    assert (depths.res_layer1, depths.res_layer3, depths.res_prep, depths.res_layer2) == (1, 1, 0, 0)


def test_train_config_holds_the_shared_fields_and_each_recipe_its_own():
    assert len(dataclasses.fields(TrainConfig)) <= 36
    assert {f.name for f in dataclasses.fields(TrainConfig)}.isdisjoint({"whiten", "lookahead", "res_layer1"})
    assert TrainConfig().recipe_fields == ResNet9Fields()
    assert TrainConfig.for_recipe("airbench").recipe_fields == AirbenchFields()


def test_recipe_fields_are_given_flat_or_nested_and_only_with_their_recipe(tmp_path):
    flat = build_config(TrainConfig, None, {"recipe": "airbench", "lookahead": "false"}, overrides_from_text=True)
    assert flat.recipe_fields.lookahead is False
    path = tmp_path / "config.yaml"
    save_config(flat, path)  # nested under recipe_fields, as a run's config.yaml
    assert "recipe_fields:\n" in path.read_text() and build_config(TrainConfig, path) == flat
    assert TrainConfig(**dataclasses.asdict(flat)) == flat  # summary.json's config
    assert build_config(TrainConfig, None, {"res_layer1": "2"}, overrides_from_text=True).recipe_fields.res_layer1 == 2
    with pytest.raises(ConfigError, match=r"^command line: field 'whiten': expected no value with recipe resnet9 "
                                          r"\(a field of recipe airbench\), got False$"):
        build_config(TrainConfig, None, {"whiten": "false"}, overrides_from_text=True)
    path.write_text("recipe: airbench\nres_layer1: 2\n")
    with pytest.raises(ConfigError, match=f"^{path}: field 'res_layer1': expected no value with recipe airbench "
                                          r"\(a field of recipe resnet9\)"):
        build_config(TrainConfig, path)
    path.write_text("recipe_fields: 3\n")
    with pytest.raises(ConfigError, match="field 'recipe_fields': expected a mapping of field names to values"):
        build_config(TrainConfig, path)


@pytest.mark.parametrize("config, message", [
    (lambda: TrainConfig(epochs="3"), "field 'epochs': expected a value of type int, got '3'"),
    (lambda: TrainConfig(tta="false"), "field 'tta': expected a value of type bool, got 'false'"),
    (lambda: TrainConfig(batch_size=64.5), "field 'batch_size': expected a value of type int, got 64.5"),
    (lambda: TrainConfig(peak_lr=float("inf")), "field 'peak_lr': expected a finite number"),
    (lambda: TrainConfig(recipe_fields={"res_layer1": "2"}), "field 'res_layer1': expected a value of type int"),
    (lambda: SearchConfig(trials="4"), "field 'trials': expected a value of type int, got '4'"),
])
def test_a_config_built_in_python_is_type_checked_as_a_file_is(config, message):
    """Not a TypeError deep in the run, nor a string 'false' that is true."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config().validate()


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("peak_lr: 0.2\nepochs: 10\nlayer1: 96\n")
    c = build_config(TrainConfig, path, {"epochs": "12", "tta": "true"}, overrides_from_text=True)
    assert (c.peak_lr, c.epochs, c.layer1, c.tta) == (0.2, 12, 96, True)


def test_json_and_roundtrip(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"peak_lr": 0.1, "cutout": 6, "data_dir": None}))
    c = build_config(TrainConfig, path)
    save_config(c, tmp_path / "resolved.yaml")
    assert build_config(TrainConfig, tmp_path / "resolved.yaml") == c


@pytest.mark.parametrize("content, message", [
    ("peak_lr: 0.1\nwarmup: 3\n", "unknown field 'warmup'"),
    ("epochs: ten\n", "field 'epochs': expected a value of type int, got 'ten'"),
    ("epochs: 2.5\n", "field 'epochs': expected a value of type int"),
    ("tta: 1\n", "field 'tta': expected a value of type bool"),
    ("cutout: 40\n", "field 'cutout': expected an integer in [0, 32], got 40"),
    ("epochs: 0\n", "field 'epochs': expected a positive integer, got 0"),
    ("epochs: 4\npeak_epoch: 5\n", "field 'peak_epoch': expected a number in [0, epochs=4], got 5"),
    ("layer2: 0\n", "field 'layer2': expected a positive integer"),
    ("dataset: imagenet\n", "field 'dataset': expected one of cifar10, cifar100, synthetic"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("peak_lr: [1\n", "not valid YAML"),
    ("peak_lr: 0.1\n\tepochs: 2\n", "not valid YAML: found character '\\t' that cannot start any token (line 2, column 1)"),
])
def test_bad_files_name_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        build_config(TrainConfig, path)
    assert str(e.value).startswith(str(path))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_override_errors_name_the_option_source(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: field 'cutout'"):
        build_config(TrainConfig, None, {"cutout": "33"}, overrides_from_text=True)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        read_config_file("nope.yaml")


def test_yaml_numbers_in_scientific_notation_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-4 as text; a config's weight decay written so is a number here."""
    path = tmp_path / "c.yaml"
    path.write_text("base_wd: 5e-4\npeak_lr: 1E+0\nlabel_smoothing: 2.e-1\ndata_dir: '1e3'\n")
    config = build_config(TrainConfig, path)
    assert (config.base_wd, config.peak_lr, config.label_smoothing, config.data_dir) == (5e-4, 1.0, 0.2, "1e3")


def test_json_with_a_byte_order_mark_or_hash_comments_reads_as_nni_reads_it(tmp_path):
    path = tmp_path / "space.json"
    path.write_bytes(b'\xef\xbb\xbf{\n  # the learning rate\n  "peak_lr": 0.1\n}\n')
    assert read_config_file(path) == {"peak_lr": 0.1}
    path.write_text('{"peak_lr": 0.1,, }')
    with pytest.raises(ConfigError, match="space.json: not valid JSON: Expecting property name"):
        read_config_file(path)


@pytest.mark.parametrize("name, content", [
    ("c.yaml", "peak_lr: 0.1\nbatch_size: 256\npeak_lr: 0.2\n"),
    ("c.json", '{"peak_lr": 0.1, "peak_lr": 0.2}'),
])
def test_a_key_given_twice_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match="duplicate key 'peak_lr'") as e:
        build_config(TrainConfig, path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("recipe, epochs, peak, whiten_bias", [
    ("resnet9", "1", 5 / 24, None),  # the default peak 5 of 24 would be refused after epoch 1
    ("resnet9", "12", 2.5, None),
    ("resnet9", "48", 10.0, None),
    ("airbench", "1", 0.23, 1),  # its peak 2.3 of 10 and whitening bias 3 of 10 epochs
    ("airbench", "20", 4.6, 6),
    ("airbench", "10", 2.3, 3),
])
def test_epochs_alone_keep_the_schedule_shape(recipe, epochs, peak, whiten_bias):
    c = build_config(TrainConfig, None, {"recipe": recipe, "epochs": epochs}, overrides_from_text=True)
    assert (c.epochs, c.peak_epoch) == (int(epochs), pytest.approx(peak))
    assert getattr(c.recipe_fields, "whiten_bias_epochs", None) == whiten_bias
    api = TrainConfig(epochs=int(epochs)) if recipe == "resnet9" else TrainConfig.for_recipe(recipe, epochs=int(epochs))
    assert api == c  # the Python API gives the schedule the command line gives


def test_the_peak_left_out_is_the_recipes_share_of_the_run():
    assert TrainConfig(epochs=1).peak_epoch == pytest.approx(5 / 24)  # valid: no ConfigError on peak_epoch
    TrainConfig(epochs=1).validate()
    assert TrainConfig().peak_epoch == 5 and TrainConfig(epochs=4, peak_epoch=1).peak_epoch == 1
    with pytest.raises(ConfigError, match=r"field 'peak_epoch': expected a number in \[0, epochs=4\], got 5"):
        TrainConfig(epochs=4, peak_epoch=5).validate()


def test_the_old_name_total_epoch_is_accepted_with_one_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config_lib, "_warned", set())
    path = tmp_path / "old.yaml"
    path.write_text("total_epoch: 4\npeak_epoch: 1\n")
    assert build_config(TrainConfig, path).epochs == 4
    assert build_config(TrainConfig, None, {"total_epoch": "2"}, overrides_from_text=True).epochs == 2
    err = capsys.readouterr().err
    assert err == (f"effcifar: warning: {path}: field 'total_epoch' is deprecated (it still works for now): "
                   f"use 'epochs'\n")
    path.write_text("total_epoch: 4\nepochs: 4\n")
    with pytest.raises(ConfigError, match="field 'epochs': given twice"):
        build_config(TrainConfig, path)


def test_the_length_scales_what_the_layers_below_set_and_not_what_its_own_layer_sets(tmp_path):
    file = tmp_path / "best.json"
    file.write_text(json.dumps({"epochs": 20, "peak_epoch": 4}))
    assert build_config(TrainConfig, file, {"epochs": "10"}, overrides_from_text=True).peak_epoch == 2
    c = build_config(TrainConfig, file, {"epochs": "10", "peak_epoch": "7"}, overrides_from_text=True)
    assert c.peak_epoch == 7  # set with the length: as given
    file.write_text(json.dumps({"peak_epoch": 6}))  # 6 of the default 24 epochs
    assert build_config(TrainConfig, file, {"epochs": "12"}, overrides_from_text=True).peak_epoch == 3
    file.write_text(json.dumps({"peak_epoch": 6, "epochs": 12}))
    assert build_config(TrainConfig, file).peak_epoch == 6  # one layer sets both: nothing is scaled
    with pytest.raises(ConfigError, match="command line: field 'peak_epoch': expected a number in"):
        build_config(TrainConfig, file, {"peak_epoch": "13"}, overrides_from_text=True)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_numbers_are_refused(text):
    with pytest.raises(ConfigError, match=f"command line: field 'peak_lr': expected a finite number, got '{text}'"):
        build_config(TrainConfig, None, {"peak_lr": text}, overrides_from_text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without a GPU")
def test_a_saved_config_naming_a_gpu_is_read_and_only_a_run_needs_the_gpu(tmp_path):
    path = tmp_path / "config.yaml"  # e.g. a supernet trained on a GPU, searched on a laptop with --device cpu
    path.write_text("device: cuda\nrecipe: airbench\n")
    config = build_config(TrainConfig, path)
    assert config.device == "cuda" and config.compile  # airbench compiles on GPUs
    with pytest.raises(ConfigError, match="field 'device': expected auto or cpu, or a GPU this machine has"):
        resolve_device(config.device)
    with pytest.raises(ConfigError, match=f"{path}: field 'device': expected auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        path.write_text("device: cuda:x\n")
        build_config(TrainConfig, path)


def test_every_field_says_what_it_means_and_execution_fields_stay_marked():
    import dataclasses

    from effcifar.config import execution_fields, field_help
    from effcifar.hpo.study import HpoConfig
    from effcifar.nas.supernet import SupernetConfig

    for cls in (TrainConfig, SupernetConfig, HpoConfig):
        for f in dataclasses.fields(cls):
            assert field_help(f), f"{cls.__name__}.{f.name}: no help text"
    precision = next(f for f in dataclasses.fields(TrainConfig) if f.name == "precision")
    assert field_help(precision).endswith("; one of auto, fp32, bf16, fp16")
    assert execution_fields(TrainConfig) == {"data_dir", "device", "threads", "eval_batch_size", "compile"}
