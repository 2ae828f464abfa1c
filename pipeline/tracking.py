"""Weights & Biases tracking that never holds a run up.

One W&B run per ``fss train`` and per ``fss evaluate``: ``group`` =
method-dataset-backbone-shot, ``job_type`` = train / evaluate, ``name`` by fold. The
config, loss curves, final metrics (run summary) and sample predictions (images with
masks) are logged. The project's own files (curves.csv, eval JSON) stay the source of
truth; tracking is a mirror.

Mode: ``WANDB_MODE`` (online / offline / disabled) is respected when set; otherwise the
run is online when credentials exist (``WANDB_API_KEY`` or a netrc entry for the W&B
host) and offline when not (``wandb sync <dir>`` uploads it later). Every wandb call is
wrapped: the first failure prints one warning and turns tracking off for the run.
``wandb.init`` gets ``init_timeout`` seconds.
"""

from __future__ import annotations

import netrc
import os
import sys
from typing import Any, Callable, Mapping
from urllib.parse import urlparse


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """online, offline or disabled (see the module docstring)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if _has_credentials() else "offline"


class Tracker:
    """A W&B run, or a no-op when disabled or broken. Safe to call in any state."""

    def __init__(
        self,
        *,
        enabled: bool,
        project: str = "fss",
        entity: str | None = None,
        group: str = "",
        job_type: str = "",
        name: str = "",
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        init_timeout: float = 30.0,
        tags: list[str] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.run = None
        self.mode = "disabled"
        self._warn = warn or (lambda m: print(m, file=sys.stderr))
        if not enabled:
            return
        self.mode = wandb_mode()
        if self.mode == "disabled":
            return
        try:
            import wandb

            self._wandb = wandb
            settings = wandb.Settings(init_timeout=float(init_timeout), silent=True, console="off")
            self.run = wandb.init(
                project=project, entity=entity, group=group, job_type=job_type, name=name,
                config=dict(config or {}), mode=self.mode, id=run_id,
                resume="allow" if run_id else None, tags=tags, settings=settings, reinit="finish_previous",
            )
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            self._fail("init", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None) if self.run is not None else None

    @property
    def run_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None

    def _fail(self, what: str, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self._warn(f"warning: W&B {what} failed ({type(exc).__name__}: {first}); tracking is off for this run.")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for k, v in metrics.items():
                self.run.summary[k] = v
        except Exception as exc:  # noqa: BLE001
            self._fail("summary", exc)

    def images(self, key: str, samples: list[dict], class_labels: Mapping[int, str] | None = None,
               step: int | None = None) -> None:
        """``samples``: dicts with ``image`` (uint8 HxWx3), ``prediction`` and
        ``ground_truth`` (int HxW; 255 = ignore) and an optional ``caption``."""
        if self.run is None or not samples:
            return
        try:
            labels = dict(class_labels or {0: "background", 1: "foreground", 255: "ignore"})
            images = []
            for s in samples:
                masks = {
                    "prediction": {"mask_data": s["prediction"], "class_labels": labels},
                    "ground_truth": {"mask_data": s["ground_truth"], "class_labels": labels},
                }
                images.append(self._wandb.Image(s["image"], masks=masks, caption=s.get("caption", "")))
            self.run.log({key: images}, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("image logging", exc)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"warning: W&B finish failed ({type(exc).__name__}); the run's own files are complete.")
