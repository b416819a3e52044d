"""effcifar: fast CIFAR training, hyper-parameter search and one-shot architecture search.

The public API, one line each; every name below is importable from `effcifar` (loaded on first
use, so `import effcifar` stays light). The example runs the whole series on synthetic data in
about a minute on two CPU cores (`tests/test_api.py` runs it):

>>> import effcifar, json, pathlib, tempfile
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> tiny = dict(dataset="synthetic", subset=600, holdout=200, batch_size=100, prep=8, layer1=8, layer2=16,
...             layer3=16, precision="fp32", threads=1)

Train one network (`TrainConfig` fields are `effcifar train`'s options; `train_network` is
`effcifar.train.train`, named apart from the `effcifar.train` module):

>>> run = effcifar.train_network(effcifar.TrainConfig(**tiny, epochs=2, peak_epoch=1), out / "r9")
>>> 0 <= run.summary["test_acc"] <= 1
True

Predict with it from its model file alone (it records the input normalisation and class names):

>>> import numpy as np
>>> model = effcifar.load_model(out / "r9" / "model.pt")
>>> images = np.zeros((2, 32, 32, 3), dtype=np.uint8)  # uint8 HWC, as CIFAR ships them
>>> model.predict(images).shape, model.predict_proba(images).shape, len(model.classes)
((2,), (2, 10), 10)

Tune its hyper-parameters (an NNI search space over TrainConfig fields; trials select on the
held-out images):

>>> _ = (out / "space.json").write_text(json.dumps({"peak_lr": {"_type": "loguniform", "_value": [0.05, 0.5]}}))
>>> effcifar.save_config(effcifar.TrainConfig(**tiny, epochs=1, peak_epoch=0.5), out / "base.yaml")
>>> study = effcifar.run_study(effcifar.HpoConfig(space=str(out / "space.json"), base=str(out / "base.yaml"),
...                                               trials=2, sampler_seed=0), out / "hpo")
>>> best_file, best = effcifar.write_best(out / "hpo")

Train a supernet, search it under a FLOPs limit, and let real training choose among its best
networks and the ResNet-9 incumbent:

>>> supernet = effcifar.train_supernet(effcifar.SupernetConfig.of(**tiny, epochs=1, bn_batches=2, panel_random=0),
...                                    out / "supernet", warn=lambda message: None)
>>> search = effcifar.run_search(effcifar.SearchConfig(strategy="random", trials=4, threads=1,
...                                                    precision="fp32"), out / "supernet", out / "search")
>>> base = effcifar.TrainConfig(**tiny, epochs=2, peak_epoch=1)
>>> selection = effcifar.select_from_search(effcifar.SelectConfig(pool=2), out / "search", out / "select", base)
>>> selection.answer in [row["name"] for row in selection.rows]
True

The whole series in one resumable call, and its HTML report:

>>> config = effcifar.load_pipeline_config("quick", "tests/data/pipeline_tiny.yaml")  # doctest: +SKIP
>>> result = effcifar.run_pipeline(config, out / "pipeline")                         # doctest: +SKIP
>>> effcifar.write_report(out / "r9").name
'report.html'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> "module:attribute" that defines it (imported when the name is first used)
_API = {
    "TrainConfig": "effcifar.train:TrainConfig", "train_network": "effcifar.train:train",
    "load_model": "effcifar.inference:load_model", "save_config": "effcifar.config:save_config",
    "build_config": "effcifar.config:build_config",
    "HpoConfig": "effcifar.hpo.study:HpoConfig", "run_study": "effcifar.hpo.study:run_study",
    "write_best": "effcifar.hpo.study:write_best",
    "SupernetConfig": "effcifar.nas.supernet:SupernetConfig", "train_supernet": "effcifar.nas.trainer:train_supernet",
    "SearchConfig": "effcifar.nas.search:SearchConfig", "run_search": "effcifar.nas.search:run_search",
    "SelectConfig": "effcifar.nas.select:SelectConfig", "select_from_search": "effcifar.nas.select:select_from_search",
    "load_pipeline_config": "effcifar.pipeline:load_pipeline_config", "run_pipeline": "effcifar.pipeline:run_pipeline",
    "write_report": "effcifar.report:write_report",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    """The public API's names, imported from their modules on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'effcifar' has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    importlib.import_module("effcifar.nas")  # registers the subnet builder: a TrainConfig's `arch` trains its subnet
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
