"""Recipe pieces of the training step (in-process, no Ray): Mixup/CutMix targets, label
smoothing, gradient accumulation and clipping."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline import config as C
from pipeline.tracking import Tracker
from pipeline.train import mix
from pipeline.train.loop import build_parts, train_one_epoch


def _data(**kw):
    return C.DataSection(**kw)


def test_mixup_targets_are_soft_and_follow_the_images():
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    labels = torch.arange(6) % 3
    mixed, targets = mix.mix(images.clone(), labels, 3, _data(mixup=1.0))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert (targets.max(1).values < 1).any()
    # Each mixed image is lam * itself + (1 - lam) * its partner, and so is its target.
    own = mixed[:, 0, 0, 0]
    assert not torch.equal(own, images[:, 0, 0, 0])


def test_cutmix_keeps_the_area_share_it_reports_and_smoothing_is_in_the_targets():
    torch.manual_seed(3)
    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mix.mix(images.clone(), labels, 4, _data(cutmix=1.0), smoothing=0.1)
    for i in range(4):
        kept = (mixed[i, 0] == float(i)).float().mean().item()
        own = targets[i, i].item()
        # target share of its own class = kept x (1 - 0.1) + 0.1 / 4 (+ the partner's smoothing)
        assert own == pytest.approx(kept * 0.9 + 0.025, abs=1e-6) or kept == 1.0
    assert torch.allclose(targets.sum(1), torch.ones(4))
    plain = mix.soft_targets(labels, 4, 0.1)
    assert torch.allclose(plain[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))


def _one_epoch(accumulate: int, batches, **optim):
    cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {
        "optim.momentum": 0.0, "optim.nesterov": False, "optim.weight_decay": 0.0, "optim.lr": 0.1,
        "schedule.kind": "constant", "optim.batch_size": 64, "optim.accumulate": accumulate,
        "train.epochs": 1, "data.channels_last": False, "train.amp": "off", **optim}))
    spec = cfg.model_spec()
    assert not spec.drop_rate  # no dropout: the two runs see the same function
    parts = build_parts(cfg, spec, torch.device("cpu"), batches=len(batches))
    before = {k: v.detach().clone() for k, v in parts.model.named_parameters()}
    train_one_epoch(parts.model, parts, batches, cfg, 0, torch.device("cpu"), 1, lambda _l: None, Tracker())
    return {k: v.detach() - before[k] for k, v in parts.model.named_parameters()}


@pytest.mark.timeout(120)
def test_accumulating_2_x_32_steps_like_one_batch_of_64():
    torch.manual_seed(0)
    half = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    # The batch of 64 is the 32 twice, so BatchNorm sees the same statistics in both runs:
    # any difference left is the accumulation's.
    whole = [(torch.cat([half[0], half[0]]), torch.cat([half[1], half[1]]))]
    one = _one_epoch(1, whole)
    two = _one_epoch(2, [half, half])
    assert max(d.abs().max().item() for d in one.values()) > 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(120)
def test_clipping_bounds_the_step():
    torch.manual_seed(0)
    batch = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))]
    step = _one_epoch(1, batch, **{"optim.clip_grad_norm": 1e-3})
    norm = torch.sqrt(sum((d ** 2).sum() for d in step.values())).item()
    assert norm == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x the clipped norm


def test_ema_warms_up_then_averages_and_copies_integer_buffers():
    from pipeline.train.ema import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)  # step 0 of the warm-up: decay min(0.99, 1/10)
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 0.9))
    assert int(ema.module[1].num_batches_tracked) == 5
    for _ in range(2000):
        ema.update(model)
    assert ema.current_decay() == 0.99 and torch.allclose(ema.module[0].weight, torch.ones(1, 2))
    assert not ema.module[0].weight.requires_grad


def test_weights_ema_on_a_checkpoint_without_an_average_is_one_line():
    from pipeline.errors import UserError
    from pipeline.infer import pick_weights

    state = {"model": {"w": 1}}
    assert pick_weights(state) == ({"w": 1}, "raw")
    with pytest.raises(UserError, match="trained without --ema"):
        pick_weights(state, "ema")
    with_ema = {"model": {"w": 1}, "model_ema": {"weights": {"w": 2}}}
    assert pick_weights(with_ema) == ({"w": 2}, "ema") and pick_weights(with_ema, "raw")[1] == "raw"


def test_imagenet_fast_ramps_like_ffcv_imagenet_and_decays_linearly():
    from pipeline.config import load_recipe, validate
    from pipeline.data.loaders import ramp_resolution
    from pipeline.train.optim import lr_factor

    cfg = validate(load_recipe("imagenet-fast"))
    # ffcv-imagenet's rn50 ramp: epoch indices <= 65 at 160, >= 76 at 192, linear between and
    # rounded to 32 px; ours counts from 1.
    for index in range(cfg.train.epochs):
        want = 160 if index <= 65 else 192 if index >= 76 else int(round((160 + (index - 65) / 11 * 32) / 32)) * 32
        assert ramp_resolution(cfg.data, index + 1) == want, index
    assert cfg.data.eval_resolution == 256 and cfg.optim.label_smoothing == 0.1
    steps = 10
    factors = [lr_factor(i, steps, cfg) for i in range(cfg.train.epochs * steps)]
    peak = factors.index(max(factors))
    assert peak == 2 * steps - 1 and max(factors) == 1.0
    assert all(a < b for a, b in zip(factors[:peak], factors[1:peak + 1]))
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1:]))
    assert factors[-1] < 0.002


def test_progressive_resizing_rules_are_one_line():
    from pipeline.config import ConfigError, apply_overrides, load_recipe, validate
    from pipeline.errors import UserError
    from pipeline.runs import check_resizing

    smoke = load_recipe("smoke")
    for overrides, needle in (({"data.min_res": 160}, "both data.min_res and data.max_res"),
                              ({"data.min_res": 200, "data.max_res": 160}, "data.min_res must be in"),
                              ({"data.min_res": 160, "data.max_res": 192, "data.start_ramp": 5,
                                "data.end_ramp": 2}, "data.start_ramp (5)")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate(apply_overrides(smoke, overrides))
    check_resizing(160, "imagenet", "stores/x")
    check_resizing(0, "small", "stores/x")
    with pytest.raises(UserError, match="needs an imagenet-family store; stores/x is small-family"):
        check_resizing(160, "small", "stores/x")


def test_sync_bn_is_for_gpus_and_keeps_parameters_and_checkpoint_keys():
    from pipeline.config import ConfigError, apply_overrides, load_recipe, validate

    with pytest.raises(ConfigError, match=re.escape("train.sync_bn needs GPUs")):
        validate(apply_overrides(load_recipe("smoke"), {"train.sync_bn": True}))
    cfg = validate(apply_overrides(load_recipe("smoke"), {"train.sync_bn": True, "cluster.use_gpu": True}))
    from pipeline.models.densenet import build

    net = build(cfg.model_spec())
    params, keys = [id(p) for p in net.parameters()], list(net.state_dict())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert [id(p) for p in synced.parameters()] == params and list(synced.state_dict()) == keys
