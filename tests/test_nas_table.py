"""The NAS-Bench-Macro space and benchmark tables: exact parameter counts, key mapping, checks, ranking by hand."""

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from effcifar.cli import main
from effcifar.errors import ConfigError
from effcifar.models import count_flops, count_parameters
from effcifar.nas.costs import CostTable
from effcifar.nas.network import build_standalone
from effcifar.nas.retrain import rank_against_table
from effcifar.nas.search import SearchConfig
from effcifar.nas.space import ArchSpace, network_key
from effcifar.nas.supernet import SupernetConfig
from effcifar.nas.table import BUILTIN_TABLES, BenchmarkTable
from effcifar.nas.trainer import train_supernet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MACRO = ArchSpace.load("nas-bench-macro")


@pytest.fixture(scope="module")
def table() -> BenchmarkTable:
    return BenchmarkTable.load_named("nas-bench-macro", MACRO)


def test_the_shipped_table_is_the_published_file(table):
    assert len(table.rows) == 6561 and BUILTIN_TABLES["nas-bench-macro"].is_file()
    best = table.rows["22212220"]  # the published best architecture
    assert round(best.mean_acc * 100, 2) == 93.13 and best.flops == 85_164_544 and best.params == 1_985_514
    assert max(row.mean_acc for row in table.rows.values()) == best.mean_acc


def test_example_space_file_is_the_builtin_space():
    assert ArchSpace.from_file(EXAMPLES / "space_nas_bench_macro.yaml") == MACRO
    assert yaml.safe_load((EXAMPLES / "space_nas_bench_macro.yaml").read_text()) == MACRO.to_dict()


def test_keys_map_digit_i_to_the_candidate_of_the_ith_key(table):
    assert list(MACRO.choices()) == ["stage1.conv1", "stage1.conv2", "stage2.conv1", "stage2.conv2", "stage2.conv3",
                                     "stage3.conv1", "stage3.conv2", "stage3.conv3"]
    arch = table.arch("02012100")
    assert arch["stage1.conv1"] == "identity_stride2" and arch["stage1.conv2"] == "mb6_k5"
    assert arch["stage2.conv1"] == "identity_stride2" and arch["stage2.conv2"] == "mb3_k3"
    assert arch["stage3.conv1"] == "mb3_k3_stride2" and arch["stage3.conv3"] == "identity"
    for key in random.Random(0).sample(sorted(table.rows), 50):
        assert table.key_of(table.arch(key)) == key


def test_standalone_networks_have_exactly_the_tables_parameters(table):
    keys = random.Random(1).sample(sorted(table.rows), 24) + ["00000000", "22222222", "11111111", "20202020"]
    for key in keys:
        net = build_standalone(MACRO, table.arch(key), {}, 10)
        assert count_parameters(net) == table.rows[key].params, key
        assert count_flops(net) == 2 * table.rows[key].flops, key  # the table counts multiply-accumulates
    costs = CostTable.build(MACRO, {}, 10)  # every row, through the additive cost table
    assert table.params_mismatches(costs) == [] and table.flops_ratio(costs) == 2.0


def test_identities_inside_a_stage_are_one_network(table):
    a, b = table.arch("01210100"), table.arch("01201100")  # stage 2's identity after or before its mb6_k5
    assert network_key(MACRO, a) == network_key(MACRO, b)
    assert table.rows["01210100"].mean_acc == table.rows["01201100"].mean_acc  # the benchmark trained it once
    assert network_key(MACRO, table.arch("01210100")) != network_key(MACRO, table.arch("01220100"))
    assert len(table.networks()) == 9 * 21 * 21  # stage 1: 3 x 3; stages 2 and 3: 3 x (1 + 2 + 4)


def test_the_published_reference_points(table):
    for limit, best, largest in ((30e6, 89.38, 84.79), (50e6, 92.17, 90.75)):
        assert round(table.best_under(limit).mean_acc * 100, 2) == best
        assert round(table.largest_under(limit).mean_acc * 100, 2) == largest
    assert table.best_under(1e6) is None


def test_sample_takes_one_network_per_flops_stratum(table):
    keys = table.sample(40, seed=3)
    groups = sorted(table.networks().values(), key=lambda k: (table.rows[k[0]].flops, k[0]))
    position = {key: i for i, group in enumerate(groups) for key in group}
    bounds = [round(i * len(groups) / 40) for i in range(41)]
    assert [lo <= position[key] < hi for key, lo, hi in zip(keys, bounds, bounds[1:])] == [True] * 40
    assert keys == table.sample(40, seed=3) and keys != table.sample(40, seed=4)
    assert len(table.sample(0, seed=0)) == len(groups)


def write_table(path: Path, rows: dict) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ({"0000000": {}, "00000001": {}}, "key '0000000' does not name an architecture of this space (expected 8 digits"),
    ({"00000003": {}, "00000001": {}}, "key '00000003'"),
    ({"00000000": {"mean_acc": 50, "test_acc": [50], "params": 1, "flops": "x"}, "00000001": {}}, "field 'flops'"),
    ({"00000000": {"mean_acc": 150, "test_acc": [50], "params": 1, "flops": 1}, "00000001": {}}, "field 'mean_acc'"),
    ({"00000000": {"mean_acc": 50, "test_acc": [], "params": 1, "flops": 1}, "00000001": {}}, "field 'test_acc'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_tables_are_one_line_errors(tmp_path, rows, message):
    path = write_table(tmp_path / "t.json", rows)
    with pytest.raises(ConfigError) as e:
        BenchmarkTable.load(path, MACRO)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_a_table_of_another_space_is_refused():
    with pytest.raises(ConfigError, match="does not name an architecture of this space"):
        BenchmarkTable.load_named("nas-bench-macro", ArchSpace.seed())


TINY_SPACE = {
    "stem": {"op": "conv3", "width": 8},
    "stages": [{"name": "s1", "width": 16, "conv1": ["identity_stride2", "mb3_k3_stride2"],
                "conv2": ["identity", "mb3_k3"]}],
    "head": {"conv": 32, "pool": "avg", "bias": True, "scale_logits": False},
}


@pytest.fixture(scope="module")
def tiny_supernet(tmp_path_factory) -> Path:
    """One epoch of a 4-architecture macro-style supernet on synthetic data."""
    root = tmp_path_factory.mktemp("table")
    (root / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    config = SupernetConfig.of(space=str(root / "space.yaml"), dataset="synthetic", subset=400, holdout=100,
                               batch_size=50, bn_batches=2, panel_random=0, eval_batch_size=100, precision="fp32",
                               threads=1, epochs=1)
    train_supernet(config, root / "supernet", warn=lambda message: None)
    return root / "supernet"


def tau_by_hand(x, y) -> float:
    """Kendall's tau-b from concordant and discordant pairs, counted one by one."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        concordant += dx * dy > 0
        discordant += dx * dy < 0
        ties_x += dx == 0 and dy != 0
        ties_y += dy == 0 and dx != 0
    return (concordant - discordant) / np.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))


def test_ranking_against_a_tiny_table_matches_a_count_by_hand(tiny_supernet, tmp_path):
    space = ArchSpace.from_dict(TINY_SPACE)
    costs = CostTable.build(space, {}, 10)
    truth = {"00": [40.0, 42.0, 41.0], "01": [55.0, 50.0, 52.0], "10": [61.0, 63.0, 60.0], "11": [70.0, 69.0, 72.0]}
    rows = {}
    for key, seeds in truth.items():
        arch = dict(zip(space.choices(), (space.choices()[k][int(d)] for k, d in zip(space.choices(), key))))
        rows[key] = {"mean_acc": sum(seeds) / 3, "test_acc": seeds, "params": costs.params_of(arch),
                     "flops": costs.flops_of(arch) // 2}
    path = write_table(tmp_path / "tiny.json", rows)
    result = rank_against_table(tiny_supernet, path, sample=0, out_dir=tmp_path / "out",
                                search=SearchConfig(precision="fp32", threads=1))
    assert result["n"] == 4 and sorted(result["keys"]) == sorted(truth) and result["flops_ratio"] == 2.0
    by_name = {r["name"]: r for r in result["rankers"]}
    supernet, table_acc = result["supernet_score"], result["standalone_acc"]  # the negative loss, the default score
    assert by_name["supernet"]["tau"] == pytest.approx(tau_by_hand(supernet, table_acc))
    assert by_name["FLOPs"]["tau"] == pytest.approx(tau_by_hand(result["flops"], table_acc))
    seeds = np.array([truth[key] for key in result["keys"]])
    pairs = [tau_by_hand(seeds[:, i], seeds[:, j]) for i in range(3) for j in range(3) if i != j]
    assert by_name["one seed vs another (ceiling)"]["tau"] == pytest.approx(np.mean(pairs))
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["verdict"] == result["verdict"] and "FLOPs" in saved["verdict"]
    assert saved["space"] == space.choices()  # decodes the keys without the supernet run
    assert (tmp_path / "out" / "ranking.png").stat().st_size > 1000


def test_table_of_another_space_on_the_command_line(tiny_supernet, capsys):
    assert main(["nas-eval", str(tiny_supernet), "--table", "nas-bench-macro"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not name an architecture of this space" in err and "Traceback" not in err


def test_table_mode_refuses_training_options(tiny_supernet, capsys):
    assert main(["nas-eval", str(tiny_supernet), "--table", "nas-bench-macro", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--epochs: does not apply with --table" in err


@pytest.mark.parametrize("mode", [["--table", "nas-bench-macro"], ["--trials", "3", "--epochs", "1"]])
def test_a_bad_score_is_one_line_naming_its_source(tiny_supernet, tmp_path, capsys, mode):
    out = tmp_path / "out"
    assert main(["nas-eval", str(tiny_supernet), *mode, "--score", "bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "command line: field 'score': expected one of accuracy, loss" in err
    assert not out.exists()


def ordered_tiny_table(tmp_path: Path) -> Path:
    """The tiny space's four networks, one seed each, accuracy rising with the key."""
    return write_table(tmp_path / "tiny.json", {key: {"mean_acc": acc, "test_acc": [acc], "params": 1, "flops": 1}
                                                for key, acc in (("00", 40.0), ("01", 50.0), ("10", 60.0), ("11", 70.0))})


def test_ranking_by_loss_uses_the_negative_cross_entropy(tiny_supernet, tmp_path):
    path = ordered_tiny_table(tmp_path)
    by = {}
    for score in ("accuracy", "loss"):
        by[score] = rank_against_table(tiny_supernet, path, sample=0, out_dir=tmp_path / score,
                                       search=SearchConfig(precision="fp32", threads=1, score=score))
    assert by["loss"]["supernet_acc"] == by["accuracy"]["supernet_acc"]  # the same evaluations
    assert by["accuracy"]["supernet_score"] == by["accuracy"]["supernet_acc"]
    assert all(s < 0 for s in by["loss"]["supernet_score"])  # minus the mean cross-entropy
    assert by["loss"]["rankers"][0]["tau"] == pytest.approx(tau_by_hand(by["loss"]["supernet_score"],
                                                                        by["loss"]["standalone_acc"]))


def test_a_rerun_reuses_the_scores_and_keeps_their_scoring_time(tiny_supernet, tmp_path):
    path, out = ordered_tiny_table(tmp_path), tmp_path / "out"
    first = rank_against_table(tiny_supernet, path, sample=0, out_dir=out, search=SearchConfig(precision="fp32", threads=1))
    first_file = (out / "scores.json").read_text()
    saved = json.loads(first_file)
    saved["seconds"] += 1000.0  # as if the first run had been slow: a re-run must report that, not its own time
    (out / "scores.json").write_text(json.dumps(saved))
    again = rank_against_table(tiny_supernet, path, sample=0, out_dir=out, search=SearchConfig(precision="fp32", threads=1))
    assert again["supernet_score"] == first["supernet_score"]
    assert first["score_seconds"] == json.loads(first_file)["seconds"] > 0
    assert 1000 + first["score_seconds"] <= again["score_seconds"] < 1000 + first["score_seconds"] + 5


@pytest.mark.parametrize("field, value, expected", [
    ("seconds", "12", "field 'seconds': expected a number >= 0, got '12'"),
    ("scores", {"00": [0.5]}, "field 'scores': expected a mapping of table key -> [accuracy, loss]"),
])
def test_a_damaged_scores_file_is_one_line_naming_it(tiny_supernet, tmp_path, capsys, field, value, expected):
    path, out = ordered_tiny_table(tmp_path), tmp_path / "out"
    command = ["nas-eval", str(tiny_supernet), "--table", str(path), "--trials", "0", "--out", str(out)]
    assert main(command) == 0
    capsys.readouterr()
    scores_file = out / "scores.json"
    saved = json.loads(scores_file.read_text())
    (out / "ranking.json").unlink()
    scores_file.write_text(json.dumps(saved | {field: value}))
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{scores_file}: {expected}" in err and "Traceback" not in err
    assert not (out / "ranking.json").exists()
