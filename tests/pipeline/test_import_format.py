"""`fss checkpoint import --format`: the choices are the importer registry's, completed by the shell."""

from __future__ import annotations

import os
import subprocess

from fss.models.checkpoints import IMPORTERS
from pipeline_helpers import FSS, assert_one_line_error, run_fss


def test_an_unknown_format_is_one_line_listing_the_registered_importers(tmp_path, capsys):
    src = tmp_path / "x.pth"
    src.write_bytes(b"")
    code, _, err = run_fss(["checkpoint", "import", src, "--format", "nope", "--out", tmp_path / "y.pt"], capsys)
    assert_one_line_error(code, err, "'nope'", ", ".join(sorted(IMPORTERS)))
    assert not (tmp_path / "y.pt").exists()


def test_bash_completion_lists_the_registered_formats():
    env = dict(os.environ, SHELL="/bin/bash", _FSS_COMPLETE="complete_bash",
               COMP_WORDS="fss checkpoint import x.pth --format p", COMP_CWORD="5")
    done = subprocess.run([FSS], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == [f for f in sorted(IMPORTERS) if f.startswith("p")], done.stderr
    assert {"pfenet", "celp", "panet"} <= set(IMPORTERS)
