"""Test-protocol presets (protocol section 3 table, sections 4-5)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fss.data.episodes import build_test_episodes, collate_episodes, episode_class_counts
from fss.data.prepared import PreparedDataset
from fss.data.protocols import PRESETS, bam_seeds, protocol_preset
from fss.errors import ConfigError

try:
    from tiny_prepared import build_tiny_prepared
except ImportError:  # tests/data became a package
    from .tiny_prepared import build_tiny_prepared


def legacy_bam_seeds():
    """What BAM's test script computes, with the global legacy API (state restored)."""
    state = np.random.get_state()
    try:
        np.random.seed(123)
        return [int(s) for s in np.random.randint(0, 1000, 5)]
    finally:
        np.random.set_state(state)


def test_pfenet_preset():
    p = protocol_preset("pfenet", "pascal")
    assert (p.episodes, p.runs, p.seeds, p.sampling) == (5000, 1, (321,), "list_order")
    assert (p.resize, p.size, p.score_at_original, p.ignore_index) == ("pfenet_pad", 473, True, 255)
    assert p.extra_episode is False and p.episodes_per_run == 5000
    c = protocol_preset("pfenet", "coco")
    assert (c.episodes, c.size, c.seeds) == (20000, 641, (321,))
    compat = protocol_preset("pfenet", "pascal", extra_episode=True)
    assert compat.episodes_per_run == 5001


def test_bam_seeds_match_the_legacy_numpy_api():
    expected = legacy_bam_seeds()
    state = np.random.get_state()[1].copy()
    assert list(bam_seeds()) == expected
    assert np.array_equal(np.random.get_state()[1], state)  # global RNG untouched
    p = protocol_preset("bam", "pascal")
    assert list(p.seeds) == expected and p.runs == 5 and p.episodes == 1000
    assert (p.sampling, p.resize, p.size) == ("list_order", "pfenet_pad", 473)
    assert protocol_preset("bam", "coco").size == 641
    # more runs extend the same legacy stream
    assert list(protocol_preset("bam", "pascal", runs=7).seeds[:5]) == expected


def test_hsnet_panet_canet_presets():
    h = protocol_preset("hsnet", "pascal")
    assert (h.episodes, h.seeds, h.sampling, h.resize, h.size, h.score_at_original) == \
        (1000, (0,), "pairs", "square", 400, False)
    assert protocol_preset("hsnet", "coco").sampling == "class_uniform"
    p = protocol_preset("panet", "coco")
    assert (p.episodes, p.runs, p.seeds, p.sampling, p.size) == \
        (1000, 5, (1234, 1235, 1236, 1237, 1238), "panet", 417)
    c = protocol_preset("canet", "pascal")
    assert (c.size, c.resize, c.ignore_index) == (321, "square", None)


def test_synthetic_uses_pascal_rules_with_size_override():
    s = protocol_preset("pfenet", "synthetic", size=65)
    assert (s.episodes, s.seeds, s.size) == (5000, (321,), 65)


def test_overrides_and_errors():
    assert protocol_preset("panet", "pascal", runs=2).seeds == (1234, 1235)
    p = protocol_preset("pfenet", "pascal", seeds=[1, 2, 3])
    assert p.runs == 3 and p.seeds == (1, 2, 3)
    assert protocol_preset("hsnet", "pascal", score_at_original=True).score_at_original
    with pytest.raises(ConfigError) as err:
        protocol_preset("fancy", "pascal")
    assert "pfenet, bam, hsnet, panet, canet" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="episodes"):
        protocol_preset("pfenet", "pascal", episode=3)
    with pytest.raises(ConfigError, match="resize"):
        protocol_preset("pfenet", "pascal", resize="crop")
    with pytest.raises(ConfigError, match="one seed per run"):
        protocol_preset("pfenet", "pascal", runs=2, seeds=[1])
    with pytest.raises(ConfigError, match="ignore_index"):
        protocol_preset("canet", "pascal", ignore_index=0)
    with pytest.raises(ConfigError, match="dataset"):
        protocol_preset("pfenet", "voc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.episodes = 3


def test_describe_is_loggable():
    for name in PRESETS:
        d = protocol_preset(name, "coco").describe()
        assert json.loads(json.dumps(d)) == d
        assert d["name"] == name and d["dataset"] == "coco" and len(d["seeds"]) == d["runs"]
        assert d["episodes_per_run"] == d["episodes"]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return PreparedDataset(build_tiny_prepared(tmp_path_factory.mktemp("tiny")), 0, "val")


def test_protocol_episodes_and_dataset(val):
    p = protocol_preset("pfenet", "synthetic", episodes=4, size=33, extra_episode=True)
    specs = p.episode_specs(val, shot=1)
    assert len(specs) == 5
    assert specs == build_test_episodes(val, sampling="list_order", episodes=5, seed=321, shot=1)
    ds = p.episode_dataset(val, shot=1)
    batch = collate_episodes([ds[0], ds[1]])
    assert batch["query_images"].shape == (2, 3, 33, 33)
    assert batch["query_label_original"].shape[0] == 2 and "original_size" in batch
    counts = episode_class_counts(specs)
    assert sum(counts.values()) == 5
    with pytest.raises(ConfigError, match="run"):
        p.episode_specs(val, shot=1, run=1)
    panet = protocol_preset("panet", "synthetic", episodes=3, size=33)
    runs = [panet.episode_specs(val, shot=1, run=r) for r in range(panet.runs)]
    assert runs[0] != runs[1]
    assert runs[0] == panet.episode_specs(val, shot=1, run=0)
    s = panet.episode_dataset(val, shot=1, run=2)[0]
    assert s["query_masks"].shape == (33, 33) and s["support_masks"].dtype == torch.int64

