from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from layerwise.augment import PRESETS, eval_transform, mix_batch


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_give_normalised_tensors_of_the_size(name):
    img = Image.new("RGB", (50, 40), (120, 30, 200))
    x = PRESETS[name](32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.01 and x.max() <= 1.01 or name == "aggressive"  # erasing writes noise


def test_aggressive_is_the_tutorials_list():
    t = PRESETS["aggressive"](224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    kinds = [type(m) for m in t.transforms]
    assert kinds[:5] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomRotation, v2.ColorJitter,
                         v2.RandomAffine]
    assert t.transforms[0].scale == (0.7, 1.0) and t.transforms[-1].p == 0.2
    assert isinstance(t.transforms[-1], v2.RandomErasing)


def test_eval_transform_is_deterministic():
    img = Image.effect_noise((60, 45), 40).convert("RGB")
    t = eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(t(img), t(img))


def test_mixup_gives_soft_targets():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    mixed, t = mix_batch(x, y, 3, mixup=0.4, cutmix=0.0)
    assert t.shape == (4, 3) and torch.allclose(t.sum(-1), torch.ones(4))
    # soft: a one-hot target would pass the lines above; MixUp blends each sample with another's
    # (samples whose partner has the same class keep a one-hot target; the others cannot)
    assert bool((t.max(-1).values < 1).any()) and not torch.equal(mixed, x)
    assert mix_batch(x, y, 3, mixup=0, cutmix=0)[1] is y


def test_cutmix_pastes_a_box_of_another_image_and_mixes_by_its_area():
    torch.manual_seed(1)
    x = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])  # image i is all i
    y = torch.arange(4) % 3
    mixed, t = mix_batch(x, y, 3, mixup=0.0, cutmix=1.0)
    for i in range(4):
        own = (mixed[i] == float(i)).float().mean().item()  # the fraction of the image still its own
        assert 0 < own < 1  # a box from another image was pasted in
        partner = int(mixed[i][mixed[i] != float(i)][0].item())
        if y[partner] != y[i]:  # the target follows the areas (same-class partners stay one-hot)
            assert t[i, y[i]].item() == pytest.approx(own, abs=1e-5)


@pytest.mark.parametrize("name,op", [("randaugment", v2.RandAugment), ("trivialaugment", v2.TrivialAugmentWide)])
def test_auto_augment_presets_hold_their_policy_and_change_the_image(name, op):
    tf = PRESETS[name](32, (0.5,) * 3, (0.5,) * 3)
    assert any(isinstance(t, op) for t in tf.transforms)
    img = Image.new("RGB", (40, 40))
    img.putdata([((7 * i) % 256, (3 * i) % 256, (11 * i) % 256) for i in range(1600)])
    plain = PRESETS["light"](32, (0.5,) * 3, (0.5,) * 3)
    changed = 0
    for seed in range(8):  # the same crop and flip, with and without the policy
        torch.manual_seed(seed)
        a = tf(img)
        torch.manual_seed(seed)
        b = plain(img)
        changed += not torch.allclose(a, b)
    assert a.shape == (3, 32, 32) and changed >= 4  # most draws apply a visible operation
