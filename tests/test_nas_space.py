import json
import random
from pathlib import Path

import pytest
import torch

from effcifar.cli import main
from effcifar.errors import ConfigError
from effcifar.models import count_flops, count_parameters
from effcifar.nas.space import (
    ArchSpace, CostTable, InputChoice, LayerChoice, Supernet, build_standalone, skip_depth,
)

from conftest import NARROW

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def random_arch(space: ArchSpace, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {k: rng.choice(v) for k, v in space.choices().items()}


def test_seed_space_keys_and_size():
    space = ArchSpace.seed()
    choices = space.choices()
    assert len(choices) == 15
    assert list(choices)[:5] == ["stage1.conv1", "stage1.conv2", "stage1.conv3", "stage1.conv4", "stage1.skip"]
    assert choices["stage2.skip"] == ["zero", "conv3_input", "conv4_input", "conv4_output"]
    assert space.size() == (4 * 2 * 2 * 2 * 4) ** 3


def test_example_declaration_is_the_seed_space_and_round_trips():
    assert ArchSpace.from_file(EXAMPLES / "space_seed.yaml") == ArchSpace.seed()
    assert ArchSpace.from_dict(ArchSpace.seed().to_dict()) == ArchSpace.seed()


def test_skip_depths():
    assert [skip_depth(n) for n in ("zero", "conv3_input", "conv4_input", "conv4_output", "conv2_output")] == [0, 1, 2, 3, 1]


def write_space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


GOOD_STAGE = "- name: s1\n  width: 16\n  conv1: [conv3_pool]\n  conv2: [conv3, conv5]\n  skip: [zero, conv2_output]\n"


@pytest.mark.parametrize("stage, message", [
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool, conv4_pool]\n  skip: [zero]\n", "stages[0].conv1[1]"),
    ("- name: s1\n  width: 16\n  conv1: []\n  skip: [zero]\n", "non-empty list"),
    ("- name: s1\n  width: 16\n  conv1: [conv3]\n  skip: [zero]\n", "stages[0].conv1[0]"),  # does not downsample
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\n  conv2: [conv3_pool]\n  skip: [zero]\n", "stages[0].conv2[0]"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\n  conv2: [conv3]\n  skip: [zero, conv5_input]\n", "stages[0].skip[1]"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\n  conv3: [conv3]\n  skip: [zero]\n", "consecutive"),
    ("- name: s1\n  conv1: [conv3_pool]\n  skip: [zero]\n", "stages[0].width"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool, conv3_pool]\n  skip: [zero]\n", "without repeats"),
    (GOOD_STAGE + GOOD_STAGE, "stages[1].name"),  # duplicate stage name -> duplicate choice keys
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\n  conv1: [conv5_pool]\n  skip: [zero]\n", "duplicate key 'conv1'"),
    ("- name: s.1\n  width: 16\n  conv1: [conv3_pool]\n  skip: [zero]\n", "stages[0].name"),
    ("- name: s1\n  width: 16\n  conv1: [mb3_k4_stride2]\n", "stages[0].conv1[0]"),  # even kernel
    ("- name: s1\n  width: 16\n  conv1: [mb9_k3_stride2]\n", "stages[0].conv1[0]"),  # expansion above 8
    ("- name: s1\n  width: 16\n  conv1: [identity_pool]\n", "stages[0].conv1[0]"),  # identity has no pool form
    ("- name: s1\n  width: 16\n  conv1: [identity_stride2]\n  conv2: [mb3_k3_stride2]\n", "stages[0].conv2[0]"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\nhead: {pool: min}\n", "head.pool"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\nhead: {conv: 0}\n", "head.conv"),
    ("- name: s1\n  width: 16\n  conv1: [conv3_pool]\nhead: {dropout: 0.1}\n", "head"),
])
def test_declaration_errors_name_file_and_field(tmp_path, stage, message):
    path = write_space(tmp_path, "stages:\n" + stage)
    with pytest.raises(ConfigError) as e:
        ArchSpace.from_file(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_space_file_on_the_command_line_is_one_line(tmp_path, capsys):
    path = write_space(tmp_path, "stages:\n- name: s1\n  width: 16\n  conv1: [conv9]\n  skip: [zero]\n")
    assert main(["supernet", "space", "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "conv1[0]" in err and "Traceback" not in err


def test_user_space_builds_and_runs(tmp_path):
    space = ArchSpace.from_file(write_space(tmp_path, "stem: {op: conv5, width: 8}\nstages:\n" + GOOD_STAGE))
    assert space.choices() == {"s1.conv1": ["conv3_pool"], "s1.conv2": ["conv3", "conv5"], "s1.skip": ["zero", "conv2_output"]}
    net = Supernet(space, {}, num_classes=3)
    net.set_arch({"s1.conv1": "conv3_pool", "s1.conv2": "conv5", "s1.skip": "conv2_output"})
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def count_calls(net: Supernet) -> dict[str, int]:
    """Forward calls of every candidate op, by 'key:candidate'."""
    calls: dict[str, int] = {}
    for module in net.modules():
        if isinstance(module, LayerChoice):
            for name, op in module.candidates.items():
                tag = f"{module.key}:{name}"
                calls[tag] = 0
                op.register_forward_hook(lambda *_, tag=tag: calls.__setitem__(tag, calls[tag] + 1))
    return calls


@pytest.mark.parametrize("seed", range(6))
def test_forward_runs_only_the_chosen_ops(seed):
    space = ArchSpace.seed()
    net = Supernet(space, NARROW, num_classes=10)
    calls = count_calls(net)
    arch = random_arch(space, seed)
    net.set_arch(arch)
    net(torch.randn(2, 3, 32, 32))
    active = {f"{k}:{arch[k]}" for k in space.active_keys(arch) if not k.endswith(".skip")}
    assert {tag for tag, n in calls.items() if n} == active
    assert all(n == 1 for tag, n in calls.items() if tag in active)


def test_zero_skip_runs_no_body_conv():
    space = ArchSpace.seed()
    net = Supernet(space, NARROW, num_classes=10)
    calls = count_calls(net)
    arch = {k: v[-1] for k, v in space.choices().items()} | {f"stage{i}.skip": "zero" for i in (1, 2, 3)}
    net.set_arch(arch)
    net(torch.randn(1, 3, 32, 32))
    assert sum(calls.values()) == 3 and all(":" in t for t in calls)


def test_choice_modules_need_a_choice_and_check_it():
    net = Supernet(ArchSpace.seed(), NARROW, num_classes=10)
    with pytest.raises(RuntimeError, match="set_arch"):
        net(torch.randn(1, 3, 32, 32))
    arch = random_arch(net.space, 0)
    with pytest.raises(ConfigError, match="stage2.conv1"):
        net.set_arch(arch | {"stage2.conv1": "conv7_pool"})
    with pytest.raises(ConfigError, match="missing"):
        net.set_arch({k: v for k, v in arch.items() if k != "stage3.skip"})
    modules = net.choice_modules()
    assert isinstance(modules["stage1.skip"], InputChoice) and isinstance(modules["stage1.conv2"], LayerChoice)
    assert modules["stage1.conv1"].names == ["conv3_pool", "conv5_pool", "conv3_stride2", "conv5_stride2"]


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro"])
def test_cost_table_matches_a_direct_count_of_the_built_subnet(space_name):
    space = ArchSpace.load(space_name)
    costs = CostTable.build(space, NARROW, num_classes=10)
    archs = [random_arch(space, s) for s in range(12)] + [costs.extreme(True), costs.extreme(False)]
    for arch in archs:
        standalone = build_standalone(space, arch, NARROW, num_classes=10)
        assert costs.flops_of(arch) == count_flops(standalone)
        assert costs.params_of(arch) == count_parameters(standalone)
    flops = [costs.flops_of(a) for a in archs]
    assert max(flops) == costs.flops_of(costs.extreme(True)) and min(flops) == costs.flops_of(costs.extreme(False))


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro"])
def test_standalone_has_exactly_the_chosen_ops_and_matches_the_supernet_path(space_name):
    space = ArchSpace.load(space_name)
    torch.manual_seed(0)
    net = Supernet(space, NARROW, num_classes=10).eval()
    arch = random_arch(space, 3)
    standalone = build_standalone(space, arch, NARROW, num_classes=10).eval()
    names = set(standalone.state_dict())
    assert names < set(net.state_dict())
    chosen = {f"{k}:{arch[k]}" for k in space.active_keys(arch) if not k.endswith(".skip")}
    assert {f"{m.key}:{n}" for m in standalone.choice_modules().values() if isinstance(m, LayerChoice) for n in m.names} == chosen
    standalone.load_state_dict({k: v for k, v in net.state_dict().items() if k in names})
    net.set_arch(arch)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(standalone(x), net(x))


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro"])
def test_fixed_spaces_round_trip_through_their_declaration(space_name):
    space = ArchSpace.load(space_name)
    for seed in range(8):
        fixed = space.fix(random_arch(space, seed))
        assert ArchSpace.from_dict(fixed.to_dict()) == fixed and fixed.size() == 1


def test_restrict_and_its_errors():
    space = ArchSpace.seed()
    shrunk = space.restrict({k: v[:1] for k, v in space.choices().items()})
    assert shrunk.size() == 1
    with pytest.raises(ConfigError, match="stage1.conv1"):
        space.restrict({k: ([] if k == "stage1.conv1" else v) for k, v in space.choices().items()})


def test_nni_export(tmp_path, capsys):
    out = tmp_path / "nni_auto_gen_search_space.json"
    assert main(["supernet", "space", "--export", str(out)]) == 0
    exported = json.loads(out.read_text())
    assert exported["stage1.conv1"] == {"_type": "layer_choice", "_value": ["conv3_pool", "conv5_pool", "conv3_stride2", "conv5_stride2"]}
    assert exported["stage3.skip"] == {"_type": "input_choice", "_value": {
        "candidates": ["zero", "conv3_input", "conv4_input", "conv4_output"], "n_chosen": 1}}
    assert len(exported) == 15
    assert "2,097,152 paths" in capsys.readouterr().out
