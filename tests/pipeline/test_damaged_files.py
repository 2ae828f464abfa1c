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
