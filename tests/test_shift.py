from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from layerwise.shift import measure_bn_shift


def _norm(means, variances) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(means)).eval()
    bn.running_mean.copy_(torch.tensor(means))
    bn.running_var.copy_(torch.tensor(variances))
    return bn


@settings(deadline=None, max_examples=30)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0.01, 10), st.floats(-5, 5)), min_size=1, max_size=4))
def test_shift_is_the_mean_distance_in_running_standard_deviations(channels):
    ref_means, ref_vars, data_means = zip(*channels)
    assume(any(m != 0 or v != 1 for m, v in zip(ref_means, ref_vars)))  # else: untrained, no shift
    bn = _norm(ref_means, ref_vars)
    # per channel, values symmetric around the data mean: its mean is exactly data_mean
    noise = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(1, 1, 2, 2)
    x = torch.tensor(data_means, dtype=torch.float32).view(1, -1, 1, 1) + noise
    with measure_bn_shift(bn) as meter:
        bn(x[:, :, :1])  # two batches of different sizes: counts add up
        bn(x[:, :, 1:])
    expected = sum(abs(d - m) / (v + bn.eps) ** 0.5 for m, v, d in channels) / len(channels)
    assert meter.value() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_the_average_is_over_layers_and_the_model_is_left_as_it_was():
    model = nn.Sequential(_norm([0.5], [1.0]), nn.Conv2d(1, 1, 1, bias=False), _norm([0.0], [4.0])).eval()
    nn.init.constant_(model[1].weight, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.full((2, 1, 3, 3), 2.0)  # layer 1: |2 - 0.5| / 1 = 1.5; layer 2 sees 3 * 1.5: |4.5 - 0| / 2 = 2.25
    with measure_bn_shift(model) as meter:
        model(x)
    assert meter.value() == pytest.approx((1.5 + 2.25) / 2, rel=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed on exit
    model(x)  # and no longer counting
    assert meter.count == [18, 18]


def test_channels_last_gives_the_same_shift():
    bn = _norm([0.5, -1.0, 2.0], [1.0, 2.0, 0.5])
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    values = []
    for inp in (x, x.to(memory_format=torch.channels_last)):
        with measure_bn_shift(bn) as meter:
            bn(inp)
        values.append(meter.value())
    # float32 sums per image run in memory order: equal to rounding, not bit for bit
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 2, 2])),  # no BatchNorm
    nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(),  # never trained: --weights none
])
def test_no_pretrained_statistics_means_no_shift(model):
    with measure_bn_shift(model) as meter:
        model(torch.randn(2, 3, 2, 2))
    assert meter.value() is None


CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"


@pytest.mark.skipif(not CIFAR.is_dir(), reason="the shared cifar10-mini is absent")
def test_on_real_pretrained_weights_the_shift_separates_photos_from_digits_and_moves_auto():
    """Lite0's ImageNet BatchNorm statistics: upscaled grayscale digits sit farther from them
    than colour photos (the suite measured 0.42 against 0.25 at 112 px), and the shift alone
    sends auto to full fine-tuning on batch statistics for the digits only."""
    from layerwise.config import RunConfig
    from layerwise.engine import prepare
    from layerwise.evidence import ProbeInputs, run_probe
    from layerwise.loaders import with_eval_transform
    from layerwise.resolve import Evidence, resolve

    shifts, choices = {}, {}
    for name, data in (("photos", str(CIFAR)), ("digits", None)):
        cfg = RunConfig(data=data, img_size=112, batch_size=32, epochs=2, workers=0, quiet=True, precision="fp32",
                        channels_last=False, strategy="auto")
        p = prepare(cfg)
        loaded = p.model.loaded
        probe_data = ProbeInputs(with_eval_transform(p.loaders.train.dataset, 112, loaded.mean, loaded.std),
                                 p.loaders.val.dataset, 32, 0, 0)
        res, _ = run_probe(loaded.model, p.model.groups, probe_data, p.device, p.amp, channels_last=False,
                           quiet=True, max_images=300)
        shifts[name] = res.bn_shift
        choices[name] = resolve(cfg, p.model.facts, Evidence(probe_skill=0.5, bn_shift=res.bn_shift)).strategy.name
    assert shifts["digits"] > shifts["photos"] + 0.05
    assert choices == {"photos": "auto:discriminative", "digits": "auto:full"}
