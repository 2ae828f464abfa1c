"""Test-time loading at PASCAL size: the time `fss evaluate`'s pfenet protocol (473 px) takes to
make its episodes, each test image read and resized once (``TestImageCache``) or every time.

    uv run python tests/bench/measure_test_loading.py --episodes 5000 --work /tmp/pascal-size

Builds VOC2012 + SBD folders in their release formats (1449 val images of 500x375, one object
each, classes 1..20 in turn; a few training images), prepares them with `fss prepare pascal`,
then times fold 0's episodes on one thread. Not a test (pytest collects test_*.py only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fss.data.access import open_prepared
from fss.data.episodes import TestImageCache
from fss.evaluation import make_protocol
from tests.data.fixtures import Img, Rect, build_sbd, build_voc

VAL_IMAGES, HEIGHT, WIDTH = 1449, 375, 500


def build(work: Path) -> Path:
    """The raw fixture and its prepared form; returns the prepared root (kept between runs)."""
    prepared = work / "prepared"
    if (prepared / "meta.json").is_file():
        return prepared
    def image(cls: int) -> Img:
        return Img((HEIGHT, WIDTH), (Rect(cls, 100, 80, 220, 180),))

    val = {f"2009_{i:06d}": image(1 + i % 20) for i in range(VAL_IMAGES)}
    train = {f"2008_{i:06d}": image(1 + i % 20) for i in range(40)}
    voc = build_voc(work / "VOC2012", {**train, **val}, {}, list(train), list(val))
    sbd = build_sbd(work / "benchmark_RELEASE" / "dataset", train, list(train), [])
    subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "pascal", "--voc-root", str(voc),
                    "--sbd-root", str(sbd), "--out", str(prepared)], check=True)
    return prepared


def time_episodes(root: Path, episodes: int, cache_mb: float | None) -> dict:
    data = open_prepared(root, 0, "val")
    proto = make_protocol("pfenet", "pascal", episodes=episodes)
    cache = TestImageCache(cache_mb) if cache_mb else None
    dataset = proto.episode_dataset(data, 1, image_cache=cache)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    seconds = time.perf_counter() - start
    out = {"episodes": episodes, "list_images": len(data), "seconds": round(seconds, 2),
           "ms_per_episode": round(1000 * seconds / episodes, 2)}
    if cache is not None:
        out["cache"] = cache.stats()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fss-pascal-size"))
    parser.add_argument("--cache-mb", type=float, default=2048.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = build(args.work)
    report = {"every time": time_episodes(root, args.episodes, None),
              "read and resized once": time_episodes(root, args.episodes, args.cache_mb)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
