"""PFENet: training/inference forwards, K-shot averaging, knobs, frozen backbone, importer."""

import re
from pathlib import Path

import pytest
import torch

from fss.errors import CheckpointError, ConfigError
from fss.models import create_model
from fss.models.blocks import resize_bilinear
from fss.models.checkpoints import IMPORT_REPORT_FIELDS, import_checkpoint
from fss.models.methods.pfenet import PFENet, bin_side, parse_pyramid_bins

#: key<TAB>shape<TAB>dtype listings of the released checkpoints (copies of spec/checkpoints)
SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_keys"
TINY = dict(pyramid_bins=[6, 3, 1.0], reduce_dim=16)


def episode_batch(batch=2, shots=1, size=(41, 41), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    out = {
        "support_images": torch.randn(batch, shots, 3, h, w, generator=g),
        "support_masks": torch.randint(0, 2, (batch, shots, h, w), generator=g),
        "query_images": torch.randn(batch, 3, h, w, generator=g),
        "query_masks": torch.randint(0, 2, (batch, h, w), generator=g),
    }
    out["support_masks"][:, :, :3] = 255
    out["query_masks"][:, -3:] = 255
    return out


def assert_trains(model, batch):
    model.train()
    out = model(batch)
    assert out.logits.shape == (batch["query_images"].shape[0], 2, *batch["query_images"].shape[-2:])
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    return out


@pytest.mark.parametrize("shots", [1, 5])
def test_training_step_reaches_every_trainable_parameter(shots):
    torch.manual_seed(0)
    model = create_model("pfenet", backbone="small", shot=shots, **TINY)
    out = assert_trains(model, episode_batch(shots=shots, size=(33, 33)))
    assert set(out.losses) == {"main", "aux", "loss"}
    assert torch.allclose(out.loss, out.losses["main"] + 1.0 * out.losses["aux"])


def test_inference_shape_non_square_and_eval_has_no_losses():
    model = create_model("pfenet", backbone="small", **TINY).eval()
    b = episode_batch(size=(33, 49))
    logits = model.predict(b["support_images"], b["support_masks"], b["query_images"])
    assert logits.shape == (2, 2, 33, 49)
    assert torch.equal(model(b), logits)


def test_backbone_frozen_and_kept_in_eval_mode():
    model = create_model("pfenet", backbone="small", **TINY).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.down_query.training
    before = model.backbone.layer1[1].running_mean.clone()
    model(episode_batch(size=(33, 33)))
    assert torch.equal(model.backbone.layer1[1].running_mean, before)

    compat = create_model("pfenet", backbone="small", backbone_bn_train=True, **TINY).train()
    assert compat.backbone.training
    before = compat.backbone.layer1[1].running_mean.clone()
    compat(episode_batch(size=(33, 33)))
    assert not torch.equal(compat.backbone.layer1[1].running_mean, before)  # the reference's behaviour


def test_kshot_averages_prototypes_and_priors():
    torch.manual_seed(0)
    model = create_model("pfenet", backbone="small", shot=2, **TINY).eval()
    b = episode_batch(shots=2, size=(33, 33))
    with torch.no_grad():
        both = model.extract_features(b["support_images"], b["support_masks"], b["query_images"])
        singles = [model.extract_features(b["support_images"][:, k:k + 1], b["support_masks"][:, k:k + 1], b["query_images"]) for k in range(2)]
        assert torch.allclose(both.prototype, (singles[0].prototype + singles[1].prototype) / 2, atol=1e-5)
        assert torch.allclose(both.prior, (singles[0].prior + singles[1].prior) / 2, atol=1e-6)
        assert both.prior.min() >= 0 and both.prior.max() <= 1
        low, _ = model.fem_decode(both.query, both.prototype, both.prior)
        expected = resize_bilinear(low, (33, 33))
        assert torch.allclose(model.predict(b["support_images"], b["support_masks"], b["query_images"]), expected, atol=1e-5)


def test_support_ignore_counts_as_background():
    model = create_model("pfenet", backbone="small", **TINY).eval()
    b = episode_batch(size=(33, 33))
    masks255 = b["support_masks"].clone()
    masks0 = torch.where(masks255 == 255, torch.zeros_like(masks255), masks255)
    with torch.no_grad():
        a = model.predict(b["support_images"], masks255, b["query_images"])
        c = model.predict(b["support_images"], masks0, b["query_images"])
    assert torch.equal(a, c)


def test_fem_decode_accepts_a_per_location_prototype_map():
    model = create_model("pfenet", backbone="small", **TINY).eval()
    query, proto, prior = torch.randn(2, 16, 5, 5), torch.randn(2, 16), torch.rand(2, 1, 5, 5)
    with torch.no_grad():
        tiled, aux = model.fem_decode(query, proto, prior)
        mapped, _ = model.fem_decode(query, proto[..., None, None].expand(-1, -1, 5, 5), prior)
    assert torch.allclose(tiled, mapped, atol=1e-5)
    assert [a.shape[-1] for a in aux] == [6, 3, 5]  # absolute 6 and 3, fraction 1.0 of side 5


def test_fem_decode_many_is_fem_decode_per_pair():
    """APANet's and CELP's batched second pass through g_phi gives each pair's own result."""
    model = create_model("pfenet", backbone="small", **TINY).eval()
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 16, 5, 5, generator=g)
    pairs = [
        (torch.randn(2, 16, generator=g), torch.rand(2, 1, 5, 5, generator=g)),
        (torch.randn(2, 16, 5, 5, generator=g), torch.rand(2, 1, 5, 5, generator=g)),
        (torch.randn(2, 16, generator=g), torch.rand(2, 1, 5, 5, generator=g)),
    ]
    with torch.no_grad():
        together = model.fem_decode_many(query, pairs)
        alone = [model.fem_decode(query, proto, prior) for proto, prior in pairs]
    assert len(together) == 3
    for (logits, aux), (ref_logits, ref_aux) in zip(together, alone):
        assert logits.shape == ref_logits.shape == (2, 2, 5, 5)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        assert len(aux) == len(ref_aux) == 3
        for a, r in zip(aux, ref_aux):
            assert torch.allclose(a, r, atol=1e-5)


def test_pyramid_bins_absolute_and_fractions():
    assert parse_pyramid_bins([60, 30, 15, 8]) == (60, 30, 15, 8)
    assert parse_pyramid_bins("coco") == (1.0, 0.5, 0.25, 0.125)
    assert [bin_side(b, 60) for b in parse_pyramid_bins("coco")] == [60, 30, 15, 7]  # int() as the reference
    assert bin_side(0.125, 5) == 1
    for bad in ([1.5], [0], []):
        with pytest.raises(ConfigError):
            parse_pyramid_bins(bad)
    with pytest.raises(ConfigError):
        create_model("pfenet", backbone="small", pyramid_bins=[60, 2.5])


def test_knob_validation():
    with pytest.raises(ConfigError):
        create_model("pfenet", backbone="small", no_such_knob=1)
    with pytest.raises(ConfigError):
        create_model("pfenet", backbone="small", aux_weight=-1)
    with pytest.raises(ConfigError):
        create_model("pfenet", backbone="vgg16")
    model = create_model("pfenet", backbone="small", aux_weight=0.25, **TINY)
    out = model.train()(episode_batch(size=(33, 33)))
    assert torch.allclose(out.loss, out.losses["main"] + 0.25 * out.losses["aux"])


def test_bf16_autocast_inference():
    model = create_model("pfenet", backbone="small", **TINY).eval()
    b = episode_batch(size=(33, 33))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.predict(b["support_images"], b["support_masks"], b["query_images"])
    assert logits.shape == (2, 2, 33, 33) and torch.isfinite(logits.float()).all()


# -- importer ------------------------------------------------------------------------------------


def synthetic_reference_checkpoint(listing: str, path, prefix="module.", container=True, seed=0, zeros=False):
    """A file in the reference's format built from a ``key<TAB>shape<TAB>dtype`` listing.

    Conv weights ~ N(0, 1/fan_in), BN weight 0.5, running var 1: activations stay finite
    (``zeros``: every tensor zero, for files that are only read for their keys).
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for line in open(f"{SPEC}/{listing}"):
        key, shape, dtype = line.rstrip("\n").split("\t")
        shape = tuple(int(s) for s in re.findall(r"\d+", shape))
        if dtype == "int64":
            value = torch.tensor(3, dtype=torch.int64)
        elif zeros:
            value = torch.zeros(shape)
        elif key.endswith("running_var"):
            value = torch.ones(shape)
        elif len(shape) == 4:
            value = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif key.endswith("weight") and "running" not in key:
            value = torch.full(shape, 0.5)
        else:
            value = 0.01 * torch.randn(shape, generator=g)
        state[prefix + key] = value
    torch.save({"epoch": 50, "state_dict": state, "optimizer": {}} if container else state, path)
    return {k[len(prefix):]: v for k, v in state.items()}


@pytest.mark.slow
def test_import_pfenet_resnet50_loads_every_key_and_runs(tmp_path):
    path = tmp_path / "pfenet_r50.pth"
    state = synthetic_reference_checkpoint("pfenet_resnet50.txt", path)
    model, report = import_checkpoint("pfenet", path, pyramid_bins="coco")
    assert isinstance(model, PFENet)
    assert report["format"] == "pfenet" and report["backbone"] == "resnet50v2" and report["epoch"] == 50
    assert report["matched"] == len(model.state_dict()) == len(state) == 365
    assert torch.equal(model.backbone.conv2.weight, state["layer0.3.weight"])
    assert torch.equal(model.backbone.bn3.running_mean, state["layer0.7.running_mean"])
    assert torch.equal(model.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    assert torch.equal(model.down_supp[0].weight, state["down_supp.0.weight"])
    assert torch.equal(model.alpha_conv[2][0].weight, state["alpha_conv.2.0.weight"])
    assert torch.equal(model.cls[3].bias, state["cls.3.bias"])
    model.eval()
    b = episode_batch(batch=1, size=(65, 65))
    with torch.no_grad():
        logits = model.predict(b["support_images"], b["support_masks"], b["query_images"])
    assert logits.shape == (1, 2, 65, 65) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_import_pfenet_vgg16bn_needs_the_dataset_for_its_bins(tmp_path):
    path = tmp_path / "pfenet_vgg.pth"
    state = synthetic_reference_checkpoint("pfenet_vgg16bn.txt", path)
    with pytest.raises(ConfigError, match="--dataset pascal or coco") as err:  # no silent PASCAL default
        import_checkpoint("pfenet", path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    model, report = import_checkpoint("pfenet", path, dataset="pascal", shot=5)
    assert tuple(report) == IMPORT_REPORT_FIELDS
    assert report["dataset"] == "pascal" and report["knobs"] == {"pyramid_bins": [60, 30, 15, 8]}
    assert report["backbone"] == "vgg16bn" and report["matched"] == len(state) == 126
    assert model.pyramid_bins == (60, 30, 15, 8) and model.shot == 5
    assert torch.equal(model.backbone.features[7].weight, state["layer1.0.weight"])
    assert torch.equal(model.backbone.features[35].running_var, state["layer4.1.running_var"])
    assert model.down_query[0].weight.shape == (256, 768, 1, 1)


@pytest.mark.slow
def test_import_pfenet_resnet101(tmp_path):
    path = tmp_path / "pfenet_r101.pth"
    state = synthetic_reference_checkpoint("pfenet_resnet101.txt", path)
    model, report = import_checkpoint("pfenet", path, dataset="pascal")
    assert report["backbone"] == "resnet101v2" and report["matched"] == len(state) == 671
    assert torch.equal(model.backbone.layer3[22].bn3.weight, state["layer3.22.bn3.weight"])


@pytest.mark.slow
def test_import_refuses_other_formats(tmp_path):
    cases = {
        "celp_pfenet_resnet50.txt": "CELP",
        "panet_vgg16.txt": "PANet",
        "resnet50_v2_backbone.txt": "plain ResNet backbone",
        "vgg16_bn_backbone.txt": "plain VGG backbone",
    }
    for listing, looks_like in cases.items():
        path = tmp_path / listing.replace(".txt", ".pth")
        plain_backbone = "backbone" in listing  # plain state dicts; PANet's is plain with "module."
        container, prefix = listing.startswith("celp"), "" if plain_backbone else "module."
        synthetic_reference_checkpoint(listing, path, prefix, container=container, zeros=True)
        with pytest.raises(CheckpointError) as err:
            import_checkpoint("pfenet", path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and looks_like in message


@pytest.mark.slow
def test_import_refuses_missing_and_mismatched_keys(tmp_path):
    path = tmp_path / "broken.pth"
    state = synthetic_reference_checkpoint("pfenet_resnet50.txt", path)
    blob = torch.load(path)
    del blob["state_dict"]["module.res1.0.weight"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="missing"):
        import_checkpoint("pfenet", path, pyramid_bins="coco")
    assert state  # the listing produced a full file before the key was removed
    with pytest.raises(CheckpointError):
        import_checkpoint("pfenet", tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="4 pyramid bins"):
        import_checkpoint("pfenet", path, pyramid_bins=[1.0, 0.5])
