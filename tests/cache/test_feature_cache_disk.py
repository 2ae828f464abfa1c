"""The on-disk feature cache: survives a new process; damaged entries are recomputed, never loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache_helpers import evaluate, metrics, protocol, small_model
from fss.models.feature_cache import DISK_SUFFIX, FeatureCache

CHILD = """
import json, sys, torch
sys.path.insert(0, {helpers!r})
from cache_helpers import evaluate, protocol, small_model
from fss.models.feature_cache import FeatureCache
from fss.data.access import open_prepared
torch.set_num_threads(1)
model = small_model("pfenet")
model.load_state_dict(torch.load({weights!r}, weights_only=True))
cache = FeatureCache(directory={directory!r})
result = evaluate(model, open_prepared({root!r}, 0, "val", cache=True), protocol(episodes=6), cache=cache)
print(json.dumps({{"miou": result["miou"], "fb_iou": result["fb_iou"],
                  "class_iou": {{str(k): v for k, v in result["class_iou"].items()}}, "stats": cache.stats.as_dict()}}))
"""


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"*{DISK_SUFFIX}"))


@pytest.mark.slow
def test_disk_cache_survives_a_new_process(tmp_path, cache_synthetic_root, cache_val_data):
    directory = tmp_path / "features"
    model = small_model("pfenet")
    cache = FeatureCache(directory=directory)
    result = evaluate(model, cache_val_data, protocol(episodes=6), cache=cache)
    assert cache.stats.disk_writes == cache.stats.stores == len(_entries(directory)) > 0
    assert not list(directory.rglob("*.tmp"))  # atomic writes leave no temporary files
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    script = CHILD.format(helpers=str(Path(__file__).parent), weights=str(weights), directory=str(directory),
                          root=str(cache_synthetic_root))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).parents[2])
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["stats"]["misses"] == 0 and got["stats"]["disk_hits"] > 0 and got["stats"]["disk_errors"] == 0
    assert (got["miou"], got["fb_iou"]) == (result["miou"], result["fb_iou"])
    assert got["class_iou"] == {str(k): v for k, v in result["class_iou"].items()}


def test_truncated_corrupted_or_misplaced_entries_are_recomputed(tmp_path, cache_val_data):
    directory = tmp_path / "features"
    model = small_model("canet")
    proto = protocol(episodes=6)
    reference = evaluate(model, cache_val_data, proto, cache=FeatureCache(directory=directory))
    files = _entries(directory)
    assert len(files) >= 3
    truncated, corrupted, misplaced = files[:3]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    blob = bytearray(corrupted.read_bytes())
    blob[-100] ^= 0xFF
    corrupted.write_bytes(bytes(blob))
    shutil.copyfile(files[3], misplaced)  # a valid entry under another key's name

    cache = FeatureCache(directory=directory)
    result = evaluate(model, cache_val_data, proto, cache=cache)
    assert metrics(result) == metrics(reference)
    assert cache.stats.disk_errors == 3 and cache.stats.misses == 3
    assert cache.stats.disk_hits == len(files) - 3

    again = FeatureCache(directory=directory)  # the recomputed rows were written back, valid
    evaluate(model, cache_val_data, proto, cache=again)
    assert again.stats.disk_errors == 0 and again.stats.misses == 0


def test_unwritable_directory_degrades_to_memory(tmp_path, cache_val_data):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = FeatureCache(directory=blocker)
    model = small_model("pfenet")
    result = evaluate(model, cache_val_data, protocol(episodes=3), cache=cache)
    assert cache.stats.disk_writes == 0 and cache.stats.disk_errors == cache.stats.stores > 0
    assert metrics(result) == metrics(evaluate(model, cache_val_data, protocol(episodes=3)))
