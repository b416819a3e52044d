"""The network family: structure, parameter count against an independent formula, FLOPs."""

import torch

from effcifar.models import NetConfig, ResNet, count_flops, count_parameters


def resnet9_parameter_count(widths: dict[str, int], num_classes: int) -> int:
    """cifar10-fast's ResNet-9, counted by hand: 3x3 convs without bias, BN weight+bias, linear without bias."""
    def conv_bn(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + 2 * c_out

    p, l1, l2, l3 = widths["prep"], widths["layer1"], widths["layer2"], widths["layer3"]
    return (conv_bn(3, p) + conv_bn(p, l1) + 2 * conv_bn(l1, l1) + conv_bn(l1, l2)
            + conv_bn(l2, l3) + 2 * conv_bn(l3, l3) + l3 * num_classes)


def test_default_is_cifar10_fast_resnet9():
    model = ResNet()
    assert count_parameters(model) == resnet9_parameter_count(NetConfig().channels, 10) == 6_573_120
    assert [name for name, _ in model.named_children()] == ["prep", "layer1", "layer2", "layer3", "pool", "flatten", "linear", "logits"]
    assert model.logits.weight == 0.125


def test_depths_and_widths_change_the_network():
    cfg = NetConfig(channels={"prep": 16, "layer1": 32, "layer2": 64, "layer3": 128},
                    res_layers={"prep": 1, "layer1": 3, "layer2": 2, "layer3": 0},
                    extra_layers={"prep": 0, "layer1": 1, "layer2": 0, "layer3": 2}, num_classes=100)
    model = ResNet(cfg)
    def cb(c_in, c_out):
        return 9 * c_in * c_out + 2 * c_out
    expected = (cb(3, 16) + 2 * cb(16, 16)                      # prep + 1 residual
                + cb(16, 32) + 3 * 2 * cb(32, 32) + cb(32, 32)  # layer1: 3 residual + 1 extra
                + cb(32, 64) + 2 * 2 * cb(64, 64)               # layer2: 2 residual
                + cb(64, 128) + 2 * cb(128, 128)                # layer3: 2 extra
                + 128 * 100)
    assert count_parameters(model) == expected
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)


def test_logits_weight_scales_output():
    torch.manual_seed(0)
    a = ResNet(NetConfig(logits_weight=1.0)).eval()
    torch.manual_seed(0)
    b = ResNet(NetConfig(logits_weight=0.25)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x) * 0.25, b(x))


def test_flops_match_conv_arithmetic_and_leave_model_untouched():
    model = ResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # forward multiply-adds of each 3x3 conv: 9 * c_in * c_out * H * W; plus the linear layer
    convs = [(3, 64, 32), (64, 128, 32), (128, 128, 16), (128, 128, 16), (128, 256, 16),
             (256, 512, 8), (512, 512, 4), (512, 512, 4)]
    macs = sum(9 * ci * co * s * s for ci, co, s in convs) + 512 * 10
    assert count_flops(model) == 2 * macs
    assert count_flops(model, (4, 3, 32, 32)) == 8 * macs
    # backward roughly doubles the work (no input gradient for the first conv)
    assert 2.9 * 2 * macs < count_flops(model, backward=True) < 3.0 * 2 * macs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
