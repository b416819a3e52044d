"""Supernet training: what each path sampler visits, the sampler registry, the trainer's hooks, resume."""

import collections

import pytest
import torch

from effcifar.config import build_config
from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable
from effcifar.nas.path_samplers import PATH_SAMPLERS, FairSampler, PathSampler, SandwichSampler, path_sampler_rule
from effcifar.nas.space import ArchSpace
from effcifar.nas.supernet import SupernetConfig, read_run_config
from effcifar.nas.trainer import SupernetTrainer, TrainerHook

from conftest import NARROW


def tiny_config(**changes) -> SupernetConfig:
    values = dict(dataset="synthetic", subset=300, holdout=100, batch_size=50, bn_batches=2, panel_random=0,
                  eval_batch_size=100, precision="fp32", threads=1, epochs=2, **NARROW)
    return SupernetConfig.of(**{**values, **changes})


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


def test_sandwich_steps_are_the_largest_and_smallest_paths_then_random_ones():
    space = ArchSpace.load("nas-bench-macro")
    costs = CostTable.build(space, NARROW, 10)
    fixed = ["mb6_k5", "identity"]  # the largest first, then the smallest
    sampler = SandwichSampler(costs, seed=0, paths=5)
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


@pytest.mark.slow
@pytest.mark.parametrize("changes", [dict(sampling="fair"), dict(sampling="sandwich"),
                                     dict(sampling="uniform", shrink_at="1", shrink_samples=1)])
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


@pytest.mark.parametrize("changes, field", [
    (dict(sampling="random"), "sampling"), (dict(sampling="ladder"), "sampling"),
    (dict(sampling="sandwich", sandwich_paths=1), "sandwich_paths"), (dict(warmup_epochs=2), "warmup_epochs"),
])
def test_bad_training_switches_are_refused(changes, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        tiny_config(**changes).validate()


def test_an_unknown_sampling_rule_is_one_line_naming_the_registered_ones():
    with pytest.raises(ConfigError) as error:
        tiny_config(sampling="ladder").validate()
    assert "\n" not in str(error.value) and "one of uniform, fair, sandwich" in str(error.value)


@pytest.mark.parametrize("removed", ["distill", "bn_eval", "canonical_paths", "few_shot_key", "few_shot_epochs",
                                     "depth_from"])
def test_a_config_file_naming_a_removed_research_switch_is_refused(tmp_path, removed):
    path = tmp_path / "supernet.yaml"
    path.write_text(f"epochs: 2\n{removed}: 1\n")
    with pytest.raises(ConfigError, match=removed):
        build_config(SupernetConfig, path)


def test_a_run_saved_with_the_removed_switches_off_still_loads(tmp_path):
    """A run directory written before the switches left: off values load, an on value is a one-line error."""
    off = "distill: false\nbn_eval: recalibrate\ncanonical_paths: false\nfew_shot_key: ''\nfew_shot_epochs: 0\n"
    (tmp_path / "config.yaml").write_text(f"epochs: 2\n{off}depth_from: 0\n")
    assert read_run_config(tmp_path).epochs == 2
    (tmp_path / "config.yaml").write_text(f"epochs: 2\n{off}depth_from: 3\n")
    with pytest.raises(ConfigError, match="field 'depth_from': this run used 3, a research switch"):
        read_run_config(tmp_path)


def test_a_registered_sampling_rule_is_what_the_trainer_draws_with():
    @path_sampler_rule("largest")
    class LargestSampler(PathSampler):
        def step_paths(self, space):
            return [self.extreme(True, space)]

    try:
        trainer = SupernetTrainer(tiny_config(space="nas-bench-macro", sampling="largest"))
        assert isinstance(trainer.sampler, LargestSampler)
        x, y = trainer.batch()
        assert [arch for arch, _, _ in trainer.backward_paths(x, y)] == [trainer.costs.extreme(True, trainer.space)]
    finally:
        del PATH_SAMPLERS["largest"]


class Recorder(TrainerHook):
    def __init__(self):
        self.calls = []

    def before_step(self, trainer):
        self.calls.append(("step", trainer.progress.epoch, trainer.progress.step))

    def after_epoch(self, trainer, row):
        self.calls.append(("epoch", row["epoch"]))
        row["hook_column"] = 1.0


def test_hooks_run_before_every_step_and_after_every_epoch_and_may_add_log_columns():
    recorder = Recorder()
    trainer = SupernetTrainer(tiny_config(epochs=1), hooks=[recorder])
    result = trainer.fit()
    steps = len(trainer.train_loader)
    assert recorder.calls == [("step", 0, s) for s in range(steps)] + [("epoch", 1)]
    assert result.history[-1]["hook_column"] == 1.0


def test_after_shrinking_training_draws_only_from_the_shrunk_space():
    trainer = SupernetTrainer(tiny_config(sampling="fair", shrink_at="1", shrink_samples=2))
    trainer.train_epoch()
    trainer.end_epoch(0.0)
    assert trainer.space.size() < ArchSpace.load("seed").size()
    x, y = trainer.batch()
    for arch, _, _ in trainer.backward_paths(x, y):
        trainer.space.check(arch)  # a dropped candidate is a ConfigError
