"""The README's table of the embedded benchmark says what the committed metrics files say.

The table is copied by hand from a run's `results/table_*.md`; this test reads the committed
`README.md`, `evals/<method>/fold<k>-<K>shot[-shifted-support].metrics.json` and
`results/metrics/` from git's HEAD (so an experiment's rewritten metrics in the working tree
do not count) and checks every cell at one decimal, as `fss aggregate` prints them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Current results of the embedded benchmark"
NAMES = {"prototype (floor)": "prototype", "APANet": "apanet", "CANet": "canet", "CELP": "celp",
         "DPNet (CANet)": "dpnet_canet", "DPNet (PFENet)": "dpnet_pfenet", "PANet": "panet",
         "PFENet": "pfenet", "SimPropNet": "simpropnet"}
METRICS = "results/metrics/synthetic-small-pfenet"


def _committed(path: str) -> str:
    done = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{path} is not committed at HEAD of {REPO} (not a git checkout?)")
    return done.stdout


def _value(path: str, key: str = "miou") -> str:
    return f"{100 * json.loads(_committed(path))[key]:.1f}"


def _readme_rows() -> dict[str, list[str]]:
    text = _committed("README.md")
    assert HEADING in text, f"README.md has no heading {HEADING!r}; update this test's HEADING"
    rows = {}
    for line in text.split(HEADING, 1)[1].splitlines():
        if line.startswith("## "):
            break
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in NAMES:
            rows[cells[0]] = cells[1:]
    return rows


def _expected(method: str) -> list[str]:
    folds = [_value(f"evals/{method}/fold{k}-1shot.metrics.json") for k in range(4)]
    means = [_value(f"{METRICS}/{method}-{setting}.json")
             for setting in ("1shot", "1shot-shifted-support", "5shot", "5shot-shifted-support")]
    fb = [_value(f"{METRICS}/{method}-{shot}.json", "fb_iou") for shot in ("1shot", "5shot")]
    return folds + means + [f"{fb[0]} / {fb[1]}"]


def test_readme_table_matches_the_committed_metrics():
    rows = _readme_rows()
    assert set(rows) == set(NAMES), f"README.md's results table has rows {sorted(rows)}; expected {sorted(NAMES)}"
    for name, method in NAMES.items():
        assert rows[name] == _expected(method), (
            f"README.md's row {name!r} reads {rows[name]} but the committed metrics give "
            f"{_expected(method)}: copy the row from results/table_miou.md and table_fbiou.md")
