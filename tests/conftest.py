"""Shared test fixtures: a tiny trial config and search space for the HPO tests; a tiny supernet run for the NAS
tests; headless Chromium."""

import json
from pathlib import Path

import pytest

import effcifar.nas.search as search_lib
from effcifar.nas.supernet import SupernetConfig
from effcifar.nas.trainer import train_supernet

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# One trial of this base config trains in about a second on 2 CPU cores.
TINY_BASE = {"dataset": "synthetic", "subset": 256, "batch_size": 64, "prep": 8, "layer1": 8, "layer2": 16,
             "layer3": 16, "epochs": 2, "peak_epoch": 1, "eval_batch_size": 500}
TINY_SPACE = {"peak_lr": {"_type": "loguniform", "_value": [0.01, 0.5]},
              "cutout": {"_type": "choice", "_value": [0, 4, 8]}}
# Seed-space widths at which a supernet epoch on 500 synthetic images takes about a second.
NARROW = {"prep": 8, "layer1": 16, "layer2": 24, "layer3": 32}
# An architecture of the seed space with a skip in every stage style: zero, a mid-body skip and the whole body.
ARCH = {"stage1.conv1": "conv3_pool", "stage1.conv2": "conv5", "stage1.conv3": "conv3", "stage1.conv4": "conv3",
        "stage1.skip": "conv4_input",
        "stage2.conv1": "conv5_stride2", "stage2.conv2": "conv3", "stage2.conv3": "conv5", "stage2.conv4": "conv5",
        "stage2.skip": "zero",
        "stage3.conv1": "conv3_stride2", "stage3.conv2": "conv3", "stage3.conv3": "conv5", "stage3.conv4": "conv3",
        "stage3.skip": "conv4_output"}


@pytest.fixture
def files(tmp_path):
    """(base config file, search space file) for a tiny study."""
    base, space = tmp_path / "base.json", tmp_path / "space.json"
    base.write_text(json.dumps(TINY_BASE))
    space.write_text(json.dumps(TINY_SPACE))
    return base, space


@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory) -> Path:
    """One epoch of a tiny supernet on synthetic data (500 training images, 100 held out)."""
    out = tmp_path_factory.mktemp("nas") / "supernet"
    config = SupernetConfig.of(dataset="synthetic", subset=500, holdout=100, batch_size=50, bn_batches=2,
                               panel_random=0, eval_batch_size=100, precision="fp32", threads=1, epochs=1, **NARROW)
    train_supernet(config, out, warn=lambda message: None)
    return out


@pytest.fixture
def evaluations(monkeypatch) -> list[dict]:
    """Every architecture actually evaluated on the supernet (cache hits are not)."""
    seen = []
    real = search_lib.evaluate_subnet

    def record(net, arch, *args):
        seen.append(dict(arch))
        return real(net, arch, *args)

    monkeypatch.setattr(search_lib, "evaluate_subnet", record)
    return seen


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium driven by the system chromedriver (never a downloaded one); it keeps the console log."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    from selenium import webdriver  # only the browser tests need selenium
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # driver.get_log("browser")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()
