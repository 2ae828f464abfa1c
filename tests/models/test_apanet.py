"""APANet: the class-agnostic branch (Eq. 4-9) on top of PFENet, and its knobs."""

import pytest
import torch

import fss.models.methods.apanet as apanet_module
from fss.errors import ConfigError
from fss.models import create_model
from fss.models.methods.apanet import class_agnostic_target, grid_regions, query_regions

TINY = dict(pyramid_bins=[6, 3, 1.0], reduce_dim=16)


def episode_batch(batch=2, shots=1, size=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {
        "support_images": torch.randn(batch, shots, 3, size, size, generator=g),
        "support_masks": torch.randint(0, 2, (batch, shots, size, size), generator=g),
        "query_images": torch.randn(batch, 3, size, size, generator=g),
        "query_masks": torch.zeros(batch, size, size, dtype=torch.long),
    }
    out["query_masks"][:, 8:20, 8:20] = 1
    out["query_masks"][:, -4:] = 255
    return out


def apanet(**knobs):
    return create_model("apanet", backbone="small", shot=knobs.pop("shot", 1), **{**TINY, **knobs})


@pytest.mark.parametrize("shots", [1, 2])
def test_training_step_with_class_agnostic_branch(shots):
    torch.manual_seed(0)
    model = apanet(shot=shots).train()
    out = model(episode_batch(shots=shots))
    assert set(out.losses) == {"main", "aux", "class_agnostic", "loss"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    expected = 0.5 * out.losses["main"] + 0.5 * out.losses["class_agnostic"] + out.losses["aux"]
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    stale = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not stale, stale


@pytest.mark.parametrize(
    "knobs",
    [
        dict(assignment="b"),
        dict(assignment="c"),
        dict(fg_negative="query_background"),
        dict(fg_negative="support_background"),
        dict(prototype_generator="spp", spp_bins=2),
        dict(agnostic_prior="support"),
        dict(agnostic_prior="zero", n_clusters=5),
    ],
)
def test_every_variant_trains(knobs):
    torch.manual_seed(0)
    out = apanet(**knobs).train()(episode_batch())
    assert torch.isfinite(out.losses["class_agnostic"])
    out.loss.backward()


def test_class_agnostic_gradient_reaches_the_shared_comparison_module():
    """lam = 1: only the class-agnostic CE and the aux losses; the decoder (cls, res1, res2)
    then learns from the class-agnostic branch alone (shared g_phi, Eq. 8)."""
    torch.manual_seed(0)
    model = apanet(lam=1.0, aux_weight=0.0).train()
    out = model(episode_batch())
    assert torch.allclose(out.loss, out.losses["class_agnostic"])
    out.loss.backward()
    assert model.cls[3].weight.grad.abs().sum() > 0 and model.down_query[0].weight.grad.abs().sum() > 0


def test_lam_zero_and_n_clusters_zero_give_pfenet_loss():
    batch = episode_batch()
    pfenet = create_model("pfenet", backbone="small", **TINY).train()
    torch.manual_seed(1)
    reference = pfenet(batch).losses
    for knobs in (dict(n_clusters=0), dict(lam=0.0), dict(assignment="a")):
        model = apanet(**knobs).train()
        model.load_state_dict(pfenet.state_dict())
        torch.manual_seed(1)
        losses = model(batch).losses
        assert "class_agnostic" not in losses
        assert torch.equal(losses["loss"], reference["loss"]) and torch.equal(losses["main"], reference["main"])


def test_n_clusters_sets_the_number_of_prototypes_and_regions_exclude_foreground():
    batch = episode_batch()
    for n in (2, 4):
        model = apanet(n_clusters=n).eval()
        model.generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            feats = model.extract_features(batch["support_images"], batch["support_masks"], batch["query_images"])
            fg, ignore = query_regions(batch["query_masks"], feats.query.shape[-2:])
            prototypes, assign, regions = model.class_agnostic_prototypes(feats, fg, ignore)
        assert prototypes.shape == (2, n, 16) and regions.shape == (2, n, 5, 5)
        assert assign.max() < n
        assert (regions.sum(dim=1)[fg | ignore] == 0).all()  # Eq. 5
        assert torch.equal(regions.sum(dim=1).bool(), ~fg & ~ignore)  # a partition of the background


def test_expansion_pairs_background_with_its_cluster_and_foreground_with_one_prototype():
    batch = episode_batch()
    model = apanet(n_clusters=3).eval()
    with torch.no_grad():
        feats = model.extract_features(batch["support_images"], batch["support_masks"], batch["query_images"])
        fg, ignore = query_regions(batch["query_masks"], feats.query.shape[-2:])
        model.generator = torch.Generator().manual_seed(5)
        prototypes, assign, _ = model.class_agnostic_prototypes(feats, fg, ignore)
        model.generator = torch.Generator().manual_seed(5)
        expanded = model.expanded_prototypes(feats, fg, ignore)  # same clusters: same generator state
    assert expanded.shape == (2, 16, 5, 5)
    per_location = expanded.flatten(2).transpose(1, 2)  # B, N, D
    for b in range(2):
        background = ~fg[b].flatten()
        assert torch.allclose(per_location[b, background], prototypes[b, assign[b, background]])
        negatives = per_location[b, fg[b].flatten()]
        assert torch.allclose(negatives, negatives[:1].expand_as(negatives))  # ONE prototype (Fig. 5)
        assert any(torch.allclose(negatives[0], p) for p in prototypes[b])


def test_class_agnostic_target_is_one_minus_mask_with_ignore_kept():
    masks = torch.tensor([[[0, 1, 255]]])
    assert class_agnostic_target(masks).tolist() == [[[1, 0, 255]]]


def test_grid_regions_cover_an_a_by_a_grid():
    cells = grid_regions(4, 6, 2, "cpu").view(4, 6)
    assert cells.tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2


def test_inference_is_pfenet_and_never_clusters(monkeypatch):
    calls = []
    real = apanet_module.cosine_kmeans
    monkeypatch.setattr(apanet_module, "cosine_kmeans", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = episode_batch()
    model = apanet().train()
    model(batch)
    assert calls, "k-means runs in training"
    calls.clear()
    pfenet = create_model("pfenet", backbone="small", **TINY)
    pfenet.load_state_dict(model.state_dict())
    model.eval(), pfenet.eval()
    with torch.no_grad():
        ours = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
        base = pfenet.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert not calls
    assert torch.equal(ours, base)


def test_knob_validation():
    for bad in (dict(n_clusters=6), dict(lam=1.5), dict(assignment="e"), dict(fg_negative="x"),
                dict(prototype_generator="em"), dict(spp_bins=1), dict(kmeans_iters=0), dict(unknown=1)):
        with pytest.raises(ConfigError):
            apanet(**bad)
