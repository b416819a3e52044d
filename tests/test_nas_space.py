import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from effcifar.cli import main
from effcifar.errors import ConfigError
from effcifar.models import count_flops, count_parameters
from effcifar.nas.costs import CostTable
from effcifar.nas.network import InputChoice, LayerChoice, Supernet, WidthChoice, build_standalone
from effcifar.nas.ops import SlicedBatchNorm2d
from effcifar.nas.space import ArchSpace, skip_depth

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


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro", "seed-widths"])
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


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro", "seed-widths"])
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


# ---------------------------------------------------------------------------------------------
# Width choices

WIDTH_SPACE = {"stem": {"op": "conv3", "width": 8}, "stages": [
    {"name": "s1", "width": 16, "widths": [8, 12, 16], "conv1": ["conv3_pool", "identity_stride2"],
     "conv2": ["conv3", "identity"], "skip": ["zero", "conv2_output"]},
    {"name": "s2", "width": "layer2", "widths": ["0.5x", "1x"], "conv1": ["conv5_stride2", "conv3_pool"],
     "conv2": ["conv3", "conv5"], "conv3": ["conv3", "identity"]},
]}


def test_width_choices_are_keys_that_round_trip_and_export():
    space = ArchSpace.from_dict(WIDTH_SPACE)
    choices = space.choices()
    assert choices["s1.width"] == ["8", "12", "16"] and choices["s2.width"] == ["0.5x", "1x"]
    assert list(choices)[:5] == ["s1.conv1", "s1.conv2", "s1.skip", "s1.width", "s2.conv1"]
    assert space.size() == (2 * 2 * 2 * 3) * (2 * 2 * 2 * 2)
    assert ArchSpace.from_dict(space.to_dict()) == space and space.to_dict()["stages"][0]["widths"] == [8, 12, 16]
    assert space.to_nni()["s1.width"] == {"_type": "layer_choice", "_value": ["8", "12", "16"]}
    assert "s2.width" in space.active_keys(random_arch(space, 0))
    shrunk = space.restrict({**choices, "s1.width": ["8", "16"]})
    assert shrunk.choices()["s1.width"] == ["8", "16"]
    fixed = space.fix({**random_arch(space, 1), "s1.width": "12", "s2.width": "0.5x"}, NARROW)
    assert [s.width for s in fixed.stages] == [12, 12] and not fixed.has_widths() and fixed.size() == 1
    seed = ArchSpace.load("seed-widths")
    assert seed.choices()["stage3.width"] == ["0.5x", "0.75x", "1x"] and seed.size() == ArchSpace.seed().size() * 27
    assert not ArchSpace.seed().has_widths() and "widths" not in json.dumps(ArchSpace.seed().to_dict())


@pytest.mark.parametrize("widths, message", [
    ("[8, 8]", "stages[0].widths': expected candidates without repeats"),
    ("[8, 24]", "stages[0].widths[1]': expected a whole channel count of at most the stage's width 16"),
    ("[0, 8]", "stages[0].widths[0]': expected a positive channel count"),
    ("[8, 0.5x]", "stages[0].widths': expected a list of channel counts or of fractions"),
    ("[0.3x, 1x]", "stages[0].widths[0]': expected a whole channel count"),
    ("[1.5x]", "stages[0].widths[0]': expected a positive channel count or a fraction in (0, 1]"),
    ("[]", "stages[0].widths': expected a list of channel counts"),
])
def test_width_declaration_errors_name_file_and_field(tmp_path, widths, message):
    path = write_space(tmp_path, f"stages:\n- name: s1\n  width: 16\n  widths: {widths}\n  conv1: [conv3_pool]\n")
    with pytest.raises(ConfigError) as error:
        ArchSpace.from_file(path)
    assert str(error.value).startswith(f"{path}: field '") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_width_choices_over_the_resolved_width_are_refused_when_built():
    named = ArchSpace.from_dict({"stages": [{"name": "s1", "width": "layer1", "widths": [8, 24],
                                             "conv1": ["conv3_pool"]}]})
    with pytest.raises(ConfigError, match="'s1.widths': expected whole channel counts of at most the stage's width 16 "
                                          "\\(layer1\\), got '24'"):
        Supernet(named, NARROW, num_classes=10)
    odd = ArchSpace.from_dict({"stages": [{"name": "s1", "width": "prep", "widths": ["0.75x", "1x"],
                                           "conv1": ["conv3_pool"]}]})
    with pytest.raises(ConfigError, match="got '0.75x' \\(7.5 channels\\)"):
        CostTable.build(odd, {**NARROW, "prep": 10}, num_classes=10)


def test_sliced_batch_norm_updates_the_shared_statistics_of_its_slice():
    torch.manual_seed(0)
    shared, plain = SlicedBatchNorm2d(8), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        shared.weight.uniform_(), shared.bias.uniform_()
        plain.weight.copy_(shared.weight[:4]), plain.bias.copy_(shared.bias[:4])
    x = torch.randn(16, 4, 5, 5) * 3 + 1
    torch.testing.assert_close(shared(x), plain(x))
    torch.testing.assert_close(shared.running_mean[:4], plain.running_mean)
    torch.testing.assert_close(shared.running_var[:4], plain.running_var)
    assert shared.running_mean[4:].eq(0).all() and shared.running_var[4:].eq(1).all()
    assert int(shared.num_batches_tracked) == 1
    shared.eval(), plain.eval()
    torch.testing.assert_close(shared(x), plain(x))


def sliced_state(net: Supernet, standalone: Supernet) -> dict[str, torch.Tensor]:
    """The supernet's weights cut to the standalone network's shapes (first channels of every dimension)."""
    state = net.state_dict()
    return {name: state[name][tuple(slice(0, n) for n in value.shape)] for name, value in standalone.state_dict().items()}


MACRO_WIDTHS = {"stem": {"op": "conv3", "width": 8}, "stages": [
    {"name": f"s{i}", "width": width, "widths": [width // 2, width], "conv1": ["identity_stride2", "mb3_k3_stride2",
     "mb6_k5_stride2"], "conv2": ["identity", "mb3_k3", "mb6_k5"], "conv3": ["identity", "mb1_k3"]}
    for i, width in ((1, 16), (2, 24))], "head": {"conv": 32, "pool": "avg", "bias": True, "scale_logits": False}}


@pytest.mark.parametrize("space_name", ["widths", "seed-widths", "macro-widths"])
def test_a_sliced_path_is_its_standalone_network(space_name):
    declared = {"widths": WIDTH_SPACE, "macro-widths": MACRO_WIDTHS}
    space = ArchSpace.from_dict(declared[space_name]) if space_name in declared else ArchSpace.load(space_name)
    torch.manual_seed(0)
    net = Supernet(space, NARROW, num_classes=10)
    assert isinstance(net.choice_modules()[space.stages[0].name + ".width"], WidthChoice)
    for seed in range(4):  # train-mode passes of random paths: the running statistics differ per channel
        net.set_arch(random_arch(space, 100 + seed))
        net(torch.randn(8, 3, 32, 32))
    net.eval()
    costs = CostTable.build(space, NARROW, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    for arch in [random_arch(space, seed) for seed in range(6)] + [costs.extreme(False)]:
        standalone = build_standalone(space, arch, NARROW, num_classes=10).eval()
        assert not any(isinstance(m, SlicedBatchNorm2d) for m in standalone.modules())
        assert count_parameters(standalone) == costs.params_of(arch)
        assert count_flops(standalone) == costs.flops_of(arch)
        stage = space.stages[0]
        assert standalone.stages[stage.name](standalone.prep(x)).shape[1] == stage.channels_of(arch, NARROW)
        standalone.load_state_dict(sliced_state(net, standalone))
        net.set_arch(arch)
        torch.testing.assert_close(standalone(x), net(x))


def test_width_extremes_are_the_most_and_fewest_flops_of_the_whole_space():
    space = ArchSpace.from_dict({"stem": {"op": "conv3", "width": 8}, "stages": [
        {"name": f"s{i}", "width": 16, "widths": [4, 16], "conv1": ["conv5_pool", "conv3_stride2"],
         "conv2": ["conv3", "identity"], "skip": ["zero", "conv2_output"]} for i in (1, 2)]})
    costs = CostTable.build(space, NARROW, num_classes=10)
    flops = sorted(costs.flops_of(dict(zip(space.choices(), values)))
                   for values in itertools.product(*space.choices().values()))
    assert len(flops) == space.size() == 256
    assert costs.flops_of(costs.extreme(True)) == flops[-1] and costs.flops_of(costs.extreme(False)) == flops[0]
    assert costs.extreme(True)["s1.width"] == "16" and costs.extreme(False)["s2.width"] == "4"


def test_an_answer_outside_the_space_names_the_widths_to_train_instead(tmp_path, capsys):
    """A selection won by a width-curve point writes `arch: null` and its widths: --arch says what to run instead."""
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps({"arch": None, "space": ArchSpace.load("seed").to_dict(), "name": "resnet_0.5x",
                                  "widths": {"prep": 8, "layer1": 16, "layer2": 32, "layer3": 64}}))
    assert main(["train", "--arch", str(answer), "--dataset", "synthetic", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'resnet_0.5x'" in err and "--prep 8, --layer1 16" in err, err
    assert not (tmp_path / "run").exists()
