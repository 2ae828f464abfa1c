"""Model files: this project's own format, and importers for released checkpoints.

Own format (``.pt``, written atomically, read with ``torch.load(weights_only=True)`` so
no pickled code ever runs)::

    {"format": "fss-model", "version": 1, "method": str, "backbone": str, "shot": int,
     "knobs": {...}, "state_dict": {...}, "source": str}

Importers for the reference implementations' released checkpoints register themselves
with :func:`register_importer` (see ``pfenet.py``, ``celp.py``, ``panet.py``); each maps
the reference key names onto this project's model and refuses a file of another format
with a one-line :class:`~fss.errors.CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from fss.errors import CheckpointError, ConfigError

MODEL_FILE_FORMAT = "fss-model"

#: format name -> importer(path, **options) -> (model, report dict)
IMPORTERS: dict[str, Callable[..., tuple[torch.nn.Module, dict]]] = {}


def register_importer(fmt: str):
    def deco(fn):
        IMPORTERS[fmt] = fn
        return fn

    return deco


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` without executing pickled code; one-line errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist; check the path.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or holding non-tensor pickled objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint file {p} is corrupt, truncated or not a weights-only PyTorch file "
            f"({first[:160]}); re-download or re-create it."
        ) from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename (never half-written)."""
    from fss.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)  # through a file object, a full disk is an OSError (ENOSPC), not torch's "enforce fail"


def save_model_file(path, model: torch.nn.Module, *, method: str, backbone: str, shot: int,
                    knobs: dict, source: str = "") -> None:
    atomic_torch_save(
        {
            "format": MODEL_FILE_FORMAT,
            "version": 1,
            "method": method,
            "backbone": backbone,
            "shot": int(shot),
            "knobs": dict(knobs),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "source": source,
        },
        path,
    )


def load_model_file(path) -> tuple[torch.nn.Module, dict]:
    """Build the model a model file describes and load its weights (strictly)."""
    from fss.models.registry import create_model

    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{path} is not a model file of this project; import released checkpoints with "
            f"'fss checkpoint import --format ...' first."
        )
    model = create_model(blob["method"], backbone=blob["backbone"], shot=blob["shot"], **blob["knobs"])
    load_strict(model, blob["state_dict"], str(path))
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta


def load_strict(model: torch.nn.Module, state_dict: dict, source: str) -> dict:
    """Load every key or fail: a one-line error lists what is missing, unexpected or misshapen."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} with other shapes (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}.")
    model.load_state_dict(state_dict, strict=True)
    return {"matched": len(own), "total": len(own)}


def import_checkpoint(fmt: str, path, **options) -> tuple[torch.nn.Module, dict]:
    """Load a released reference checkpoint of format ``fmt`` into this project's model."""
    import fss.models  # noqa: F401  (registers the importers)

    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(sorted(IMPORTERS))}.")
    return IMPORTERS[fmt](path, **options)
