"""Tests of fss.metrics: class-wise mIoU, FB-IoU, N-way, merging and run summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fss.errors import ConfigError
from fss.metrics import IoUMeter, summarize_runs

# Three hand-counted 2x4 episodes (see the counts next to each).
# E1, class 1: the (1,1) pixel is ignored. fg: I=2, U=4; bg: I=3, U=5.
E1_TARGET = np.array([[1, 1, 0, 0], [1, 255, 0, 0]], dtype=np.uint8)
E1_PRED = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=np.int64)
# E2, class 1: fg: I=6, U=8; bg: I=0, U=2.
E2_TARGET = np.ones((2, 4), dtype=np.uint8)
E2_PRED = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int64)
# E3, class 2: fg: I=0, U=4; bg: I=4, U=8.
E3_TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.uint8)
E3_PRED = np.zeros((2, 4), dtype=np.int64)

EPISODES = [(E1_PRED, E1_TARGET, 1), (E2_PRED, E2_TARGET, 1), (E3_PRED, E3_TARGET, 2)]


def _meter(classes=(1, 2), **kw) -> IoUMeter:
    meter = IoUMeter(classes, **kw)
    for pred, target, cls in EPISODES:
        meter.update(pred, target, cls)
    return meter


def test_hand_counted_miou_and_fb_iou():
    result = _meter().compute()
    assert result["class_iou"][1] == pytest.approx(8 / 12)
    assert result["class_iou"][2] == 0.0
    assert result["miou"] == pytest.approx((8 / 12 + 0.0) / 2)
    assert result["bg_iou"] == pytest.approx(7 / 15)
    assert result["fg_iou"] == pytest.approx(8 / 16)
    assert result["fb_iou"] == pytest.approx((7 / 15 + 8 / 16) / 2)
    assert result["class_episodes"] == {1: 2, 2: 1}
    assert result["episodes"] == 3
    assert result["missing_classes"] == []
    # summing I and U per class is not averaging per-episode IoUs: (2/4 + 6/8) / 2 = 0.625
    assert result["class_iou"][1] != pytest.approx((2 / 4 + 6 / 8) / 2)


def test_ignore_index_none_counts_255_as_background():
    meter = IoUMeter([1], ignore_index=None)
    meter.update(E1_PRED, E1_TARGET, 1)
    result = meter.compute()
    assert result["class_iou"][1] == pytest.approx(2 / 5)
    assert result["bg_iou"] == pytest.approx(3 / 6)
    ignoring = IoUMeter([1])
    ignoring.update(E1_PRED, E1_TARGET, 1)
    assert ignoring.compute()["class_iou"][1] == pytest.approx(2 / 4)


def test_torch_and_numpy_inputs_agree():
    meter = IoUMeter([1, 2])
    for pred, target, cls in EPISODES:
        meter.update(torch.from_numpy(pred), torch.from_numpy(target.astype(np.int64)), torch.tensor(cls))
    assert meter.compute() == _meter().compute()
    boolean = IoUMeter([1, 2])
    for pred, target, cls in EPISODES:
        boolean.update(torch.from_numpy(pred.astype(bool)), target, cls)
    assert boolean.compute() == _meter().compute()


def test_update_batch_equals_repeated_update():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 2, size=(6, 9, 11))
    targets = rng.integers(0, 2, size=(6, 9, 11)).astype(np.uint8)
    targets[rng.random(targets.shape) < 0.1] = 255
    classes = [3, 5, 3, 7, 5, 3]
    one_by_one = IoUMeter([3, 5, 7])
    for p, t, c in zip(preds, targets, classes):
        one_by_one.update(p, t, c)
    batched = IoUMeter([3, 5, 7])
    batched.update_batch(torch.from_numpy(preds), torch.from_numpy(targets), torch.tensor(classes))
    assert batched.state_dict() == one_by_one.state_dict()
    assert batched.compute() == one_by_one.compute()


def test_merge_and_state_dict_round_trip():
    full = _meter()
    first, second = IoUMeter([1, 2]), IoUMeter([1, 2])
    first.update(*EPISODES[0])
    second.update(*EPISODES[1])
    second.update(*EPISODES[2])
    state = json.loads(json.dumps(second.state_dict()))  # plain Python, as gathered across ranks
    assert first.merge(state).compute() == full.compute()
    restored = IoUMeter([1, 2])
    restored.load_state_dict(full.state_dict())
    assert restored.compute() == full.compute()
    assert IoUMeter([1, 2]).merge(first).episodes == 3


def test_merge_rejects_meters_built_differently():
    with pytest.raises(ConfigError, match="class_ids"):
        IoUMeter([1, 2]).merge(IoUMeter([1, 3]))
    with pytest.raises(ConfigError, match="ignore_index"):
        IoUMeter([1, 2]).merge(IoUMeter([1, 2], ignore_index=None))


def test_empty_class_modes():
    zero = _meter((1, 2, 3)).compute()
    assert zero["missing_classes"] == [3]
    assert zero["class_iou"][3] == 0.0
    assert zero["miou"] == pytest.approx((8 / 12 + 0.0 + 0.0) / 3)  # PFENet/HSNet
    excluded = _meter((1, 2, 3), empty_class="exclude").compute()
    assert excluded["miou"] == pytest.approx((8 / 12 + 0.0) / 2)
    assert excluded["missing_classes"] == [3]
    with pytest.raises(ConfigError, match=r"\[3\]") as info:
        _meter((1, 2, 3), empty_class="error").compute()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        IoUMeter([1, 2], empty_class="exclude").compute()
    for result in (zero, excluded):
        assert all(np.isfinite(v) for v in result["class_iou"].values())


def test_absent_labels_skip_follows_panet():
    pred = np.array([[1, 1, 0, 0]])
    target = np.zeros((1, 4), dtype=np.uint8)  # the class is absent from the target
    counted = IoUMeter([4])
    counted.update(pred, target, 4)
    assert counted.class_union.tolist() == [2] and counted.class_episodes == {4: 1}
    skipped = IoUMeter([4], absent_labels="skip")
    skipped.update(pred, target, 4)
    assert skipped.class_union.tolist() == [0] and skipped.class_episodes == {4: 0}
    assert skipped.fb_union.tolist() == [4, 0]  # background present: I=2, U=4
    assert skipped.fb_intersection.tolist() == [2, 0]


def test_two_way_hand_counted():
    meter = IoUMeter([4, 7, 9])
    meter.update(np.array([[0, 1, 1, 2]]), np.array([[0, 1, 2, 255]]), [4, 7])
    state = meter.state_dict()
    assert state["class_intersection"] == [1, 0, 0]
    assert state["class_union"] == [2, 1, 0]
    assert state["fb_intersection"] == [1, 1] and state["fb_union"] == [1, 3]
    assert meter.class_episodes == {4: 1, 7: 1, 9: 0}


def _panet_record(pred, target, labels, skip_absent):
    """The reference's per-label TP/FP/FN bookkeeping, written independently with sets."""
    stats = {}
    for j, label in enumerate([0] + list(labels)):
        predicted = {tuple(p) for p in np.argwhere((pred == j) & (target != 255))}
        truth = {tuple(p) for p in np.argwhere(target == j)}
        if truth or not skip_absent:
            stats[label] = (len(predicted & truth), len(predicted | truth))
    return stats


@pytest.mark.parametrize("absent_labels", ["count", "skip"])
def test_n_way_matches_set_based_reference(absent_labels):
    rng = np.random.default_rng(3)
    classes = [2, 5, 8, 11]
    meter = IoUMeter(classes, absent_labels=absent_labels)
    inter = {c: 0 for c in [0] + classes}
    union = {c: 0 for c in [0] + classes}
    for _ in range(12):
        ways = int(rng.integers(1, 3))
        labels = [int(c) for c in rng.choice(classes, size=ways, replace=False)]
        pred = rng.integers(0, ways + 1, size=(7, 6))
        target = rng.integers(0, ways + 1, size=(7, 6))
        target[:, 0] = rng.choice([0, 255], size=7)
        if rng.random() < 0.3:
            target[target == ways] = 0  # a way absent from the query
        meter.update(pred, target, labels)
        for label, (i, u) in _panet_record(pred, target, labels, absent_labels == "skip").items():
            inter[label] += i
            union[label] += u
    result = meter.compute()
    for c in classes:
        expected = inter[c] / union[c] if union[c] else 0.0
        assert result["class_iou"][c] == pytest.approx(expected)
    fg_i, fg_u = sum(inter[c] for c in classes), sum(union[c] for c in classes)
    assert result["fb_iou"] == pytest.approx((inter[0] / union[0] + fg_i / fg_u) / 2)


def test_errors_are_one_line_config_errors():
    meter = IoUMeter([1, 2])
    with pytest.raises(ConfigError, match="class id 6") as info:
        meter.update(E1_PRED, E1_TARGET, 6)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="does not match"):
        meter.update_batch(np.zeros((1, 2, 4), np.int64), np.zeros((1, 2, 5), np.uint8), [1])
    with pytest.raises(ConfigError, match="HxW"):
        meter.update(np.zeros((2, 4), np.int64), np.zeros((1, 2, 4), np.uint8), 1)
    with pytest.raises(ConfigError, match="integer labels"):
        meter.update(np.zeros((2, 4), np.float32), E1_TARGET, 1)
    with pytest.raises(ConfigError, match="outside 0..1"):
        meter.update(np.full((2, 4), 2), E1_TARGET, 1)
    with pytest.raises(ConfigError, match="target holds label 3"):
        meter.update(E1_PRED, np.full((2, 4), 3, np.uint8), 1)
    with pytest.raises(ConfigError, match="repeat"):
        meter.update(E1_PRED, E1_TARGET, [1, 1])
    with pytest.raises(ConfigError, match="do not match a batch"):
        meter.update_batch(np.zeros((2, 2, 4), np.int64), np.zeros((2, 2, 4), np.uint8), [1])
    with pytest.raises(ConfigError, match="empty_class"):
        IoUMeter([1], empty_class="nan")
    assert meter.episodes == 0  # nothing was counted by the failed updates


def test_summarize_runs_mean_and_population_std():
    runs = [
        {"miou": 0.5, "fb_iou": 0.7, "class_iou": {1: 0.4, 2: 0.6}},
        {"miou": 0.6, "fb_iou": 0.7, "class_iou": {1: 0.5, 2: 0.7}},
        {"miou": 0.7, "fb_iou": 0.7, "class_iou": {1: 0.6, 2: 0.8}},
    ]
    summary = summarize_runs(runs)
    assert summary["miou"] == pytest.approx(0.6)
    assert summary["miou_std"] == pytest.approx(np.sqrt(2 / 3) * 0.1)  # ddof = 0
    assert summary["fb_iou"] == pytest.approx(0.7) and summary["fb_iou_std"] == pytest.approx(0.0)
    assert summary["class_iou"] == pytest.approx({1: 0.5, 2: 0.7})
    assert summary["class_iou_std"][1] == pytest.approx(np.std([0.4, 0.5, 0.6]))
    assert summary["runs"] == runs
    with pytest.raises(ConfigError):
        summarize_runs([])
    real = summarize_runs([_meter().compute(), _meter().compute()])
    assert real["miou"] == pytest.approx(1 / 3) and real["miou_std"] == 0.0


def test_keep_episodes_hand_counted_rows_and_unchanged_results():
    kept = _meter(keep_episodes=True)
    assert kept.compute() == _meter().compute()
    assert {k: v for k, v in kept.state_dict().items() if k != "episode_table"} == _meter().state_dict()
    table = kept.episode_table().to_json()
    assert table["columns"] == ["class", "fg_i", "fg_u", "bg_i", "bg_u", "recorded"]
    assert table["rows"] == [[1, 2, 4, 3, 5, 1], [1, 6, 8, 0, 2, 1], [2, 0, 4, 4, 8, 1]]  # E1, E2, E3 above
    skipped = IoUMeter([4], absent_labels="skip", keep_episodes=True)
    skipped.update(np.array([[1, 1, 0, 0]]), np.zeros((1, 4), dtype=np.uint8), 4)
    assert skipped.episode_table().to_json()["rows"] == [[4, 0, 0, 2, 4, 0]]  # absent class: not recorded
