"""Shell completion: `fss --install-completion` exists and the completion completes commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FSS = str(Path(sys.executable).parent / "fss")


def test_install_completion_is_offered_and_bash_completion_completes_commands():
    env = dict(os.environ, SHELL="/bin/bash")
    shown = subprocess.run([FSS, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "--install-completion" in shown.stdout
    # what the installed bash hook asks the program for 'fss sweep r<TAB>'
    env.update(_FSS_COMPLETE="complete_bash", COMP_WORDS="fss sweep r", COMP_CWORD="2")
    done = subprocess.run([FSS], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["run", "report"], done.stderr
