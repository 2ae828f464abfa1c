"""CANet: frozen backbone, dense comparison, IOM iterations and training history knobs."""

from __future__ import annotations

import pytest
import torch

from fss.errors import ConfigError
from fss.models import create_model
from fss.models.blocks import CANET_MAP_EPS

from tests.models.episodes import random_episode

H = W = 33


def _episode(b=2, shot=1, seed=0, size=H):
    return random_episode(b, shot, seed, size)


def _model(seed=0, shot=1, **knobs):
    torch.manual_seed(seed)
    return create_model("canet", backbone="small", shot=shot, **knobs)


def _bn_stats(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_mean" in k}


@pytest.mark.parametrize("shot", [1, 5])
def test_train_step_gradients_reach_every_trainable_parameter(shot):
    model = _model(shot=shot).train()
    before = _bn_stats(model)
    out = model(_episode(shot=shot))
    assert set(out.losses) == {"seg", "loss"}
    assert out.logits.shape == (2, 2, H, W)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
    # frozen backbone runs with BatchNorm in eval mode: running statistics untouched
    assert not model.backbone.training
    for k, v in _bn_stats(model).items():
        torch.testing.assert_close(v, before[k])
    assert model.trainable_parameters() == list(trainable.values())


def test_backbone_bn_train_compat_flag_updates_running_stats():
    model = _model(backbone_bn_train=True).train()
    before = _bn_stats(model)
    model(_episode())
    assert model.backbone.training
    assert any(not torch.equal(v, before[k]) for k, v in _bn_stats(model).items())


def test_backbone_layer4_is_not_kept():
    model = _model()
    assert not any(k.startswith("backbone.layer4") for k in model.state_dict())


@pytest.mark.parametrize("shot", [1, 5])
def test_inference_shape_and_determinism(shot):
    model = _model().eval()
    batch = _episode(shot=shot)
    out = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert out.shape == (2, 2, H, W) and torch.isfinite(out).all()
    torch.testing.assert_close(model(batch), out)


def test_iom_iterations_change_inference_but_not_parameters():
    one, four = _model(seed=2, iom_iterations=1).eval(), _model(seed=2, iom_iterations=4).eval()
    assert list(one.state_dict()) == list(four.state_dict())
    batch = _episode()
    a, b = one(batch), four(batch)
    assert not torch.allclose(a, b)
    # 4 iterations = decoder fed back its own softmax 3 times
    with torch.no_grad():
        q, s = one.encode_episode(batch["support_images"], batch["support_masks"], batch["query_images"])
        compared = one.dense_comparison(q, one.support_prototype(s, batch["support_masks"]))
        logits = one.iom_decode(compared)
        for _ in range(3):
            logits = one.iom_decode(compared, logits.softmax(1))
    torch.testing.assert_close(b, torch.nn.functional.interpolate(logits, (H, W), mode="bilinear", align_corners=True))


def _count_decodes(model, monkeypatch):
    calls = []
    original = model.iom_decode

    def spy(feat, history=None):
        calls.append(history is None or float(history.abs().sum()) == 0.0)
        return original(feat, history)

    monkeypatch.setattr(model, "iom_decode", spy)
    return calls


@pytest.mark.parametrize(
    "knobs,expected",
    [
        ({"history_prob": 1.0}, [True, False]),  # one no-grad pass, then the graded pass with its softmax
        ({"history_prob": 1.0, "train_history_steps": 3}, [True, False, False, False]),
        ({"history_prob": 0.0}, [True]),
        ({"history_mode": "zeros", "history_prob": 1.0}, [True]),
    ],
)
def test_training_history_mask_knobs(monkeypatch, knobs, expected):
    model = _model(**knobs).train()
    calls = _count_decodes(model, monkeypatch)
    model(_episode())
    assert calls == expected  # True = empty history


def test_support_prototype_is_map_with_eps_at_feature_resolution():
    model = _model()
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 1, 2, 2)
    masks = torch.tensor([[1, 0], [255, 1]]).view(1, 1, 2, 2)  # 255 counts as background
    proto = model.support_prototype(feats, masks)
    torch.testing.assert_close(proto, torch.tensor([[5.0 / (2 + CANET_MAP_EPS)]]))
    two = model.support_prototype(torch.cat([feats, 2 * feats], 1), torch.cat([masks, masks], 1))
    torch.testing.assert_close(two, torch.tensor([[7.5 / (2 + CANET_MAP_EPS)]]))  # K-shot mean


def test_reusable_pieces_shapes():
    model = _model().eval()
    feat = model.extract_features(torch.randn(3, 3, H, W))
    assert feat.shape[:2] == (3, 256)
    compared = model.dense_comparison(feat, torch.randn(3, 256))
    assert compared.shape == feat.shape
    assert model.iom_decode(compared).shape == (3, 2, *feat.shape[-2:])
    hist = torch.rand(3, 2, 3, 3)  # any size: resized to the feature size
    assert model.iom_decode(compared, hist).shape == (3, 2, *feat.shape[-2:])


def test_bf16_autocast_inference():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _model().eval()(_episode())
    assert out.shape == (2, 2, H, W) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "knobs",
    [{"nope": 1}, {"iom_iterations": 0}, {"history_mode": "stored"}, {"history_prob": 1.5}, {"train_history_steps": 0}],
)
def test_bad_knobs_raise_config_error(knobs):
    with pytest.raises(ConfigError):
        create_model("canet", backbone="small", **knobs)


def test_unsupported_backbone_and_n_way_input():
    with pytest.raises(ConfigError):
        create_model("canet", backbone="vgg16")
    model = _model().eval()
    batch = _episode()
    with pytest.raises(ConfigError, match="1-way"):
        model.predict(batch["support_images"][:, None], batch["support_masks"][:, None], batch["query_images"])
