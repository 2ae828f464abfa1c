"""The README's table of the embedded benchmark says what the committed metrics files say.

`fss aggregate` writes the table (`results/readme_table.md`) and `fss aggregate --readme README.md`
puts it between the README's markers; this test checks that the README holds exactly that file,
and reads the committed
`README.md`, `evals/<method>/fold<k>-<K>shot[-shifted-support].metrics.json` and
`results/metrics/` from git's HEAD (so an experiment's rewritten metrics in the working tree
do not count) and checks every cell at one decimal, as `fss aggregate` prints them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fss.models.registry import get_method, list_methods
from pipeline.aggregate import README_MARKERS, README_TABLE, _fmt

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Current results of the embedded benchmark"
#: row name -> method: the display names of the registry (``register_method(display=...)``)
NAMES = {get_method(m).display: m for m in list_methods()}
METRICS = "results/metrics/synthetic-small-pfenet"


def _committed(path: str) -> str:
    done = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{path} is not committed at HEAD of {REPO} (not a git checkout?)")
    return done.stdout


def _percent(path: str) -> dict[str, str]:
    """The committed metrics file's mIoU and FB-IoU as `fss aggregate` prints them."""
    metrics = json.loads(_committed(path))
    return {key: _fmt(100 * metrics[key]) for key in ("miou", "fb_iou")}


def _readme_rows() -> dict[str, list[str]]:
    text = _committed("README.md")
    assert HEADING in text, f"README.md has no heading {HEADING!r}; update this test's HEADING"
    rows = {}
    for line in text.split(HEADING, 1)[1].splitlines():
        if line.startswith("## "):
            break
        cells = [c.strip().strip("*").split(" ±")[0] for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in NAMES:
            rows[cells[0]] = cells[1:]
    return rows


def _expected(method: str) -> list[str]:
    folds = [_percent(f"evals/{method}/fold{k}-1shot.metrics.json")["miou"] for k in range(4)]
    means = {setting: _percent(f"{METRICS}/{method}-{setting}.json")
             for setting in ("1shot", "1shot-shifted-support", "5shot", "5shot-shifted-support")}
    fb = f"{means['1shot']['fb_iou']} / {means['5shot']['fb_iou']}"
    return folds + [m["miou"] for m in means.values()] + [fb]


def test_readme_table_matches_the_committed_metrics():
    rows = _readme_rows()
    assert set(rows) == set(NAMES), f"README.md's results table has rows {sorted(rows)}; expected {sorted(NAMES)}"
    for name, method in NAMES.items():
        expected = _expected(method)
        assert rows[name] == expected, (
            f"README.md's row {name!r} reads {rows[name]} but the committed metrics give "
            f"{expected}: copy the row from results/table_miou.md and table_fbiou.md")


def test_readme_table_is_the_one_fss_aggregate_wrote():
    readme, table = _committed("README.md"), _committed(f"results/{README_TABLE}")
    begin, end = README_MARKERS
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    assert block == "\n" + table, (f"README.md's table differs from results/{README_TABLE}; run "
                                   f"'uv run fss aggregate --runs evals --out results --readme README.md'")
    assert " ±" in table  # the means carry their intervals
