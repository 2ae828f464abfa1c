"""Data loading: worker processes give the same batches and metrics as the main process."""

from __future__ import annotations

import pytest
import torch

from cache_helpers import evaluate, metrics, protocol, small_model
from fss.models.feature_cache import FeatureCache


def _tensors_equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all((isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))
               if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _training_episodes(root):
    from fss.data.episodes import EpisodeDataset, TrainEpisodeSampler
    from fss.data.transforms import build_train_transform
    from fss.data.access import open_prepared

    data = open_prepared(root, 0, "train", cache=True)
    return EpisodeDataset(data, TrainEpisodeSampler(data, shot=1, seed=3),
                          build_train_transform("pfenet", "synthetic", size=33), seed=3, keep_original=False)


def test_training_batches_identical_with_zero_and_two_workers(cache_synthetic_root):
    """Augmentation randomness comes from per-episode seeds, not from the worker processes."""
    from pipeline.train_data import epoch_loader

    dataset = _training_episodes(cache_synthetic_root)
    main = list(epoch_loader(dataset, epoch=1, first_batch=1, batch_size=2, num_workers=0, pin=False))
    workers = list(epoch_loader(dataset, epoch=1, first_batch=1, batch_size=2, num_workers=2, pin=False))
    assert len(main) == len(workers) == len(dataset) // 2 - 1
    assert all(_tensors_equal(a, b) for a, b in zip(main, workers))
    other_epoch = next(iter(epoch_loader(dataset, epoch=2, first_batch=1, batch_size=2, num_workers=0, pin=False)))
    assert not _tensors_equal(main[0], other_epoch)  # the check can fail: epochs differ


def test_evaluation_metrics_identical_with_zero_and_two_workers(cache_val_data):
    model = small_model("panet")
    proto = protocol(episodes=9)
    main = evaluate(model, cache_val_data, proto, num_workers=0)
    workers = evaluate(model, cache_val_data, proto, num_workers=2, cache=FeatureCache())
    assert metrics(main) == metrics(workers)
    assert main["class_episodes"] == workers["class_episodes"]


def test_small_worker_batches_travel_as_arrays_and_large_ones_as_tensors(cache_synthetic_root, monkeypatch):
    """Under PIPE_BATCH_BYTES a worker's batch is sent as numpy arrays (one pipe copy instead of
    a socket round trip per shared-memory tensor) and comes out as the same tensors."""
    import numpy as np

    import fss.data.episodes as T

    dataset = _training_episodes(cache_synthetic_root)
    dataset.set_epoch(0)
    samples = [dataset[0], dataset[1]]
    reference = T.collate_episodes(samples)
    small = T.collate_small_as_arrays(samples)
    assert all(isinstance(v, np.ndarray) for v in small.values())
    assert _tensors_equal(reference, T.arrays_to_tensors(small))
    monkeypatch.setattr(T, "PIPE_BATCH_BYTES", 1000)
    assert all(isinstance(v, torch.Tensor) for v in T.collate_small_as_arrays(samples).values())
    assert T.EpisodeLoader(dataset, num_workers=1, pin=False, batch_size=2).by_pipe
    assert not T.EpisodeLoader(dataset, num_workers=1, pin=True, batch_size=2).by_pipe  # pinned: shared memory
    assert not T.EpisodeLoader(dataset, num_workers=0, pin=False, batch_size=2).by_pipe
