"""DPNet on both bases: CCM, discriminator, PIM, MSF, losses, knobs, multi-scale inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.errors import ConfigError
from fss.models import create_model, get_method
from fss.models.backbones import build_backbone
from fss.models.methods.dpnet import (
    DPNet,
    PrototypeInteraction,
    cycle_candidates,
    labels_at,
    stage_with_pre_relu,
)

METHODS = ["dpnet_canet", "dpnet_pfenet"]
SIZE = 33


def _episode(b=2, shot=1, seed=0, size=SIZE, same=True):
    """Episode whose first support is the query image itself (plus other random supports),
    so the cycle comparison finds candidates; masks hold 0, 1 and 255."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, 3, size, size, generator=g)
    supports = torch.randn(b, shot, 3, size, size, generator=g)
    query_masks = torch.zeros(b, size, size, dtype=torch.long)
    query_masks[:, 8:28, 10:30] = 1
    query_masks[:, -3:, :] = 255
    support_masks = torch.zeros(b, shot, size, size, dtype=torch.long)
    support_masks[..., 5:25, 12:32] = 1
    support_masks[..., :2, :] = 255
    if same:
        supports[:, 0] = query
        support_masks[:, 0] = query_masks
    return {
        "support_images": supports,
        "support_masks": support_masks,
        "query_images": query,
        "query_masks": query_masks,
    }


def _model(name="dpnet_canet", seed=0, shot=1, **knobs):
    torch.manual_seed(seed)
    return create_model(name, backbone="small", shot=shot, **knobs)


def _infer(model, batch):
    return model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])


# ---------------------------------------------------------------------------- CCM


def _hand_built_ccm():
    """Support row of 4 locations (fg, fg, bg, bg), query row of 3, 2-d features.

    s0=[1,0] -> q0=[1,.1] -> back to s0 (fg): q0 passes the cycle.
    s1=[0,1] -> q1=[.1,1] -> back to s3=[.1,1] (bg, identical to q1): q1 fails.
    q2=[-1,0] is nobody's match from the foreground (only s2, bg, points at it).
    """
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.1, 1.0]]).T  # C=2, 4 locations
    query = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]]).T
    support_pre = support.reshape(1, 1, 2, 1, 4)
    support_fg = torch.tensor([[True, True, False, False]]).reshape(1, 1, 1, 4)
    query_pre = query.reshape(1, 2, 1, 3)
    return support_pre, support_fg, query_pre


def test_cycle_comparison_keeps_only_cycle_consistent_locations():
    support_pre, support_fg, query_pre = _hand_built_ccm()
    ccm = cycle_candidates(support_pre, support_fg, query_pre, cycle=True)
    cosine = cycle_candidates(support_pre, support_fg, query_pre, cycle=False)
    assert ccm.shape == (1, 1, 1, 3)
    assert ccm.flatten().tolist() == [True, False, False]
    assert cosine.flatten().tolist() == [True, True, False]
    # no support foreground -> no candidates at all
    assert not cycle_candidates(support_pre, torch.zeros_like(support_fg), query_pre).any()


def test_cycle_comparison_batches_shots_independently():
    support_pre, support_fg, query_pre = _hand_built_ccm()
    # shot 2: only s1 is foreground and s3 is foreground too -> q1 passes, q0 is never hit
    fg2 = torch.tensor([[False, True, False, True]]).reshape(1, 1, 1, 4)
    out = cycle_candidates(
        support_pre.expand(2, 2, -1, -1, -1),
        torch.cat([support_fg, fg2], dim=1).expand(2, -1, -1, -1),
        query_pre.expand(2, -1, -1, -1),
    )
    assert out.shape == (2, 2, 1, 3)
    assert out[:, 0].flatten(1).tolist() == [[True, False, False]] * 2
    assert out[:, 1].flatten(1).tolist() == [[False, True, False]] * 2


def test_labels_at_feature_resolution_samples_align_corners_positions():
    mask = torch.arange(321 * 321).view(1, 321, 321)
    out = labels_at(mask, (41, 41))
    assert out.shape == (1, 41, 41)
    assert torch.equal(out, mask[:, ::8, ::8])
    assert labels_at(torch.full((2, 9, 9), 255), (3, 3)).eq(255).all()


@pytest.mark.parametrize("backbone", ["small", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_stage_with_pre_relu_splits_the_last_relu_of_block3(backbone):
    net = build_backbone(backbone).eval()
    with torch.no_grad():
        x = net.layer2(net.layer1(net.layer0(torch.randn(1, 3, 33, 33))))
        reference = net.layer3(x.clone())
        out, pre = stage_with_pre_relu(net.layer3, x)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(F.relu(pre), reference)
    assert (pre < 0).any()  # negative parts kept for the cycle comparison


# ---------------------------------------------------------------------------- discriminator


def _threshold_model(**knobs):
    """Discriminator with hidden width 1 whose logit is relu(channel 0 of the location)."""
    model = _model(dis_hidden=1, **knobs).eval()
    with torch.no_grad():
        d = model.discriminator
        d.fc1.weight.zero_()
        d.fc1.weight[0, 0] = 1.0
        d.fc1.bias.zero_()
        d.fc2.weight.fill_(1.0)
        d.fc2.bias.zero_()
    channels = model.feature_channels
    query = torch.zeros(1, channels, 1, 3)
    query[0, 0] = torch.tensor([0.0, 1.0, 2.0])  # sigmoid = 0.5, 0.731, 0.881
    query[0, 1] = torch.tensor([3.0, 5.0, 7.0])
    pre = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).view(1, 2, 1, 3)  # 3 distinct directions
    enc = {
        "query": query,
        "query_pre": pre,
        "support_pre": pre[:, None],  # support == query: every location passes the cycle
        "support_fg": torch.ones(1, 1, 1, 3, dtype=torch.bool),
        "prototypes": torch.full((1, 1, channels), -1.0),
    }
    return model, enc


def test_discriminator_keeps_locations_above_beta():
    model, enc = _threshold_model()
    query, prototype = enc["query"].flatten(2)[0], enc["prototypes"][0, 0]
    cases = {0.0: [0, 1, 2], 0.5: [1, 2], 0.6: [1, 2], 0.8: [2], 0.45: [0, 1, 2]}
    for beta, kept in cases.items():
        pseudo, loss = model.pseudo_prototypes(enc, beta)
        assert loss is None  # no query label at inference
        torch.testing.assert_close(pseudo[0, 0], query[:, kept].mean(dim=1))
    # nothing above beta -> P_q = P
    pseudo, _ = model.pseudo_prototypes(enc, 0.9)
    torch.testing.assert_close(pseudo[0, 0], prototype)


def test_discriminator_loss_is_bce_on_kept_candidates():
    model, enc = _threshold_model()
    labels = torch.tensor([[0, 1, 255]])  # at feature size 1x3 (sampled as is)
    query_masks = labels.view(1, 1, 3)
    _, loss = model.pseudo_prototypes(enc, 0.6, query_masks)  # kept: locations 1, 2; 2 ignored
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(torch.tensor(1.0), torch.tensor(1.0)))
    _, loss = model.pseudo_prototypes(enc, 0.45, query_masks)  # kept 0, 1
    expected = (F.softplus(torch.tensor(0.0)) + F.softplus(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(loss, expected)
    _, loss = model.pseudo_prototypes(enc, 0.9, query_masks)  # nothing kept -> 0
    assert loss.item() == 0.0
    wide, _ = _threshold_model(dis_loss_set="candidates")
    _, loss = wide.pseudo_prototypes(enc, 0.9, query_masks)  # all candidates: 0 and 1
    torch.testing.assert_close(loss, expected)


def test_pseudo_prototype_options():
    model, enc = _threshold_model()
    query = enc["query"]
    for mode, expected in [("none", enc["prototypes"]), ("global", query.mean(dim=(2, 3))[:, None])]:
        model.pseudo_mode = mode
        pseudo, loss = model.pseudo_prototypes(enc, 0.5)
        assert loss is None
        torch.testing.assert_close(pseudo, expected)
    # cosine without the cycle keeps more than ccm on the hand-built example
    support_pre, support_fg, query_pre = _hand_built_ccm()
    enc.update(support_pre=support_pre, support_fg=support_fg, query_pre=query_pre)
    results = {}
    for mode in ("ccm", "cosine"):
        model.pseudo_mode = mode
        results[mode], _ = model.pseudo_prototypes(enc, 0.0)
    flat = query.flatten(2)[0]
    torch.testing.assert_close(results["ccm"][0, 0], flat[:, 0])
    torch.testing.assert_close(results["cosine"][0, 0], flat[:, :2].mean(dim=1))
    # only the candidate-based modes build a discriminator
    for mode, has in [("none", False), ("global", False), ("cosine", True), ("ccm", True)]:
        assert (_model(pseudo_prototype=mode).discriminator is not None) == has


# ---------------------------------------------------------------------------- PIM


def test_pim_shapes_zscore_and_alpha():
    torch.manual_seed(0)
    pim = PrototypeInteraction(8, 4, alpha_init=0.0)
    p, q, f = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8, 5, 6)
    w = pim.weights(p, q)
    assert w.shape == (2, 8) and ((w > 0) & (w < 1)).all()
    # z-score normalisation: W is unchanged by an affine change of the 1x1 conv's output
    x = pim.merge(torch.cat([p, q], 1)[..., None, None]).flatten(1)
    z = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(w, torch.sigmoid(pim.fc2(F.relu(pim.fc1(z)))), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        pim.merge.weight.mul_(3.0)
        pim.merge.bias.mul_(3.0)
    torch.testing.assert_close(pim.weights(p, q), w, atol=1e-5, rtol=1e-5)
    out = pim(p, q, f)  # alpha = 0: identity
    for a, b in zip(out, (p, q, f)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        pim.alpha.fill_(0.5)
    p2, q2, f2 = pim(p, q, f)
    scale = 1 + 0.5 * w
    torch.testing.assert_close(p2, p * scale)
    torch.testing.assert_close(q2, q * scale)
    torch.testing.assert_close(f2, f * scale[..., None, None])
    assert pim.alpha.requires_grad


# ---------------------------------------------------------------------------- whole model


@pytest.mark.slow
@pytest.mark.parametrize("name,shot", [("dpnet_canet", 1), ("dpnet_pfenet", 1), ("dpnet_canet", 5), ("dpnet_pfenet", 5)])
def test_train_step_gradients_reach_every_trainable_parameter(name, shot):
    model = _model(name, shot=shot, beta_train=0.0).train()
    with torch.no_grad():
        model.pim.alpha.fill_(0.5)  # alpha starts at 0, which would zero PIM's gradients
    out = model(_episode(shot=shot))
    assert set(out.losses) == {"seg", "aux", "dis", "loss"}
    assert out.logits.shape == (2, 2, SIZE, SIZE)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["dis"].item() > 0
    torch.testing.assert_close(out.loss, out.losses["seg"] + out.losses["aux"] + out.losses["dis"])
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
    assert not model.backbone.training
    assert not any(k.startswith("backbone.layer4") for k in model.state_dict())


@pytest.mark.parametrize("name", METHODS)
def test_inference_shape_and_eval_forward(name):
    model = _model(name).eval()
    batch = _episode(shot=2, same=False)
    out = _infer(model, batch)
    assert out.shape == (2, 2, SIZE, SIZE) and torch.isfinite(out).all()
    torch.testing.assert_close(model(batch), out)


def test_both_registrations_share_one_network():
    canet, pfenet = get_method("dpnet_canet"), get_method("dpnet_pfenet")
    assert (canet.base, pfenet.base) == ("canet", "pfenet")
    assert canet.describe()["knobs"] == pfenet.describe()["knobs"]
    a, b = _model("dpnet_canet").eval(), _model("dpnet_pfenet").eval()
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    batch = _episode(b=1)
    torch.testing.assert_close(_infer(a, batch), _infer(b, batch))
    assert (a.method_name, b.method_name) == ("dpnet_canet", "dpnet_pfenet")


def test_k_shot_averages_prototype_pairs():
    model = _model().eval()
    one = _episode(b=1)
    two = dict(one, support_images=one["support_images"].repeat(1, 2, 1, 1, 1),
               support_masks=one["support_masks"].repeat(1, 2, 1, 1))
    torch.testing.assert_close(_infer(model, two), _infer(model, one), atol=1e-5, rtol=1e-4)
    enc = model.encode_episode(two["support_images"], two["support_masks"], two["query_images"])
    assert enc["prototypes"].shape == (1, 2, model.feature_channels)


def _twin(knobs_a, knobs_b, name="dpnet_canet"):
    a = _model(name, **knobs_a)
    b = _model(name, **knobs_b)
    b.load_state_dict(a.state_dict())
    return a, b


def _train_losses(model, batch, seed=1):
    torch.manual_seed(seed)  # dropout
    return {k: v.detach() for k, v in model.train()(batch).losses.items()}


def _distinct_pseudo_prototype(model, batch):
    """The episode gives kept locations whose mean differs from P (so P_q matters)."""
    enc = model.encode_episode(batch["support_images"], batch["support_masks"], batch["query_images"])
    pseudo, _ = model.pseudo_prototypes(enc, 0.0)
    return (pseudo - enc["prototypes"]).abs().max() > 1e-3


def test_beta_test_changes_inference_only():
    a, b = _twin({"beta_test": 0.0}, {"beta_test": 0.99})
    batch = _episode(b=1, same=False)
    la, lb = _train_losses(a, batch), _train_losses(b, batch)
    for k in la:
        torch.testing.assert_close(la[k], lb[k])
    a.eval(), b.eval()
    assert _distinct_pseudo_prototype(a, batch)
    assert not torch.allclose(_infer(a, batch), _infer(b, batch))
    # beta_train changes training
    c, d = _twin({"beta_train": 0.0}, {"beta_train": 0.99})
    assert not torch.allclose(_train_losses(c, batch)["seg"], _train_losses(d, batch)["seg"])


def test_loss_weights_lambda1_lambda2():
    a, b = _twin({}, {"lambda2": 0.0, "lambda1": 0.5})
    batch = _episode(b=1)
    la, lb = _train_losses(a, batch), _train_losses(b, batch)
    torch.testing.assert_close(la["loss"], la["seg"] + la["aux"] + la["dis"])
    assert lb["dis"].item() > 0  # still computed, for logging
    torch.testing.assert_close(lb["loss"], lb["seg"] + 0.5 * lb["aux"])
    no_aux = _model(lambda1=0.0)
    assert no_aux.aux_decoder is None
    losses = _train_losses(no_aux, batch)
    assert losses["aux"].item() == 0.0
    torch.testing.assert_close(losses["loss"], losses["seg"] + losses["dis"])


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_component_switches_change_parameters_and_computation():
    full = _trainable_names(_model())
    assert any(n.startswith("discriminator.") for n in full)
    assert any(n.startswith("pim.") for n in full)
    assert any(n.startswith("msf_prototype.fuse.2.") for n in full)
    no_ccm = _model(ccm=False)
    assert no_ccm.pseudo_mode == "none" and no_ccm.discriminator is None
    assert _trainable_names(no_ccm) == {n for n in full if not n.startswith("discriminator.")}
    assert _trainable_names(_model(pim=False)) == {n for n in full if not n.startswith("pim.")}
    no_msf = _model(msf=False)
    assert len(no_msf.msf_prototype.fuse) == 1 and len(no_msf.msf_pseudo.fuse) == 1
    shared = _model(msf_shared=True)
    assert shared.msf_pseudo is shared.msf_prototype
    assert not any(n.startswith("msf_pseudo.") for n in _trainable_names(shared))
    assert _trainable_names(_model(discriminator=False)) == {n for n in full if not n.startswith("discriminator.")}
    # same weights, different computation
    batch = _episode(b=1, same=False)
    base = _model().eval()
    assert _distinct_pseudo_prototype(base, batch)
    # (cosine vs ccm differ only where the cycle rejects a match: see test_pseudo_prototype_options)
    for knobs in ({"ccm": False}, {"pseudo_prototype": "global"}):
        other = _model(**knobs).eval()
        other.load_state_dict(base.state_dict(), strict=False)
        assert not torch.allclose(_infer(other, batch), _infer(base, batch)), knobs
    with torch.no_grad():
        base.pim.alpha.fill_(1.0)
    no_pim = _model(pim=False).eval()
    no_pim.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(_infer(no_pim, batch), _infer(base, batch))


def test_multiscale_changes_inference_only():
    a, b = _twin({}, {"multiscale": True})
    batch = _episode(b=1)
    la, lb = _train_losses(a, batch), _train_losses(b, batch)
    torch.testing.assert_close(la["loss"], lb["loss"])
    a.eval(), b.eval()
    single, multi = _infer(a, batch), _infer(b, batch)
    assert multi.shape == single.shape == (1, 2, SIZE, SIZE)
    assert not torch.allclose(multi.softmax(1), single.softmax(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(multi.exp().sum(1), torch.ones(1, SIZE, SIZE))
    # one scale of 1.0 = the single-scale probabilities
    c = _model(multiscale=True, multiscale_scales=[1.0]).eval()
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(_infer(c, batch), single.log_softmax(1), atol=1e-5, rtol=1e-5)


def test_training_only_branches_are_not_run_at_inference(monkeypatch):
    model = _model().eval()
    calls = {"aux": 0, "main": 0, "dis_loss": 0}
    model.aux_decoder.register_forward_hook(lambda *a: calls.__setitem__("aux", calls["aux"] + 1))
    model.decoder.register_forward_hook(lambda *a: calls.__setitem__("main", calls["main"] + 1))
    original = DPNet.discriminator_loss

    def counting(*args, **kwargs):
        calls["dis_loss"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(DPNet, "discriminator_loss", staticmethod(counting))
    batch = _episode(b=1)
    _infer(model, batch)
    assert calls == {"aux": 0, "main": 1, "dis_loss": 0}
    model.train()(batch)
    assert calls == {"aux": 1, "main": 2, "dis_loss": 1}
    # Table 3's "without CCM" measurement: the auxiliary branch at inference
    aux = _model(infer_branch="aux").eval()
    aux.load_state_dict(model.state_dict())
    aux.decoder.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("main decoder ran")))
    assert _infer(aux, batch).shape == (1, 2, SIZE, SIZE)


def test_bf16_autocast_training_step():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_episode(b=1, size=33))
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize(
    "knobs",
    [
        {"beta_test": 1.5},
        {"beta_train": -0.1},
        {"lambda1": -1.0},
        {"pseudo_prototype": "random"},
        {"dis_loss_set": "all"},
        {"infer_branch": "side"},
        {"multiscale_scales": []},
        {"multiscale_scales": [0.0, 1.0]},
        {"ccm": False, "pseudo_prototype": "global"},
        {"infer_branch": "aux", "lambda1": 0.0},
        {"gamma": 1.0},
        {"multiscale": "maybe"},
    ],
)
def test_bad_knobs_raise_config_error(knobs):
    with pytest.raises(ConfigError) as err:
        create_model("dpnet_pfenet", backbone="small", **knobs)
    assert "\n" not in str(err.value)


def test_unsupported_backbone_raises_config_error():
    with pytest.raises(ConfigError):
        create_model("dpnet_canet", backbone="vgg16")


def test_discriminator_loss_is_per_episode_mean_then_batch_mean():
    """Eq. 10: 1/K over each episode's K kept locations, then the mean over the batch (not one
    mean over every location of the batch, which weights episodes by how many they keep)."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).view(2, 1, 1, 2)
    selected = torch.tensor([[True, False], [True, True]]).view(2, 1, 1, 2)
    masks = torch.tensor([[1, 0], [0, 1]]).view(2, 1, 2)
    terms = F.binary_cross_entropy_with_logits(logits.flatten(), torch.tensor([1.0, 0.0, 0.0, 1.0]),
                                               reduction="none")
    expected = (terms[0] + (terms[2] + terms[3]) / 2) / 2
    torch.testing.assert_close(DPNet.discriminator_loss(logits, selected, masks), expected)
    assert DPNet.discriminator_loss(logits, torch.zeros_like(selected), masks).item() == 0.0


def test_fg_weight_changes_the_segmentation_terms_only():
    torch.manual_seed(0)
    plain = _model().train().forward_train(_episode()).losses
    torch.manual_seed(0)
    model = _model(fg_weight=3.0).train()  # train.fg_weight: a constructor argument
    weighted = model.forward_train(_episode()).losses
    assert not torch.isclose(plain["seg"], weighted["seg"])
    torch.testing.assert_close(plain["dis"], weighted["dis"])
