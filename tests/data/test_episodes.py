"""Episodes: samplers, determinism, the episode dataset and its collate function, on a
tiny prepared dataset written in the real format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fss.data.episodes import (
    EpisodeDataset,
    EpisodeSpec,
    TestEpisodeSampler,
    TrainEpisodeSampler,
    base_class_mask,
    binary_mask,
    OTHER_EPISODE_CLASS,
    build_test_episodes,
    collate_episodes,
    episode_class_counts,
    episode_label,
    load_instance_map,
)
from fss.data.prepared import PreparedDataset
from fss.data.transforms import NoAugTransform, TestTransform, build_train_transform
from fss.errors import ConfigError, DataError

try:
    from tiny_prepared import build_tiny_prepared
except ImportError:  # tests/data became a package
    from .tiny_prepared import build_tiny_prepared


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_tiny_prepared(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def val(root):
    return PreparedDataset(root, 0, "val")


@pytest.fixture(scope="module")
def train(root):
    return PreparedDataset(root, 0, "train")


def assert_valid_episode(data, spec: EpisodeSpec, shot: int, ways: int = 1):
    assert len(spec.class_ids) == ways and len(set(spec.class_ids)) == ways
    assert all(c in data.classes for c in spec.class_ids)
    assert spec.class_ids[0] in data.records[spec.query].present
    assert len(spec.supports) == ways
    for c, sup in zip(spec.class_ids, spec.supports):
        assert len(sup) == shot and len(set(sup)) == shot
        assert spec.query not in sup
        assert all(i in data.class_index[c] for i in sup)


# ---------------------------------------------------------------- masks


def test_binary_episode_and_base_masks():
    label = np.array([[0, 1, 2, 255], [3, 1, 17, 0]], np.uint8)
    assert binary_mask(label, 1).tolist() == [[0, 1, 0, 255], [0, 1, 0, 0]]
    assert episode_label(label, (3, 1)).tolist() == [[0, 2, 0, 255], [1, 2, 0, 0]]
    assert base_class_mask(label, [2, 17]).tolist() == [[0, 0, 1, 255], [0, 0, 1, 0]]


# ---------------------------------------------------------------- test samplers


@pytest.mark.parametrize("sampling", ["list_order", "pairs", "class_uniform", "panet"])
@pytest.mark.parametrize("shot", [1, 5])
def test_supports_distinct_from_query_and_each_other(val, sampling, shot):
    specs = build_test_episodes(val, sampling=sampling, episodes=80, seed=5, shot=shot)
    assert len(specs) == 80
    for s in specs:
        assert_valid_episode(val, s, shot)
    if sampling in ("class_uniform", "panet"):
        assert all(s.query in val.class_index[s.class_ids[0]] for s in specs)


@pytest.mark.parametrize("sampling", ["list_order", "pairs", "class_uniform", "panet"])
def test_same_seed_same_episodes_whatever_the_access_order(val, sampling):
    a = TestEpisodeSampler(val, sampling, seed=321, shot=2)
    forward = [a.spec(i) for i in range(40)]
    b = TestEpisodeSampler(val, sampling, seed=321, shot=2)
    backward = [b.spec(i) for i in reversed(range(40))][::-1]
    assert forward == backward
    other = TestEpisodeSampler(val, sampling, seed=322, shot=2).specs(40)
    assert other != forward


def test_list_order_walks_the_list_and_wraps(val):
    n = len(val.records)
    specs = build_test_episodes(val, sampling="list_order", episodes=2 * n + 3, seed=321, shot=1)
    assert [s.query for s in specs] == [i % n for i in range(2 * n + 3)]
    assert all(s.class_ids[0] in val.records[s.query].present for s in specs)


def test_list_order_class_uniform_among_present(root):
    # a training list has queries with several present classes: each must be drawn
    data = PreparedDataset(root, 0, "train")
    multi = next(i for i, r in enumerate(data.records) if len(r.present) >= 2)
    n = len(data.records)
    specs = build_test_episodes(data, sampling="list_order", episodes=n * 60, seed=1, shot=1)
    drawn = {s.class_ids[0] for s in specs if s.query == multi}
    assert drawn == set(data.records[multi].present)


def test_hsnet_pairs_order(val):
    pairs = [(i, c) for i, r in enumerate(val.records) for c in r.counted]
    specs = build_test_episodes(val, sampling="pairs", episodes=len(pairs) + 4, seed=0, shot=1)
    got = [(s.query, s.class_ids[0]) for s in specs]
    assert got == [pairs[i % len(pairs)] for i in range(len(pairs) + 4)]


def test_class_uniform_counts_roughly_uniform(val):
    specs = build_test_episodes(val, sampling="class_uniform", episodes=1500, seed=0, shot=1)
    counts = episode_class_counts(specs)
    assert sorted(counts) == val.classes
    assert sum(counts.values()) == 1500
    assert all(240 <= n <= 360 for n in counts.values()), counts  # 300 expected each


def test_panet_nway(val):
    sampler = TestEpisodeSampler(val, "panet", seed=1234, shot=2, ways=2)
    specs = sampler.specs(60)
    for s in specs:
        assert_valid_episode(val, s, 2, ways=2)
        assert s.query in val.class_index[s.class_ids[0]]
    counts = episode_class_counts(specs)
    assert sum(counts.values()) == 120
    with pytest.raises(ConfigError, match="panet"):
        TestEpisodeSampler(val, "list_order", seed=0, shot=1, ways=2)
    with pytest.raises(ConfigError, match="ways"):
        TestEpisodeSampler(val, "panet", seed=0, shot=1, ways=6)


def test_too_many_shots_is_a_one_line_data_error(val):
    with pytest.raises(DataError) as err:
        build_test_episodes(val, sampling="list_order", episodes=5, seed=0, shot=6)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == "class 1 of fold 0 has 6 images; 6-shot needs 7; lower --shot."
    with pytest.raises(ConfigError):
        build_test_episodes(val, sampling="list_order", episodes=5, seed=0, shot=0)
    with pytest.raises(ConfigError, match="list_order"):
        build_test_episodes(val, sampling="random", episodes=5, seed=0, shot=1)


# ---------------------------------------------------------------- training sampler


def test_train_sampler_shuffles_each_epoch(train):
    sampler = TrainEpisodeSampler(train, shot=1, seed=7)
    n = len(train.records)
    assert len(sampler) == n
    e0 = [sampler.spec(0, i) for i in range(n)]
    e1 = [sampler.spec(1, i) for i in range(n)]
    assert sorted(s.query for s in e0) == list(range(n))  # each image once per epoch
    assert [s.query for s in e0] != [s.query for s in e1]
    assert [s.query for s in e0] != list(range(n))
    for s in e0 + e1:
        assert_valid_episode(train, s, 1)
        assert s.class_ids[0] in train.base_classes
    again = TrainEpisodeSampler(train, shot=1, seed=7)
    assert [again.spec(1, i) for i in reversed(range(n))][::-1] == e1
    panet = TrainEpisodeSampler(train, shot=1, seed=7, ways=2, sampling="panet", episodes_per_epoch=10)
    assert len(panet) == 10 and all(len(panet.spec(0, i).class_ids) == 2 for i in range(10))
    with pytest.raises(ConfigError):
        TrainEpisodeSampler(train, shot=1, seed=7, ways=2)


# ---------------------------------------------------------------- dataset


def test_episode_dataset_sample_contents(val):
    specs = build_test_episodes(val, sampling="list_order", episodes=4, seed=321, shot=1)
    ds = EpisodeDataset(val, specs, NoAugTransform(), seed=321)  # original sizes kept
    assert ds.keep_original
    for i, spec in enumerate(specs):
        s = ds[i]
        image, label = val.load(spec.query)
        c = spec.class_ids[0]
        h, w = label.shape
        assert s["query_images"].shape == (3, h, w) and s["query_images"].dtype == torch.float32
        assert s["support_images"].shape[:2] == (1, 3)
        assert s["support_masks"].dtype == torch.int64 and s["support_masks"].shape[0] == 1
        assert s["class_ids"].shape == () and int(s["class_ids"]) == c
        target = torch.from_numpy(binary_mask(label, c)).long()
        assert torch.equal(s["query_masks"], target)
        assert torch.equal(s["query_label_original"], target)
        assert s["original_size"].tolist() == [h, w]
        base = torch.from_numpy(base_class_mask(label, val.base_classes)).long()
        assert torch.equal(s["query_base_masks"], base)
        assert (s["query_base_masks"] == 1).any()  # the tiny images hold base classes too
        assert set(s["query_masks"].unique().tolist()) <= {0, 1, 255}
        for k, record in enumerate(spec.supports[0]):
            _, s_label = val.load(record)
            assert torch.equal(s["support_masks"][k], torch.from_numpy(binary_mask(s_label, c)).long())
    # unresized supports of different sizes cannot be stacked: a clear error
    mixed = next(sp for sp in build_test_episodes(val, sampling="list_order", episodes=30, seed=1, shot=3)
                 if len({val.load(i)[1].shape for i in sp.supports[0]}) > 1)
    with pytest.raises(ConfigError, match="different sizes"):
        EpisodeDataset(val, [mixed], NoAugTransform())[0]


def test_episode_dataset_nway_sample(val, train):
    specs = TestEpisodeSampler(val, "panet", seed=1, shot=1, ways=2).specs(3)
    ds = EpisodeDataset(val, specs, TestTransform("square", 33), seed=1)
    s = ds[0]
    assert s["support_images"].shape == (2, 1, 3, 33, 33)
    assert s["support_masks"].shape == (2, 1, 33, 33)
    assert s["class_ids"].tolist() == list(specs[0].class_ids)
    assert set(s["query_masks"].unique().tolist()) <= {0, 1, 2, 255}
    assert (s["query_masks"] == 1).any()
    # at original resolution: query label j on class j, supports 2 on the other episode class
    raw = NoAugTransform()  # unresized: pick episodes whose two supports share a size
    # (base classes: the tiny images hold several base classes but one novel class at most)
    specs = [sp for sp in TestEpisodeSampler(train, "panet", seed=1, shot=1, ways=2).specs(300)
             if train.load(sp.supports[0][0])[1].shape == train.load(sp.supports[1][0])[1].shape][:20]
    ds_raw = EpisodeDataset(train, specs, raw, seed=1)
    ds_plain = EpisodeDataset(train, specs, raw, seed=1, other_episode_class=None)
    marked = 0
    for i, spec in enumerate(specs):
        r, p = ds_raw[i], ds_plain[i]
        _, q_label = train.load(spec.query)
        assert torch.equal(r["query_masks"], torch.from_numpy(episode_label(q_label, spec.class_ids)).long())
        for w, c in enumerate(spec.class_ids):
            other = spec.class_ids[1 - w]
            _, s_label = train.load(spec.supports[w][0])
            expected = binary_mask(s_label, c).astype(np.int64)
            assert torch.equal(p["support_masks"][w, 0], torch.from_numpy(expected))
            expected[s_label == other] = OTHER_EPISODE_CLASS
            assert torch.equal(r["support_masks"][w, 0], torch.from_numpy(expected))
            marked += int((s_label == other).any())
    assert marked > 0  # the tiny supports do hold the other episode class sometimes


def test_collate_pads_original_labels(val):
    specs = build_test_episodes(val, sampling="list_order", episodes=3, seed=0, shot=1)
    ds = EpisodeDataset(val, specs, TestTransform("pfenet_pad", 33))
    samples = [ds[i] for i in range(3)]
    batch = collate_episodes(samples)
    sizes = [tuple(s["query_label_original"].shape) for s in samples]
    assert len(set(sizes)) > 1  # the tiny images differ in size
    side = max(max(sz) for sz in sizes)
    assert batch["query_label_original"].shape == (3, side, side)
    assert batch["support_images"].shape == (3, 1, 3, 33, 33)
    assert batch["class_ids"].shape == (3,)
    for b, (h, w) in enumerate(sizes):
        assert batch["original_size"][b].tolist() == [h, w]
        assert torch.equal(batch["query_label_original"][b, :h, :w], samples[b]["query_label_original"])
        assert (batch["query_label_original"][b, h:] == 255).all()
        assert (batch["query_label_original"][b, :, w:] == 255).all()


def _run_loader(ds, workers, batch_size=2):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_episodes)
    return list(loader)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
def test_training_is_reproducible_across_workers_and_order(train):
    sampler = TrainEpisodeSampler(train, shot=1, seed=3)
    transform = build_train_transform("pfenet", "synthetic", size=33)
    ds = EpisodeDataset(train, sampler, transform, seed=3, epoch=2)
    ds_small = torch.utils.data.Subset(ds, list(range(8)))
    single = _run_loader(ds_small, 0)
    multi = _run_loader(ds_small, 2)
    _assert_batches_equal(single, multi)
    # access order does not matter
    backwards = [ds[i] for i in reversed(range(8))][::-1]
    _assert_batches_equal(single, [collate_episodes(backwards[i:i + 2]) for i in range(0, 8, 2)])
    # another epoch: other episodes and augmentation
    ds.set_epoch(3)
    assert not torch.equal(ds[0]["query_images"], single[0]["query_images"][0])
    ds.set_epoch(2)
    assert torch.equal(ds[0]["query_images"], single[0]["query_images"][0])


@pytest.mark.slow
def test_test_episodes_reproducible_across_workers(val):
    specs = build_test_episodes(val, sampling="panet", episodes=6, seed=1234, shot=2)
    ds = EpisodeDataset(val, specs, TestTransform("pfenet_pad", 33), seed=1234)
    _assert_batches_equal(_run_loader(ds, 0, 3), _run_loader(ds, 2, 3))


def test_support_annotation_option(val):
    specs = build_test_episodes(val, sampling="list_order", episodes=2, seed=0, shot=1)
    with pytest.raises(ConfigError, match="dense, bbox, scribble"):
        EpisodeDataset(val, specs, TestTransform("square", 33), support_annotation="polygon")
    ds = EpisodeDataset(val, specs, TestTransform("square", 33), support_annotation="bbox")
    try:
        import fss.data.weak  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="weak.py"):
            ds[0]
        return
    s = ds[0]
    assert set(s["support_masks"].unique().tolist()) <= {0, 1, 255}
    assert (s["support_masks"] == 1).any()
    assert torch.equal(ds[0]["support_masks"], s["support_masks"])  # seeded
    # the box of a rectangle is the rectangle: bbox == dense foreground at original size
    raw_box = EpisodeDataset(val, specs, NoAugTransform(), support_annotation="bbox", weak_unlabelled=2)[0]
    _, s_label = val.load(specs[0].supports[0][0])
    assert torch.equal(raw_box["support_masks"][0] == 1,
                       torch.from_numpy(s_label == specs[0].class_ids[0]))
    scribble = EpisodeDataset(val, specs, TestTransform("square", 33), support_annotation="scribble")[1]
    assert (scribble["support_masks"] == 1).sum() < (ds[1]["support_masks"] == 1).sum()


def test_instance_maps_are_loaded(val):
    inst = load_instance_map(val, 0)
    _, label = val.load(0)
    assert inst is not None and inst.shape == label.shape
    assert set(np.unique(inst[label == 0]).tolist()) == {0}
    assert inst.max(initial=0) == 255 and len(set(np.unique(inst).tolist()) - {0, 255}) >= 1
