"""The test-image cache: each test image decoded, resized and normalised once for every episode,
shot and support control of one evaluation, with samples identical to loading every time."""

from __future__ import annotations

import pytest
import torch

from cache_helpers import CPU, metrics, small_model
from fss.data.access import open_prepared
from fss.data.episodes import TestImageCache
from fss.evaluation import EvalSettings, evaluate_model, make_protocol


def _samples_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,ways", [("pfenet", 1), ("hsnet", 1), ("panet", 2)])
def test_cached_samples_equal_loading_every_time(cache_synthetic_root, name, ways):
    """pfenet_pad and square resizing, and an N-way episode whose supports mark the other class."""
    data = open_prepared(cache_synthetic_root, 0, "val")
    proto = make_protocol(name, "synthetic", episodes=12, size=41)
    cache = TestImageCache(max_mb=64)
    for shot in (1, 2):
        plain = proto.episode_dataset(data, shot, ways=ways)
        cached = proto.episode_dataset(data, shot, ways=ways, image_cache=cache)
        for i in range(len(plain)):
            assert _samples_equal(plain[i], cached[i]), (name, shot, i)
    records = {r for ds in (proto.episode_dataset(data, s, ways=ways) for s in (1, 2))
               for spec in ds.specs for r in (spec.query, *(x for w in spec.supports for x in w))}
    assert cache.misses == len(records) and cache.hits > 0  # each image read and resized once


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(cache_synthetic_root):
    data = open_prepared(cache_synthetic_root, 0, "val")
    proto = make_protocol("pfenet", "synthetic", episodes=20, size=65)
    entry_mb = (3 * 65 * 65 * 4 + 65 * 65 + 48 * 48) / (1 << 20)
    cache = TestImageCache(max_mb=3.5 * entry_mb)
    plain, cached = proto.episode_dataset(data, 1), proto.episode_dataset(data, 1, image_cache=cache)
    for i in range(len(plain)):
        assert _samples_equal(plain[i], cached[i])
    assert len(cache.entries) == 3 and cache.evictions > 0 and cache.bytes <= cache.max_bytes


def test_evaluation_metrics_with_and_without_the_image_cache(cache_synthetic_root):
    data = open_prepared(cache_synthetic_root, 0, "val")
    proto = make_protocol("pfenet", "synthetic", episodes=8, size=33)
    model = small_model("pfenet")
    cache = TestImageCache(max_mb=64)
    runs = [evaluate_model(model, data, proto, EvalSettings(batch_size=4), image_cache=c) for c in (None, cache)]
    assert metrics(runs[0]) == metrics(runs[1])
    again = evaluate_model(model, data, proto, EvalSettings(batch_size=4, support_control="shifted"),
                           image_cache=cache)
    assert again["episodes"] == runs[0]["episodes"] and cache.misses == len(cache.entries)
