"""Multi-process training with ``torchrun`` and DistributedDataParallel (issue #6).

``fss train`` run by ``torchrun`` (``python -m torch.distributed.run``) finds ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in its environment and trains one model with W processes:

* process group: NCCL when the device is CUDA, gloo on CPU (``train.dist_backend``); each
  process uses GPU ``LOCAL_RANK``;
* batch: ``train.batch_size`` is the GLOBAL batch (the paper's); global batch ``b`` is the
  same episodes as in one process and rank ``r`` takes its contiguous slice
  ``[r * B/W, (r + 1) * B/W)`` (:func:`rank_slice`), so the data do not depend on W.
  DDP averages the W gradients, i.e. the loss is the mean of the per-rank losses (as in the
  reference codebases' multi-GPU training); with equal valid-pixel counts per rank this is
  the one-process gradient up to float reduction order;
* learning rate: the configured one (the paper's for the paper's global batch); it is never
  scaled with W;
* randomness: episodes and augmentations are keyed by (seed, epoch, episode index)
  (:mod:`fss.data.episodes`), identical for any W; the model's training-time randomness
  (dropout, k-means seeds, CANet's history) is drawn on rank ``r`` at iteration ``it`` from
  the global RNGs seeded by ``(seed, r, it)`` (:func:`seed_rank_step`): ranks differ, and
  a resumed run redraws exactly what the uninterrupted one drew;
* BatchNorm layers in train mode (PANet's end-to-end backbone, the ``backbone_bn_train``
  compatibility knobs) normalise with the statistics of the global batch
  (:class:`GlobalBatchNorm2d`, ``train.sync_batchnorm``), as one process would;
* files: rank 0 alone writes the run directory (checkpoints, logs, curves, W&B, metrics)
  and validates (that work lives in :class:`pipeline.loop.MainProcess`); the others need neither the run directory nor a shared file system: the
  resume checkpoint is read by rank 0 and broadcast (:func:`broadcast_object`); saved
  weights never carry DDP's ``module.`` prefix.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fss.errors import CheckpointError, ConfigError, DataError, FSSError
from pipeline.config import resolve_device

BACKENDS = ("auto", "nccl", "gloo")
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, and whether it owns the process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()
_OWNED_GROUP = False  # setup_distributed initialised the process group (teardown destroys it)


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(
                f"WORLD_SIZE is set but {name} is not; launch with torchrun (python -m torch.distributed.run), which sets both."
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun.") from None


def launched_world_size(env: Mapping[str, str] | None = None) -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    env = os.environ if env is None else env
    return _env_int(env, "WORLD_SIZE", 1)


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """``train.batch_size`` (the global batch) split over the ranks; one-line error if uneven."""
    if global_batch % world_size:
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size} or launch a number of processes that divides {global_batch}."
        )
    return global_batch // world_size


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of one global batch (disjoint, covering it)."""
    per = per_rank_batch_size(len(indices), world_size)
    return list(indices[rank * per:(rank + 1) * per])


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> nccl on CUDA, gloo on CPU; nccl without CUDA is a user error."""
    if name not in BACKENDS:
        raise ConfigError(f"train.dist_backend={name!r} is unknown; choose one of: {', '.join(BACKENDS)}.")
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError("train.dist_backend=nccl needs CUDA devices; use gloo (or auto) for CPU training.")
    return name


def setup_distributed(device_name: str = "auto", backend: str = "auto", timeout_minutes: float = 60.0,
                      env: Mapping[str, str] | None = None) -> tuple[DistContext, torch.device]:
    """This process's :class:`DistContext` and device; initialises the process group.

    Without ``WORLD_SIZE > 1`` (a plain ``fss train``) nothing is initialised. A process
    group that already exists (a caller's own launcher) is used as it is and not destroyed
    by :func:`teardown_distributed`.
    """
    env = os.environ if env is None else env
    world = launched_world_size(env)
    device = resolve_device(device_name)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return SINGLE, device
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run fss train without torchrun.")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        owns = False
        used = dist.get_backend()
    else:
        rank = _env_int(env, "RANK")
        local_rank = _env_int(env, "LOCAL_RANK")
        used = resolve_backend(backend, device)
        owns = True
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this machine has {count} GPU(s); launch at most {count} processes per node (--nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if owns:
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if used == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend=used, **kwargs)
        global _OWNED_GROUP
        _OWNED_GROUP = True
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, backend=used, owns_group=owns), device


def teardown_distributed() -> None:
    """Destroy the process group :func:`setup_distributed` created (no-op otherwise)."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False


def launched_rank(env: Mapping[str, str] | None = None) -> int:
    """``RANK`` set by torchrun (0 when absent or not an integer)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK") or 0)
    except ValueError:
        return 0


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; the training checkpoint, small results)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_ERRORS: dict[str, type[FSSError]] = {cls.__name__: cls for cls in (FSSError, ConfigError, DataError, CheckpointError)}


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result; its user error is raised on all.

    So a rank-0-only step (the run directory, the checkpoint) never leaves the other ranks
    waiting at a collective call: they raise the same one-line error.
    """
    if not ctx.distributed:
        return fn()
    payload: tuple[str | None, str | None, Any] = (None, None, None)
    if ctx.is_main:
        try:
            payload = (None, None, fn())
        except FSSError as exc:
            payload = (type(exc).__name__, str(exc), None)
            broadcast_object(payload, ctx)
            raise
    payload = broadcast_object(payload, ctx)
    kind, message, result = payload
    if kind is not None:
        raise _ERRORS.get(kind, FSSError)(message)
    return result


def reduce_mean(values: Mapping[str, float | torch.Tensor], ctx: DistContext, *, flag: bool = False) -> tuple[dict[str, float], bool]:
    """Mean over ranks of scalar ``values`` and OR of ``flag``, in one all-reduce.

    Every rank gets the same numbers, so decisions taken from them (a non-finite loss, a
    stop signal) are taken by all ranks at the same iteration.
    """
    names = list(values)
    local = [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values.values()]
    if not ctx.distributed:
        return dict(zip(names, local)), bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
    buf = torch.tensor(local + [1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    out = (buf / ctx.world_size).tolist()
    return dict(zip(names, out[:-1])), buf[-1].item() > 0


def seed_rank_step(seed: int, rank: int, iteration: int) -> None:
    """Seed the global torch/numpy/python RNGs from (seed, rank, iteration).

    Distributed runs only: the model's training-time randomness differs between ranks and
    does not depend on where a run was interrupted (the checkpoint holds rank 0's RNG only).
    """
    digest = hashlib.sha256(f"fss-train-rank:{int(seed)}:{int(rank)}:{int(iteration)}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


# ---------------------------------------------------------------- BatchNorm over the global batch


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the ranks of the default process group."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are those of the whole global batch.

    The mean and the biased variance normalise over every rank's ``N x H x W`` values (two
    passes: the mean, then the mean squared deviation), the running variance is updated with
    the unbiased variance -- exactly ``nn.BatchNorm2d`` on the concatenated batch, as one
    process would compute it. Works on CPU (gloo) and CUDA (NCCL), unlike
    ``nn.SyncBatchNorm``. Outside distributed training mode it is ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        if not (use_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        xf = x.float()
        mean = all_reduce_sum(xf.sum(dims)) / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def use_global_batchnorm(model: nn.Module) -> int:
    """Turn every ``nn.BatchNorm2d`` of ``model`` into :class:`GlobalBatchNorm2d` in place.

    Same object, parameters, buffers and state-dict keys (the class is swapped), so
    checkpoints and the model's own references to its layers are unchanged. Returns the
    number of layers converted.
    """
    converted = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            converted += 1
    return converted


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, *, find_unused_parameters: bool = True,
               sync_batchnorm: bool = True) -> nn.Module:
    """The module to call in training: ``model`` itself, or DDP around it when distributed.

    ``find_unused_parameters``: methods have training-only branches and knobs that leave
    some trainable parameters without a gradient in a step (DDP would then wait for them
    forever), so it is on by default; turn it off only for a method whose every trainable
    parameter gets a gradient in every step.
    """
    if not ctx.distributed:
        return model

    if sync_batchnorm:
        use_global_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (its state dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
