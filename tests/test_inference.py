"""Model files that carry their normalisation and classes: `effcifar.load_model(path).predict(images)` for a
resnet9 run, an airbench run and a NAS subnet run, with no dataset at hand; old files are refused saying what to do."""

import json
import shutil

import numpy as np
import pytest
import torch

import effcifar
from effcifar.data import make_synthetic
from effcifar.errors import ConfigError
from effcifar.inference import Classifier, load_model
from effcifar.train import TrainConfig, train

from conftest import ARCH, NARROW, TINY_BASE

ONE_EPOCH = {**TINY_BASE, "epochs": 1, "peak_epoch": 0.5, "threads": 1, "precision": "fp32"}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=256, n_test=200)


def reference_predictions(result, data) -> np.ndarray:
    """What the trained model predicts for the test images, normalised as training did (the data set's mean/std)."""
    mean, std = data.mean_std()
    x = (torch.from_numpy(data.x_test).permute(0, 3, 1, 2).float() - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    model = result.model.cpu().float().eval()
    with torch.inference_mode():
        logits = model(x)
        if result.summary["config"]["tta"]:
            logits = (logits + model(x.flip(3))) / 2
    return logits.argmax(1).numpy()


@pytest.mark.parametrize("kind", ["resnet9", "airbench", "nas"])
def test_a_model_file_alone_predicts_what_the_trained_model_does(kind, data, tmp_path):
    fields = dict(ONE_EPOCH)
    if kind == "nas":
        arch_file = tmp_path / "arch.json"
        arch_file.write_text(json.dumps({"arch": ARCH}))
        fields.update(NARROW, arch=str(arch_file))
    config = TrainConfig.for_recipe("airbench", **{**fields, "multicrop_tta": False}) if kind == "airbench" \
        else TrainConfig(**fields)
    result = train(config, tmp_path / "run", data=data)
    moved = tmp_path / "elsewhere" / "model.pt"  # the file alone: no run directory, no arch file, no data set
    moved.parent.mkdir()
    shutil.copy(tmp_path / "run" / "model.pt", moved)
    shutil.rmtree(tmp_path / "run")
    if kind == "nas":
        (tmp_path / "arch.json").unlink()
    model = effcifar.load_model(moved)
    assert isinstance(model, Classifier) and model.classes == data.classes
    predicted = model.predict(data.x_test)  # uint8 NHWC, as the data set holds them
    agreement = float(np.mean(predicted == reference_predictions(result, data)))
    assert predicted.shape == (200,) and agreement > 0.98  # equal up to float summation order
    proba = model.predict_proba(torch.from_numpy(data.x_test[:3]))  # a tensor works too
    assert proba.shape == (3, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert model.predict(data.x_test[0]).shape == (1,)  # one HWC image
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 32, 32, 3\)"):
        model.predict(np.zeros((2, 3, 32, 32), dtype=np.uint8))


def test_an_old_model_file_is_refused_saying_what_to_do(data, tmp_path):
    result = train(TrainConfig(**ONE_EPOCH), tmp_path / "run", data=data)
    torch.save(result.model.state_dict(), tmp_path / "run" / "model.pt")  # what effcifar wrote before
    with pytest.raises(ConfigError) as error:
        load_model(tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message and "without its input normalisation" in message and "effcifar train" in message
    with pytest.raises(ConfigError, match="no model file"):
        load_model(tmp_path / "nothing.pt")


def test_images_a_network_trained_on_0_255_would_misread_are_refused_and_any_array_layout_is_read(data, tmp_path):
    """Floats in 0..1 (torchvision's scale) would all be one class without an error; flipped views, read-only
    arrays and empty batches are ordinary inputs."""
    train(TrainConfig(**ONE_EPOCH), tmp_path / "run", data=data)
    model = load_model(tmp_path / "run")
    images = data.x_test[:8]
    expected = model.predict(images)
    for bad, message in [(images / 255.0, r"got floats in [0-9.]+\.\.[0-9.]+ \(scaled to 0\.\.1\? multiply by 255"),
                         (images.astype(np.int64) + 1, r"got values in [0-9]+\.\.256"),
                         (np.full((1, 32, 32, 3), np.nan, np.float32), "not finite"),
                         (images.astype(bool), "uint8 or float"),
                         (np.zeros((3, 32, 32), np.uint8), r"got \(3, 32, 32\) \(channels first\?")]:
        with pytest.raises(ValueError, match=message):
            model.predict(bad)
    assert (model.predict(images.astype(np.float32)) == expected).all()
    assert (model.predict(images[:, :, ::-1][:, :, ::-1]) == expected).all()  # a (double) flipped view
    frozen = images.copy()
    frozen.setflags(write=False)
    assert (model.predict(frozen, batch_size=3) == expected).all()
    assert model.predict_proba(images[:0]).shape == (0, 10) and model.predict(images[:0]).shape == (0,)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        model.predict(images, batch_size=0)


def test_load_model_names_a_missing_gpu_and_a_file_that_is_not_a_model(data, tmp_path):
    train(TrainConfig(**ONE_EPOCH), tmp_path / "run", data=data)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="field 'device': expected auto or cpu, or a GPU this machine has"):
            load_model(tmp_path / "run", device="cuda")
    torch.save({"module": torch.nn.Linear(2, 2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="not an effcifar model file") as error:
        load_model(tmp_path / "checkpoint.pt")
    assert "weights_only" not in str(error.value)  # torch's hint to load unsafely is not passed on


def test_load_model_is_public_api():
    assert "load_model" in effcifar.__all__ and effcifar.load_model is load_model
