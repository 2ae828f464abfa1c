"""bf16 autocast for every method, fp32 islands, and train.channels_last."""

from __future__ import annotations

import pytest
import torch

from fss.errors import ConfigError
from fss.models.registry import create_model, get_method, list_methods
from pipeline.bench import synthetic_episodes
from fss.layout import channels_last_batch, channels_last_images

CPU = torch.device("cpu")


def tiny_model(method: str, seed: int = 0):
    torch.manual_seed(seed)  # narrow heads: the registry's small knob values
    return create_model(method, backbone="small", shot=1, **get_method(method).small_knobs)


def _train_losses(model, batch, bf16: bool):
    torch.manual_seed(1)  # same dropout masks and sampling in both precisions
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
    if not model.training_free:  # prototype: nothing to back-propagate into
        out.losses["loss"].backward()
    return out


@pytest.mark.parametrize("method", list_methods())
def test_bf16_training_step_and_inference_of_every_method(method):
    model = tiny_model(method)
    batch = synthetic_episodes(2, 1, 33, CPU, seed=0)
    reference = {k: float(v.detach()) for k, v in _train_losses(model, batch, bf16=False).losses.items()}
    out = _train_losses(model, batch, bf16=True)
    for name, value in out.losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        # bf16 arithmetic moves a loss of a fresh model by well under 5%
        assert float(value.detach()) == pytest.approx(reference[name], rel=0.05, abs=0.02), name
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert (grads or model.training_free) and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights
    assert batch["support_masks"].dtype == torch.long and batch["query_masks"].dtype == torch.long
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert logits.shape == (2, 2, 33, 33) and torch.isfinite(logits.float()).all()


def test_apanet_class_agnostic_prior_is_float32_under_autocast():
    """Eq. 8-9 of APANet: min-max normalised cosine computed in fp32 even under bf16."""
    from fss.models.blocks import prototype_cosine_prior

    model = tiny_model("apanet")
    g = torch.Generator().manual_seed(0)
    query = torch.relu(torch.randn(2, 16, 9, 9, generator=g) + 0.5).bfloat16()
    expanded = query.float().mean(dim=(2, 3), keepdim=True).expand_as(query).bfloat16()

    class Feats:  # the only fields class_agnostic_prior reads
        pass

    feats = Feats()
    feats.query, feats.prior = query, torch.zeros(2, 1, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prior = model.class_agnostic_prior(feats, expanded)
    assert prior.dtype == torch.float32
    assert torch.equal(prior, prototype_cosine_prior(query.float(), expanded.float()))


def test_celp_latent_prior_is_float32_under_autocast(monkeypatch):
    import fss.models.methods.celp as celp_module

    seen = []
    original = celp_module.prototype_cosine_prior

    def spy(feat, prototype, *args, **kwargs):
        seen.append((feat.dtype, prototype.dtype, torch.is_autocast_enabled("cpu")))
        return original(feat, prototype, *args, **kwargs)

    monkeypatch.setattr(celp_module, "prototype_cosine_prior", spy)
    model = tiny_model("celp")
    batch = synthetic_episodes(2, 1, 33, CPU, seed=0)
    out = _train_losses(model, batch, bf16=True)
    assert torch.isfinite(out.losses["contrast"])
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen)


@pytest.mark.parametrize("method", list_methods())
def test_channels_last_gives_the_same_logits(method):
    model = tiny_model(method).eval()
    batch = synthetic_episodes(2, 1, 33, CPU, seed=3)
    with torch.no_grad():
        expected = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
        model.to(memory_format=torch.channels_last)
        cl = channels_last_batch(batch)
        assert cl["query_images"].is_contiguous(memory_format=torch.channels_last)
        assert cl["support_images"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
        assert cl["support_masks"] is batch["support_masks"]
        got = model.predict(cl["support_images"], cl["support_masks"], cl["query_images"])
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_channels_last_images_keeps_values_and_shapes():
    x = torch.randn(2, 3, 3, 7, 5)
    y = channels_last_images(x)
    assert torch.equal(x, y) and y.shape == x.shape
    assert y.stride()[-3] == 1  # channels innermost
    z = channels_last_images(x[:, 0])
    assert torch.equal(z, x[:, 0]) and z.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_config_key():
    from pipeline.config import OPERATIONAL_KEYS, build_section, describe_sections

    assert build_section("train", {}).channels_last is False
    assert build_section("train", {"channels_last": "true"}).channels_last is True
    assert describe_sections()["train"]["channels_last"]["default"] is False
    with pytest.raises(ConfigError, match="train.channels_last"):
        build_section("train", {"channels_last": "maybe"})
    assert "train.channels_last" in OPERATIONAL_KEYS  # memory layout: how fast, not what


@pytest.mark.slow
def test_training_and_evaluation_with_bf16_and_channels_last(bench_synthetic_root, tmp_path):
    """A tiny bf16 + channels_last run trains, validates and evaluates with finite results,
    and channels_last does not change the fp32 evaluation metrics."""
    from fss.models.checkpoints import load_model_file
    from pipeline.config import REPO_PARAMS, resolve_run_config
    from fss.evaluation import EvalSettings, evaluate_model, validation_protocol
    from pipeline.train import train_run
    from pipeline.train_data import open_split

    sets = {
        "data.root": str(bench_synthetic_root), "data.train_size": 33, "train.batch_size": 2,
        "train.log_every": 1, "train.checkpoint_minutes": 0, "validation.every": 2, "validation.episodes": 4,
        "test.size": 33, "test.batch_size": 2, "knobs.reduce_dim": 16, "train.precision": "bf16",
        "train.channels_last": True,
    }
    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=3, device="cpu",
                                set_values=[f"{k}={v}" for k, v in sets.items()], params_path=REPO_PARAMS)
    assert config.train.channels_last and config.train.precision == "bf16"
    said: list[str] = []
    summary = train_run(config, tmp_path / "run", say=said.append)["summary"]
    assert summary["iterations"] == 3 and summary["best_val_miou"] is not None
    from pipeline.config import cpu_has_bf16

    warned = any("without bf16 instructions" in m for m in said)
    assert warned == (cpu_has_bf16() is False)
    model, _ = load_model_file(tmp_path / "run" / "model.pt")
    data = open_split(config, "val")
    protocol = validation_protocol(config)
    plain = evaluate_model(model, data, protocol, EvalSettings(batch_size=2))
    channels_last = evaluate_model(model, data, protocol, EvalSettings(batch_size=2, channels_last=True))
    assert channels_last["miou"] == pytest.approx(plain["miou"], abs=1e-6)
    assert channels_last["fb_iou"] == pytest.approx(plain["fb_iou"], abs=1e-6)


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned(monkeypatch):
    import pipeline.config as C

    assert C.cpu_has_bf16() in (True, False, None)
    monkeypatch.setattr(C, "cpu_has_bf16", lambda: False)
    message = C.bf16_cpu_warning("bf16", CPU)
    assert message is not None and "\n" not in message and "train.precision=fp32" in message
    assert C.bf16_cpu_warning("fp32", CPU) is None
    assert C.bf16_cpu_warning("bf16", torch.device("cuda")) is None  # GPUs have bf16 units
    monkeypatch.setattr(C, "cpu_has_bf16", lambda: True)
    assert C.bf16_cpu_warning("bf16", CPU) is None
