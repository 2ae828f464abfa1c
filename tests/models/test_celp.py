"""CELP: LPS + contrastive enhancement on PFENet, K-shot voting, knobs, importer."""

import re
from pathlib import Path

import pytest
import torch

import fss.models.methods.celp as celp_module
from fss.errors import CheckpointError, ConfigError, DataError
from fss.models import create_model
from fss.models.methods.celp import CELP
from fss.models.methods.pfenet import COCO_BINS, PASCAL_BINS
from fss.models.checkpoints import import_checkpoint

#: key<TAB>shape<TAB>dtype listings of the released checkpoints (copies of spec/checkpoints)
SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_keys"
TINY = dict(pyramid_bins=[6, 3, 1.0], reduce_dim=16)


def episode_batch(batch=2, shots=1, size=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {
        "support_images": torch.randn(batch, shots, 3, size, size, generator=g),
        "support_masks": torch.randint(0, 2, (batch, shots, size, size), generator=g),
        "query_images": torch.randn(batch, 3, size, size, generator=g),
        "query_masks": torch.zeros(batch, size, size, dtype=torch.long),
        "query_base_masks": torch.zeros(batch, size, size, dtype=torch.long),
    }
    out["query_masks"][:, 8:20, 8:20] = 1
    out["query_base_masks"][:, 8:20, 8:20] = 1  # the target class ...
    out["query_base_masks"][:, 24:30, 2:8] = 1  # ... and another base class
    out["query_masks"][:, -2:] = 255
    out["query_base_masks"][:, -2:] = 255
    return out


def celp(**knobs):
    model = create_model("celp", backbone="small", shot=knobs.pop("shot", 1), **{**TINY, **knobs})
    model.generator = torch.Generator().manual_seed(0)
    return model


def test_single_shared_reduction():
    model = celp()
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert "down_feat" in names and "down_query" not in names and "down_supp" not in names


@pytest.mark.parametrize("shots", [1, 2])
def test_training_step_with_contrastive_enhancement(shots):
    torch.manual_seed(0)
    model = celp(shot=shots, delta=0.5, sigma=2).train()
    out = model(episode_batch(shots=shots))
    assert set(out.losses) == {"main", "aux", "contrast", "loss"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert torch.allclose(out.loss, out.losses["main"] + out.losses["aux"] + 0.1 * out.losses["contrast"])
    out.loss.backward()
    stale = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not stale, stale


def test_ce_weight_zero_removes_contrast_and_equals_pfenet_style_loss():
    torch.manual_seed(0)
    out = celp(ce_weight=0.0).train()(episode_batch())
    assert "contrast" not in out.losses
    assert torch.allclose(out.loss, out.losses["main"] + out.losses["aux"])
    weighted = celp(ce_weight=1.0, aux_weight=0.1).train()(episode_batch())  # literal Eq. 13 weights
    assert torch.allclose(weighted.loss, weighted.losses["main"] + 0.1 * weighted.losses["aux"] + weighted.losses["contrast"])


def test_pseudo_mask_marks_region_base_classes_and_ignore():
    batch = episode_batch()
    model = celp(delta=0.3, sigma=1).eval()
    with torch.no_grad():
        feats = model.extract_features(batch["support_images"], batch["support_masks"], batch["query_images"])
        latent, pseudo = model.latent_prototype_sampling(feats, batch["query_base_masks"])
    assert latent.shape == (2, 16) and pseudo.shape == (2, 33, 33)
    base = batch["query_base_masks"] == 1
    assert (pseudo[base] == 0).all()  # annotated base classes are background (Eq. 5-6)
    assert set(pseudo.unique().tolist()) <= {0, 1, 255}
    assert (pseudo == 1).any() and (pseudo == 255).any()


def test_delta_changes_the_pseudo_mask():
    batch = episode_batch()
    masks = {}
    for delta in (0.2, 0.95):
        model = celp(delta=delta, sigma=0, reference_diagonal_quirk=True).eval()
        with torch.no_grad():
            feats = model.extract_features(batch["support_images"], batch["support_masks"], batch["query_images"])
            masks[delta] = model.latent_prototype_sampling(feats, batch["query_base_masks"])[1]
    assert (masks[0.2] == 1).sum() > (masks[0.95] == 1).sum()


def test_missing_base_masks_is_a_clear_error():
    batch = episode_batch()
    del batch["query_base_masks"]
    with pytest.raises(DataError, match="query_base_masks"):
        celp().train()(batch)
    celp(ce_weight=0.0).train()(batch)  # not needed without the contrast branch


def test_inference_never_samples_latent_prototypes(monkeypatch):
    calls = []
    real = celp_module.latent_prototype_region
    monkeypatch.setattr(celp_module, "latent_prototype_region", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = episode_batch()
    model = celp().train()
    model(batch)
    assert calls
    calls.clear()
    model.eval()
    with torch.no_grad():
        logits = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert not calls and logits.shape == (2, 2, 33, 33)


def test_vote_counts_one_shot_passes():
    torch.manual_seed(0)
    batch = episode_batch(shots=3)
    avg = celp(shot=3).eval()
    votes = {}
    with torch.no_grad():
        singles = [
            avg.predict(batch["support_images"][:, k:k + 1], batch["support_masks"][:, k:k + 1], batch["query_images"]).argmax(1)
            for k in range(3)
        ]
        count = torch.stack(singles).sum(0)
        for v in (1, 2, 3):
            model = celp(shot=3, kshot_mode=f"vote-{v}").eval()
            model.load_state_dict(avg.state_dict())
            votes[v] = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
            assert torch.equal(votes[v].argmax(1), (count >= v).long())
    assert (votes[1].argmax(1) >= votes[3].argmax(1)).all()
    with pytest.raises(ConfigError, match="vote-3"):
        votes_model = celp(shot=1, kshot_mode="vote-3").eval()
        votes_model.predict(batch["support_images"][:, :1], batch["support_masks"][:, :1], batch["query_images"])


def test_knob_validation():
    for bad in (dict(delta=1.5), dict(sigma=-1), dict(ce_weight=-0.1), dict(kshot_mode="vote-0"),
                dict(kshot_mode="median"), dict(down_query=1)):
        with pytest.raises(ConfigError):
            celp(**bad)


# -- importer ------------------------------------------------------------------------------------


def _synthetic(listing, path, prefix="module."):
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in open(f"{SPEC}/{listing}"):
        key, shape, dtype = line.rstrip("\n").split("\t")
        shape = tuple(int(s) for s in re.findall(r"\d+", shape))
        if dtype == "int64":
            value = torch.tensor(1, dtype=torch.int64)
        elif key.endswith("running_var"):
            value = torch.ones(shape)
        elif len(shape) == 4:
            value = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        else:
            value = 0.5 * torch.rand(shape, generator=g)
        state[prefix + key] = value
    torch.save({"epoch": 200, "state_dict": state, "optimizer": {}}, path)
    return {k[len(prefix):]: v for k, v in state.items()}


@pytest.mark.slow
def test_import_celp_resnet50_loads_every_key_and_runs(tmp_path):
    path = tmp_path / "celp_r50.pth"
    state = _synthetic("celp_pfenet_resnet50.txt", path)
    model, report = import_checkpoint("celp", path, dataset="coco", kshot_mode="vote-1")
    assert isinstance(model, CELP) and model.kshot_mode == "vote-1"
    assert report["format"] == "celp" and report["backbone"] == "resnet50v2" and report["epoch"] == 200
    assert report["dataset"] == "coco" and report["knobs"] == {"pyramid_bins": COCO_BINS, "kshot_mode": "vote-1"}
    assert report["matched"] == len(state) == 364
    assert torch.equal(model.down_feat[0].weight, state["down_feat.0.weight"])
    assert torch.equal(model.backbone.conv1.weight, state["layer0.0.weight"])
    assert torch.equal(model.inner_cls[1][3].bias, state["inner_cls.1.3.bias"])
    model.eval()
    b = episode_batch(batch=1, size=33)
    with torch.no_grad():
        logits = model.predict(b["support_images"], b["support_masks"], b["query_images"])
    assert logits.shape == (1, 2, 33, 33) and torch.isfinite(logits).all()
    with pytest.raises(CheckpointError, match="looks like a CELP checkpoint"):
        import_checkpoint("pfenet", path)


def test_import_celp_as_its_scripts_save_it_unwrapped(tmp_path):
    """CELP's train/test scripts save the model without DataParallel: keys without ``module.``."""
    path = tmp_path / "celp_unwrapped.pth"
    state = _synthetic("celp_pfenet_resnet50.txt", path, prefix="")
    assert not any(k.startswith("module.") for k in torch.load(path)["state_dict"])
    model, report = import_checkpoint("celp", path, dataset="pascal")
    assert report["matched"] == len(state) == 364 and report["knobs"] == {"pyramid_bins": PASCAL_BINS}
    assert torch.equal(model.down_feat[0].weight, state["down_feat.0.weight"])
    assert model.pyramid_bins == tuple(PASCAL_BINS)
