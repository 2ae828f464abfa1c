"""Shared PFENet-family blocks against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from fss.models.blocks import (
    PFENET_MAP_EPS,
    cosine_kmeans,
    cross_entropy_ignore,
    latent_prototype_region,
    latent_pseudo_mask,
    masked_average_pool,
    min_max_normalise,
    prior_mask,
    prototype_cosine_prior,
    resize_bilinear,
)


def _locations(*vectors) -> torch.Tensor:
    """Feature map [1, C, 1, N] whose N locations are the given C-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).t()[None, :, None, :]


def test_masked_average_pool_with_pfenet_eps():
    feat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None, None]
    pooled = masked_average_pool(feat, mask, PFENET_MAP_EPS)
    assert pooled.shape == (1, 1)
    assert pooled.item() == pytest.approx(4.0 / (2.0 + 5e-4), rel=1e-6)
    # an empty mask gives a zero prototype, not NaN
    assert masked_average_pool(feat, torch.zeros_like(mask), PFENET_MAP_EPS).item() == 0.0


def test_prior_mask_max_cosine_then_min_max_with_eps():
    query = _locations((1, 0), (1, 1), (0, 1))
    # support: one foreground location (0, 1) and one masked-out (zero) location
    support = _locations((0, 1), (0, 0))
    prior = prior_mask(query, support)
    assert prior.shape == (1, 1, 1, 3)
    eps = 1e-7
    raw = [0.0, 1 / (math.sqrt(2) + eps), 1 / (1 + eps)]
    low, high = min(raw), max(raw)
    expected = [(r - low) / (high - low + eps) for r in raw]
    assert prior.flatten().tolist() == pytest.approx(expected, abs=1e-7)
    assert prior.flatten()[2].item() < 1.0  # the eps in the normalisation is there


def test_min_max_normalise_constant_input_is_zero_not_nan():
    out = min_max_normalise(torch.full((2, 5), 3.0))
    assert torch.equal(out, torch.zeros(2, 5))


def test_prototype_cosine_prior_vector_and_per_location():
    feat = _locations((1, 0), (1, 1), (0, 2))
    prior = prototype_cosine_prior(feat, torch.tensor([[1.0, 0.0]]))
    eps = 1e-7
    raw = [1 / (1 + eps), 1 / (math.sqrt(2) + eps), 0.0]
    expected = [(r - 0.0) / (raw[0] + eps) for r in raw]
    assert prior.flatten().tolist() == pytest.approx(expected, abs=1e-7)
    # a per-location map with the same vector everywhere gives the same prior
    per_location = torch.tensor([1.0, 0.0])[None, :, None, None].expand(1, 2, 1, 3)
    assert torch.allclose(prototype_cosine_prior(feat, per_location), prior)


def _two_direction_points(generator):
    """8 points near direction (1, 0, 0) and 8 near (0, 1, 0), random magnitudes, shuffled."""
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(8, 3, generator=generator)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(8, 3, generator=generator)
    scale = 0.5 + 5 * torch.rand(16, 1, generator=generator)  # cosine ignores the magnitude
    points = torch.cat([a, b]) * scale
    order = torch.randperm(16, generator=generator)
    return points[order], (order < 8)


def test_cosine_kmeans_separates_two_directions_per_sample():
    g = torch.Generator().manual_seed(3)
    x0, is_a0 = _two_direction_points(g)
    x1, is_a1 = _two_direction_points(g)
    assign, centers = cosine_kmeans(torch.stack([x0, x1]), k=2, iters=10, generator=torch.Generator().manual_seed(0))
    assert assign.shape == (2, 16) and centers.shape == (2, 2, 3)
    for b, is_a in enumerate([is_a0, is_a1]):
        cluster_of_a = assign[b][is_a]
        cluster_of_b = assign[b][~is_a]
        assert (cluster_of_a == cluster_of_a[0]).all() and (cluster_of_b == cluster_of_b[0]).all()
        assert cluster_of_a[0] != cluster_of_b[0]
        centre_a = centers[b, cluster_of_a[0]]
        assert torch.allclose(centre_a.norm(), torch.tensor(1.0), atol=1e-5)
        assert centre_a[0] > 0.99  # unit centre along (1, 0, 0)


def test_cosine_kmeans_is_deterministic_given_a_generator():
    x = torch.randn(3, 40, 5)
    runs = [cosine_kmeans(x, 4, 10, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert set(runs[0][0].unique().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError):
        cosine_kmeans(x, 41)


def _lps_example():
    """6 locations: 0-2 along a, 3-4 along b, 5 along a but a base-class location."""
    a, b = (1.0, 0.0), (0.0, 1.0)
    feat = _locations(a, a, a, b, b, a)
    excluded = torch.tensor([[False] * 5 + [True]])[:, None, :]  # [1, 1, 6] = [B, h, w]
    return feat, excluded


def test_latent_region_zeroes_diagonal_and_base_classes():
    feat, excluded = _lps_example()
    # counts without self and without location 5: 2, 2, 2, 1, 1, 0 -> candidates (> 1): 0, 1, 2
    for seed in range(6):
        region, found = latent_prototype_region(feat, excluded, delta=0.65, sigma=1, generator=torch.Generator().manual_seed(seed))
        region = region.flatten()
        assert found.tolist() == [True]
        assert region.sum().item() == 2  # the two other a-locations, never the centre itself
        assert region[3:].sum().item() == 0  # neither b nor the excluded a-location
    # no candidate: found False and an empty region
    region, found = latent_prototype_region(feat, excluded, delta=0.65, sigma=2)
    assert found.tolist() == [False] and region.sum().item() == 0


def test_latent_region_reference_quirk():
    feat, excluded = _lps_example()
    # quirk: only (0, 0) zeroed -> counts 2(+2 bonus), 3, 3, 2, 2, 0; b-locations become candidates
    regions = {
        tuple(latent_prototype_region(feat, excluded, 0.65, 1, torch.Generator().manual_seed(s), True)[0].flatten().tolist())
        for s in range(30)
    }
    assert (0.0, 0.0, 0.0, 1.0, 1.0, 0.0) in regions  # a b-centre: its row includes itself
    assert (1.0, 1.0, 1.0, 0.0, 0.0, 0.0) in regions  # centre 1 or 2 with self counted
    # location 0 is a candidate even when nothing is similar to it
    lonely = _locations((1, 0), (0, 1), (0, 1))
    region, found = latent_prototype_region(lonely, torch.zeros(1, 1, 3, dtype=torch.bool), 0.65, 10, None, True)
    assert found.tolist() == [True] and region.flatten().tolist() == [0.0, 0.0, 0.0]


def test_latent_region_delta_changes_the_region():
    close = (math.cos(0.7), math.sin(0.7))  # cosine 0.765 with (1, 0)
    feat = _locations((1, 0), (1, 0), close, (0, 1))
    excluded = torch.zeros(1, 1, 4, dtype=torch.bool)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loose, _ = latent_prototype_region(feat, excluded, delta=0.65, sigma=0, generator=g())
    strict, _ = latent_prototype_region(feat, excluded, delta=0.8, sigma=0, generator=g())
    assert loose.sum() > strict.sum()


def test_latent_pseudo_mask_thresholds_and_base_classes():
    region = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    base = torch.zeros(1, 3, 3, dtype=torch.long)
    base[0, 0, 0] = 1
    base[0, 2, 2] = 255
    mask = latent_pseudo_mask(region, base)
    # bilinear (align_corners) of the 2x2 region to 3x3: 1, .5, 0 / .5, .25, 0 / 0, 0, 0
    assert mask[0].tolist() == [[0, 1, 255], [1, 1, 255], [255, 255, 255]]
    assert (latent_pseudo_mask(region, base, torch.tensor([False]))[0] == 255).all()


def test_cross_entropy_ignore_matches_torch_and_survives_all_ignored():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (2, 4, 4))
    target[0, 0] = 255
    assert torch.allclose(cross_entropy_ignore(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    empty = cross_entropy_ignore(logits, torch.full_like(target, 255))
    assert empty.item() == 0.0
    empty.backward()  # keeps the graph


def test_resize_bilinear_is_identity_at_same_size():
    x = torch.randn(1, 3, 5, 7)
    assert resize_bilinear(x, (5, 7)) is x
    assert resize_bilinear(x, (9, 13)).shape == (1, 3, 9, 13)
