"""Helpers of the feature-cache tests."""

from __future__ import annotations

import torch

CPU = torch.device("cpu")


def small_model(method: str, shot: int = 1, seed: int = 0):
    """``method`` on the small backbone with the registry's small knob values (narrow heads)."""
    from fss.models.registry import create_model, get_method

    torch.manual_seed(seed)
    return create_model(method, backbone="small", shot=shot, **get_method(method).small_knobs).eval()


def protocol(episodes: int = 6, size: int = 33):
    from fss.evaluation import make_protocol

    return make_protocol("pfenet", "synthetic", episodes=episodes, size=size)


def evaluate(model, data, proto, *, shot: int = 1, cache=None, batch_size: int = 3, num_workers: int = 0,
             precision: str = "fp32") -> dict:
    from fss.evaluation import EvalSettings, evaluate_model

    settings = EvalSettings(shot=shot, device=CPU, batch_size=batch_size, num_workers=num_workers, precision=precision)
    return evaluate_model(model, data, proto, settings, feature_cache=cache)


def metrics(result: dict) -> tuple:
    return result["miou"], result["fb_iou"], result["class_iou"], result["episodes"]


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """The `fss` entry point in-process (its one-line error handling included)."""
    from tests.pipeline.pipeline_helpers import run_fss

    return run_fss(args, capsys)
