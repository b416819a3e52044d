"""Predicting with a trained network: `load_model(path)` rebuilds it from its model file alone.

A run's `model.pt` (`effcifar train`, the pipeline's final runs, `train --arch` retrains) records
the weights with everything a prediction needs (`effcifar.train.model_record`): the input
normalisation, the class names, the training config and, for a NAS subnet, its architecture and
space. So a model file copied anywhere predicts without the dataset, the run directory or any
knowledge of `effcifar.data`:

>>> import numpy as np, effcifar
>>> model = effcifar.load_model("runs/r9")  # doctest: +SKIP
>>> images = np.zeros((2, 32, 32, 3), dtype=np.uint8)  # uint8 HWC, as CIFAR ships them
>>> model.predict(images)  # doctest: +SKIP
array([3, 3])
>>> model.classes[int(model.predict(images)[0])], model.predict_proba(images).shape  # doctest: +SKIP
('cat', (2, 10))

`tests/test_inference.py` runs this on a trained run of each kind (resnet9, airbench, NAS subnet).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from effcifar.config import build_from_layers
from effcifar.device import resolve_device
from effcifar.errors import ConfigError
from effcifar.nas.network import build_standalone
from effcifar.nas.space import ArchSpace
from effcifar.models import NETWORK_STAGES
from effcifar.train import MODEL_FORMAT, TrainConfig, mirror_logits, plain_logits, recipe_for

MODEL_FILE = "model.pt"


class Classifier(nn.Module):
    """A trained network with its input normalisation and class names: `predict` takes raw images.

    `forward` takes normalised NCHW float tensors (as in training) and returns logits; `predict` and
    `predict_proba` take uint8 images (HWC, NHWC, or a tensor of either, values 0..255) or float tensors in
    0..255, normalise them and apply the run's test-time augmentation (`tta`), in batches.
    """

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float], classes: Sequence[str],
                 config: TrainConfig):
        super().__init__()
        self.network, self.classes, self.config = network, list(classes), config
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        predict = getattr(recipe_for(config), "predict", None)  # airbench: mirror / multi-crop TTA of its final test
        self.logits_of = predict(True) if predict is not None else mirror_logits if config.tta else plain_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def images_tensor(self, images: Any) -> torch.Tensor:
        """Images (N, 32, 32, 3) or one (32, 32, 3), values 0..255, as a normalised float NCHW batch on the model's
        device.

        ValueError for another shape, or for values outside 0..255 (negative, beyond 255, not finite), or for
        float images in 0..1 (torchvision's ToTensor scale): a network trained on 0..255 would answer one
        class for them, without an error.
        """
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.array(images))  # a copy: flipped views and read-only arrays are fine
        shape = tuple(images.shape)
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[-1] != 3 or tuple(x.shape[1:3]) != (32, 32):
            hint = " (channels first? give them last: HWC)" if len(shape) >= 3 and shape[-3] == 3 else ""
            raise ValueError(f"expected images of shape (N, 32, 32, 3) or (32, 32, 3) (HWC, values 0..255), got "
                             f"{shape}{hint}")
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"expected images of values 0..255 (uint8 or float), got {x.dtype}")
        x = x.to(self.mean.device).permute(0, 3, 1, 2).float()
        if len(x):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("expected image values in 0..255, got values that are not finite (NaN or inf)")
            low, high = float(x.min()), float(x.max())
            if not (0 <= low and high <= 255):
                raise ValueError(f"expected image values in 0..255, got values in {low:.4g}..{high:.4g}")
            if images.is_floating_point() and 0 < high <= 1:
                raise ValueError(f"expected image values in 0..255, got floats in {low:.4g}..{high:.4g} (scaled to 0..1? "
                                 f"multiply by 255, or give uint8 images)")
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def predict_proba(self, images: Any, batch_size: int = 500) -> np.ndarray:
        """Class probabilities, shape (N, classes), of images (see `images_tensor`), `batch_size` at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        x = self.images_tensor(images)
        self.eval()
        chunks = [torch.softmax(self.logits_of(self.network, x[i:i + batch_size]).float(), dim=1)
                  for i in range(0, len(x), batch_size)]
        if not chunks:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(chunks).cpu().numpy()

    def predict(self, images: Any, batch_size: int = 500) -> np.ndarray:
        """The predicted class index of each image (`classes[i]` names it)."""
        return self.predict_proba(images, batch_size).argmax(axis=1)


def model_file(path: str | Path) -> Path:
    """The model file of `path`: the file itself, or RUN/model.pt of a run directory."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The trained network of a run directory or model file, ready to `predict` raw images.

    Reads the file with `torch.load(weights_only=True)` (no code from the file runs). A model file
    written before effcifar recorded the normalisation and class names is refused with what to do.
    """
    device = resolve_device(str(device))  # before the file: a GPU this machine lacks is no fault of the file
    file = model_file(path)
    try:
        record = torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no model file (every finished training run has one: a train run, a "
                          f"pipeline's final runs, a selection's trials/NAME)") from None
    except pickle.UnpicklingError:  # objects beyond tensors and plain values: not a file effcifar train writes
        raise ConfigError(f"{file}: not an effcifar model file (it holds objects a model file does not: a supernet "
                          f"or a checkpoint?); give a run's {MODEL_FILE}") from None
    except Exception as e:  # a damaged or foreign file
        raise ConfigError(f"{file}: not a readable model file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{file}: a model file without its input normalisation and class names (written by an "
                          f"older effcifar, or not by effcifar): train the run again (effcifar train --config "
                          f"RUN/config.yaml --out NEW) to get one that load_model can predict with")
    values = {**record["config"], "arch": None}  # the architecture comes from the record, not a file path
    config = build_from_layers(TrainConfig, [(str(file), values, False)])
    num_classes = len(record["classes"])
    if record.get("arch") is not None:
        space = ArchSpace.from_dict(record["arch"]["space"], f"{file}: space")
        network = build_standalone(space, space.check(record["arch"]["arch"], str(file)),
                                   {s: getattr(config, s) for s in NETWORK_STAGES}, num_classes, config.logits_weight)
    else:
        network = recipe_for(config).build_model(num_classes)
    network.load_state_dict(record["state_dict"])
    classifier = Classifier(network, record["mean"], record["std"], record["classes"], config).to(device)
    return classifier.eval()
