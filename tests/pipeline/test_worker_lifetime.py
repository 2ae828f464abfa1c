"""DataLoader workers never outlive their training process (issue 17, item 2): they ignore
SIGINT/SIGTERM (the training loop checkpoints and stops), so they must die with the process
that owns them and be stopped when the loop ends with an exception."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.train_data import worker_ignores_stop_signals
from pipeline_helpers import tiny_sets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")


class _DeathSignal(Dataset):
    """Each item: the parent-death signal of the worker process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
        return torch.tensor(sig.value)


def test_a_loader_worker_is_killed_with_its_training_process():
    loader = DataLoader(_DeathSignal(), num_workers=1, worker_init_fn=worker_ignores_stop_signals)
    assert [int(x) for x in loader] == [signal.SIGKILL] * 2


def test_an_exception_mid_training_ends_the_process_and_its_workers(synthetic_root, tmp_path, subprocess_env):
    script = textwrap.dedent(f"""
        import pipeline.train as T
        from pipeline.config import REPO_PARAMS, resolve_run_config
        calls = []
        real_step = T.train_step
        def failing_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated failure mid-training")
            return real_step(*args, **kwargs)
        T.train_step = failing_step
        config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=6,
                                    device="cpu", params_path=REPO_PARAMS,
                                    set_values={tiny_sets(synthetic_root, **{"data.num_workers": 1})!r})
        T.train_run(config, {str(tmp_path / "run")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)  # without the fix: hung for good at interpreter exit
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0 and "simulated failure mid-training" in stderr
    with pytest.raises(ProcessLookupError):  # nothing of its session (the workers) is left
        os.killpg(proc.pid, 0)
