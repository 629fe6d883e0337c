"""The DenseNet zoo: the paper's parameter counts, torchvision's layout, memory-efficient mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from pipeline.models import spec
from pipeline.models.densenet import build
from pipeline.models.flops import count_macs, count_params, profile

# Table 2 of Huang et al. (2017), in millions, for 10 classes.
TABLE2 = {
    "densenet40_k12": 1.0,
    "densenet100_k12": 7.0,
    "densenet100_k24": 27.2,
    "densenet_bc100_k12": 0.8,
    "densenet_bc250_k24": 15.3,
    "densenet_bc190_k40": 25.6,
}


@pytest.mark.parametrize("name,millions", TABLE2.items())
def test_cifar_nets_have_the_papers_parameter_counts(name, millions):
    assert round(profile(spec.resolve(name))["params"] / 1e6, 1) == millions


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_imagenet_nets_match_torchvision_parameter_for_parameter(name):
    with torch.device("meta"):
        ours = build(spec.resolve(name))
        ref = getattr(torchvision.models, name)(weights=None)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert count_params(ours) == count_params(ref)


def test_densenet121_computes_what_torchvision_computes_with_the_same_weights():
    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None).eval()
    ours = build(spec.resolve("densenet121")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_densenet264_has_its_table1_layout():
    s = spec.resolve("densenet264")
    assert s.block_config == (6, 12, 64, 48) and s.growth_rate == 32
    assert round(s.complexity()["params"] / 1e6, 1) == 33.3


def test_densenet121_macs_at_224():
    # Conv + linear multiply-adds only; the often-quoted 2.87 G adds BN and ReLU elements.
    assert profile(spec.resolve("densenet121"))["macs"] == pytest.approx(2.834e9, rel=1e-3)


@pytest.mark.parametrize("name", spec.names())
def test_analytic_counts_equal_the_built_modules(name):
    s = spec.resolve(name, num_classes=37)
    assert s.complexity() == profile(s)


def test_macs_follow_the_input_size():
    small = spec.resolve("densenet121", input_size=112)
    with torch.device("meta"):
        model = build(small)
    assert count_macs(model, 112) == small.complexity()["macs"]
    # Conv MACs scale with the pixel count; only the classifier does not.
    assert small.complexity()["macs"] < spec.resolve("densenet121").complexity()["macs"] / 3.5


def test_cifar_layout_follows_the_paper():
    s = spec.resolve("densenet_bc100_k12")
    assert s.block_config == (16, 16, 16) and s.num_init_features == 24 and s.bottleneck
    plain = spec.resolve("densenet40_k12")
    assert plain.block_config == (12, 12, 12) and plain.num_init_features == 16
    net = build(s)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    transition = net.features.transition1
    assert [type(m).__name__ for m in transition] == ["BatchNorm2d", "ReLU", "Conv2d", "AvgPool2d"]
    # Compression 0.5 halves the channels: 24 + 16 * 12 = 216 -> 108.
    assert transition.conv.in_channels == 216 and transition.conv.out_channels == 108


@pytest.mark.parametrize("kwargs,rule", [
    (dict(name="densenet_bc100_k12", depth=101), "multiple of 6"),
    (dict(name="densenet40_k12", depth=41), "multiple of 3"),
    (dict(name="densenet121", depth=150), "Table 1"),
    (dict(name="densenet121", bottleneck=False), "bottleneck"),
    (dict(name="densenet40_k12", compression=1.5), "compression"),
    (dict(name="densenet40_k12", growth_rate=0), "growth rate"),
    (dict(name="densenet40_k12", drop_rate=1.0), "drop rate"),
    (dict(name="densenet_bc100_k12", input_size=2), "too small"),
])
def test_impossible_combinations_name_the_rule(kwargs, rule):
    with pytest.raises(spec.SpecError, match=rule):
        spec.resolve(**kwargs)


def test_unknown_model_lists_known_ones():
    with pytest.raises(spec.SpecError) as e:
        spec.resolve("densenet_bc99")
    assert "densenet121" in str(e.value) and "densenet_bc190_k40" in str(e.value)


def test_overrides_change_the_family_rule():
    # Turning the bottleneck off makes a BC net a plain DenseNet: layers per block follow L = 3n + 4.
    s = spec.resolve("densenet_bc100_k12", bottleneck=False, compression=1.0)
    assert s.family == "densenet" and s.block_config == (32, 32, 32)
    assert spec.resolve("densenet40_k12", depth=100).block_config == (32, 32, 32)


def _step(model, x, y, seed):
    torch.manual_seed(seed)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name,drop", [("densenet_bc100_k12", 0.2), ("densenet40_k12", 0.0)])
def test_memory_efficient_mode_gives_the_same_outputs_gradients_and_statistics(name, drop):
    torch.manual_seed(0)
    plain = build(spec.resolve(name, drop_rate=drop, depth=None))
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert torch.equal(_step(plain, x, y, 1), _step(efficient, x, y, 1))
    for (n, p), (_, q) in zip(plain.named_parameters(), efficient.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=n)
    # BatchNorm running statistics move once per step, not again in the recomputation.
    for (n, a), (_, b) in zip(plain.named_buffers(), efficient.named_buffers()):
        assert torch.equal(a, b), n


def test_memory_efficient_mode_checkpoints_in_training_only():
    net = build(spec.resolve("densenet_simple"), memory_efficient=True)
    calls = []
    layer = net.features.denseblock1.denselayer2
    original = layer._first

    def spy(*a, **kw):
        calls.append(kw.get("state") is not None)
        return original(*a, **kw)

    layer._first = spy
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, 32, 32))
    assert calls == [False]
    net.train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    # Forward, then the recomputation in backward.
    assert calls[1:] == [True, True]
