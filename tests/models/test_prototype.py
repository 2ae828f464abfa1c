"""prototype: the training-free floor (cosine to masked-average fg/bg prototypes), and train.fg_weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.errors import ConfigError
from fss.models import create_model
from fss.models.blocks import cross_entropy_ignore, masked_average_pool, resize_bilinear

S = 33


def _episode(b=2, shot=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, shot, S, S, dtype=torch.long)
    masks[..., 8:20, 10:24] = 1
    masks[..., :3, :] = 255  # padding band: neither foreground nor background
    return (torch.randn(b, shot, 3, S, S, generator=g), masks, torch.randn(b, 3, S, S, generator=g))


def test_no_learned_parameter_and_logits_are_scaled_cosines():
    torch.manual_seed(0)
    model = create_model("prototype", backbone="small", shot=1).eval()
    assert model.training_free and not model.trainable_parameters()
    si, sm, q = _episode()
    with torch.no_grad():
        logits = model.predict(si, sm, q)
        feats = model.encode(torch.cat([si.flatten(0, 1), q]))
        s, qf = feats[:2], feats[2:]
        fg = masked_average_pool(s, resize_bilinear((sm.flatten(0, 1) == 1).float().unsqueeze(1), s.shape[-2:]), 5e-4)
        bg = masked_average_pool(s, resize_bilinear((sm.flatten(0, 1) == 0).float().unsqueeze(1), s.shape[-2:]), 5e-4)
        want = torch.stack([F.cosine_similarity(qf, p[..., None, None], dim=1) for p in (bg, fg)], 1) * 10.0
    assert logits.shape == (2, 2, S, S)
    torch.testing.assert_close(logits, resize_bilinear(want, (S, S)))
    assert feats.shape[1] == model.backbone.stage_channels["layer2"] + model.backbone.stage_channels["layer3"]


def test_k_shots_average_the_per_shot_prototypes_and_layers_knob():
    torch.manual_seed(0)
    five = create_model("prototype", backbone="small", shot=5, layers=["layer3"]).eval()
    si, sm, q = _episode(b=1, shot=5)
    with torch.no_grad():
        same = five.predict(si[:, :1].expand(-1, 5, -1, -1, -1), sm[:, :1].expand(-1, 5, -1, -1), q)
        one = five.predict(si[:, :1], sm[:, :1], q)
    torch.testing.assert_close(same, one)
    assert five.encode(q).shape[1] == five.backbone.stage_channels["layer3"]
    with pytest.raises(ConfigError):
        create_model("prototype", backbone="small", layers=["layer9"])


def test_fg_weight_is_the_class_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 5, generator=g)
    target = torch.randint(0, 2, (2, 5, 5), generator=g)
    target[0, 0] = 255
    want = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0]), ignore_index=255)
    torch.testing.assert_close(cross_entropy_ignore(logits, target, fg_weight=3.0), want)
    plain = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(cross_entropy_ignore(logits, target), plain)
    three = torch.randn(2, 3, 5, 5, generator=g)  # N-way: every class > 0 is foreground
    target3 = torch.randint(0, 3, (2, 5, 5), generator=g)
    want3 = F.cross_entropy(three, target3, weight=torch.tensor([1.0, 3.0, 3.0]))
    torch.testing.assert_close(cross_entropy_ignore(three, target3, fg_weight=3.0), want3)
