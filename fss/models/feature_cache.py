"""Evaluation feature cache for the frozen backbone.

At test time a frozen backbone's features of an image depend only on the image tensor
(which already went through the deterministic test-time resize and normalisation) and on
the backbone's weights, so they can be computed once and reused across episodes, shots,
protocols and re-evaluations of a checkpoint. :class:`FeatureCache` keeps them in memory
(least recently used entries evicted beyond ``max_bytes``) and optionally on disk
(``directory``; entries are written atomically and checked on read, so a truncated or
damaged file is recomputed, never loaded).

How the models use it: every method sends its backbone calls through
:meth:`fss.models.base.FSSModel.frozen_features` (one hook). Without an attached cache,
in training mode or with gradients enabled, that hook is a plain call of the computation.
``with cache.attached(model):`` (done by ``fss.evaluation.evaluate_model``) binds the
cache to an eval-mode model; the hook then splits the batch per image (row), looks each
row up, computes only the missing rows (as one sub-batch), stores them and reassembles
the batch in its original order.

The key of a row is a SHA-256 digest of

* the exact bytes, dtype and shape of every input row (the image, and the resized
  support mask where the computation uses it, e.g. PFENet's masked block 4),
* the call site's tag, the model class and the backbone class,
* a fingerprint of the backbone's ``state_dict`` (every weight and buffer, with names,
  dtypes and shapes),
* the device type, the autocast state (enabled, dtype), channels_last of the input,
  the TF32 switches and the torch version (numerics may differ between any of these),

so a different image, resolution, backbone, weight or precision can never hit a stale
entry. The fingerprint is computed when the cache is attached and recomputed whenever a
backbone tensor is modified in place (its version counter or storage moves); a parameter
replaced, or written through ``.data``, is seen at the next attach.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from fss.atomic import create_temporary

#: bump when the key recipe or the on-disk layout changes (old entries then never match)
CACHE_FORMAT = "fss-feature-cache-1"
#: first bytes of an on-disk entry; then the SHA-256 of the payload, then the payload
DISK_MAGIC = b"FSSFC1\n"
DISK_SUFFIX = ".fsc"
#: default memory budget of ``fss evaluate`` (MiB)
DEFAULT_MAX_MB = 2048


@dataclass
class CacheStats:
    """Counters of one :class:`FeatureCache` (rows, not batches)."""

    hits: int = 0  # rows served from memory
    disk_hits: int = 0  # rows served from disk (then kept in memory)
    misses: int = 0  # rows computed
    stores: int = 0  # rows put in memory
    evictions: int = 0  # rows dropped from memory by the LRU bound
    disk_writes: int = 0
    disk_errors: int = 0  # unreadable / truncated / mismatching disk entries (recomputed)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def tensor_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _update_with_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed dtype, shape and the exact bytes of ``tensor`` (any device, any dtype)."""
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    data = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    digest.update(memoryview(data.cpu().numpy()))


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict``: names, dtypes, shapes and bytes of every tensor."""
    digest = hashlib.sha256(b"state|")
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"|")
        if isinstance(value, torch.Tensor):
            _update_with_tensor(digest, value)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]


def _version_stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    """Cheap check of tensors: changes when one is modified in place through ops the
    version counter sees (``copy_``, ``load_state_dict``, optimiser steps, ``add_``)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def numerics_context(device: torch.device, channels_last: bool) -> str:
    """Everything besides inputs and weights that can change a backbone's output bits."""
    kind = device.type
    autocast = torch.is_autocast_enabled(kind) if kind in ("cpu", "cuda") else False
    dtype = str(torch.get_autocast_dtype(kind)) if autocast else "-"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if kind == "cuda" else ()
    return f"{kind}|autocast={autocast}:{dtype}|channels_last={channels_last}|tf32={tf32}|torch={torch.__version__}"


class FeatureCache:
    """Backbone outputs keyed by input digest (see the module docstring).

    ``max_bytes``: memory bound (least recently used rows are evicted; a row larger than
    the bound is not kept). ``directory``: optional on-disk store shared between processes
    (not bounded: delete the directory to reclaim the space).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_MB << 20, directory: str | os.PathLike | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes_in_memory = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        """Forget every in-memory row (the disk store is left alone)."""
        self._memory.clear()
        self._sizes.clear()
        self.bytes_in_memory = 0

    # ------------------------------------------------------------------ storage
    def lookup(self, key: str, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """The tensors stored under ``key`` (memory first, then disk), or None."""
        found = self._memory.get(key)
        if found is not None:
            self._memory.move_to_end(key)
            self.stats.hits += 1
            return tuple(t if t.device == device else t.to(device) for t in found)
        if self.directory is None:
            return None
        loaded = self._read_disk(key)
        if loaded is None:
            return None
        self.stats.disk_hits += 1
        tensors = tuple(t.to(device) for t in loaded)
        self._remember(key, tensors)
        return tensors

    def store(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        """Keep ``tensors`` (one row's outputs, already detached copies) under ``key``."""
        self._remember(key, tensors)
        if self.directory is not None:
            self._write_disk(key, tensors)

    def _remember(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        size = tensor_nbytes(tensors)
        if size > self.max_bytes:
            return
        if key in self._memory:
            self.bytes_in_memory -= self._sizes.pop(key)
            del self._memory[key]
        while self._memory and self.bytes_in_memory + size > self.max_bytes:
            old, _ = self._memory.popitem(last=False)
            self.bytes_in_memory -= self._sizes.pop(old)
            self.stats.evictions += 1
        self._memory[key] = tensors
        self._sizes[key] = size
        self.bytes_in_memory += size
        self.stats.stores += 1

    def disk_path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}{DISK_SUFFIX}"

    def _write_disk(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        """Atomic write: a temporary file in the same folder, fsync, then ``os.replace``."""
        path = self.disk_path(key)
        if path.is_file():
            return
        buffer = io.BytesIO()
        torch.save({"format": CACHE_FORMAT, "key": key, "tensors": [t.detach().cpu() for t in tensors]}, buffer)
        payload = buffer.getvalue()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temporary(path.parent, prefix=f".{key[:16]}.", suffix=".tmp")  # umask mode
        except OSError:  # unwritable or full: keep evaluating from memory
            self.stats.disk_errors += 1
            return
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(DISK_MAGIC + hashlib.sha256(payload).digest() + payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            self.stats.disk_errors += 1
            return
        self.stats.disk_writes += 1

    def _read_disk(self, key: str) -> list[torch.Tensor] | None:
        """Load and verify one entry; None (and the entry is recomputed) when missing or bad."""
        path = self.disk_path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        head = len(DISK_MAGIC)
        payload = blob[head + 32:]
        data = None
        if blob[:head] == DISK_MAGIC and hashlib.sha256(payload).digest() == blob[head:head + 32]:
            try:
                data = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - any unreadable entry is a miss
                data = None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key \
                or not isinstance(data.get("tensors"), list):
            # damaged (truncated, corrupted) or not this key's entry: drop it; it is recomputed and rewritten
            self.stats.disk_errors += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return list(data["tensors"])

    # ------------------------------------------------------------------ binding
    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["CacheBinding"]:
        """Use this cache for ``model``'s backbone calls inside the block (eval mode only).

        The model must be in eval mode (the hook skips the cache in training mode anyway).
        """
        if model.training:
            raise RuntimeError("the feature cache is for evaluation only: call model.eval() first")
        binding = CacheBinding(self, model)
        previous = model.__dict__.get("_feature_cache_binding")
        model.__dict__["_feature_cache_binding"] = binding
        try:
            yield binding
        finally:
            if previous is None:
                model.__dict__.pop("_feature_cache_binding", None)
            else:
                model.__dict__["_feature_cache_binding"] = previous


class CacheBinding:
    """A :class:`FeatureCache` bound to one model: knows the backbone's fingerprint.

    The fingerprint is computed here (every ``attached`` block) and again whenever a
    backbone tensor's version counter or storage moves; replacing a parameter object, or
    writing through ``.data``, inside one ``attached`` block is not seen until the next.
    """

    #: per-row digests of the last few input tensors (the same images feed several calls)
    MEMO_SIZE = 4

    def __init__(self, cache: FeatureCache, model: nn.Module) -> None:
        self.cache = cache
        self.model = model
        self._tensors = _state_tensors(self.backbone)
        self._stamp = None
        self._fingerprint = ""
        self._memo: list[tuple[torch.Tensor, int, list[bytes]]] = []
        self.fingerprint()

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.model, "backbone", self.model)

    def fingerprint(self) -> str:
        """Backbone weight fingerprint; recomputed when a backbone tensor changed."""
        stamp = _version_stamp(self._tensors)
        if stamp != self._stamp:
            self._fingerprint = state_fingerprint(self.backbone)
            self._stamp = stamp
        return self._fingerprint

    def _row_digests(self, tensor: torch.Tensor) -> list[bytes]:
        """SHA-256 of every row's dtype, shape and bytes; remembered for the same (unchanged)
        tensor object, which the memo keeps alive so its identity cannot be reused."""
        for held, version, digests in self._memo:
            if held is tensor and held._version == version:
                return digests
        digests = []
        for row in range(tensor.shape[0]):
            digest = hashlib.sha256()
            _update_with_tensor(digest, tensor[row])
            digests.append(digest.digest())
        self._memo = [(tensor, tensor._version, digests), *self._memo[: self.MEMO_SIZE - 1]]
        return digests

    def row_keys(self, tag: str, inputs: Sequence[torch.Tensor | None]) -> list[str]:
        """One key per row of the inputs (all share the leading batch size)."""
        first = next(t for t in inputs if t is not None)
        channels_last = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) \
            and not first.is_contiguous()
        prefix = "|".join((
            CACHE_FORMAT, tag, f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            f"{type(self.backbone).__module__}.{type(self.backbone).__qualname__}",
            str(getattr(self.model, "backbone_name", "")), self.fingerprint(),
            numerics_context(first.device, channels_last),
        )).encode()
        rows = [None if t is None else self._row_digests(t) for t in inputs]
        keys = []
        for row in range(first.shape[0]):
            digest = hashlib.sha256(prefix)
            for i, per_row in enumerate(rows):
                digest.update(f"|input{i}|".encode() + (b"none" if per_row is None else per_row[row]))
            keys.append(digest.hexdigest())
        return keys

    def run(self, tag: str, compute: Callable, inputs: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """``compute(rows)`` for the rows not cached; the full batch's outputs in order."""
        first = next(t for t in inputs if t is not None)
        batch, device = first.shape[0], first.device
        keys = self.row_keys(tag, inputs)
        found: dict[str, tuple[torch.Tensor, ...]] = {}
        missing: list[int] = []  # first row of every missing key (duplicates computed once)
        missing_keys: set[str] = set()
        for row, key in enumerate(keys):
            if key in found or key in missing_keys:
                continue
            hit = self.cache.lookup(key, device)
            if hit is None:
                missing.append(row)
                missing_keys.add(key)
            else:
                found[key] = hit
        if missing:
            everything = len(missing) == batch
            rows = slice(None) if everything else torch.tensor(missing, device=device)
            outputs = tuple(compute(rows))
            if everything:
                for position, row in enumerate(missing):
                    entry = tuple(t[position:position + 1].clone() for t in outputs)
                    self.cache.store(keys[row], entry)
                self.cache.stats.misses += len(missing)
                return outputs
            for position, row in enumerate(missing):
                entry = tuple(t[position:position + 1].clone() for t in outputs)
                found[keys[row]] = entry
                self.cache.store(keys[row], entry)
            self.cache.stats.misses += len(missing)
        parts = [found[key] for key in keys]
        return tuple(torch.cat([part[i] for part in parts], dim=0) for i in range(len(parts[0])))
