"""Standalone subnets (train --arch), retraining a search's top K, and the supernet's ranking quality."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effcifar.nas.retrain as retrain_lib
from effcifar.config import build_config, flat_values
from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable
from effcifar.nas.network import Supernet
from effcifar.nas.ranking import RankingReport, kendall_tau
from effcifar.nas.retrain import base_config, nas_eval, retrain_top
from effcifar.nas.search import SearchConfig, arch_key, run_search
from effcifar.inference import load_model
from effcifar.nas.space import ArchSpace
from effcifar.train import TrainConfig, recipe_for

from conftest import ARCH, NARROW
from test_studies import children, is_running, poll

ROOT = Path(__file__).resolve().parents[1]
# One epoch of 500 synthetic images (100 held out by the supernet run) at the narrow widths.
TINY = {"subset": 500, "batch_size": 50, "eval_batch_size": 100, "precision": "fp32", "threads": 1,
        "epochs": "1"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effcifar", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=300)


@pytest.fixture(scope="module")
def search_run(supernet_run) -> tuple[Path, Path]:
    """(supernet run, search run): the tiny supernet, then 4 random trials (best 3 exported)."""
    search = supernet_run.parent / "search"
    run_search(SearchConfig(strategy="random", trials=4, precision="fp32", threads=1, export=3),
               supernet_run, search)
    return supernet_run, search


def test_standalone_has_exactly_the_chosen_ops_parameters(tmp_path):
    space = ArchSpace.seed()
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps({k: [v] for k, v in ARCH.items()}))  # NNI's one-element lists
    config = TrainConfig(arch=str(arch_file), **NARROW)
    config.validate()
    model = recipe_for(config).build_model(10)
    supernet = Supernet(space, NARROW, 10)
    supernet.set_arch(ARCH)
    unused = {id(p) for p in supernet.inactive_parameters()}
    chosen = {name: p.shape for name, p in supernet.named_parameters() if id(p) not in unused}
    assert {name: p.shape for name, p in model.named_parameters()} == chosen
    assert sum(p.numel() for p in model.parameters()) == CostTable.build(space, NARROW, 10).params_of(ARCH)
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.startswith("stages.stage2.body") for name in names)  # skip 'zero': no body convs
    assert not any(name.startswith("stages.stage1.body.conv4") for name in names)  # past the skip
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_train_arch_cli_and_load_model_round_trip(tmp_path):
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps({"arch": ARCH}))
    out = tmp_path / "run"
    result = cli("train", "--dataset", "synthetic", "--arch", str(arch_file), "--subset", "200", "--batch-size", "50",
                 "--epochs", "1", "--peak-epoch", "0.5", "--threads", "1", "--quiet",
                 *[f"--{k}={v}" for k, v in NARROW.items()], "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == CostTable.build(ArchSpace.seed(), NARROW, 10).params_of(ARCH)
    saved = json.loads((out / "arch.json").read_text())
    assert saved["arch"] == ARCH and ArchSpace.from_dict(saved["space"]) == ArchSpace.seed()
    arch_file.unlink()  # the run keeps its own copy
    model = load_model(out)
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(model.network.state_dict()[k], v) for k, v in state.items())


@pytest.mark.slow
def test_arch_errors_are_one_line_and_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**ARCH, "stage1.conv2": "conv7"}))
    with pytest.raises(ConfigError, match=r"field 'arch': .*bad.json: field 'stage1.conv2'"):
        build_config(TrainConfig, None, {"arch": str(bad)})
    with pytest.raises(ConfigError, match="field 'arch': expected none with recipe airbench"):
        build_config(TrainConfig, None, {"arch": str(bad), "recipe": "airbench"})
    bad.write_text("{not json")
    result = cli("train", "--dataset", "synthetic", "--arch", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "bad.json: not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_export_embeds_the_space(search_run):
    supernet_dir, search_dir = search_run
    records = [json.loads((search_dir / "arch" / f"top_{rank}.json").read_text()) for rank in (1, 2, 3)]
    assert all(ArchSpace.from_dict(r["space"]) == ArchSpace.seed() for r in records)
    assert json.loads((search_dir / "architecture_final.json").read_text()) == records[0]


@pytest.mark.slow
def test_retrain_top_k_then_resume(search_run, tmp_path, monkeypatch):
    supernet_dir, search_dir = search_run
    base = base_config(supernet_dir, None, {**TINY, "peak_epoch": "0.5"}, overrides_from_text=True)
    assert base.prep == NARROW["prep"] and base.holdout == 100 and base.epochs == 1
    rows = retrain_top(search_dir, 2, tmp_path / "retrain", base)
    assert [r["rank"] for r in rows] == [1, 2]
    table = json.loads((tmp_path / "retrain" / "retrain.json").read_text())
    assert table == rows and len((tmp_path / "retrain" / "retrain.tsv").read_text().splitlines()) == 3
    for row in rows:
        record = json.loads((search_dir / "arch" / f"top_{row['rank']}.json").read_text())
        assert row["trial"] == record["trial"] and row["supernet_acc"] == record["accuracy"]
        assert row["params"] == record["params"] and row["flops"] == record["flops"]
        summary = json.loads((tmp_path / "retrain" / f"top_{row['rank']}" / "summary.json").read_text())
        assert summary["dataset"]["valid_split"] == "holdout"  # held-out images for the holdout column, test for test
        assert (row["standalone_holdout_acc"], row["standalone_test_acc"]) == (summary["final_valid_acc"],
                                                                               summary["test_acc"])
    # Re-running trains nothing; another config is refused rather than mixed in.
    monkeypatch.setattr(retrain_lib, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert retrain_top(search_dir, 2, tmp_path / "retrain", base) == rows
    with pytest.raises(ConfigError, match="finished with another config"):
        retrain_top(search_dir, 1, tmp_path / "retrain", base_config(supernet_dir, None, {**TINY, "peak_lr": "0.1"},
                                                                     overrides_from_text=True))
    with pytest.raises(ConfigError, match="top_4.json: no such architecture file"):
        retrain_top(search_dir, 4, tmp_path / "retrain", base)


@pytest.mark.slow
@pytest.mark.slow
def test_a_run_of_another_network_at_the_same_rank_is_not_reused(search_run, tmp_path):
    """A search run further rewrites arch/top_1.json: the finished top_1 run belongs to the old network."""
    supernet_dir, search_dir = search_run
    search = tmp_path / "search"
    shutil.copytree(search_dir, search)
    base = base_config(supernet_dir, None, {**TINY, "peak_epoch": "0.5"}, overrides_from_text=True)
    retrain_top(search, 1, tmp_path / "retrain", base)
    shutil.copy(search / "arch" / "top_2.json", search / "arch" / "top_1.json")
    with pytest.raises(ConfigError, match="top_1: finished with another architecture than .*top_1.json holds now"):
        retrain_top(search, 1, tmp_path / "retrain", base)


def test_retrain_cli(search_run, tmp_path):
    supernet_dir, search_dir = search_run
    out = tmp_path / "r"
    result = cli("retrain", str(search_dir), "--best", "1", "--epochs", "1", "--subset", "300", "--batch-size", "50",
                 "--threads", "1", "--precision", "fp32", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "supernet (held out)" in result.stdout and len(json.loads((out / "retrain.json").read_text())) == 1
    assert json.loads((out / "top_1" / "summary.json").read_text())["config"]["peak_epoch"] == pytest.approx(5 / 24)
    result = cli("retrain", str(tmp_path), "--top", "1", cwd=tmp_path)  # the old name still works, with a warning
    assert "option --top is deprecated" in result.stderr
    assert result.returncode == 2 and "not a search run" in result.stderr


@pytest.mark.slow
def test_nas_eval_ranks_random_subnets(search_run, tmp_path, monkeypatch):
    supernet_dir, _ = search_run
    out = tmp_path / "nas_eval"
    result = cli("nas-eval", str(supernet_dir), "--trials", "3", "--epochs", "1", "--subset", "300",
                 "--batch-size", "50", "--threads", "1", "--precision", "fp32", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Kendall tau" in result.stdout and "FLOPs" in result.stdout and "parameters" in result.stdout
    ranking = json.loads((out / "ranking.json").read_text())
    assert [r["name"] for r in ranking["rankers"]] == ["supernet", "FLOPs", "parameters"]  # one seed: no ceiling
    table = json.loads((out / "table.json").read_text())  # the trained subnets as a benchmark table
    assert [row["mean_acc"] for row in table.values()] == pytest.approx([a * 100 for a in ranking["standalone_acc"]])
    assert ranking["n"] == 3 and len(ranking["supernet_acc"]) == len(ranking["standalone_acc"]) == 3
    space = ArchSpace.seed()
    assert len({arch_key(space, a) for a in ranking["archs"]}) == 3
    report = RankingReport.compute(ranking["supernet_score"], ranking["standalone_acc"])  # by loss, the default
    for name in ("tau", "rho", "top_overlap"):  # null where the accuracies have no spread (NaN)
        expected = getattr(report, name)
        assert ranking[name] == (None if expected != expected else pytest.approx(expected))
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for i in range(3):  # standalone accuracy is on the supernet's held-out images
        summary = json.loads((out / f"subnet_{i}" / "summary.json").read_text())
        assert summary["dataset"]["valid_split"] == "holdout" and summary["dataset"]["valid_images"] == 100
        assert summary["final_valid_acc"] == ranking["standalone_acc"][i]
    # Resume: nothing is trained again and the same result comes back.
    monkeypatch.setattr(retrain_lib, "train", lambda *a, **k: pytest.fail("a finished subnet was trained again"))
    again = nas_eval(supernet_dir, 3, 1, out, overrides={"subset": 300, "batch_size": 50, "threads": 1,
                                                          "precision": "fp32"})
    assert json.loads((out / "ranking.json").read_text())["standalone_acc"] == ranking["standalone_acc"]
    assert again.n == 3
    result = cli("nas-eval", str(supernet_dir), "--trials", "3", cwd=tmp_path)
    assert result.returncode == 2 and "--epochs: required" in result.stderr


@pytest.mark.slow
def test_nas_eval_with_two_seeds_reports_the_truths_own_agreement(search_run, tmp_path):
    supernet_dir, _ = search_run
    out = tmp_path / "two_seeds"
    nas_eval(supernet_dir, 4, 1, out, overrides={"subset": 300, "batch_size": 50, "threads": 1, "precision": "fp32"},
             repeats=2, workers=2)  # two training processes
    ranking = json.loads((out / "ranking.json").read_text())
    assert all(len(seeds) == 2 for seeds in ranking["standalone_seed_acc"])
    for i in range(4):  # seed 0 in subnet_i, seed 1 beside it, both on the held-out images
        accs = [json.loads((out / d / "summary.json").read_text())["final_valid_acc"]
                for d in (f"subnet_{i}", f"subnet_{i}_seed1")]
        assert ranking["standalone_seed_acc"][i] == pytest.approx(accs)
        assert ranking["standalone_acc"][i] == pytest.approx(sum(accs) / 2)
    ceiling = ranking["rankers"][-1]
    assert ceiling["name"] == "one seed vs another (ceiling)"
    seeds = list(zip(*ranking["standalone_seed_acc"]))
    by_hand = kendall_tau(seeds[0], seeds[1])  # both orders of the pair give the same tau
    assert ceiling["tau"] == pytest.approx(by_hand) if by_hand == by_hand else ceiling["tau"] is None
    assert ranking["flops"] == sorted(ranking["flops"])  # stratified over FLOPs, smallest first


def test_a_run_finished_before_the_renames_is_reused(tmp_path):
    """A summary.json written with the old flat names (total_epoch, res_layer1) still matches its config."""
    config = TrainConfig(**NARROW, epochs=2, peak_epoch=1)
    old = {k: v for k, v in flat_values(config).items() if k != "epochs"} | {"total_epoch": 2}
    (tmp_path / "summary.json").write_text(json.dumps({"config": old, "test_acc": 0.5}))
    assert retrain_lib.train_once(config, tmp_path, data=None)["test_acc"] == 0.5
    with pytest.raises(ConfigError, match="finished with another config"):
        retrain_lib.train_once(TrainConfig(**NARROW, epochs=3, peak_epoch=1), tmp_path, data=None)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nas_eval_workers_end_with_their_command(search_run, tmp_path, sig):
    """Its training processes die with a killed command, and a terminated one stops them (no queued run starts)
    before it exits and lets go of its lock."""
    supernet_dir, _ = search_run
    proc = subprocess.Popen([sys.executable, "-m", "effcifar", "nas-eval", str(supernet_dir), "--trials", "4",
                             "--epochs", "400", "--subset", "500", "--batch-size", "50", "--threads", "1",
                             "--precision", "fp32", "--workers", "2", "--out", str(tmp_path / "ne")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers: list[int] = []
    try:
        def two_trainings_started() -> bool:
            workers[:] = [p for p in children(proc.pid)
                          if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            return len(workers) >= 2 and len(list((tmp_path / "ne").glob("subnet_*/logs.tsv"))) == 2
        assert poll(two_trainings_started, 120), "the two trainings did not start"
        os.kill(proc.pid, sig)
        assert proc.wait(30) == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
        if sig == signal.SIGTERM:
            assert not any(is_running(w) for w in workers), "the command ended before its workers"
            assert not (tmp_path / "ne" / ".lock").exists()
        assert poll(lambda: not any(is_running(w) for w in workers), 5), "a worker outlived its command"
        assert sorted(p.name for p in (tmp_path / "ne").glob("subnet_*")) == ["subnet_0", "subnet_1"]  # none queued
    finally:
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
