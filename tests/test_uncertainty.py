"""Tests of fss.uncertainty: per-episode counts and the bootstrap of mIoU over episodes."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from fss.errors import ConfigError
from fss.metrics import IoUMeter, summarize_runs
from fss.uncertainty import (
    EpisodeCounts,
    bootstrap_mean,
    bootstrap_miou,
    paired_difference,
    replicate_statistics,
)


def _episodes(rng, classes, count, ways=1, size=(5, 6), absent=0.2):
    """``count`` random episodes (pred, target, class ids) with ignored pixels and absent ways."""
    out = []
    for _ in range(count):
        ids = [int(c) for c in rng.choice(classes, size=ways, replace=False)]
        pred = rng.integers(0, ways + 1, size=size)
        target = rng.integers(0, ways + 1, size=size)
        target[rng.random(size) < 0.1] = 255
        if rng.random() < absent:
            target[target == int(rng.integers(0, ways + 1))] = 0 if rng.random() < 0.5 else 255
        out.append((pred, target, ids))
    return out


def _fill(meter, episodes, batch=3):
    for start in range(0, len(episodes), batch):
        chunk = episodes[start:start + batch]
        meter.update_batch(np.stack([e[0] for e in chunk]), np.stack([e[1] for e in chunk]),
                           np.array([e[2] for e in chunk]))
    return meter


def _synthetic(rng, p, episodes, shrink=None):
    """A 1-way evaluation whose true class IoU is ``p[c]`` (E[I | c] / E[U | c]); with
    ``shrink``, also a second method on the same episodes whose true IoU is ``shrink * p[c]``."""
    c = len(p)
    cls = rng.integers(0, c, size=episodes)
    union = 1 + np.round(rng.lognormal(7.0, 1.0, size=episodes)).astype(np.int64)
    mean = np.asarray(p)[cls]
    q = rng.beta(4.0 * mean, 4.0 * (1.0 - mean))  # per-episode quality, independent of the size
    bg_u = 1 + rng.integers(0, 5000, size=episodes)
    bg_i = rng.binomial(bg_u, 0.8)
    tables = []
    for factor in (1.0,) if shrink is None else (1.0, shrink):
        inter = rng.binomial(union, q * factor)
        tables.append(EpisodeCounts(cls[:, None] + 1, np.stack([bg_i, inter], 1), np.stack([bg_u, union], 1),
                                    np.ones((episodes, 1), bool), range(1, c + 1)))
    return tables


CASES = [  # ways, absent_labels, empty_class, classes
    (1, "count", "zero", [3, 5, 7, 9]),
    (1, "skip", "exclude", [3, 5, 7, 9]),
    (2, "skip", "zero", [2, 4, 6, 8, 10]),
    (2, "count", "exclude", list(range(1, 13))),
]


@pytest.mark.parametrize("ways,absent_labels,empty_class,classes", CASES)
def test_episode_table_reproduces_the_meter_exactly(ways, absent_labels, empty_class, classes):
    rng = np.random.default_rng(ways * 10 + len(classes))
    episodes = _episodes(rng, classes[:-1], 40, ways)  # the last class never occurs
    plain = _fill(IoUMeter(classes, absent_labels=absent_labels, empty_class=empty_class), episodes)
    kept = _fill(IoUMeter(classes, absent_labels=absent_labels, empty_class=empty_class, keep_episodes=True), episodes)
    result = plain.compute()
    assert kept.compute() == result  # keeping episodes changes nothing
    assert {k: v for k, v in kept.state_dict().items() if k != "episode_table"} == plain.state_dict()
    table = kept.episode_table()
    assert table.episodes == 40 and table.ways == ways
    assert table.miou() == result["miou"] and table.fb_iou() == result["fb_iou"]  # identical floats
    assert table.class_iou() == result["class_iou"]
    strict = IoUMeter(classes, absent_labels=absent_labels, empty_class="error", keep_episodes=True)
    with pytest.raises(ConfigError, match="have no episode"):
        _fill(strict, episodes).episode_table().miou()


def test_json_round_trip_and_columns():
    rng = np.random.default_rng(1)
    one = _fill(IoUMeter([1, 2, 3], keep_episodes=True), _episodes(rng, [1, 2, 3], 7)).episode_table("digest-1")
    data = json.loads(json.dumps(one.to_json()))
    assert data["columns"] == ["class", "fg_i", "fg_u", "bg_i", "bg_u", "recorded"]
    assert data["rows"][0] == [int(one.classes[0, 0]), int(one.inter[0, 1]), int(one.union[0, 1]),
                               int(one.inter[0, 0]), int(one.union[0, 0]), 1]
    back = EpisodeCounts.from_json(data)
    for key in ("classes", "inter", "union", "recorded"):
        assert np.array_equal(getattr(back, key), getattr(one, key))
    assert (back.class_ids, back.empty_class, back.episode_key) == ((1, 2, 3), "zero", "digest-1")
    two = _fill(IoUMeter([1, 2, 3, 4], absent_labels="skip", keep_episodes=True),
                _episodes(rng, [1, 2, 3, 4], 9, ways=2)).episode_table()
    assert not two.recorded.all()  # skip left some ways unrecorded
    assert EpisodeCounts.from_json(json.loads(json.dumps(two.to_json()))).to_json() == two.to_json()
    assert EpisodeCounts.from_json(two.to_json()).miou() == two.miou()
    with pytest.raises(ConfigError, match="columns"):
        EpisodeCounts.from_json({**data, "columns": data["columns"][::-1]})
    with pytest.raises(ConfigError, match="not an episode-count table"):
        EpisodeCounts.from_json({"rows": []}, "report.json")
    with pytest.raises(ConfigError, match="above its union"):
        EpisodeCounts.from_json({**data, "rows": [[1, 5, 4, 0, 0, 1]]})


def test_state_dict_and_merge_concatenate_rows():
    rng = np.random.default_rng(2)
    episodes = _episodes(rng, [1, 2, 3], 12)
    full = _fill(IoUMeter([1, 2, 3], keep_episodes=True), episodes)
    first = _fill(IoUMeter([1, 2, 3], keep_episodes=True), episodes[:5])
    second = _fill(IoUMeter([1, 2, 3], keep_episodes=True), episodes[5:])
    first.merge(json.loads(json.dumps(second.state_dict())))  # as gathered across ranks
    assert first.compute() == full.compute()
    assert first.episode_table().to_json() == full.episode_table().to_json()
    restored = IoUMeter([1, 2, 3], keep_episodes=True)
    restored.load_state_dict(full.state_dict())
    assert restored.episode_table().to_json() == full.episode_table().to_json()
    assert IoUMeter([1, 2, 3], keep_episodes=True).merge(IoUMeter([1, 2, 3])).episodes == 0  # empty: no rows needed
    no_rows = _fill(IoUMeter([1, 2, 3]), episodes[:2])
    assert IoUMeter([1, 2, 3]).merge(full).episodes == 12  # a plain meter ignores the rows
    with pytest.raises(ConfigError, match="no episode rows"):
        IoUMeter([1, 2, 3], keep_episodes=True).merge(no_rows)
    with pytest.raises(ConfigError, match="2-way batch"):
        full.update(episodes[0][0] % 2, episodes[0][1] % 3, [1, 2])
    assert full.episodes == 12
    with pytest.raises(ConfigError, match="keep_episodes"):
        no_rows.episode_table()
    full.reset()
    assert full.episode_table().episodes == 0


@pytest.mark.parametrize("ways,absent_labels,empty_class,classes", CASES)
@pytest.mark.parametrize("metric", ["miou", "fb_iou"])
def test_vectorised_replicates_equal_a_meter_per_resample(ways, absent_labels, empty_class, classes, metric):
    rng = np.random.default_rng(len(classes) + ways)
    episodes = _episodes(rng, classes, 14, ways, absent=0.4)  # few episodes: resamples miss classes
    table = _fill(IoUMeter(classes, absent_labels=absent_labels, empty_class=empty_class, keep_episodes=True),
                  episodes).episode_table()
    indices = rng.integers(0, len(episodes), size=(60, len(episodes)))
    naive = []
    for draw in indices:
        meter = IoUMeter(classes, absent_labels=absent_labels, empty_class=empty_class)
        _fill(meter, [episodes[i] for i in draw], batch=len(draw))
        naive.append(meter.compute()[metric])
    assert replicate_statistics(table, indices, metric).tolist() == naive  # exact equality


def test_bootstrap_matches_the_exact_distribution_of_a_tiny_case():
    # 4 episodes, 2 classes: all 4**4 resamples are equally likely
    table = EpisodeCounts([[1], [1], [2], [2]], [[50, 3], [40, 9], [70, 1], [30, 6]],
                          [[90, 10], [60, 12], [80, 8], [45, 7]], np.ones((4, 1), bool), [1, 2])
    exact = np.array([table.take(idx).miou() for idx in itertools.product(range(4), repeat=4)])
    exact.sort()
    result = bootstrap_miou([table], replicates=200_000, seed=3)
    values = replicate_statistics(table, np.random.default_rng(4).integers(0, 4, size=(200_000, 4)))
    assert values.mean() == pytest.approx(exact.mean(), abs=2e-3)
    for v in np.unique(exact):  # the replicates' CDF is the exact one at every support point
        assert (values <= v).mean() == pytest.approx((exact <= v).mean(), abs=6e-3)
    q = lambda level: exact[int(np.ceil(level * len(exact))) - 1]  # noqa: E731
    assert q(0.015) <= result.low <= q(0.035) and q(0.965) <= result.high <= q(0.985)
    assert result.estimate == table.miou() and result.method == "percentile" and result.replicates == 200_000


@pytest.mark.slow
def test_coverage_of_the_95_percent_interval():
    """400 synthetic evaluations of 300 episodes (5 classes drawn uniformly; 300 replicates
    each, for speed): the interval covers the true mIoU 92-98% of the time; paired
    differences too. (Over 2000 such evaluations at 1000 replicates: 94.2% and 94.1%.)"""
    p = np.array([0.3, 0.45, 0.55, 0.65, 0.8])
    rng = np.random.default_rng(11)
    covered = covered_diff = 0
    for trial in range(400):
        a, b = _synthetic(rng, p, 300, shrink=0.9)
        single = bootstrap_miou([a], replicates=300, seed=trial)
        covered += bool(single.low <= p.mean() <= single.high)
        diff = paired_difference([[a]], [[b]], replicates=300, seed=trial)
        covered_diff += bool(diff.low <= 0.1 * p.mean() <= diff.high)
    assert 0.92 <= covered / 400 <= 0.98
    assert 0.92 <= covered_diff / 400 <= 0.98


def test_fold_mean_runs_and_paired_checks():
    p = np.array([0.3, 0.45, 0.55, 0.65, 0.8])
    rng = np.random.default_rng(5)
    folds = [[_synthetic(rng, p, 300)[0]] for _ in range(4)]
    singles = [bootstrap_miou(runs) for runs in folds]
    mean = bootstrap_mean(folds)
    assert mean.estimate == pytest.approx(np.mean([s.estimate for s in singles]))
    assert mean.high - mean.low < 0.7 * min(s.high - s.low for s in singles)
    assert bootstrap_mean(folds[:1]) == singles[0] == bootstrap_miou(folds[0][0])
    assert bootstrap_mean(folds, seed=0) == mean and bootstrap_mean(folds, seed=1) != mean  # seeded
    same = paired_difference(folds, folds)
    assert (same.estimate, same.low, same.high, same.std, same.contains_zero) == (0.0, 0.0, 0.0, 0.0, True)
    runs = [_synthetic(rng, p, 100)[0] for _ in range(3)]  # a multi-run protocol: the mean of runs
    summary = summarize_runs([{"miou": t.miou(), "fb_iou": t.fb_iou()} for t in runs])  # miou(): the meter's value
    assert bootstrap_miou(runs).estimate == summary["miou"]
    assert bootstrap_miou(runs, metric="fb_iou").estimate == summary["fb_iou"]


def test_paired_difference_refuses_other_episodes():
    rng = np.random.default_rng(6)
    a = _synthetic(rng, [0.4, 0.6], 50)[0]
    other = _synthetic(rng, [0.4, 0.6], 50)[0]
    with pytest.raises(ConfigError, match=r"fold 0 run 0: episode \d+ has classes") as info:
        paired_difference([[a]], [[other]])
    assert "\n" not in str(info.value)
    keyed = lambda t, k: EpisodeCounts(t.classes, t.inter, t.union, t.recorded, t.class_ids, episode_key=k)  # noqa: E731
    with pytest.raises(ConfigError, match="episode keys differ"):
        paired_difference([[keyed(a, "x")]], [[keyed(a, "y")]])
    assert paired_difference([[keyed(a, "x")]], [[keyed(a, "x")]]).estimate == 0.0
    with pytest.raises(ConfigError, match="2 folds"):
        paired_difference([[a], [a]], [[a]])
    with pytest.raises(ConfigError, match="runs"):
        paired_difference([[a, a]], [[a]])
    with pytest.raises(ConfigError, match="50 episodes"):
        paired_difference([[a]], [[a.take(range(40))]])


def test_options_and_empty_class_error():
    table = _synthetic(np.random.default_rng(7), [0.4, 0.6], 30)[0]
    for kwargs, match in (({"replicates": 1}, "replicates"), ({"level": 1.5}, "level"),
                          ({"seed": -1}, "seed"), ({"metric": "dice"}, "metric"), ({"level": "95%"}, "level")):
        with pytest.raises(ConfigError, match=match):
            bootstrap_miou([table], **kwargs)
    with pytest.raises(ConfigError, match="list of runs"):
        bootstrap_mean([table])
    strict = EpisodeCounts(table.classes[:3], table.inter[:3], table.union[:3], table.recorded[:3],
                           [1, 2, 3], empty_class="error")
    with pytest.raises(ConfigError, match="have no episode"):
        bootstrap_miou([strict])
    rare = EpisodeCounts([[1], [1], [1], [2]], [[1, 1]] * 4, [[2, 2]] * 4, np.ones((4, 1), bool), [1, 2],
                         empty_class="error")
    with pytest.raises(ConfigError, match="bootstrap resamples miss a class"):
        bootstrap_miou([rare], replicates=200)


def test_timing_of_a_four_fold_case():
    rng = np.random.default_rng(8)
    folds = [[_synthetic(rng, [0.3, 0.5, 0.6, 0.7, 0.8], 1000)[0]] for _ in range(4)]
    start = time.perf_counter()
    bootstrap_mean(folds, replicates=2000)
    assert time.perf_counter() - start < 5.0  # ~0.15 s measured on one core
