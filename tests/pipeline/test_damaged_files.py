"""A file that is not UTF-8 (a damaged or binary file in the place of a text one) is refused
in one line naming it, never with a UnicodeDecodeError traceback (issue 17, item 4)."""

from __future__ import annotations

import pytest

from fss.data.prepared import read_meta
from fss.errors import ConfigError, DataError
from pipeline.config import load_params
from pipeline.runs import CONFIG_FILE, RunDir, read_json
from pipeline.sweep.study import load_study

NOT_UTF8 = b"\xff\xfe\x00garbage\x80\x81"


def _damaged(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(NOT_UTF8)
    return path


@pytest.mark.parametrize("case", ["params", "run_config", "json", "meta", "study"])
def test_a_non_utf8_file_is_one_line_naming_it(case, tmp_path):
    if case == "params":
        path, call, error = _damaged(tmp_path / "params.yaml"), load_params, ConfigError
    elif case == "run_config":
        path, error = _damaged(tmp_path / "run" / CONFIG_FILE), ConfigError
        call = lambda _: RunDir(tmp_path / "run").load_config()  # noqa: E731
    elif case == "json":
        path, call, error = _damaged(tmp_path / "summary.json"), read_json, ConfigError
    elif case == "meta":
        path, error = _damaged(tmp_path / "data" / "meta.json"), DataError
        call = lambda _: read_meta(tmp_path / "data")  # noqa: E731
    else:
        path, call, error = _damaged(tmp_path / "study.yaml"), load_study, ConfigError
    with pytest.raises(error) as info:
        call(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_csv_log_one_line_ending_and_a_header_when_empty(tmp_path):
    from pipeline.runs import CsvLog

    log = CsvLog(tmp_path / "val.csv", ("iteration", "epoch"))
    log.truncate_after(0)  # a resumed run whose validation has not run yet
    assert (tmp_path / "val.csv").read_bytes() == b"iteration,epoch\n"
    log.append({"iteration": 1, "epoch": 0.5, "miou": 0.25})  # new column: rewritten
    log.append({"iteration": 2, "epoch": 1.0, "miou": 0.5})  # appended
    data = (tmp_path / "val.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 3
    assert [r["miou"] for r in CsvLog(tmp_path / "val.csv").rows] == ["0.25", "0.5"]


@pytest.mark.parametrize("content", [b"\0" * 64, NOT_UTF8, b"loss,lr\n0.1,0.2\n"])
def test_a_damaged_csv_log_is_refused_not_appended_to(content, tmp_path):
    from pipeline.runs import CsvLog

    path = tmp_path / "curves.csv"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        CsvLog(path, ("iteration", "epoch", "lr"))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == content


def test_a_rerun_removes_what_a_killed_checkpoint_write_left(tmp_path):
    import subprocess

    from pipeline.config import resolve_run_config

    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=2, device="cpu")
    run = RunDir(tmp_path / "run")
    assert run.prepare(config) is False
    dead = subprocess.Popen(["true"])  # a pid that is gone
    dead.wait()
    stale = tmp_path / "run" / f".checkpoint.pt.{dead.pid}.abc123xy.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert run.prepare(config) is True and not stale.exists()
