"""The evaluation feature cache gives identical results and never serves stale features."""

from __future__ import annotations

import pytest
import torch

from cache_helpers import evaluate, metrics, protocol, small_model
from fss.models.feature_cache import FeatureCache
from fss.models.registry import list_methods


def _episode_batches(data, shot: int, count: int = 2, batch_size: int = 3, size: int = 33):
    from fss.data.episodes import collate_episodes

    episodes = protocol(episodes=count * batch_size, size=size).episode_dataset(data, shot)
    return [collate_episodes([episodes[b * batch_size + i] for i in range(batch_size)]) for b in range(count)]


def _predict(model, batch):
    with torch.no_grad():
        return model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])


@pytest.mark.parametrize("method", list_methods())
def test_every_method_identical_with_and_without_cache(method, cache_val_data):
    """Metrics (miou, fb_iou, class_iou) equal exactly; logits bit for bit, on misses and hits."""
    model = small_model(method)
    proto = protocol(episodes=6)
    plain = evaluate(model, cache_val_data, proto)
    cache = FeatureCache()
    first = evaluate(model, cache_val_data, proto, cache=cache)
    misses = cache.stats.misses
    second = evaluate(model, cache_val_data, proto, cache=cache)
    assert metrics(first) == metrics(plain)
    assert metrics(second) == metrics(plain)
    assert cache.stats.misses == misses > 0  # the second pass computed nothing
    assert cache.stats.hits >= misses

    # logits: bit for bit when the cached rows were computed in the same batch (a full miss
    # is the plain call); rows computed in a sub-batch of another size may differ by the
    # conv kernels' batch-size dependence (oneDNN: N=1 vs N>1, ~1e-9), never more
    batches = _episode_batches(cache_val_data, shot=1)
    expected = [_predict(model, b) for b in batches]
    fresh = FeatureCache()
    with fresh.attached(model):
        assert torch.equal(_predict(model, batches[0]), expected[0])  # all rows missed
        assert torch.equal(_predict(model, batches[0]), expected[0])  # all rows hit
        for _ in range(2):
            for batch, want in zip(batches, expected):
                got = _predict(model, batch)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                assert torch.equal(got.argmax(1), want.argmax(1))
    assert fresh.stats.hits > 0 and fresh.stats.misses > 0


def test_shots_share_the_cache_across_model_instances(cache_val_data):
    """A model rebuilt with 5 shots and the same weights hits the rows the 1-shot one stored."""
    one = small_model("pfenet", shot=1)
    five = small_model("pfenet", shot=5)
    five.load_state_dict(one.state_dict())
    cache = FeatureCache()
    evaluate(one, cache_val_data, protocol(episodes=6), cache=cache)
    hits = cache.stats.hits
    plain = evaluate(five, cache_val_data, protocol(episodes=6), shot=5)
    cached = evaluate(five, cache_val_data, protocol(episodes=6), shot=5, cache=cache)
    assert metrics(cached) == metrics(plain)
    assert cache.stats.hits > hits  # the queries' block 2-4 features came from the 1-shot pass


def test_changed_backbone_weight_misses(cache_val_data):
    model = small_model("pfenet")
    proto = protocol(episodes=6)
    cache = FeatureCache()
    evaluate(model, cache_val_data, proto, cache=cache)
    stored = cache.stats.stores
    hits = cache.stats.hits
    with torch.no_grad():  # a tiny change the version counter sees
        model.backbone.layer0[0].weight[0, 0, 0, 0] += 1e-3
    changed = evaluate(model, cache_val_data, proto, cache=cache)
    assert cache.stats.stores == 2 * stored  # every row recomputed
    assert cache.stats.hits - hits < stored  # only within-pass reuse, nothing from before
    assert metrics(changed) == metrics(evaluate(model, cache_val_data, proto))

    # a change through .data (invisible to the version counter) is seen when the cache is attached again
    model.backbone.layer1[0].weight.data[0, 0, 0, 0] += 1e-3
    evaluate(model, cache_val_data, proto, cache=cache)
    assert cache.stats.stores == 3 * stored


def test_changed_buffer_and_changed_resolution_miss(cache_val_data):
    model = small_model("canet")
    cache = FeatureCache()
    evaluate(model, cache_val_data, protocol(episodes=6, size=33), cache=cache)
    stored = cache.stats.stores
    evaluate(model, cache_val_data, protocol(episodes=6, size=41), cache=cache)  # another test resize
    assert cache.stats.stores == 2 * stored
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.add_(0.5)  # a BatchNorm statistic is part of the weights' fingerprint
    evaluate(model, cache_val_data, protocol(episodes=6, size=41), cache=cache)
    assert cache.stats.stores == 3 * stored


def test_other_backbone_weights_with_same_shapes_miss(cache_val_data):
    first, second = small_model("panet", seed=0), small_model("panet", seed=1)
    cache = FeatureCache()
    evaluate(first, cache_val_data, protocol(), cache=cache)
    stored = cache.stats.stores
    result = evaluate(second, cache_val_data, protocol(), cache=cache)
    assert cache.stats.stores == 2 * stored
    assert metrics(result) == metrics(evaluate(second, cache_val_data, protocol()))


def test_bf16_autocast_identical_and_kept_apart_from_fp32(cache_val_data):
    model = small_model("dpnet_pfenet")
    proto = protocol(episodes=6)
    cache = FeatureCache()
    fp32 = evaluate(model, cache_val_data, proto, cache=cache)
    stored = cache.stats.stores
    plain = evaluate(model, cache_val_data, proto, precision="bf16")
    cached = evaluate(model, cache_val_data, proto, precision="bf16", cache=cache)
    assert cache.stats.stores == 2 * stored  # bf16 features are not the fp32 ones
    assert metrics(cached) == metrics(plain)
    assert metrics(evaluate(model, cache_val_data, proto, cache=cache)) == metrics(fp32)


def test_keys_depend_on_autocast_and_layout():
    model = small_model("pfenet")
    images = torch.randn(2, 3, 33, 33)
    cache = FeatureCache()
    with cache.attached(model) as binding:
        plain = binding.row_keys("t", (images,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = binding.row_keys("t", (images,))
        last = binding.row_keys("t", (images.contiguous(memory_format=torch.channels_last),))
        masked = binding.row_keys("t", (images, torch.ones(2, 1, 5, 5)))
        other_tag = binding.row_keys("u", (images,))
        nudged = images.clone()
        nudged[1, 0, 0, 0] = torch.nextafter(nudged[1, 0, 0, 0], torch.tensor(1e9))
        nudged_keys = binding.row_keys("t", (nudged,))
    assert plain[0] != plain[1]
    for keys in (mixed, last, masked, other_tag):
        assert set(keys).isdisjoint(plain)
    assert nudged_keys[0] == plain[0] and nudged_keys[1] != plain[1]  # one ulp of one pixel


def test_memory_bound_evicts_least_recently_used(cache_val_data):
    model = small_model("canet")
    proto = protocol(episodes=6)
    full = FeatureCache()
    evaluate(model, cache_val_data, proto, cache=full)
    per_row = full.bytes_in_memory // len(full)
    small = FeatureCache(max_bytes=3 * per_row)
    result = evaluate(model, cache_val_data, proto, cache=small)
    assert len(small) == 3 and small.bytes_in_memory <= small.max_bytes
    assert small.stats.evictions == small.stats.stores - 3
    assert metrics(result) == metrics(evaluate(model, cache_val_data, proto))
    # LRU order: a looked-up key survives the next insertion, the oldest one goes
    keys = list(small._memory)
    small.lookup(keys[0], torch.device("cpu"))
    small.store("extra", small._memory[keys[1]])
    assert keys[0] in small._memory and keys[1] not in small._memory


def test_never_used_in_training_mode(cache_val_data):
    model = small_model("pfenet")
    cache = FeatureCache()
    with pytest.raises(RuntimeError, match="evaluation only"):
        with cache.attached(model.train()):
            pass
    model.eval()
    batch = _episode_batches(cache_val_data, shot=1, count=1)[0]
    with cache.attached(model):
        model.train()  # switched to training inside the block: the hook skips the cache
        out = model(batch)
        assert out.loss.requires_grad
        assert cache.stats.as_dict() == FeatureCache().stats.as_dict() and len(cache) == 0
    assert "_feature_cache_binding" not in model.__dict__  # detached after the block

    panet = small_model("panet")  # its backbone is trained: features carry gradients when enabled
    with cache.attached(panet), torch.enable_grad():  # eval mode with gradients on: skipped as well
        logits = panet.predict(batch["support_images"], batch["support_masks"], batch["query_images"])
        assert logits.requires_grad and len(cache) == 0
