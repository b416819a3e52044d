import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effcifar.cli import main
from effcifar.config import save_config
from effcifar.data import make_synthetic
from effcifar.errors import ConfigError
from effcifar.nas.checkpoint import checkpoint_files, read_checkpoint, save_checkpoint
from effcifar.nas.costs import CostTable
from effcifar.nas.distributed import GlobalBatchNorm2d, average_gradients, global_batch_norm, use_global_batch_norm
from effcifar.nas.evaluation import recalibrate_bn
from effcifar.nas.network import Supernet
from effcifar.nas.path_samplers import PathSampler
from effcifar.nas.shrinking import shrink_space
from effcifar.nas.space import ArchSpace
from effcifar.nas.supernet import SupernetConfig, load_config, load_supernet
from effcifar.nas.trainer import SupernetTrainer, train_supernet
from effcifar.train import seed_everything

from conftest import NARROW

# A tiny run: 600 synthetic training images (100 held out), batches of 50, fp32 on 1 thread.
TINY = ["--dataset", "synthetic", "--subset", "500", "--holdout", "100", "--batch-size", "50", "--prep", "8",
        "--layer1", "16", "--layer2", "24", "--layer3", "32", "--bn-batches", "2", "--panel-random", "2",
        "--eval-batch-size", "100", "--precision", "fp32", "--threads", "1", "--quiet"]


def tiny_config(**changes) -> SupernetConfig:
    values = dict(dataset="synthetic", subset=500, holdout=100, batch_size=50, bn_batches=2, panel_random=2,
                  eval_batch_size=100, precision="fp32", threads=1, epochs=2, **NARROW)
    values.update(changes)
    return SupernetConfig.of(**values)


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "effcifar", "supernet", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "supernet.pt")["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run, shrinking after epoch 1, to compare resumed runs against."""
    out = tmp_path_factory.mktemp("supernet") / "reference"
    proc = cli(*TINY, "--epochs", "3", "--shrink-at", "1", "--shrink-samples", "1", "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.mark.slow
def test_end_to_end_run_writes_every_artifact(reference_run):
    logs = (reference_run / "logs.tsv").read_text().splitlines()
    header = logs[0].split("\t")
    for column in ("epoch", "lr", "train_loss", "train_acc", "valid_largest", "valid_smallest", "valid_random1",
                   "valid_random2", "valid_panel_mean", "space_size"):
        assert column in header
    assert len(logs) == 4
    rows = [dict(zip(header, line.split("\t"))) for line in logs[1:]]
    assert int(rows[0]["space_size"]) == ArchSpace.seed().size() > int(rows[1]["space_size"])
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["processes"] == 1
    net, space, config = load_supernet(reference_run)
    assert isinstance(net, Supernet) and config.epochs == 3
    assert space.choices() == json.loads((reference_run / "space.json").read_text())
    assert len(checkpoint_files(reference_run)) == 3


@pytest.mark.slow
def test_shrinking_removes_one_candidate_per_key_per_event(reference_run):
    log = json.loads((reference_run / "shrink_log.json").read_text())
    assert [event["epoch"] for event in log] == [1]
    full = ArchSpace.seed().choices()
    shrunk = log[0]["space"]
    for key, candidates in full.items():
        assert len(shrunk[key]) == len(candidates) - 1
        assert set(candidates) - set(shrunk[key]) == {log[0]["dropped"][key]}
        assert all(n >= 1 for n in log[0]["counts"][key].values())


def test_shrink_never_drops_the_last_candidate_and_drops_the_worst():
    space = ArchSpace.seed().restrict({k: (v[:1] if k.endswith("conv1") else v) for k, v in ArchSpace.seed().choices().items()})
    # a synthetic judge: active 3x3 convs and the deepest skip score higher
    score = lambda arch: sum(arch[k] in ("conv3", "conv4_output") for k in space.active_keys(arch))
    shrunk, record = shrink_space(space, samples=100, seed=0, evaluate=score)
    for key, candidates in space.choices().items():
        if len(candidates) == 1:
            assert shrunk.choices()[key] == candidates and key not in record["dropped"]
        elif key.split(".")[1] in ("conv2", "conv3", "conv4"):
            assert record["dropped"][key] == "conv5"
    assert all(record["dropped"][f"stage{i}.skip"] != "conv4_output" for i in (1, 2, 3))


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def first_epoch_done(run: Path) -> bool:
    return (run / "checkpoints").exists() and bool(checkpoint_files(run))


@pytest.mark.slow
def test_kill_9_after_an_epoch_then_resume_is_bitwise_identical(reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [*TINY, "--epochs", "3", "--shrink-at", "1", "--shrink-samples", "1", "--out", str(out)]
    proc = cli(*args)
    wait_for(lambda: first_epoch_done(out) or proc.poll() is not None)
    proc.kill()
    proc.wait()
    assert not (out / "supernet.pt").exists(), "the run finished before it could be killed"
    resumed = cli(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_bitwise_equal(weights(out), weights(reference_run))
    assert (out / "logs.tsv").read_text().count("\n") == 4
    assert json.loads((out / "shrink_log.json").read_text())[0]["dropped"] == \
        json.loads((reference_run / "shrink_log.json").read_text())[0]["dropped"]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resume_is_bitwise_identical(reference_run, tmp_path, monkeypatch, capsys):
    """SIGTERM arrives after step 3 of epoch 2 (sent by the run itself, so no timing is involved)."""
    out = tmp_path / "terminated"
    args = ["supernet", "train", *TINY, "--epochs", "3", "--shrink-at", "1", "--shrink-samples", "1", "--out", str(out)]
    step = SupernetTrainer.train_step

    def step_then_signal(self, x, y, lr):
        result = step(self, x, y, lr)
        if self.progress.global_step == len(self.train_loader) + 2:  # this step is epoch 2's third
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    threads = torch.get_num_threads()
    monkeypatch.setattr(SupernetTrainer, "train_step", step_then_signal)
    assert main(args) == 130  # stopped by a signal, as Ctrl-C
    err = capsys.readouterr().err
    assert "checkpoint saved" in err and "epoch 2, step 3" in err and "--resume" in err, err
    assert err.strip().count("\n") == 0
    latest = read_checkpoint(checkpoint_files(out)[0])
    assert (latest["progress"]["epoch"], latest["progress"]["step"]) == (1, 3)
    monkeypatch.setattr(SupernetTrainer, "train_step", step)
    assert main([*args, "--resume"]) == 0
    torch.set_num_threads(threads)
    assert_bitwise_equal(weights(out), weights(reference_run))


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(reference_run, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference_run, out)
    (out / "supernet.pt").unlink()
    files = checkpoint_files(out)
    files[0].unlink()  # back to the end of epoch 2 ...
    files[1].write_bytes(files[1].read_bytes()[:5000])  # ... whose checkpoint is truncated: epoch 1 remains
    proc = cli(*TINY, "--out", str(out), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "checksum mismatch" in err and files[1].name in err
    assert_bitwise_equal(weights(out), weights(reference_run))


@pytest.mark.slow
def test_resume_with_another_config_is_refused(reference_run, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    code = main(["supernet", "train", "--out", str(out), "--resume", "--config", str(out / "config.yaml"), "--peak-lr", "0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "made with other settings (peak_lr changed)" in err and err.count("\n") == 1, err
    code = main(["supernet", "train", *TINY, "--epochs", "3", "--out", str(out)])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_checkpoint_digest_detects_a_flipped_byte(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.arange(10)}, path)
    assert torch.equal(read_checkpoint(path)["x"], torch.arange(10))
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        read_checkpoint(path)


def test_flops_limits_are_respected_and_impossible_ones_refused():
    space = ArchSpace.seed()
    costs = CostTable.build(space, NARROW, num_classes=10)
    low, high = costs.flops_of(costs.extreme(False)), costs.flops_of(costs.extreme(True))
    lo, hi = low + (high - low) * 0.3, low + (high - low) * 0.5
    sampler = PathSampler(costs, seed=0, flops_min=lo, flops_max=hi)
    flops = [costs.flops_of(sampler.sample(space)) for _ in range(200)]
    assert all(lo <= f <= hi for f in flops) and len(set(flops)) > 20
    with pytest.raises(ConfigError, match="flops_max"):
        PathSampler(costs, seed=0, flops_max=low - 1).sample(space)


def test_flops_limits_in_training_and_config_checks():
    config = tiny_config(flops_max=1.0)
    with pytest.raises(ConfigError, match="no path within"):
        train_supernet(config, data=make_synthetic(10, 600, 10))
    for changes, field in [({"schedule": "step"}, "schedule"), ({"shrink_at": "0"}, "shrink_at"),
                           ({"shrink_at": "x"}, "shrink_at"), ({"holdout": 0}, "holdout"),
                           ({"cutout": 40}, "cutout"), ({"flops_min": 5.0, "flops_max": 2.0}, "flops_max")]:
        with pytest.raises(ConfigError, match=field):
            tiny_config(**changes).validate()


def test_schedules_and_hparams_layer(tmp_path):
    config = SupernetConfig(peak_lr=0.4, epochs=10)
    assert config.lr_at(0) == pytest.approx(0.12) and config.lr_at(5) == pytest.approx(0.06) and config.lr_at(10) == 0
    cosine = SupernetConfig(peak_lr=0.4, epochs=10, schedule="cosine")
    assert cosine.lr_at(5) == pytest.approx(0.06) and cosine.lr_at(2.5) == pytest.approx(0.06 * (1 + 2 ** -0.5))
    warm = SupernetConfig(peak_lr=0.4, epochs=12, schedule="cosine", warmup_epochs=2)
    assert warm.lr_at(0) == 0 and warm.lr_at(1) == pytest.approx(0.06) and warm.lr_at(2) == pytest.approx(0.12)
    assert warm.lr_at(7) == pytest.approx(0.06) and warm.lr_at(12) == pytest.approx(0)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"peak_lr": 0.2, "layer1": 96, "cutout": 4, "epochs": 40, "seed": 7}))
    config = load_config(None, {"hparams": str(best), "cutout": "6"}, overrides_from_text=True)
    values = (config.peak_lr, config.widths.layer1, config.augment.cutout, config.seed, config.epochs)
    assert values == (0.2, 96, 6, 0, 30)
    save_config(config, tmp_path / "config.yaml")  # as a run keeps it: every value, the hparams path beside them
    best.unlink()  # a resume reads the run's config alone: a moved best.json does not block it
    assert load_config(tmp_path / "config.yaml") == config


def test_bn_recalibration_equals_the_batch_statistics():
    torch.manual_seed(0)
    net = Supernet(ArchSpace.seed(), NARROW, num_classes=10)
    net.set_arch({k: v[0] for k, v in ArchSpace.seed().choices().items()})
    bn = net.prep[1]
    bn.running_mean.fill_(5.0)
    batches = [torch.randn(16, 3, 32, 32) * 2 + 1 for _ in range(3)]
    recalibrate_bn(net, batches, _no_autocast)
    outs = [net.prep[0](b) for b in batches]
    torch.testing.assert_close(bn.running_mean, torch.cat(outs).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # momentum None: the plain average of the batches' (unbiased) variances, not a moving average
    torch.testing.assert_close(bn.running_var, torch.stack([o.var((0, 2, 3)) for o in outs]).mean(0),
                               rtol=1e-4, atol=1e-5)
    assert not net.training and bn.momentum == 0.1 and bn.num_batches_tracked == len(batches)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_global_batch_norm_is_plain_batch_norm_without_a_process_group():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    swapped = torch.nn.BatchNorm2d(4)
    swapped.__class__ = GlobalBatchNorm2d
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(swapped(x), plain(x))



def test_width_choices_are_refused_for_batch_norm_over_several_processes():
    """Sliced batch norm is not synchronised over processes: such a run is refused in one line, not trained wrong."""
    net = Supernet(ArchSpace.load("seed-widths"), NARROW, num_classes=10)
    with pytest.raises(ConfigError, match="expected a space without width choices when training on several processes"):
        global_batch_norm(net, torch.device("cpu"))
    global_batch_norm(Supernet(ArchSpace.seed(), NARROW, num_classes=10), torch.device("cpu"))

def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
         "-m", "effcifar", "supernet", "train", *args],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
    )


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """torchrun, gloo: 2 processes end with the weights of 1 process on the same global batches.

    Both runs go through the same code path (torchrun with 1 or 2 processes; global batch norm),
    so only the order of float reductions differs. (Native CPU batch norm itself differs from
    the float64 result by ~1e-5, which 5 steps amplify to ~1e-3: it is not the comparison here.)
    """
    common = ["--dataset", "synthetic", "--subset", "200", "--holdout", "100", "--batch-size", "40", "--epochs", "1",
              "--sampling", "uniform", *TINY[8:]]  # one path per step: multi-path steps are checked in float64 below
    for processes in (1, 2):
        run = torchrun(processes, *common, "--out", str(tmp_path / f"p{processes}"))
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((tmp_path / f"p{processes}" / "summary.json").read_text())
        assert summary["processes"] == processes
        assert summary["malloc"] == ("tuned" if platform.libc_ver()[0] == "glibc" else "system")  # rank 0 set it itself
    one, two = weights(tmp_path / "p1"), weights(tmp_path / "p2")
    assert one.keys() == two.keys()
    seed_everything(0)  # the runs' seed: the same initial weights as theirs
    initial = Supernet(ArchSpace.seed(), NARROW, num_classes=10).state_dict()
    moved = 0
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
        if value.is_floating_point() and not torch.equal(value, initial[key]):
            moved += 1
    assert moved > 10  # the comparison is about trained weights, not the initial ones


def _float64_grads(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, archs: list[dict],
                   out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = Supernet(ArchSpace.seed(), NARROW, num_classes=10).double()
    use_global_batch_norm(net)
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    for arch in archs:  # a multi-path step: each path's gradients add up, then one average over the ranks
        net.set_arch(arch)
        torch.nn.functional.cross_entropy(net(x[shard]), y[shard], label_smoothing=0.2).backward()
    average_gradients(net, world)
    if rank == 0:
        torch.save({n: p.grad for n, p in net.named_parameters() if p.grad is not None}, out)
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_path_gradients_over_two_processes_are_exact_in_float64(tmp_path):
    """In float64, a sandwich-like step (largest and smallest path) over 2 processes (global batch
    norm, one gradient average) gives the 1-process gradients of the same batch to ~1e-15; in fp32
    the two differ by float rounding only, which multi-path steps amplify beyond a fixed tolerance."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 3, 32, 32, generator=g).double(), torch.randint(0, 10, (50,), generator=g)
    choices = ArchSpace.seed().choices()
    archs = [{k: v[-1] for k, v in choices.items()}, {k: v[0] for k, v in choices.items()}]
    for world in (1, 2):
        torch.multiprocessing.spawn(_float64_grads, args=(world, free_port(), x, y, archs, str(tmp_path / f"g{world}.pt")),
                                    nprocs=world)
    one, two = (torch.load(tmp_path / f"g{w}.pt", weights_only=True) for w in (1, 2))
    assert one.keys() == two.keys() and len(one) > 20
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, rtol=1e-10, atol=1e-12, msg=name)
