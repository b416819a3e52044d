"""Every bad input is one line on stderr naming the file or option and what was expected, exit 2, no traceback,
and nothing left behind: one table per class of error, run through the command line's entry point.

Each row is (command line, expected text); `{tmp}` stands for the test's folder, whose files the `inputs`
fixture makes. The command runs in-process (`effcifar.cli.main`, the entry point of the console script);
an exception other than the project's one-line errors would fail the test with its traceback.
"""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from effcifar.cli import main
from effcifar.config import save_config
from effcifar.errors import ConfigError
from effcifar.hpo.study import HpoConfig

from conftest import TINY_BASE, TINY_SPACE

TINY = ["--dataset", "synthetic", "--subset", "256", "--batch-size", "64", "--epochs", "1", "--prep", "8",
        "--layer1", "8", "--layer2", "16", "--layer3", "16"]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def huge_array_pickle() -> bytes:
    """A CIFAR batch whose data asks numpy for a 1 TiB array (a few bytes on disk)."""
    reconstruct = np.zeros(0, np.uint8).__reduce__()[0]  # how numpy pickles an array: numpy's _reconstruct

    class Huge:
        def __reduce__(self):
            return reconstruct, (np.ndarray, (2**40,), b"b")

    return pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=2)


def huge_array_npz() -> bytes:
    """An .npz whose header declares a 1 TiB array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", header.getvalue() + b"\0" * 16)
    return archive.getvalue()


@pytest.fixture
def inputs(tmp_path):
    """The test's folder with a bad file of each kind in it."""
    (tmp_path / "latin1.yaml").write_bytes("peak_lr: 0.4  # d\xe9j\xe0 vu\n".encode("latin-1"))
    (tmp_path / "latin1_arch.json").write_bytes(b'{"stage1.conv1": "conv3\xe9"}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.yaml").write_text("".join("  " * i + f"k{i}:\n" for i in range(3000)))
    (tmp_path / "inf.yaml").write_text("peak_lr: .inf\n")
    (tmp_path / "nul.yaml").write_text('data_dir: "cache\\0x"\n')
    (tmp_path / "bomb.yaml").write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                                        + "".join(f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n"
                                                  for p, x in zip("abcdefgh", "bcdefghi"))
                                        + "peak_lr: *i\n")  # 9**9 strings if expanded
    (tmp_path / "long.yaml").write_text(f"peak_lr: [{', '.join(['1234567890'] * 100_000)}]\n")
    (tmp_path / "nan.json").write_text('{"peak_epoch": NaN}')
    (tmp_path / "text.npz").write_text("x_train, y_train: see the README\n")
    (tmp_path / "huge.npz").write_bytes(huge_array_npz())
    (tmp_path / "pickles").mkdir()
    for name in CIFAR10_FILES:
        (tmp_path / "pickles" / name).write_bytes(huge_array_pickle())
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    (tmp_path / "empty_space.json").write_text("{}")
    (tmp_path / "latin1_space.json").write_bytes(b'{"peak_lr": {"_type": "choice", "_value": ["\xe9"]}}')
    (tmp_path / "base.json").write_text(json.dumps(TINY_BASE))
    (tmp_path / "bad_base.json").write_text(json.dumps({**TINY_BASE, "peak_lr": "fast"}))
    (tmp_path / "inline.yml").write_text("searchSpace:\n  peak_lr: {_type: loguniform, _value: [0.01, 0.5]}\n")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "pipeline" / "baseline").mkdir(parents=True)
    (tmp_path / "pipeline" / "pipeline.yaml").write_text("# preset: quick\n")
    (tmp_path / "pipeline" / "baseline" / "stage.json").write_bytes(b'{"stage": "baseline\xff"}')
    (tmp_path / "no_study").mkdir()  # an HPO run directory whose study never started
    save_config(HpoConfig(space=str(tmp_path / "space.json"), study="mine"), tmp_path / "no_study" / "hpo.yaml")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "logs.tsv").write_text("epoch\tvalid_acc\n1\t0.5\n")
    return tmp_path


def run_bad(tmp_path, capsys, args, message):
    """Run the command; check exit 2, one line naming `message`, and that the folder holds what it held before."""
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing left behind


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "{tmp}/latin1.yaml", "--out", "{tmp}/run"],
     "{tmp}/latin1.yaml: not a UTF-8 text config file (byte 0xe9 at offset 17)"),
    (["train", "--config", "{tmp}/deep.json", "--out", "{tmp}/run"], "{tmp}/deep.json: not valid JSON: nested too deeply"),
    (["train", "--config", "{tmp}/deep.yaml", "--out", "{tmp}/run"], "{tmp}/deep.yaml: not valid YAML: nested too deeply"),
    (["train", "--config", "{tmp}/bomb.yaml", "--out", "{tmp}/run"],
     "{tmp}/bomb.yaml: not valid YAML: aliases (*a) are not allowed, at line 2; write the value out"),
    (["train", *TINY, "--arch", "{tmp}/latin1_arch.json", "--out", "{tmp}/run"],
     "{tmp}/latin1_arch.json: not a UTF-8 text architecture file"),
    (["hpo", "run", "--space", "{tmp}/latin1_space.json", "--dataset", "synthetic", "--out", "{tmp}/run"],
     "{tmp}/latin1_space.json: not a UTF-8 text config file"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/text.npz", "--out", "{tmp}/run"],
     "{tmp}/text.npz: not an .npz archive (expected a zip of .npy arrays"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/huge.npz", "--out", "{tmp}/run"],
     "{tmp}/huge.npz: cannot read .npz: it asks for more memory than this machine has"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/pickles", "--out", "{tmp}/run"],
     "not a valid CIFAR pickle: it asks for more memory than this machine has"),
    (["pipeline", "--config", "tests/data/pipeline_tiny.yaml", "--quiet", "--out", "{tmp}/pipeline"],
     "{tmp}/pipeline/baseline/stage.json: not a UTF-8 text stage marker"),
    (["report", "{tmp}/training"], "{tmp}/training/logs.tsv: expected the columns epoch, train_loss, train_acc, "
                                   "valid_loss, valid_acc; missing train_loss, train_acc, valid_loss"),
])
def test_unreadable_files(inputs, capsys, args, message):
    run_bad(inputs, capsys, args, message)


@pytest.mark.parametrize("args, message", [
    (["train", *TINY, "--device", "cuda:abc", "--out", "{tmp}/run"],
     "field 'device': expected auto, cpu, cuda or cuda:N, got 'cuda:abc'"),
    (["train", *TINY, "--peak-lr", "inf", "--out", "{tmp}/run"], "field 'peak_lr': expected a finite number, got 'inf'"),
    (["train", *TINY, "--threads", "100000", "--out", "{tmp}/run"],
     f"field 'threads': expected 0 (torch's default) to {4 * (os.cpu_count() or 1)} threads on this machine, got 100000"),
    (["search", "{tmp}", "--threads", "100000", "--out", "{tmp}/run"], "field 'threads': expected 0 (torch's default)"),
    (["search", "{tmp}", "--population", "4", "--parents", "10", "--mutations", "1", "--crossovers", "1", "--out",
      "{tmp}/run"], "field 'parents': expected at most population = 4 with strategy evolution, got 10"),
    (["search", "{tmp}", "--mutations", "0", "--crossovers", "0", "--out", "{tmp}/run"],
     "field 'mutations': expected mutations + crossovers >= 1 with strategy evolution"),
    (["nas-eval", "{tmp}", "--epochs", "1", "--bn-batches", "0"], "--bn-batches: applies with --table only"),
    (["train", "--config", "{tmp}/inf.yaml", "--out", "{tmp}/run"],
     "{tmp}/inf.yaml: field 'peak_lr': expected a finite number, got inf"),
    (["train", "--config", "{tmp}/nan.json", "--out", "{tmp}/run"], "field 'peak_epoch': expected a finite number"),
    (["train", *TINY, "--holdout", "10000", "--out", "{tmp}/run"],
     "field 'holdout': expected fewer than the 10000 training images of synthetic, got 10000"),
    (["train", *TINY, "--subset", "9000", "--holdout", "2000", "--out", "{tmp}/run"],
     "field 'subset': expected at most the 8000 training images of synthetic left after holdout=2000, got 9000"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--storage",
      "postgresql://alice:secret-pw@db:notaport/hpo", "--out", "{tmp}/run"],
     "field 'storage': expected a postgresql://USER@HOST[:PORT]/DB URL (an '@' in a password written %40), got '<not a URL>'"),
    (["hpo", "run", "--space", "{tmp}/empty_space.json", "--dataset", "synthetic", "--out", "{tmp}/run"],
     "{tmp}/empty_space.json: expected at least one parameter"),
    (["hpo", "run", "--experiment", "{tmp}/inline.yml", "--config", "{tmp}/bad_base.json", "--out", "{tmp}/run"],
     "{tmp}/bad_base.json: field 'peak_lr': expected a value of type float, got 'fast'"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--heartbeat", "nan", "--out", "{tmp}/run"],
     "command line: field 'heartbeat': expected a finite number, got 'nan'"),
    (["pipeline", "--set", "hpo.tie=inf", "--out", "{tmp}/run"], "field 'hpo.tie': expected a finite number"),
    (["train", *TINY, "--seed", "-1", "--out", "{tmp}/run"],
     "command line: field 'seed': expected a seed in 0..4294967295, got -1"),
    (["train", *TINY, "--seed", "100000000000000000000", "--out", "{tmp}/run"],
     "command line: field 'seed': expected a seed in 0..4294967295, got 100000000000000000000"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--seed", "-1", "--out", "{tmp}/run"],
     "command line: field 'seed': expected a seed in 0..4294967295, got -1"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--sampler-seed", "-1", "--out",
      "{tmp}/run"], "command line: field 'sampler_seed': expected a seed in 0..4294967295, got -1"),
    (["pipeline", "--set", "seed=-1", "--out", "{tmp}/run"],
     "command line: field 'seed': expected a seed in 0..4294967295, got -1"),
    (["pipeline", "--set", "train.layer1.x=1", "--out", "{tmp}/run"],
     "command line: field 'train.layer1': expected a single value of type int (it has no fields below it)"),
    (["train", "--config", "{tmp}/nul.yaml", "--out", "{tmp}/run"], "{tmp}/nul.yaml: field 'data_dir': expected text "
                                                                    "on one line without control characters"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--study", "mine\n", "--out", "{tmp}/run"],
     "command line: field 'study': expected text on one line without control characters"),
    (["hpo", "best", "{tmp}/no_study", "--tie", "nan"], "--tie: expected a number of percentage points >= 0, got nan"),
    (["pipeline", "--preset", "huge", "--out", "{tmp}/run"], "--preset: expected one of quick, medium, gpu, full, got 'huge'"),
    (["dashboard", "{tmp}/run", "--host", "0.0.0.0"], "--host 0.0.0.0: optuna-dashboard has no login, and anyone who "
                                                      "can reach it can edit and delete studies; add --allow-network"),
    (["dashboard", "{tmp}/run", "--port", "70000"], "--port 70000: expected a port number in 1..65535"),
])
def test_bad_values(inputs, capsys, args, message):
    run_bad(inputs, capsys, args, message)


def test_a_huge_value_is_quoted_in_at_most_a_hundred_characters(inputs, capsys):
    run_bad(inputs, capsys, ["train", "--config", "{tmp}/long.yaml", "--out", "{tmp}/run"],
            "{tmp}/long.yaml: field 'peak_lr': expected a value of type float, got [1234567890, ")
    assert len(capsys.readouterr().err) < 300


@pytest.mark.parametrize("args, message", [
    (["nas-eval", "{tmp}/supernet", "--epochs", "1", "--workers", "0"],
     "--workers: expected 1 to {max_workers} training processes on this machine, got 0"),
    (["nas-eval", "{tmp}/supernet", "--epochs", "1", "--workers", "1000000"],
     "--workers: expected 1 to {max_workers} training processes on this machine, got 1000000"),
    (["hpo", "run", "--space", "{tmp}/space.json", "--dataset", "synthetic", "--workers", "1000000", "--out", "{tmp}/run"],
     "command line: field 'workers': expected 1 to {max_workers} processes on this machine, got 1000000"),
    (["nas-eval", "{tmp}/supernet", "--epochs", "1", "--trials", "1000000000"],
     "--trials: expected at most 10000 subnets to train, got 1000000000"),
])
def test_work_beyond_the_machine_is_refused_before_it_starts(inputs, capsys, args, message):
    run_bad(inputs, capsys, args, message.replace("{max_workers}", str(4 * os.cpu_count())))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU refuses --device cuda")
def test_a_gpu_this_machine_lacks(inputs, capsys):
    run_bad(inputs, capsys, ["train", *TINY, "--device", "cuda", "--out", "{tmp}/run"],
            "field 'device': expected auto or cpu, or a GPU this machine has")


@pytest.mark.parametrize("args", [
    ["train", *TINY, "--out", "{tmp}/a_file"],
    ["hpo", "run", "--space", "{tmp}/space.json", "--config", "{tmp}/base.json", "--out", "{tmp}/a_file"],
    ["supernet", "train", "--dataset", "synthetic", "--out", "{tmp}/a_file"],
    ["report", "{tmp}/training", "--out", "{tmp}/a_file"],
    ["pipeline", "--config", "tests/data/pipeline_tiny.yaml", "--out", "{tmp}/a_file"],
])
def test_a_file_where_a_run_directory_goes(inputs, capsys, args):
    run_bad(inputs, capsys, args, "{tmp}/a_file: expected a run directory, got a file")
    assert (inputs / "a_file").read_text() == "mine"


def test_a_file_on_the_way_to_a_run_directory(inputs, capsys):
    run_bad(inputs, capsys, ["train", *TINY, "--out", "{tmp}/a_file/run"],
            "{tmp}/a_file/run: cannot create the run directory or its lock (Not a directory)")


@pytest.mark.parametrize("args", [
    ["train", "--dataset", "synthetic", "--prep", "1000000000", "--out", "{tmp}/run"],
    ["train", *TINY, "--eval-batch-size", "1000000000", "--out", "{tmp}/run"],
    ["supernet", "train", "--dataset", "synthetic", "--layer3", "100000000", "--out", "{tmp}/run"],
])
def test_sizes_beyond_the_device_are_refused_before_allocation(inputs, capsys, args):
    run_bad(inputs, capsys, args, "GiB free; lower the widths (prep, layer1..3), batch_size, eval_batch_size or subset")


@pytest.mark.parametrize("args, message", [
    (["supernet", "train", "--dataset", "synthetic", "--resume", "--out", "{tmp}/typo"],
     "{tmp}/typo: no checkpoint to resume from (expected {tmp}/typo/checkpoints/step_*.pt)"),
    (["hpo", "status", "{tmp}/training"], "{tmp}/training: not an HPO run directory (no hpo.yaml)"),
    (["hpo", "best", "{tmp}/no_study"], "{tmp}/no_study: no study yet (no study.journal)"),
    (["dashboard", "{tmp}/no_study"], "{tmp}/no_study: no study yet (no study.journal)"),
    (["report", "{tmp}/no_study"], "{tmp}/no_study: no study yet (no study.journal)"),
])
def test_nothing_to_resume_or_read(inputs, capsys, args, message):
    run_bad(inputs, capsys, args, message)


@pytest.mark.parametrize("message", [
    "cannot download http://bob:SECRETPW@127.0.0.1:8090/cifar-10-python.tar.gz into data: refused",
    "field 'hpo': expected a mapping, got 'postgresql://alice:SECRETPW@db/x'",
    "got ['postgresql://alice:SE@CRETPW@db/x']",
    "download of https://mirror.example/c.tar.gz?Token=SECRETPW&x=1 failed",
])
def test_no_error_message_shows_a_urls_credentials(message):
    """Wherever a URL in a message came from (a mirror, a misplaced storage value), its secret is masked."""
    shown = str(ConfigError(message))
    assert "SECRETPW" not in shown and "CRETPW" not in shown and ("***@" in shown or "=***" in shown), shown
