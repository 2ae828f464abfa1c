"""SimPropNet: FBAF equations, DPr / FBAF / ICA switches, K-shot probe averaging."""

from __future__ import annotations

import math

import pytest
import torch

from fss.errors import ConfigError
from fss.models import create_model
from fss.models.blocks import CANET_MAP_EPS
from fss.models.methods.simpropnet import FBAFusion, fg_bg_attention, pairwise_normalise, similarity_attention

from tests.models.episodes import random_episode

H = W = 33


def _episode(b=2, shot=1, seed=0, size=H):
    return random_episode(b, shot, seed, size)


def _model(seed=0, shot=1, **knobs):
    torch.manual_seed(seed)
    return create_model("simpropnet", backbone="small", shot=shot, **knobs)


# --------------------------------------------------------------------------- FBAF equations
def test_similarity_attention_and_pairwise_normalisation():
    feat = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)  # (1,0) (0,1) (1,1)
    c = similarity_attention(feat, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(c, torch.tensor([[[[1.0, 0.5, (1 + 1 / math.sqrt(2)) / 2]]]]))
    c_neg = similarity_attention(feat, torch.tensor([[-2.0, 0.0]]))
    torch.testing.assert_close(c_neg, torch.tensor([[[[0.0, 0.5, (1 - 1 / math.sqrt(2)) / 2]]]]))
    a, b = pairwise_normalise(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.5, 0.5, 0.6]))
    torch.testing.assert_close(a, torch.tensor([2 / 3, 0.5, 0.25]))
    torch.testing.assert_close(b, torch.tensor([1 / 3, 0.5, 0.75]))
    att = fg_bg_attention(feat, torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]]))
    torch.testing.assert_close(att[:, 0], torch.tensor([[[1.0, 0.5, (1 + 1 / math.sqrt(2)) / 2]]]))
    torch.testing.assert_close(att.sum(1), torch.ones(1, 1, 3))


def test_fusion_eq3_shapes_and_instance_norm():
    fusion = FBAFusion(channels=8)
    out = fusion(torch.randn(2, 8, 5, 5), torch.randn(2, 8), torch.rand(2, 2, 5, 5))
    assert out.shape == (2, 16, 5, 5)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(2, 3), unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
    assert fusion.conv2.in_channels == 16 + 2  # G1 (+) A_f (+) A_b


@pytest.mark.parametrize("zpool", ["map", "gap"])
def test_probes_eq1_and_kshot_average_eq4(zpool):
    model = _model(zpool=zpool)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 1, 2, 2)
    masks = torch.tensor([[1, 0], [255, 1]]).view(1, 1, 2, 2)
    z_fg, z_bg = model.probes(feats, masks)
    if zpool == "map":
        torch.testing.assert_close(z_fg, torch.tensor([[5.0 / (2 + CANET_MAP_EPS)]]))
        torch.testing.assert_close(z_bg, torch.tensor([[5.0 / (2 + CANET_MAP_EPS)]]))
    else:  # Eq. 1 literally: average over all h*w locations
        torch.testing.assert_close(z_fg, torch.tensor([[5.0 / 4]]))
        torch.testing.assert_close(z_bg, torch.tensor([[5.0 / 4]]))
    masks2 = torch.tensor([[1, 1], [1, 0]]).view(1, 1, 2, 2)
    both = model.probes(torch.cat([feats, feats], 1), torch.cat([masks, masks2], 1))
    single2 = model.probes(feats, masks2)
    torch.testing.assert_close(both[0], (z_fg + single2[0]) / 2)
    torch.testing.assert_close(both[1], (z_bg + single2[1]) / 2)


# --------------------------------------------------------------------------- switches
CONFIGS = [  # (knobs, shot): Table 4 rows at 1 shot, the full model at 5 shots
    ({}, 1),
    ({}, 5),
    ({"dpr": False}, 1),
    ({"fbaf": False}, 1),
    ({"dpr": False, "fbaf": False, "ica": False}, 1),
]


@pytest.mark.parametrize("knobs,shot", CONFIGS)
def test_train_step_gradients_reach_every_trainable_parameter(knobs, shot):
    model = _model(shot=shot, **knobs).train()
    out = model(_episode(shot=shot))
    expected = {"seg", "loss"} | ({"dpr"} if knobs.get("dpr", True) else set())
    assert set(out.losses) == expected
    assert all(torch.isfinite(v) for v in out.losses.values())
    torch.testing.assert_close(out.losses["loss"], sum(v for k, v in out.losses.items() if k != "loss"))
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.") for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_fbaf_switch_changes_the_parameter_set():
    with_fbaf = set(dict(_model().named_parameters()))
    without = set(dict(_model(fbaf=False).named_parameters()))
    torch.manual_seed(0)
    canet = set(dict(create_model("canet", backbone="small").named_parameters()))
    assert without == canet  # fbaf off = CANet's dense comparison + IOM
    assert any(n.startswith("fusion.") for n in with_fbaf)
    assert not any(n.startswith(("dense_compare.", "iom_blocks.")) for n in with_fbaf)
    assert _model().head.branches[0][0].in_channels == 512  # decoder reads the fused 2C feature


def test_inference_shape_and_training_branches_not_run(monkeypatch):
    model = _model()
    calls = []
    for name in ("dual_prediction_loss", "channel_average"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    batch = _episode(shot=5)
    model.eval()
    out = model(batch)
    assert out.shape == (2, 2, H, W) and torch.isfinite(out).all()
    torch.testing.assert_close(out, model.predict(batch["support_images"], batch["support_masks"], batch["query_images"]))
    model.train()
    model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert calls == []
    model(batch)
    assert sorted(calls) == ["channel_average", "dual_prediction_loss"]


def test_dpr_loss_is_ce_of_the_support_predicted_from_itself():
    model = _model().eval()  # dropout off: deterministic
    batch = _episode()
    masks = batch["support_masks"]
    with torch.no_grad():
        _, support_feats = model.encode_episode(batch["support_images"], masks, batch["query_images"])
        loss = model.dual_prediction_loss(support_feats, masks)
        z_fg, z_bg = model.probes(support_feats, masks)
        logits = model.fuse_and_decode(support_feats[:, 0], z_fg, z_bg)
        logits = torch.nn.functional.interpolate(logits, (H, W), mode="bilinear", align_corners=True)
        expected = torch.nn.functional.cross_entropy(logits, masks[:, 0], ignore_index=255)
    torch.testing.assert_close(loss, expected)


def test_ica_probability_schedule_and_channel_average():
    model = _model(ica_p0=1.0, ica_decay=2.0)
    assert model.ica_probability() == 1.0
    images = torch.randn(4, 3, 5, 5)
    gray = model.channel_average(images)
    torch.testing.assert_close(gray, images.mean(1, keepdim=True).expand_as(images))
    model.set_train_progress(0.5)
    assert model.ica_probability() == pytest.approx(math.exp(-1.0))
    model.set_train_progress(2.0)  # clamped
    assert model.ica_probability() == pytest.approx(math.exp(-2.0))
    off = _model(ica_p0=0.0)
    assert torch.equal(off.channel_average(images), images)
    default = _model()
    assert default.ica_probability() == 0.25


def test_ica_switch_changes_training_computation():
    batch = _episode()
    on, off = _model(seed=4, ica_p0=1.0).train(), _model(seed=4, ica=False, ica_p0=1.0).train()
    torch.manual_seed(9)
    a = on(batch).losses["seg"]
    torch.manual_seed(9)
    b = off(batch).losses["seg"]
    assert not torch.allclose(a, b)
    assert list(on.state_dict()) == list(off.state_dict())  # ICA has no parameters


def test_iom_iterations_only_matter_without_fbaf():
    batch = _episode()
    a, b = _model(seed=1, iom_iterations=1).eval()(batch), _model(seed=1, iom_iterations=3).eval()(batch)
    torch.testing.assert_close(a, b)
    c, d = _model(seed=1, fbaf=False, iom_iterations=1).eval()(batch), _model(seed=1, fbaf=False, iom_iterations=3).eval()(batch)
    assert not torch.allclose(c, d)


def test_bf16_autocast_inference():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _model().eval()(_episode())
    assert out.shape == (2, 2, H, W) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "knobs",
    [{"nope": 1}, {"ica_p0": 1.5}, {"ica_decay": -1.0}, {"zpool": "max"}, {"dpr": "perhaps"}, {"iom_iterations": 0}],
)
def test_bad_knobs_raise_config_error(knobs):
    with pytest.raises(ConfigError):
        create_model("simpropnet", backbone="small", **knobs)
