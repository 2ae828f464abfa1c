"""Model files: this project's own format, and importers for released checkpoints.

Own format (``.pt``, written atomically, read with ``torch.load(weights_only=True)`` so
no pickled code ever runs)::

    {"format": "fss-model", "version": 1, "method": str, "backbone": str, "shot": int | None,
     "knobs": {...}, "state_dict": {...}, "source": str, "dataset": str | None}

``shot`` is the training shot count (None when an imported file's is unknown) and ``dataset``
the dataset preset an imported file was built for (``pascal``/``coco``; absent or None for
runs of this project). :func:`load_model_file` is the one loader of these files: it rebuilds
the model with the test-time settings of the evaluation (``shot``, PANet's ``ways``; no
weight depends on them) and refuses a file recorded for another dataset.

Importers for the reference implementations' released checkpoints register themselves
with :func:`register_importer` (see ``pfenet.py``, ``celp.py``, ``panet.py``); each maps
the reference key names onto this project's model, refuses a file of another format
with a one-line :class:`~fss.errors.CheckpointError`, and returns the report of
:func:`import_report` (the same fields for every format).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from fss.atomic import atomic_path
from fss.errors import CheckpointError, ConfigError
from fss.models.registry import create_model, get_method

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
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)  # through a file object, a full disk is an OSError (ENOSPC), not torch's "enforce fail"


def save_model_file(path, model: torch.nn.Module, *, method: str, backbone: str, shot: int | None,
                    knobs: dict, source: str = "", dataset: str | None = None) -> None:
    atomic_torch_save(
        {
            "format": MODEL_FILE_FORMAT,
            "version": 1,
            "method": method,
            "backbone": backbone,
            "shot": None if shot is None else int(shot),
            "knobs": dict(knobs),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "source": source,
            "dataset": dataset,
        },
        path,
    )


def read_model_file(path) -> dict:
    """The checked contents of a model file of this project (weights not yet loaded)."""
    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{path} is not a model file of this project; import released checkpoints with "
            f"'fss checkpoint import --format ...' first."
        )
    for key in ("method", "backbone", "shot", "knobs", "state_dict"):
        if key not in blob:
            raise CheckpointError(f"model file {path} lacks {key!r}; it is damaged: re-create it.")
    return blob


def check_model_dataset(blob: dict, path, dataset: str, allow_mismatch: bool = False) -> None:
    """Refuse to evaluate a file recorded for another dataset preset (e.g. PFENet's COCO bins on PASCAL)."""
    recorded = blob.get("dataset")
    if recorded is None or recorded == dataset or allow_mismatch:
        return
    bins = blob["knobs"].get("pyramid_bins")
    raise ConfigError(
        f"{path} was imported for {recorded}{f' (pyramid bins {bins})' if bins is not None else ''} but is "
        f"evaluated on {dataset}; evaluate it on {recorded}, re-import it with --dataset {dataset} if it was "
        f"trained there, or pass --allow-dataset-mismatch."
    )


def with_eval_ways(method: str, knobs: dict, ways: int | None, path) -> dict:
    """``knobs`` with the evaluation's number of ways (a test-time choice: no weight depends on it)."""
    if ways is None:
        return dict(knobs)
    if "ways" in get_method(method).knobs:
        return {**knobs, "ways": int(ways)}
    if ways != 1:
        raise ConfigError(
            f"{path} holds a {method} model, which segments 1-way episodes only; use --ways 1 "
            f"(N-way episodes need a method with a 'ways' knob, e.g. panet)."
        )
    return dict(knobs)


def load_model_file(path, *, shot: int | None = None, ways: int | None = None, dataset: str | None = None,
                    allow_dataset_mismatch: bool = False, knobs: dict | None = None,
                    method: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build the model a model file describes and load its weights strictly: the one loader.

    ``shot``/``ways``: the evaluation's test-time settings (default: as recorded; the
    recorded ``shot`` is the training one and changes no weight). ``dataset``: the
    evaluation dataset; a file imported for another one is refused unless
    ``allow_dataset_mismatch``. ``knobs``: test-time knob values over the recorded ones (a
    sweep of a test-time knob). ``method``: refuse a file of another method. ``meta`` is the
    file without its weights, with the knobs the model was built with.
    """
    blob = read_model_file(path)
    if method is not None and blob["method"] != method:
        raise CheckpointError(f"{path} holds a {blob['method']} model, not {method}; give a {method} model file.")
    if dataset is not None:
        check_model_dataset(blob, path, dataset, allow_dataset_mismatch)
    built_knobs = with_eval_ways(blob["method"], {**dict(blob["knobs"]), **dict(knobs or {})}, ways, path)
    build_shot = int(shot) if shot is not None else int(blob["shot"] or 1)
    model = create_model(blob["method"], backbone=blob["backbone"], shot=build_shot, **built_knobs)
    load_strict(model, blob["state_dict"], str(path))
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["knobs"] = built_knobs
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


#: the fields of every import report, whatever the format
IMPORT_REPORT_FIELDS = ("format", "method", "backbone", "dataset", "knobs", "matched", "file_keys", "epoch", "source")
IMPORT_DATASETS = ("pascal", "coco")


def import_report(*, fmt: str, method: str, backbone: str, dataset: str | None, knobs: dict, matched: int,
                  file_keys: int, epoch: int | None, path) -> dict:
    """The report of an importer: what was read (keys, epoch) and every setting the keys cannot tell."""
    return {"format": fmt, "method": method, "backbone": backbone, "dataset": dataset, "knobs": dict(knobs),
            "matched": int(matched), "file_keys": int(file_keys), "epoch": epoch, "source": str(Path(path))}


def import_checkpoint(fmt: str, path, dataset: str | None = None, **options) -> tuple[torch.nn.Module, dict]:
    """Load a released reference checkpoint of format ``fmt`` into this project's model.

    ``dataset`` (``pascal``/``coco``) is the dataset the released model was trained on: it
    chooses PFENet's and CELP's pyramid bins (required for them unless ``pyramid_bins`` is
    given) and is recorded in the report. Returns ``(model, report)``; the report has the
    fields :data:`IMPORT_REPORT_FIELDS`.
    """
    import fss.models  # noqa: F401  cycle: fss.models imports this module; this registers the importers

    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(sorted(IMPORTERS))}.")
    if dataset is not None and dataset not in IMPORT_DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r} for an import; choose one of: {', '.join(IMPORT_DATASETS)}.")
    return IMPORTERS[fmt](path, dataset=dataset, **options)
