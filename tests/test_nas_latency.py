"""The latency lookup table (real CPU timings at small widths) and latency limits/objectives in the search."""

import itertools
import json
import math
import random

import optuna
import pytest
import torch

import effcifar.nas.latency as latency_lib
import effcifar.nas.search as search_lib
from effcifar.config import fingerprint
from effcifar.errors import ConfigError
from effcifar.nas.latency import (
    LATENCY_FILE, LatencyTable, Target, distinct_archs, fit_scale, load_or_measure, site_key,
)
from effcifar.nas.costs import extreme_arch, sites
from effcifar.nas.search import CandidateEvaluator, run_search
from effcifar.nas.space import ArchSpace, arch_key
from conftest import NARROW
from test_nas_search import cli, complete, config

TINY = ArchSpace.from_dict({"stages": [{"name": "s1", "width": "layer1", "conv1": ["conv3_pool", "conv3_stride2"],
                                        "conv2": ["conv3", "conv5"], "skip": ["zero", "conv2_output"]}]})


@pytest.fixture
def one_thread():
    """One torch thread while timing: on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_scale_is_exact_on_a_known_linear_relation():
    table_ms = [0.5, 1.25, 2.0, 3.5]
    assert fit_scale(table_ms, [1.7 * t for t in table_ms]) == pytest.approx(1.7)
    assert fit_scale([2.0], [3.0]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least one whole network"):
        fit_scale([], [])


def test_distinct_archs_are_different_networks_or_a_config_error():
    archs = distinct_archs(TINY, 6, random.Random(0))  # skip zero: 2 networks (conv2 unused); else 2 x 2
    assert len({arch_key(TINY, a) for a in archs}) == 6
    with pytest.raises(ConfigError, match="fewer than 7 distinct networks"):
        distinct_archs(TINY, 7, random.Random(0))


def test_table_is_its_parts_calibrated_on_whole_networks_and_checked_on_others(one_thread, tmp_path):
    space = ArchSpace.seed()
    table = LatencyTable.measure(space, NARROW, 10, Target(torch.device("cpu")), repeats=5, warmup=2,
                                 calibrate=4, check=3)
    shallow = {k: c[0] for k, c in space.choices().items()} | {f"stage{i}.skip": "zero" for i in (1, 2, 3)}
    deep = shallow | {f"stage{i}.skip": "conv4_output" for i in (1, 2, 3)}
    parts = [table.ms[key][deep[key]] for key in space.active_keys(deep)]
    assert len(parts) == 3 * 5 and all(p > 0 for p in parts)  # conv1, conv2..4 and the skip per stage
    assert table.raw_latency_of(deep) == pytest.approx(table.base_ms + sum(parts))
    assert table.scale > 0 and table.latency_of(deep) == pytest.approx(table.scale * table.raw_latency_of(deep))
    assert table.base_ms > 0 and table.latency_of(deep) > table.latency_of(shallow)
    assert all(table.latency_of(table.fastest()) <= table.latency_of(a) for a in (shallow, deep))
    v = table.validation
    fitted, held_out = v["calibration"], v["held_out"]
    assert len(fitted) == 4 and len(held_out) == 3 and all(p["measured_ms"] > 0 for p in fitted + held_out)
    assert not {arch_key(space, p["arch"]) for p in fitted} & {arch_key(space, p["arch"]) for p in held_out}
    assert all(p["table_ms"] == pytest.approx(table.raw_latency_of(p["arch"])) for p in fitted + held_out)
    assert table.scale == pytest.approx(fit_scale([p["table_ms"] for p in fitted], [p["measured_ms"] for p in fitted]))
    for errors in (v["raw"], v["calibrated"]):
        assert errors["networks"] == 3 and math.isfinite(errors["mean_abs_pct"])
        assert errors["max_abs_pct"] >= errors["mean_abs_pct"] >= abs(errors["bias_pct"]) - 1e-9
    summary = table.summary()
    assert f"x{table.scale:.2f} from 4 whole networks; held-out error over 3 others" in summary
    assert f"mean |error| {v['calibrated']['mean_abs_pct']:.1f}% (raw sum {v['raw']['mean_abs_pct']:.1f}%)" in summary
    table.save(tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["scale"] == table.scale and saved["validation"]["calibrated"] == v["calibrated"]
    assert LatencyTable.load(tmp_path / "t.json") == table


def test_saved_table_is_reused_for_the_same_target_and_rebuilt_for_another(one_thread, tmp_path, monkeypatch):
    path, target = tmp_path / LATENCY_FILE, Target(torch.device("cpu"))
    table = LatencyTable.measure(TINY, NARROW, 10, target, repeats=3, warmup=1, calibrate=1, check=1)
    table.save(path)
    measured = []
    real = LatencyTable.measure.__func__

    def measure(cls, *args, **kwargs):
        measured.append(args[3].setup())
        return real(cls, *args, **{"repeats": 3, "warmup": 1, "calibrate": 1, "check": 1, **kwargs})

    monkeypatch.setattr(LatencyTable, "measure", classmethod(measure))
    assert load_or_measure(path, TINY, NARROW, 10, target) == table and measured == []
    assert load_or_measure(path, TINY, NARROW, 10, Target(torch.device("cpu"), batch=4)).setup["batch"] == 4
    assert load_or_measure(path, TINY, NARROW | {"layer1": 24}, 10, target).setup["channels"]["layer1"] == 24
    old = json.loads(json.dumps(table.to_dict()))  # as version 1 wrote it: the raw sum, no scale
    old["setup"].pop("version")
    old.pop("scale")
    path.write_text(json.dumps(old))
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["version"] == latency_lib.VERSION
    path.write_text(json.dumps(table.to_dict() | {"setup": table.setup | {"version": 1}}))
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["version"] == latency_lib.VERSION
    monkeypatch.setattr(latency_lib, "device_name", lambda device: "another machine")
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["device"] == "another machine"
    path.write_text("{not json")
    assert load_or_measure(path, TINY, NARROW, 10, target).setup["device"] == "another machine"
    assert [s["batch"] for s in measured] == [4, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("strategy", ["evolution", "random", "nsga2"])
def test_no_candidate_over_the_latency_limit_is_evaluated(supernet_run, tmp_path, evaluations, one_thread, strategy):
    out = tmp_path / "s"
    probe = CandidateEvaluator.from_run(supernet_run, config(max_latency_ms=1e9))
    table = probe.latency
    slowest = extreme_arch(table.ms, probe.space, largest=True)
    limit = (table.latency_of(table.fastest()) + table.latency_of(slowest)) / 2
    table.save(out / LATENCY_FILE)  # run_search reuses it (same device and setup), so the limit is exact
    study = run_search(config(strategy=strategy, trials=8, max_latency_ms=limit), supernet_run, out)
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


@pytest.mark.slow
def test_cli_nsga2_against_latency_records_two_objectives(supernet_run, tmp_path, monkeypatch):
    out = tmp_path / "cli"
    result = cli(str(supernet_run), "--strategy", "nsga2", "--cost", "latency", "--trials", "5",
                 "--population", "4", "--mutations", "1", "--crossovers", "1", "--export", "2",
                 "--precision", "fp32", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "latency table (cpu" in result.stdout and "Pareto front (held-out loss vs latency)" in result.stdout
    study = optuna.load_study(study_name="cli", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    done = complete(study)
    assert len(study.directions) == 2 and done
    assert all(t.values == [t.user_attrs["neg_loss"], t.user_attrs["latency_ms"]] for t in done)  # by loss, the default
    assert "latency_ms" in json.loads((out / "architecture_final.json").read_text())
    # Latency values were told to the study: resuming it against FLOPs, or with another table method, is refused.
    with pytest.raises(ConfigError, match="another supernet run, evaluation setup or objectives"):
        run_search(config(strategy="nsga2", trials=6), supernet_run, out)
    by_latency, by_flops = config(strategy="nsga2", cost="latency"), config(strategy="nsga2")
    before = [fingerprint(search_lib.setup_values(c, supernet_run)) for c in (by_latency, by_flops)]
    monkeypatch.setattr(search_lib, "LATENCY_VERSION", latency_lib.VERSION - 1)
    after = [fingerprint(search_lib.setup_values(c, supernet_run)) for c in (by_latency, by_flops)]
    assert before[0] != after[0] and before[1] == after[1]


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



def test_with_width_choices_each_op_is_timed_at_every_pair_of_widths_it_runs_at(one_thread, tmp_path):
    space = ArchSpace.from_dict({"stages": [
        {"name": "s1", "width": "layer1", "widths": ["0.5x", "1x"], "conv1": ["conv3_pool", "conv3_stride2"],
         "conv2": ["conv3"], "skip": ["zero", "conv2_output"]},
        {"name": "s2", "width": 16, "widths": [8, 16], "conv1": ["conv3_stride2"]}]})
    table = LatencyTable.measure(space, NARROW, 10, Target(torch.device("cpu")), repeats=3, warmup=1,
                                 calibrate=3, check=2)
    assert set(table.sized) == {site_key(s.key, s.name, s.c_in, s.c_out) for s in sites(space, NARROW)}
    assert set(table.bases) == {"8", "16"} and "s2.conv1 conv3_stride2 8 16" in table.sized
    arch = {"s1.conv1": "conv3_pool", "s1.conv2": "conv3", "s1.skip": "conv2_output", "s1.width": "0.5x",
            "s2.conv1": "conv3_stride2", "s2.width": "16"}
    parts = ["s1.conv1 conv3_pool 8 8", "s1.conv2 conv3 8 8", "s1.skip conv2_output 8 8", "s2.conv1 conv3_stride2 8 16"]
    assert table.raw_latency_of(arch) == pytest.approx(table.bases["16"] + sum(table.sized[p] for p in parts))
    archs = [dict(zip(space.choices(), values)) for values in itertools.product(*space.choices().values())]
    assert table.raw_latency_of(table.fastest()) == min(map(table.raw_latency_of, archs))
    assert all(p["table_ms"] == pytest.approx(table.raw_latency_of(p["arch"])) for p in table.validation["held_out"])
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
