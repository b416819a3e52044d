"""The latency lookup table (real CPU timings at small widths) and latency limits/objectives in the search."""

import json
import math

import optuna
import pytest
import torch

import effcifar.nas.latency as latency_lib
from effcifar.errors import ConfigError
from effcifar.nas.latency import LATENCY_FILE, LatencyTable, Target, load_or_measure
from effcifar.nas.search import CandidateEvaluator, run_search
from effcifar.nas.space import ArchSpace, extreme_arch
from test_nas_search import NARROW, cli, complete, config, evaluations, supernet_run  # noqa: F401 (fixtures)

TINY = ArchSpace.from_dict({"stages": [{"name": "s1", "width": "layer1", "conv1": ["conv3_pool", "conv3_stride2"],
                                        "conv2": ["conv3", "conv5"], "skip": ["zero", "conv2_output"]}]})


@pytest.fixture
def one_thread():
    """One torch thread while timing: on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_table_is_its_parts_and_reports_its_error_against_whole_networks(one_thread, tmp_path):
    space = ArchSpace.seed()
    table = LatencyTable.measure(space, NARROW, 10, Target(torch.device("cpu")), repeats=5, warmup=2, check=3)
    shallow = {k: c[0] for k, c in space.choices().items()} | {f"stage{i}.skip": "zero" for i in (1, 2, 3)}
    deep = shallow | {f"stage{i}.skip": "conv4_output" for i in (1, 2, 3)}
    parts = [table.ms[key][deep[key]] for key in space.active_keys(deep)]
    assert len(parts) == 3 * 5 and all(p > 0 for p in parts)  # conv1, conv2..4 and the skip per stage
    assert table.latency_of(deep) == pytest.approx(table.base_ms + sum(parts))
    assert table.base_ms > 0 and table.latency_of(deep) > table.latency_of(shallow)
    assert all(table.latency_of(table.fastest()) <= table.latency_of(a) for a in (shallow, deep))
    v = table.validation
    assert v["networks"] == len(v["pairs"]) == 3 and all(p["measured_ms"] > 0 for p in v["pairs"])
    assert math.isfinite(v["mean_abs_pct"]) and v["max_abs_pct"] >= v["mean_abs_pct"] >= abs(v["bias_pct"]) - 1e-9
    assert "mean |error|" in table.summary() and "over 3 random networks" in table.summary()
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table


def test_saved_table_is_reused_for_the_same_target_and_rebuilt_for_another(one_thread, tmp_path, monkeypatch):
    path, target = tmp_path / LATENCY_FILE, Target(torch.device("cpu"))
    table = LatencyTable.measure(TINY, NARROW, 10, target, repeats=3, warmup=1, check=1)
    table.save(path)
    measured = []
    real = LatencyTable.measure.__func__

    def measure(cls, *args, **kwargs):
        measured.append(args[3].setup())
        return real(cls, *args, **{"repeats": 3, "warmup": 1, "check": 1, **kwargs})

    monkeypatch.setattr(LatencyTable, "measure", classmethod(measure))
    assert load_or_measure(path, TINY, NARROW, 10, target) == table and measured == []
    assert load_or_measure(path, TINY, NARROW, 10, Target(torch.device("cpu"), batch=4)).setup["batch"] == 4
    assert load_or_measure(path, TINY, NARROW | {"layer1": 24}, 10, target).setup["channels"]["layer1"] == 24
    monkeypatch.setattr(latency_lib, "device_name", lambda device: "another machine")
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["device"] == "another machine"
    path.write_text("{not json")
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["device"] == "another machine"
    assert [s["batch"] for s in measured] == [4, 1, 1, 1]


@pytest.mark.parametrize("strategy", ["evolution", "random", "nsga2"])
def test_no_candidate_over_the_latency_limit_is_evaluated(supernet_run, tmp_path, evaluations, one_thread, strategy):
    out = tmp_path / "s"
    probe = CandidateEvaluator.from_run(supernet_run, config(max_latency_ms=1e9))
    table = probe.latency
    slowest = extreme_arch(table.ms, probe.space, largest=True)
    limit = (table.latency_of(table.fastest()) + table.latency_of(slowest)) / 2
    table.save(out / LATENCY_FILE)  # run_search reuses it (same device and setup), so the limit is exact
    study = run_search(config(strategy=strategy, evaluations=8, max_latency_ms=limit), supernet_run, out)
    assert LatencyTable.load(out / LATENCY_FILE) == table
    assert len(study.trials) == 8 and evaluations
    assert all(table.latency_of(arch) <= limit for arch in evaluations)
    assert all(t.user_attrs["latency_ms"] <= limit for t in complete(study))
    records = [json.loads(p.read_text()) for p in sorted((out / "arch").glob("top_*.json"))]
    assert records and all(r["latency_ms"] == pytest.approx(table.latency_of(r["arch"])) for r in records)
    limited = CandidateEvaluator(probe.net, probe.space, probe.costs, probe.loader, probe.bn_batches, probe.autocast,
                                 latency=table, max_latency_ms=limit)
    with pytest.raises(ValueError, match="over the limits"):
        limited.evaluate(slowest)
    assert limited.evaluated == []


def test_impossible_latency_limit_is_a_config_error_before_any_file(supernet_run, tmp_path):
    with pytest.raises(ConfigError, match="no architecture within .* the fastest takes"):
        run_search(config(max_latency_ms=1e-6), supernet_run, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_nsga2_against_latency_records_two_objectives(supernet_run, tmp_path):
    out = tmp_path / "cli"
    result = cli(str(supernet_run), "--strategy", "nsga2", "--cost", "latency", "--evaluations", "5",
                 "--population", "4", "--mutations", "1", "--crossovers", "1", "--top-k-export", "2",
                 "--precision", "fp32", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "latency table (cpu" in result.stdout and "Pareto front (accuracy vs latency)" in result.stdout
    study = optuna.load_study(study_name="cli", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    done = complete(study)
    assert len(study.directions) == 2 and done
    assert all(t.values == [t.user_attrs["accuracy"], t.user_attrs["latency_ms"]] for t in done)
    assert "latency_ms" in json.loads((out / "architecture_final.json").read_text())
    # Latency values were told to the study: resuming it against FLOPs is refused.
    with pytest.raises(ConfigError, match="another supernet run or evaluation setup"):
        run_search(config(strategy="nsga2", evaluations=6), supernet_run, out)


@pytest.mark.parametrize("args, message", [
    (["--max-latency-ms", "0"], "field 'max_latency_ms': expected a positive number or none, got 0.0"),
    (["--strategy", "nsga2", "--cost", "foo"], "field 'cost': expected one of flops, latency, got 'foo'"),
    (["--cost", "latency"], "field 'cost': expected flops unless strategy is nsga2"),
])
def test_cli_bad_latency_options_are_one_line(supernet_run, tmp_path, args, message):
    result = cli(str(supernet_run), *args, "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
