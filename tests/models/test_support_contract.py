"""The support contract: every registered method's prediction depends on its support.

A bug that zeroed every support mask, or fed every episode the same support, leaves a
trained model's score unchanged on a benchmark where the heads segment the query's
salient objects (the "other support" column of the results table). This file catches such
a break without any training: for an untrained model (seed 0, small backbone, 33 px, narrow
heads), in eval mode,

* changing the support mask (foreground and background swapped, same image) changes the
  logits, and so does changing the support image (same mask);
* in train mode, the gradient of the query's cross-entropy (and of the method's total loss)
  reaches the support rows of the frozen backbone features (``FSSModel.frozen_features``,
  the one boundary between the frozen backbone and the trained head).

"Changes" is measured against the change a different query image makes (the ratio is free
of the logits' scale, which at init is mostly the classifier's bias): the support's effect
must be at least ``MIN_RATIO`` of the query's. Untrained, the smallest ratio over the
registry is 0.34 (SimPropNet; gradients 0.25); a cut support path gives exactly 0 (the arithmetic is
deterministic). The negative tests check that the helpers catch two broken support paths
(a wrapper zeroing the masks, one feeding a constant support) for every method.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.models import create_model, get_method, list_methods
from fss.models.base import FSSModel

METHODS = list_methods()
#: narrow heads where a method has these knobs, as in test_contract.py
SMALL_KNOBS = {"reduce_dim": 16, "channels": 16, "pyramid_bins": [6, 3, 1.0]}
SIZE, BATCH = 33, 2
#: the support's effect on the logits, at least this fraction of a new query's
MIN_RATIO = 0.05
#: support-feature gradient norm, at least this fraction of the query-feature gradient norm
MIN_GRAD_RATIO = 0.01
COLOUR_A, COLOUR_B = (1.5, -1.0, 0.5), (-1.5, 1.0, -0.5)


def build(method: str) -> FSSModel:
    knobs = {k: v for k, v in SMALL_KNOBS.items() if k in get_method(method).knobs}
    torch.manual_seed(0)
    return create_model(method, backbone="small", shot=1, **knobs)


def episode(seed: int, colour) -> dict:
    """Noise images with an object: a coloured square, the support's labelled 1 (255 strip on
    top), the query's shifted; noise alone makes every masked average nearly the same vector."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(colour).view(1, 3, 1, 1)
    support = torch.randn(BATCH, 1, 3, SIZE, SIZE, generator=g) * 0.5
    support[:, :, :, 8:22, 6:20] += c.unsqueeze(1)
    masks = torch.zeros(BATCH, 1, SIZE, SIZE, dtype=torch.long)
    masks[..., 8:22, 6:20] = 1
    masks[..., :3, :] = 255
    query = torch.randn(BATCH, 3, SIZE, SIZE, generator=g) * 0.5
    query[:, :, 12:26, 10:24] += c
    query_masks = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
    query_masks[:, 12:26, 10:24] = 1
    return {
        "support_images": support, "support_masks": masks, "query_images": query,
        "query_masks": query_masks, "query_base_masks": query_masks.clone(),
        "class_ids": torch.arange(1, BATCH + 1),
    }


def swapped(masks: torch.Tensor) -> torch.Tensor:
    """Foreground and background exchanged, 255 kept."""
    return torch.where(masks == 1, 0, torch.where(masks == 0, 1, masks))


def support_effect(model: FSSModel) -> dict[str, float]:
    """Mean |change of the logits| from a new support mask / support image, over that from a
    new query image (eval mode, no gradients)."""
    a, b = episode(0, COLOUR_A), episode(1, COLOUR_B)
    model.eval()
    with torch.no_grad():
        base = model.predict(a["support_images"], a["support_masks"], a["query_images"])
        new_mask = model.predict(a["support_images"], swapped(a["support_masks"]), a["query_images"])
        new_image = model.predict(b["support_images"], a["support_masks"], a["query_images"])
        new_query = model.predict(a["support_images"], a["support_masks"], b["query_images"])
    query_change = (new_query - base).abs().mean()
    assert query_change > 0, "the logits do not depend on the query image at all"
    return {"mask": float((new_mask - base).abs().mean() / query_change),
            "image": float((new_image - base).abs().mean() / query_change)}


def assert_uses_support(model: FSSModel) -> None:
    effect = support_effect(model)
    assert effect["mask"] >= MIN_RATIO, f"the support mask barely moves the logits: {effect}"
    assert effect["image"] >= MIN_RATIO, f"the support image barely moves the logits: {effect}"


def _rows_in(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: row n of ``images`` equals one of ``targets``' rows."""
    flat, ref = images.flatten(1), targets.flatten(1).to(images.dtype)
    return torch.tensor([bool((row == ref).all(dim=1).any()) for row in flat], dtype=torch.bool)


def feature_gradients(model: FSSModel, batch: dict, term: str) -> tuple[float, float]:
    """Norms of d(term)/d(frozen features) on the support rows and on the query rows.

    Every ``frozen_features`` call of every FSSModel inside ``model`` is wrapped so that its
    outputs keep their gradient (leaves when computed without gradients); rows are told apart
    by comparing the backbone's input images with the batch's. ``term``: ``"query_ce"``
    (plain CE of the query's logits, ignore 255: the support reaches it only through the
    query's prediction) or ``"loss"`` (the method's total loss)."""
    recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    support = batch["support_images"].flatten(0, -4)

    def wrap(original):
        def frozen_features(tag, compute, *key_inputs):
            outs = []
            for out in original(tag, compute, *key_inputs):
                if out.requires_grad:
                    out.retain_grad()
                else:
                    out = out.detach().requires_grad_(True)
                is_support = _rows_in(key_inputs[0], support)
                is_query = _rows_in(key_inputs[0], batch["query_images"])
                recorded.append((out, is_support, is_query))
                outs.append(out)
            return tuple(outs)
        return frozen_features

    inner = [m for m in model.modules() if isinstance(m, FSSModel)]
    for m in inner:
        m.frozen_features = wrap(m.frozen_features)
    try:
        torch.manual_seed(0)
        out = model.train()(batch)
        value = F.cross_entropy(out.logits.float(), batch["query_masks"], ignore_index=255) \
            if term == "query_ce" else out.loss
        value.backward()
    finally:
        for m in inner:
            del m.frozen_features
    support_sq = query_sq = 0.0
    for out, is_support, is_query in recorded:
        if out.grad is not None:
            support_sq += float(out.grad[is_support].pow(2).sum())
            query_sq += float(out.grad[is_query].pow(2).sum())
    return support_sq ** 0.5, query_sq ** 0.5


def assert_gradient_reaches_support(model: FSSModel, batch: dict, term: str) -> None:
    support_norm, query_norm = feature_gradients(model, batch, term)
    assert query_norm > 0, f"no gradient of {term} reaches the query features"
    assert support_norm >= MIN_GRAD_RATIO * query_norm, (
        f"the gradient of {term} barely reaches the support features: {support_norm:.3g} "
        f"against {query_norm:.3g} on the query's")


class ZeroedSupportMask(FSSModel):
    """A broken support path: every support mask replaced by all-background."""

    def __init__(self, inner: FSSModel) -> None:
        super().__init__(fg_weight=inner.fg_weight)
        self.inner = inner

    def broken(self, masks: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(masks)

    def forward_train(self, batch):
        return self.inner.forward_train({**batch, "support_masks": self.broken(batch["support_masks"])})

    def forward_infer(self, support_images, support_masks, query_images):
        return self.inner.forward_infer(support_images, self.broken(support_masks), query_images)


class ConstantSupport(ZeroedSupportMask):
    """A broken support path: every episode gets the same support image (fixed noise)."""

    def fixed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=torch.Generator().manual_seed(99)).to(images)

    def forward_train(self, batch):
        return self.inner.forward_train({**batch, "support_images": self.fixed(batch["support_images"])})

    def forward_infer(self, support_images, support_masks, query_images):
        return self.inner.forward_infer(self.fixed(support_images), support_masks, query_images)


@pytest.mark.parametrize("method", METHODS)
def test_untrained_prediction_depends_on_the_support_mask_and_image(method):
    assert_uses_support(build(method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("term", ["query_ce", "loss"])
def test_untrained_gradient_reaches_the_support_features(method, term):
    assert_gradient_reaches_support(build(method), episode(0, COLOUR_A), term)


@pytest.mark.parametrize("method", METHODS)
def test_the_helpers_catch_a_zeroed_support_mask(method):
    broken = ZeroedSupportMask(build(method))
    assert support_effect(broken)["mask"] == 0.0
    with pytest.raises(AssertionError, match="support mask"):
        assert_uses_support(broken)


@pytest.mark.parametrize("method", METHODS)
def test_the_helpers_catch_a_constant_support(method):
    broken = ConstantSupport(build(method))
    effect = support_effect(broken)
    assert effect["image"] == 0.0
    with pytest.raises(AssertionError, match="support image"):
        assert_uses_support(broken)
    with pytest.raises(AssertionError, match="support features"):
        assert_gradient_reaches_support(broken, episode(0, COLOUR_A), "query_ce")
