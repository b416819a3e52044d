"""The airbench recipe: whitening, alternating flip, multi-crop TTA, ablation switches, recipe defaults, runs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effcifar import cli
from effcifar.airbench import (
    AIRBENCH_FIELDS, WHITEN_IMAGES, AirbenchRecipe, Lookahead, alternate_flip_, build_airbench_net, multicrop_logits,
    patch_whitening, whitening_sample,
)
from effcifar.config import build_config
from effcifar.data import DeviceLoader, make_synthetic
from effcifar.errors import ConfigError
from effcifar.inference import load_model
from effcifar.train import TrainConfig, evaluate, mirror_logits, train

TINY = dict(dataset="synthetic", layer1=8, layer2=16, layer3=16, batch_size=128, subset=512, epochs=1,
            peak_epoch=0.3, eval_batch_size=500)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(10, n_train=1000, n_test=300, seed=0)


def tiny(**fields):
    return TrainConfig.for_recipe("airbench", **{**TINY, **fields})


def correlated_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return x + 0.8 * x.roll(1, 3) + 0.5 * x[:, :1] + 0.3  # neighbouring pixels and channels correlate


def loader_for(images, labels=None, **kw):
    labels = np.arange(len(images)) if labels is None else labels
    return DeviceLoader(images, labels, batch_size=len(images), mean=np.zeros(3, np.float32),
                        std=np.ones(3, np.float32), channels_last=False, **kw)


# whitening ----------------------------------------------------------------------------------------------

def test_whitening_outputs_are_decorrelated_and_frozen():
    x = correlated_images()
    raw = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert (torch.cov(raw.T) - torch.eye(12)).abs().max() > 0.5  # the input patches are far from white
    net = build_airbench_net(tiny(), 10, x)
    first = net[0]
    assert not first.weight.requires_grad and first.bias.requires_grad
    out = first(x).detach().permute(0, 2, 3, 1).reshape(-1, 24).double()
    white = out[:, :12]
    cov = torch.cov(white.T, correction=0)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-3  # decorrelated
    assert cov.diag().min() > 0.9 and cov.diag().max() < 1.0 + 1e-4  # unit variance, but for eps
    assert white.mean(0).abs().max() < 1e-4  # centred by the bias
    assert torch.allclose(out[:, 12:], -white, atol=1e-5)  # the negated copies
    w, b = patch_whitening(x, 2, eps=0.0)
    exact = F.conv2d(x, w[:12], b[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert (torch.cov(exact.T, correction=0) - torch.eye(12)).abs().max() < 1e-3


def test_whitening_bias_freezes_after_its_epochs(synthetic):
    config = tiny(whiten_bias_epochs=1)
    recipe = AirbenchRecipe(config)
    loader = loader_for(synthetic.x_train[:256], labels=synthetic.y_train[:256], augment=recipe.augment())
    model = recipe.build_model(10, loader)
    step = recipe.train_step(model, "fp32")
    x, y = next(iter(loader))

    def changed_by_a_step(epoch):
        recipe.start_epoch(epoch, model, loader)
        before = [model[0].bias.detach().clone(), model[2][0].weight.detach().clone()]
        step(x, y, lr=0.1)
        return [not torch.equal(b, p) for b, p in zip(before, (model[0].bias, model[2][0].weight))]

    assert changed_by_a_step(1) == [True, True]
    assert changed_by_a_step(2) == [False, True]  # frozen; the next conv still learns
    # by its learning rate: requires_grad stays as it was, so a compiled network is not compiled again
    assert model[0].bias.requires_grad and not model[0].weight.requires_grad


def test_whitening_uses_a_seeded_random_sample_not_the_first_images(synthetic):
    order = np.argsort(synthetic.y_train, kind="stable")  # class-major, like the shared CIFAR-10 copy
    loader = loader_for(synthetic.x_train[order], labels=synthetic.y_train[order])
    first = synthetic.y_train[order][:500]
    assert len(set(first.tolist())) == 5  # the first 500 images are five of the ten classes
    index = torch.randperm(len(order), generator=torch.Generator().manual_seed(3))[:500]
    assert len(set(synthetic.y_train[order][index.numpy()].tolist())) == 10
    sample = whitening_sample(loader, 500, seed=3)
    assert torch.equal(sample, whitening_sample(loader, 500, seed=3))  # seeded: the same run, the same filters
    assert not torch.equal(sample, whitening_sample(loader, 500, seed=4))
    expected = torch.from_numpy(synthetic.x_train[order][index.numpy()]).permute(0, 3, 1, 2).float()
    assert torch.equal(sample, expected)  # those images, whole (un-padded), normalised as the loader does


def test_the_recipe_whitens_a_sample_of_every_class():
    data = make_synthetic(10, n_train=2 * WHITEN_IMAGES, n_test=0)
    order = np.argsort(data.y_train, kind="stable")
    loader = loader_for(data.x_train[order], labels=data.y_train[order])
    weight = AirbenchRecipe(tiny(seed=3)).build_model(10, loader)[0].weight.detach()
    assert torch.equal(weight, patch_whitening(whitening_sample(loader, WHITEN_IMAGES, 3), 2)[0])
    first = torch.from_numpy(data.x_train[order][:WHITEN_IMAGES]).permute(0, 3, 1, 2).float()
    other = patch_whitening(first, 2)[0]  # what the first images (five classes) would have given
    assert (weight - other).norm() > 0.2 * weight.norm(), ((weight - other).norm(), weight.norm())


# alternating flip -------------------------------------------------------------------------------------

def test_alternating_flip_mirrors_each_image_on_alternate_epochs(synthetic):
    recipe = AirbenchRecipe(tiny(crop_pad=0))
    images = synthetic.x_train[:200]
    loader = loader_for(images, augment=recipe.augment(), shuffle=True, seed=3)
    assert recipe.augment().flip is False  # no random per-batch flip on top
    original = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    states = []
    for epoch in range(1, 6):
        recipe.start_epoch(epoch, None, loader)
        (x, y), = list(loader)
        seen = torch.empty_like(original)
        seen[y] = x  # the loader's labels are the image indices
        flipped = (seen == original.flip(3)).flatten(1).all(1)
        assert ((seen == original).flatten(1).all(1) | flipped).all()
        states.append(flipped)
    assert 0.3 < states[0].float().mean() < 0.7  # a random half in the first epoch
    for before, after in zip(states, states[1:]):
        assert torch.equal(after, ~before)  # every image changes state every epoch


def test_alternating_flip_keeps_crops_valid():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    loader = loader_for(images, augment=AirbenchRecipe(tiny()).augment())
    padded = loader.images.clone()
    alternate_flip_(loader, 2)
    assert torch.equal(loader.images, padded.flip(3))


# multi-crop TTA ---------------------------------------------------------------------------------------

def test_multicrop_tta_is_the_weighted_mean_of_explicit_crops():
    torch.manual_seed(0)
    model = build_airbench_net(tiny(), 10, correlated_images(8)).eval()
    x = torch.randn(4, 3, 32, 32)
    rows = torch.tensor([1, *range(32), 30])  # reflect padding by 1, written out
    padded = x[:, :, rows][:, :, :, rows]
    crops = [x, x, padded[:, :, :32, :32], padded[:, :, 2:, 2:]]  # the centre counts twice
    views = [v for c in crops for v in (c, c.flip(3))]
    expected = torch.stack([model(v) for v in views]).mean(0)
    with torch.no_grad():
        assert torch.allclose(multicrop_logits(model, x), expected, atol=1e-5)
        assert not torch.allclose(multicrop_logits(model, x), mirror_logits(model, x), atol=1e-3)


def test_multicrop_tta_gives_the_shifted_images_the_layout_of_the_batch():
    model = build_airbench_net(tiny(), 10, correlated_images(8)).eval()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    with torch.no_grad():
        multicrop_logits(model, x)
    assert len(seen) == 6 and set(seen) == {x.stride()}  # a compiled network is compiled for one layout


def test_a_padded_last_batch_evaluates_alike(synthetic):
    """`one_shape` (compiled runs) pads the last batch to the batch size: the same loss and accuracy."""
    model = build_airbench_net(tiny(), 10, correlated_images(8)).eval()
    loader = loader_for(synthetic.x_test[:300], labels=synthetic.y_test[:300])
    loader.batch_size = 128  # batches of 128, 128 and 44
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(len(args[0])))
    plain = evaluate(model, loader, autocast, 0.2, True, multicrop_logits)
    assert sorted(set(shapes)) == [44, 128]
    shapes.clear()
    padded = evaluate(model, loader, autocast, 0.2, True, multicrop_logits, one_shape=True)
    assert set(shapes) == {128}
    assert padded[1] == plain[1] and padded[0] == pytest.approx(plain[0], rel=1e-6)


@pytest.mark.slow
def test_a_compiled_run_compiles_one_training_and_one_evaluation_graph(synthetic):
    """Past the whitening bias's freeze, a short last evaluation batch and the multi-crop TTA's shifted images."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    result = train(tiny(epochs=3, whiten_bias_epochs=1, compile=True, eval_batch_size=128, threads=2),
                   data=synthetic)  # 300 test images: batches of 128, 128 and 44
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert result.summary["test_acc"] > 0.15
    torch._dynamo.reset()


# ablation switches ------------------------------------------------------------------------------------

def test_whiten_off_gives_a_trainable_default_first_conv():
    x = correlated_images(16)
    on, off = build_airbench_net(tiny(), 10, x), build_airbench_net(tiny(whiten=False), 10, x)
    assert off[0].weight.requires_grad
    assert not torch.allclose(on[0].weight, off[0].weight)


def test_identity_init_switch():
    on, off = build_airbench_net(tiny(), 10, None), build_airbench_net(tiny(identity_init=False), 10, None)
    conv_on, conv_off = on[2][0], off[2][0]  # first conv of the first group: 24 -> 8 channels
    dirac = torch.zeros_like(conv_on.weight[:8])
    torch.nn.init.dirac_(dirac)
    assert torch.equal(conv_on.weight[:8], dirac)
    assert not torch.equal(conv_off.weight[:8], dirac)


def test_lookahead_switch_and_update():
    assert AirbenchRecipe(tiny(lookahead=False)).lookahead is None
    model = build_airbench_net(tiny(), 10, None)
    recipe = AirbenchRecipe(tiny())
    recipe.train_step(model, "fp32")
    assert isinstance(recipe.lookahead, Lookahead)
    slow = model[-2].weight.detach().clone()
    with torch.no_grad():
        model[-2].weight.add_(1.0)
    recipe.after_step(model, 4, 10)  # not a lookahead step: nothing happens
    assert torch.allclose(model[-2].weight, slow + 1)
    recipe.after_step(model, 10, 10)  # the last step: decay 0.95^5, weights pulled back toward the slow copy
    assert torch.allclose(model[-2].weight, slow + (1 - 0.95**5), atol=1e-6)
    off = AirbenchRecipe(tiny(lookahead=False))
    off.train_step(model, "fp32")
    before = model[-2].weight.detach().clone()
    off.after_step(model, 10, 10)
    off.finish(model)
    assert torch.equal(model[-2].weight, before)


def test_bn_bias_lr_switch():
    model = build_airbench_net(tiny(), 10, None)
    groups = AirbenchRecipe(tiny()).train_step(model, "fp32").optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 64.0, 1.0]  # the whitening bias, BatchNorm biases, the rest
    assert groups[1]["weight_decay"] == pytest.approx(groups[2]["weight_decay"] / 64)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    step = AirbenchRecipe(tiny(bn_bias_lr=1.0)).train_step(model, "fp32")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    step(x, y, lr=0.1)
    assert {g["lr"] for g in step.optimizer.param_groups} == {0.1}


def test_tta_and_flip_switches_pick_the_documented_behaviour():
    assert AirbenchRecipe(tiny()).predict(final=True) is multicrop_logits
    assert AirbenchRecipe(tiny()).predict(final=False) is mirror_logits
    assert AirbenchRecipe(tiny(multicrop_tta=False)).predict(final=True) is mirror_logits
    # summary.json and `effcifar train` name the TTA the test accuracy used
    assert [AirbenchRecipe(tiny(**f)).test_tta() for f in ({}, {"multicrop_tta": False}, {"tta": False})] == [
        "multi-crop", "flip", None]
    assert AirbenchRecipe(tiny(alt_flip=False)).augment().flip is True
    assert AirbenchRecipe(tiny(label_smoothing=0.0)).train_step(
        build_airbench_net(tiny(), 10, None), "fp32").label_smoothing == 0.0


def test_triangular_lr_schedule():
    recipe = AirbenchRecipe(TrainConfig.for_recipe("airbench"))
    peak = AIRBENCH_FIELDS["peak_lr"]
    assert [recipe.lr(e) for e in (0, 2.3, 10)] == pytest.approx([0.2 * peak, peak, 0.07 * peak])


# recipe defaults and config ---------------------------------------------------------------------------

def test_recipe_defaults_apply_to_unset_fields_only(tmp_path):
    c = build_config(TrainConfig, overrides={"recipe": "airbench"})
    assert (c.batch_size, c.epochs, c.layer2, c.cutout, c.momentum) == (1024, 10, 256, 0, 0.85)
    assert c.peak_lr == pytest.approx(1.5) and c.compile is torch.cuda.is_available()
    path = tmp_path / "c.yaml"
    path.write_text("recipe: airbench\nbatch_size: 256\n")
    c = build_config(TrainConfig, path, {"epochs": "3", "peak_epoch": "1"}, overrides_from_text=True)
    assert (c.batch_size, c.epochs, c.layer1, c.crop_pad) == (256, 3, 64, 2)
    assert build_config(TrainConfig, overrides={"recipe": "airbench", "device": "cpu"}).compile is False
    assert build_config(TrainConfig) == TrainConfig()  # resnet9: the defaults as they were


def test_bad_recipe_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"command line: field 'recipe': expected one of resnet9, airbench, got 'foo'"):
        build_config(TrainConfig, overrides={"recipe": "foo"})


# runs -------------------------------------------------------------------------------------------------

def test_one_epoch_synthetic_run(tmp_path, synthetic):
    result = train(tiny(threads=2), tmp_path / "run", data=synthetic)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["recipe"] == "airbench" and summary["epochs_run"] == 1
    assert summary["test_acc"] == result.history[-1].valid_acc and np.isfinite(result.history[0].train_loss)
    assert result.history[0].train_loss < np.log(10) + 0.5
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    assert state["0.weight"].shape == (24, 3, 2, 2)
    reloaded, trained = load_model(tmp_path / "run").eval(), result.model.cpu().float().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), trained(x), atol=1e-5)


@pytest.mark.slow
def test_cli_recipe_airbench(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--recipe", "airbench", "--dataset", "synthetic", "--layer1", "8", "--layer2", "16",
            "--layer3", "16", "--batch-size", "256", "--subset", "512", "--epochs", "1", "--peak-epoch", "0.3",
            "--no-lookahead", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert config["recipe"] == "airbench" and config["batch_size"] == 256
    assert config["recipe_fields"]["lookahead"] is False
    assert config["crop_pad"] == 2 and config["cutout"] == 0  # recipe defaults for what was not given
