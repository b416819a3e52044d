"""SupernetConfig's groups: the top level stays short, every flat key still works, and old runs still resume."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from effcifar.cli import main
from effcifar.config import build_config, nested_keys, save_config
from effcifar.errors import ConfigError
from effcifar.nas.checkpoint import checkpoint_files, read_checkpoint
from effcifar.nas.supernet import SupernetConfig, load_config, read_run_config
from effcifar.nas.trainer import train_supernet
from effcifar.pipeline.plan import load_pipeline_config
from effcifar.train import TrainConfig

DATA = Path(__file__).parent / "data"
# The settings of tests/data/supernet_config_flat.yaml, a config.yaml as runs saved it before the groups (flat).
FLAT_RUN = dict(dataset="synthetic", subset=300, holdout=100, batch_size=50, prep=8, layer1=16, layer2=24, layer3=32,
                cutout=4, bn_batches=2, panel_random=1, eval_batch_size=100, precision="fp32", threads=1, epochs=2,
                shrink_at="1", shrink_samples=1, sandwich_paths=3, flops_max=5e7)
# Settings away from the defaults in every group, given flat (as files, options and the pipeline give them).
OTHER = dict(space="seed-widths", epochs=12, sampling="uniform", flops_min=2e7, flops_max=9e7, bn_batches=3,
             panel_random=2, shrink_at="4,8", shrink_samples=6, sandwich_paths=3, layer2=192, logits_weight=0.25,
             cutout=4, flip=False, crop_pad=2, lr_factor=0.5, keep_checkpoints=2, threads=1)


def test_the_top_level_is_short():
    assert len(dataclasses.fields(SupernetConfig)) <= 30
    assert len(dataclasses.fields(TrainConfig)) <= 36


@pytest.mark.parametrize("cls", [SupernetConfig, TrainConfig])
def test_every_flat_key_belongs_to_one_group_only(cls):
    groups = nested_keys(cls)  # raises TypeError for a key of two groups, or of a group and a field
    own = {f.name for f in dataclasses.fields(cls)}
    assert groups and all(not set(keys) & own for keys in groups.values())


def test_the_fingerprint_of_a_run_is_what_it_was_before_the_groups():
    """Computed by the code that kept every setting flat: a changed fingerprint would refuse to resume old runs."""
    assert SupernetConfig().fingerprint() == "ac98ebd254065a7b"
    assert load_config(overrides=OTHER).fingerprint() == "637d3063b13dbcaf"


def test_flat_and_nested_spellings_give_the_same_config(tmp_path):
    flat = load_config(overrides=OTHER)
    assert (flat.sampler.flops_max, flat.evaluation.bn_batches, flat.shrinking.shrink_at) == (9e7, 3, "4,8")
    assert (flat.widths.layer2, flat.augment.flip, flat.keep_checkpoints) == (192, False, 2)
    saved = tmp_path / "config.yaml"
    save_config(flat, saved)
    nested = yaml.safe_load(saved.read_text())
    assert nested["sampler"] == {"flops_min": 2e7, "flops_max": 9e7, "sandwich_paths": 3} and "bn_batches" not in nested
    assert build_config(SupernetConfig, saved) == flat
    text = {key: str(value) for key, value in OTHER.items()}
    assert load_config(overrides=text, overrides_from_text=True) == flat
    mixed = {k: v for k, v in OTHER.items() if k not in ("flops_min", "flops_max")} | {
        "sampler": {"flops_min": 2e7, "flops_max": 9e7}}
    assert SupernetConfig.of(**mixed) == flat


def test_a_key_given_flat_and_under_its_group_is_refused(tmp_path):
    path = tmp_path / "supernet.yaml"
    path.write_text("bn_batches: 2\nevaluation: {bn_batches: 3}\n")
    with pytest.raises(ConfigError, match=f"{path}: field 'bn_batches': given twice"):
        build_config(SupernetConfig, path)


@pytest.mark.parametrize("text, named", [
    ("flops_maximum: 3\n", "unknown field 'flops_maximum'"),
    ("sampler: {bn_batches: 3}\n", "unknown field 'sampler.bn_batches' (known fields of sampler: flops_min"),
    ("evaluation: 3\n", "field 'evaluation': expected a mapping of field names to values"),
])
def test_a_key_unknown_in_every_group_is_one_line_naming_the_file_and_field(tmp_path, text, named):
    path = tmp_path / "supernet.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        build_config(SupernetConfig, path)
    assert str(error.value).startswith(f"{path}: {named}") and "\n" not in str(error.value)


def test_the_pipeline_section_takes_a_group_flat_or_nested(tmp_path):
    flat = load_pipeline_config("quick", None, {"supernet.flops_max": "9e7", "supernet.bn_batches": "3"})
    nested = load_pipeline_config("quick", None, {"supernet.sampler.flops_max": "9e7",
                                                  "supernet.evaluation.bn_batches": "3"})
    assert flat.supernet == nested.supernet and flat.supernet["flops_max"] == 9e7
    with pytest.raises(ConfigError, match="field 'supernet.sampler.bn_batches': unknown"):
        load_pipeline_config("quick", None, {"supernet.sampler.bn_batches": "3"})


def test_every_setting_has_an_option_with_help(capsys):
    with pytest.raises(SystemExit):
        main(["supernet", "train", "--help"])
    out = capsys.readouterr().out
    for keys in nested_keys(SupernetConfig).values():
        for key in keys:
            assert f"--{key.replace('_', '-')}" in out
    assert "sampler: the path samplers' settings" in out


def test_an_old_flat_config_yaml_loads_and_its_run_resumes(tmp_path):
    """A run whose config.yaml was written before the groups: it reads as the same config and continues from a
    checkpoint stamped with the fingerprint that code computed (dcd0dc958125fa93)."""
    config = SupernetConfig.of(**FLAT_RUN)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(DATA / "supernet_config_flat.yaml", old / "config.yaml")
    assert read_run_config(old) == config and config.fingerprint() == "dcd0dc958125fa93"
    train_supernet(config, tmp_path / "whole", warn=lambda message: None)
    shutil.copytree(tmp_path / "whole" / "checkpoints", old / "checkpoints")
    checkpoint_files(old)[0].unlink()  # back to the end of epoch 1
    assert read_checkpoint(checkpoint_files(old)[0])["fingerprint"] == "dcd0dc958125fa93"
    assert main(["supernet", "train", "--out", str(old), "--resume", "--quiet"]) == 0
    resumed, whole = (read_checkpoint(run / "supernet.pt")["model"] for run in (old, tmp_path / "whole"))
    assert resumed.keys() == whole.keys() and all(resumed[k].equal(whole[k]) for k in whole)
