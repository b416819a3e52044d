"""Supernet training switches: what each path sampler visits, in-place distillation, BN at evaluation, resume."""

import collections

import pytest
import torch

from effcifar.errors import ConfigError
from effcifar.nas.space import ArchSpace, CostTable
from effcifar.nas.supernet import (
    FairSampler, SandwichSampler, SupernetConfig, SupernetTrainer, batch_statistics, evaluate_subnet,
)

NARROW = {"prep": 8, "layer1": 16, "layer2": 24, "layer3": 32}


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


def test_sandwich_steps_are_largest_smallest_and_random():
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    sampler = SandwichSampler(costs, seed=0, paths=4)
    flops = [costs.flops_of(a) for a in space_archs(space)]
    randoms = set()
    for _ in range(10):
        paths = sampler.step_paths(space)
        assert len(paths) == 4
        assert costs.flops_of(paths[0]) == max(flops) and costs.flops_of(paths[1]) == min(flops)
        assert set(paths[0].values()) == {"mb6_k5", "mb6_k5_stride2"}  # and which ones they are
        assert set(paths[1].values()) == {"identity", "identity_stride2"}
        randoms.update(tuple(sorted(p.items())) for p in paths[2:])
    assert len(randoms) > 10


def space_archs(space: ArchSpace):
    import itertools
    keys, choices = list(space.choices()), list(space.choices().values())
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


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
    trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", distill=True))
    x, y = trainer.batch()
    passes = trainer.backward_paths(x, y)
    assert len(passes) == 2 and passes[0][0] == trainer.costs.extreme(True, trainer.space)


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
    trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", bn_eval="batch"))
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
    top1, _ = evaluate_subnet(net, arch, trainer.bn_batches, trainer.valid_loader, trainer.step.autocast, "batch")
    assert top1 == trainer.evaluate(arch)


@pytest.mark.parametrize("changes, field", [
    (dict(sampling="random"), "sampling"), (dict(sampling="fair", flops_max=1e9), "sampling"),
    (dict(sampling="sandwich", sandwich_paths=1), "sandwich_paths"), (dict(bn_eval="none"), "bn_eval"),
    (dict(warmup_epochs=2), "warmup_epochs"),
])
def test_bad_training_switches_are_refused(changes, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        tiny_config(**changes).validate()
