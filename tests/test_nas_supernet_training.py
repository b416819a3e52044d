"""Supernet training switches: what each path sampler visits, in-place distillation, BN at evaluation, resume."""

import collections

import pytest
import torch

from effcifar.errors import ConfigError
from effcifar.nas.space import ArchSpace, CostTable
from effcifar.nas.supernet import (
    FairSampler, LadderSampler, SandwichSampler, SupernetConfig, SupernetTrainer, batch_statistics, evaluate_subnet,
)

from conftest import NARROW


def tiny_config(**changes) -> SupernetConfig:
    values = dict(dataset="synthetic", subset=300, holdout=100, batch_size=50, bn_batches=2, panel_random=0,
                  eval_batch_size=100, precision="fp32", threads=1, epochs=2, **NARROW)
    return SupernetConfig(**{**values, **changes})


@pytest.mark.parametrize("space_name", ["seed", "nas-bench-macro"])
def test_fair_steps_use_every_candidate_of_every_key_evenly(space_name):
    space = ArchSpace.load(space_name)
    sampler = FairSampler(CostTable.build(space, NARROW, 10), seed=0)
    k = max(len(c) for c in space.choices().values())
    seen = set()
    for _ in range(20):
        paths = sampler.step_paths(space)
        assert len(paths) == k
        for key, candidates in space.choices().items():
            counts = collections.Counter(path[key] for path in paths)
            assert set(counts) == set(candidates)  # every candidate, every step
            assert max(counts.values()) - min(counts.values()) <= 1
        seen.add(tuple(sorted(paths[0].items())))
    assert len(seen) > 10  # and the groups are random, not one fixed rotation


def test_fair_under_flops_limits_stays_within_them_and_stays_fair_where_it_can():
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    flops = sorted(costs.flops_of(a) for a in space_archs(space))
    low, high = flops[len(flops) // 4], flops[3 * len(flops) // 4]
    sampler = FairSampler(costs, seed=0, flops_min=low, flops_max=high)
    fair_steps = 0
    for _ in range(30):
        paths = sampler.step_paths(space)
        assert len(paths) == 3 and all(low <= costs.flops_of(p) <= high for p in paths)
        fair_steps += all(len({p[key] for p in paths}) == 3 for key in space.choices())
    assert fair_steps == 30  # the middle half of the FLOPs range admits fair groups: no step fell back
    tight = FairSampler(costs, seed=0, flops_max=flops[10])  # only the ~10 smallest networks: no fair group fits
    assert all(costs.flops_of(p) <= flops[10] for p in tight.step_paths(space))


@pytest.mark.parametrize("sampler_class, fixed", [
    (SandwichSampler, ["mb6_k5", "identity"]),  # the largest first (distillation's teacher), then the smallest
    (LadderSampler, ["mb6_k5", "identity", "mb3_k3"]),  # and every rung between
])
def test_multi_path_steps_are_the_fixed_all_same_paths_then_random_ones(sampler_class, fixed):
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    sampler = sampler_class(costs, seed=0, paths=5)
    flops = [costs.flops_of(a) for a in space_archs(space)]
    randoms = set()
    for _ in range(10):
        paths = sampler.step_paths(space)
        assert len(paths) == 5
        assert costs.flops_of(paths[0]) == max(flops) and costs.flops_of(paths[1]) == min(flops)
        assert [{name.removesuffix("_stride2") for name in p.values()} for p in paths[:len(fixed)]] == [
            {name} for name in fixed]
        randoms.update(tuple(sorted(p.items())) for p in paths[len(fixed):])
    assert len(randoms) > 10


def test_sandwich_under_flops_limits_takes_the_extremes_within_them():
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    flops = sorted(costs.flops_of(a) for a in space_archs(space))
    low, high = flops[len(flops) // 4], flops[3 * len(flops) // 4]  # both table extremes fall outside
    sampler = SandwichSampler(costs, seed=0, paths=4, flops_min=low, flops_max=high)
    randoms = []
    for _ in range(50):
        paths = sampler.step_paths(space)
        assert all(low <= costs.flops_of(p) <= high for p in paths)
        randoms += paths[2:]
    largest, smallest = costs.flops_of(paths[0]), costs.flops_of(paths[1])
    assert all(smallest <= costs.flops_of(p) <= largest for p in randoms)
    assert largest > flops[int(len(flops) * 0.7)] and smallest < flops[int(len(flops) * 0.3)]  # near the limits
    again = SandwichSampler(costs, seed=0, paths=4, flops_min=low, flops_max=high)
    assert again.step_paths(space)[:2] == paths[:2]  # fixed by the seed and the limits (a resume picks the same)


def test_ladder_rungs_use_every_candidate_evenly_where_keys_have_fewer():
    space = ArchSpace.load("seed")  # four candidates on conv1 and skip keys, two on the others
    costs = CostTable.build(space, NARROW, 10)
    rungs = LadderSampler(costs, seed=0, paths=4).step_paths(space)
    for key, candidates in space.choices().items():
        counts = collections.Counter(path[key] for path in rungs)
        assert set(counts) == set(candidates) and max(counts.values()) - min(counts.values()) <= 1
    climb = [costs.flops_of(path) for path in rungs[1:] + rungs[:1]]  # smallest, middle rungs, largest
    assert climb == sorted(set(climb))


def test_ladder_under_flops_limits_stays_within_them():
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    flops = sorted(costs.flops_of(a) for a in space_archs(space))
    low, high = flops[len(flops) // 4], flops[3 * len(flops) // 4]
    sampler = LadderSampler(costs, seed=0, paths=4, flops_min=low, flops_max=high)
    for _ in range(20):
        assert all(low <= costs.flops_of(p) <= high for p in sampler.step_paths(space))


def space_archs(space: ArchSpace):
    import itertools
    keys, choices = list(space.choices()), list(space.choices().values())
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def test_a_multi_path_step_averages_its_paths_gradients():
    """The learning rate means the same step size for every sampling: a 4-path step's gradient is the
    mean of its paths' own gradients on the batch (BigNAS adds them, which made LRs tuned on one path
    four times too large)."""
    trainer = SupernetTrainer(tiny_config(sampling="sandwich"))
    x, y = trainer.batch()
    passes = trainer.backward_paths(x, y)
    assert len(passes) == 4
    step = {n: p.grad.clone() for n, p in trainer.net.named_parameters() if p.grad is not None}
    trainer.net.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    for arch, _, _ in passes:  # each path alone, weight 1
        trainer.net.set_arch(arch)
        trainer.step.backward(x, y)
        for n, p in trainer.net.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad
        trainer.net.zero_grad(set_to_none=True)
    assert step.keys() == total.keys() and len(step) > 20
    for n, grad in step.items():
        torch.testing.assert_close(grad, total[n] / 4, rtol=1e-5, atol=1e-7, msg=n)


def test_distillation_changes_the_smaller_paths_loss_and_not_the_largests():
    losses = {}
    for distill in (False, True):
        trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", sampling="sandwich", distill=distill))
        x, y = trainer.batch()
        passes = trainer.backward_paths(x, y)
        losses[distill] = [(arch, loss.item()) for arch, loss, _ in passes]
    plain, distilled = losses[False], losses[True]
    assert [arch for arch, _ in plain] == [arch for arch, _ in distilled]  # the same paths, same seed
    assert distilled[0][1] == plain[0][1]  # the largest still learns the labels, bit for bit
    for (_, a), (_, b) in zip(plain[1:], distilled[1:]):
        assert a != b  # the others learn its soft labels


def test_distillation_with_uniform_sampling_puts_the_largest_path_first():
    trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", sampling="uniform", distill=True))
    x, y = trainer.batch()
    passes = trainer.backward_paths(x, y)
    assert len(passes) == 2 and passes[0][0] == trainer.costs.extreme(True, trainer.space)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [dict(sampling="fair"), dict(sampling="sandwich", distill=True),
                                     dict(sampling="uniform", distill=True, bn_eval="batch")])
def test_multi_path_training_resumes_bitwise(changes):
    config = tiny_config(space="nas-bench-macro", **changes)
    whole = SupernetTrainer(config)
    whole.fit()
    half = SupernetTrainer(config)
    half.train_epoch()
    half.end_epoch(0.0)
    state = half.state_dict()
    resumed = SupernetTrainer(config)
    resumed.load_state_dict(state)
    resumed.fit()
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.progress.history[-1]["valid_panel_mean"] == whole.progress.history[-1]["valid_panel_mean"]


def test_batch_statistics_judge_each_batch_by_itself_and_leave_running_stats_alone():
    trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", sampling="uniform", bn_eval="batch"))
    net = trainer.net
    arch = trainer.costs.extreme(True, trainer.space)
    net.set_arch(arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, _ = next(iter(trainer.valid_loader))
    net.train()
    with torch.no_grad():
        expected = net(x)  # train-mode BN: the batch's statistics (updates running stats, restored below)
    net.load_state_dict(before)
    net.eval()
    with batch_statistics(net), torch.no_grad():
        torch.testing.assert_close(net(x), expected)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert not torch.allclose(net(x), expected)  # outside the block: running statistics again
    top1 = evaluate_subnet(net, arch, trainer.bn_batches, trainer.valid_loader, trainer.step.autocast, "batch")[0]
    assert top1 == trainer.evaluate(arch)


@pytest.mark.parametrize("changes, field", [
    (dict(sampling="random"), "sampling"),
    (dict(sampling="sandwich", sandwich_paths=1), "sandwich_paths"), (dict(bn_eval="none"), "bn_eval"),
    (dict(space="nas-bench-macro", sampling="ladder", sandwich_paths=2), "sandwich_paths"),
    (dict(warmup_epochs=2), "warmup_epochs"), (dict(few_shot_key="stage9.conv1", few_shot_epochs=1), "few_shot_key"),
    (dict(few_shot_key="stage1.conv1"), "few_shot_epochs"), (dict(few_shot_epochs=2), "few_shot_epochs"),
])
def test_bad_training_switches_are_refused(changes, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        tiny_config(**changes).validate()


def few_shot_config(**changes) -> SupernetConfig:
    return tiny_config(space="nas-bench-macro", epochs=2, few_shot_key="stage1.conv1", few_shot_epochs=1, **changes)


@pytest.mark.slow
def test_few_shot_splits_train_only_their_own_paths_from_the_one_shot_weights():
    trainer = SupernetTrainer(few_shot_config())
    trainer.train_epoch()
    trainer.end_epoch(0.0)
    trainer.train_epoch()
    trainer.end_epoch(0.0)
    oneshot = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.enter_split(1)  # candidate mb3_k3_stride2
    net = trainer.net
    assert list(net.splits) == ["identity_stride2", "mb3_k3_stride2", "mb6_k5_stride2"]
    for candidate in net.splits:  # every sub-supernet starts as a copy of the one-shot supernet
        split = net.split(candidate).state_dict()
        assert all(torch.equal(split[k], oneshot[k]) for k in oneshot)
    for _ in range(3):
        x, y = trainer.batch()
        paths = [arch for arch, _, _ in trainer.backward_paths(x, y)]
        assert all(arch["stage1.conv1"] == "mb3_k3_stride2" for arch in paths)
        trainer.step.update(0.05)
        trainer.progress.step += 1
    changed = {c for c in net.splits if not all(torch.equal(net.split(c).state_dict()[k], oneshot[k]) for k in oneshot)}
    assert changed == {"mb3_k3_stride2"}
    arch = {k: v[0] for k, v in trainer.space.choices().items()} | {"stage1.conv1": "mb6_k5_stride2"}
    net.set_arch(arch)
    assert net.active_network() is net.split("mb6_k5_stride2")  # judged in its own sub-supernet


@pytest.mark.slow
def test_few_shot_run_resumes_bitwise_across_the_split_and_loads_for_search(tmp_path):
    config = few_shot_config(bn_eval="batch")
    whole = SupernetTrainer(config, out=tmp_path / "whole")
    result = whole.fit()
    assert whole.total_epochs() == 5 and len(result.history) == 5
    for stop_after in (2, 3):  # at the split, and inside the second sub-supernet's turn
        part = SupernetTrainer(config)
        for _ in range(stop_after):
            if part.progress.epoch >= config.epochs:
                part.enter_split((part.progress.epoch - config.epochs) // config.few_shot_epochs)
            part.train_epoch()
            part.end_epoch(0.0)
        resumed = SupernetTrainer(config)
        resumed.load_state_dict(part.state_dict())
        resumed.fit()
        a, b = whole.net.state_dict(), resumed.net.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from effcifar.nas.supernet import load_supernet
    net, _, _ = load_supernet(tmp_path / "whole")
    assert list(net.splits) == list(whole.net.splits)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in whole.net.state_dict().items())


def test_canonical_paths_run_each_network_as_one_path():
    from effcifar.nas.space import Supernet, arch_key, canonical_path, network_key
    space = ArchSpace.load("nas-bench-macro")
    keys = list(space.choices())
    arch = lambda digits: {k: space.choices()[k][int(d)] for k, d in zip(keys, digits)}  # noqa: E731
    a, b = arch("01201100"), arch("01210100")  # stage 2: identity then mb6_k5, or mb6_k5 then identity
    assert canonical_path(space, a) == canonical_path(space, b) == b
    assert network_key(space, a) == network_key(space, canonical_path(space, a))
    assert canonical_path(space, arch("20012001")) == arch("20012010")  # stage 3: identity, mb3_k3 -> mb3_k3, identity
    torch.manual_seed(0)
    plain, canonical = Supernet(space, {}, 10).eval(), Supernet(space, {}, 10, canonical_paths=True).eval()
    canonical.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = {}
        for name, digits in (("a", "01201100"), ("b", "01210100")):
            plain.set_arch(arch(digits))
            canonical.set_arch(arch(digits))
            outputs[name] = (plain(x), canonical(x))
    assert not torch.allclose(outputs["a"][0], outputs["b"][0])  # different weights for one network ...
    torch.testing.assert_close(outputs["a"][1], outputs["b"][1])  # ... unless both run its canonical path
    assert arch_key(space, canonical.path_of(a)) == arch_key(space, canonical.path_of(b))


def test_canonical_paths_refuse_fair_sampling_and_a_split_on_a_body_key():
    with pytest.raises(ConfigError, match="field 'canonical_paths'"):
        tiny_config(space="nas-bench-macro", canonical_paths=True, sampling="fair").validate()
    with pytest.raises(ConfigError, match="field 'few_shot_key'"):
        tiny_config(space="nas-bench-macro", canonical_paths=True, few_shot_key="stage2.conv2",
                    few_shot_epochs=1).validate()


def test_depth_from_trains_every_stage_at_full_depth_first_then_samples_the_skips():
    trainer = SupernetTrainer(tiny_config(sampling="fair", depth_from=1))
    skips = [key for key in trainer.space.choices() if key.endswith(".skip")]
    x, y = trainer.batch()
    early = [arch for arch, _, _ in trainer.backward_paths(x, y)]
    assert {arch[key] for arch in early for key in skips} == {"conv4_output"}  # the deepest, in every stage
    assert {arch["stage1.conv1"] for arch in early} == set(trainer.space.choices()["stage1.conv1"])  # still fair
    trainer.progress.epoch = 1
    late = [arch for arch, _, _ in trainer.backward_paths(x, y)]
    for key in skips:
        assert {arch[key] for arch in late} == set(trainer.space.choices()[key])


def test_depth_from_refuses_an_epoch_outside_the_run_and_a_space_without_skips():
    with pytest.raises(ConfigError, match="field 'depth_from'.*epochs=2"):
        tiny_config(depth_from=2).validate()
    with pytest.raises(ConfigError, match="field 'depth_from'.*without skip"):
        tiny_config(space="nas-bench-macro", depth_from=1).validate()


def test_after_shrinking_training_draws_only_from_the_shrunk_space():
    trainer = SupernetTrainer(tiny_config(sampling="fair", shrink_at="1", shrink_samples=2))
    trainer.train_epoch()
    trainer.end_epoch(0.0)
    assert trainer.space.size() < ArchSpace.load("seed").size()
    x, y = trainer.batch()
    for arch, _, _ in trainer.backward_paths(x, y):
        trainer.space.check(arch)  # a dropped candidate is a ConfigError
