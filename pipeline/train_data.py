"""The training episodes of a run, batch by batch: its fold lists and per-epoch loaders."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

import torch

from fss.data.access import open_prepared
from fss.data.episodes import EpisodeDataset, EpisodeLoader, TrainEpisodeSampler
from fss.data.transforms import build_train_transform
from pipeline.config import RunConfig
from pipeline.distributed import rank_slice


def open_split(config: RunConfig, split: str):
    """The run's fold list ``split`` (checked to hold the run's dataset)."""
    data = open_prepared(config.data.root, config.fold, split, config.data.convention, dataset=config.dataset,
                         cache=config.data.cache_images)
    if config.data.cache_images and config.data.num_workers > 0:
        data.preload()  # decoded once, shared by the forked workers
    return data


def training_ways(config: RunConfig) -> int:
    return int(config.knobs.get("ways", 1) or 1)


def build_training_episodes(config: RunConfig):
    """The run's training episodes (base classes), augmented, keyed by (seed, epoch, index)."""
    data = open_split(config, "train")
    ways = training_ways(config)
    sampling = config.data.sampling if ways == 1 else "panet"
    sampler = TrainEpisodeSampler(
        data, shot=config.shot, seed=config.train.seed, ways=ways, sampling=sampling,
        episodes_per_epoch=config.data.episodes_per_epoch if sampling == "panet" else None,
    )
    transform = build_train_transform(config.data.augment, config.dataset, size=config.data.train_size)
    return EpisodeDataset(data, sampler, transform, seed=config.train.seed, keep_original=False)


def epoch_loader(dataset, epoch: int, first_batch: int, batch_size: int, num_workers: int, pin: bool,
                 rank: int = 0, world_size: int = 1):
    """Batches ``first_batch..`` of ``epoch`` (drop_last); no global RNG is consumed.

    ``batch_size`` is the global batch; under torchrun rank ``rank`` of ``world_size`` loads
    its contiguous slice of each global batch (``pipeline.distributed.rank_slice``).
    """
    dataset.set_epoch(epoch)
    n = len(dataset) // batch_size
    batches = [rank_slice(list(range(b * batch_size, (b + 1) * batch_size)), rank, world_size)
               for b in range(first_batch, n)]
    return EpisodeLoader(
        dataset, num_workers=num_workers, pin=pin, batch_sampler=batches,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=worker_ignores_stop_signals if num_workers > 0 else None,
    )


class EpochBatches:
    """A run's training batches by iteration: a new loader per epoch, and mid-epoch on resume
    (the episodes depend on (seed, epoch, index) only). Leaving the ``with`` block drops the
    loader, also on an exception: a traceback keeps the caller's frame alive until exit, and
    workers that ignore SIGTERM would then block the interpreter's exit."""

    def __init__(self, dataset, per_epoch: int, batch_size: int, num_workers: int, pin: bool, device,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.per_epoch, self.device = dataset, per_epoch, device
        self.options = dict(batch_size=batch_size, num_workers=num_workers, pin=pin, rank=rank, world_size=world_size)
        self.batches = None

    def __enter__(self) -> "EpochBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.batches = None

    def at(self, it: int) -> tuple[int, dict]:
        """(epoch, batch on the device) of iteration ``it``; iterations come in order."""
        epoch, index = divmod(it, self.per_epoch)
        if self.batches is None or index == 0:
            self.batches = iter(epoch_loader(self.dataset, epoch, index, **self.options))
        return epoch, to_device(next(self.batches), self.device)


def worker_ignores_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the training process: a Ctrl-C or a kill
    of the process group (torchrun, a scheduler) then ends with the checkpoint the training
    loop writes, instead of a "DataLoader worker killed" error; the loader stops its workers
    when the loop returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """A worker that ignores SIGTERM must not outlive a training process killed with SIGKILL
    (it would stay blocked on its pipe for good): Linux sends it SIGKILL when the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl
        os._exit(1)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}
