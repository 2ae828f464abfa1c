"""`fss bench --data` (pipeline/bench_data.py): the references it times compute what our
transforms compute, the workers formula, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fss.data.transforms import build_train_transform
from pipeline.bench_data import (
    ReferencePFENet,
    ReferencePIL,
    images_per_second,
    synthetic_pair,
    workers_needed,
)

FSS = str(Path(sys.executable).with_name("fss"))


@pytest.fixture(scope="module")
def small_pair():
    image, masks = synthetic_pair(60, 80)
    return image, masks


@pytest.mark.parametrize("dataset, size", [("pascal", 65), ("coco", 49)])
def test_pfenet_is_the_reference_pipeline(small_pair, dataset, size):
    """Same draws, same cv2 calls: the masks are equal, the images equal up to the last bit
    of the normalisation (the reference divides by a Python float in place)."""
    image, masks = small_pair
    scale = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25)}[dataset]
    ours = build_train_transform("pfenet", dataset, size=size)
    ref = ReferencePFENet(size, scale)
    for seed in range(12):
        for role, m in (("query", masks), ("support", masks[:1])):
            img, out_m = ours(image, m, np.random.default_rng(seed), role)
            ref_img, ref_m = ref(image, m, np.random.default_rng(seed), role)
            assert torch.equal(out_m, ref_m), (seed, role)
            torch.testing.assert_close(img, ref_img, atol=1e-6, rtol=1e-6)
            assert img.shape == (3, size, size)


@pytest.mark.parametrize("preset", ["panet", "hsnet", "canet"])
def test_pil_presets_compute_the_reference_image(small_pair, preset):
    """Same draws, PIL's resize: the images agree up to the normalisation's rounding, the
    masks exactly (PIL's NEAREST for panet / canet, torch's nearest for hsnet)."""
    image, masks = small_pair
    ours = build_train_transform(preset, "pascal", size=33)
    ref = ReferencePIL(preset, 33)
    for seed in range(8):
        for role in ("query", "support"):
            img, out_m = ours(image, masks[:1], np.random.default_rng(seed), role)
            ref_img, ref_m = ref(image, masks[:1], np.random.default_rng(seed), role)
            torch.testing.assert_close(img, ref_img, atol=2e-6, rtol=1e-6)
            assert torch.equal(out_m, ref_m), (seed, role)


def test_synthetic_pair_is_pascal_sized_with_a_target():
    image, masks = synthetic_pair()
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    assert masks.shape == (2, 375, 500)
    assert set(np.unique(masks[0])) == {0, 1, 255} and set(np.unique(masks[1])) <= {0, 1}
    assert not ((masks[0] == 1) & (masks[1] == 1)).any()


def test_workers_formula():
    # one query 4 ms + 5 supports 2 ms = 14 ms per episode; 8 episodes per step at 10 steps/s
    assert images_per_second(0.004, 0.002, 5) == pytest.approx(6 / 0.014)
    assert workers_needed(10.0, 8, 5, 0.004, 0.002) == 2  # 1.12 worker-seconds per second
    assert workers_needed(1.0, 5, 1, 0.1, 0.1) == 1  # exactly one, not two
    assert workers_needed(2.0, 5, 1, 0.1, 0.1) == 2


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FSS, "bench", *args], capture_output=True, text=True, timeout=300)


def test_bench_data_cli_report(tmp_path):
    out = tmp_path / "data.json"
    proc = _run("--data", "--preset", "canet", "--preset", "pfenet", "--repeats", "2", "--warmup", "0",
                "--batch", "4", "--shot", "5", "--step-rate", "3", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report and report["kind"] == "fss-bench-data"
    assert report["settings"]["images_per_step"] == 24 and report["machine"]["cv2_threads"] <= 1
    rows = [(r["preset"], r["dataset"], r["size"]) for r in report["rows"]]
    assert rows == [("pfenet", "pascal", 473), ("pfenet", "coco", 641), ("canet", "pascal", 321)]
    for row in report["rows"]:
        for entry in row["methods"].values():
            q, s = entry["query"]["mean_ms"] / 1e3, entry["support"]["mean_ms"] / 1e3
            assert entry["images_per_s"] == pytest.approx(6 / (q + 5 * s))
            assert entry["workers"] == workers_needed(3.0, 4, 5, q, s) >= 1
    assert set(report["ops"]) == {"pascal", "coco"}
    assert set(report["ops"]["pascal"]) == {"scale", "rotate", "blur", "flip", "pad_crop", "normalize"}
    md = _run("--data", "--preset", "hsnet", "--repeats", "1", "--warmup", "0", "--out", str(out), "--markdown")
    assert md.returncode == 0, md.stderr
    assert "| hsnet | pascal | 400 |" in md.stdout and "workers" not in md.stdout


@pytest.mark.parametrize("args, needle", [
    (["--step-rate", "2"], "add --data"),
    (["--data", "--preset", "fancy"], "unknown --preset 'fancy'"),
    (["--data", "--step-rate", "0"], "--step-rate 0.0 must be positive"),
])
def test_bench_data_user_errors_are_one_line(args, needle, tmp_path):
    proc = _run(*args, "--out", str(tmp_path / "b.json"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "b.json").exists()
