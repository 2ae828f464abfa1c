"""`fss pretrain` on the training loop: stopped or killed, then rerun, it ends with the same bytes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fss.errors import CheckpointError, ConfigError
from pipeline import runs as R
from pipeline.config_schema import PretrainConfig
from pipeline.pretrain import RUN_FILE, pretrain_backbone

from pipeline_helpers import FSS

#: 3 epochs of 3 steps on 12 pool images: a stop mid-epoch and one at an epoch boundary
TINY = dict(source="objects", images=12, image_size=32, epochs=3, batch_size=4, size=33, device="cpu", log_every=1)


def _curves(run_dir: Path) -> list[dict]:
    with open(run_dir / R.CURVES_FILE, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _report(out: Path) -> dict:
    return {k: v for k, v in json.loads(out.with_suffix(".json").read_text()).items() if k != "weights"}


def test_the_defaults_are_the_params_section():
    """One set of pretraining defaults: the schema's are params.yaml's pretrain section."""
    import yaml

    from pipeline.config import REPO_PARAMS

    section = yaml.safe_load(REPO_PARAMS.read_text())["pretrain"]
    defaults = PretrainConfig().to_dict()
    assert section and {k: defaults[k] for k in section} == section


def test_a_stopped_pretraining_resumes_to_the_same_bytes(tmp_path):
    reference = pretrain_backbone(tmp_path / "ref" / "b.pt", **TINY)
    assert reference["status"] == "done" and reference["total_iterations"] == 9
    assert {p.name for p in (tmp_path / "ref" / ".b.run").iterdir()} >= {R.CHECKPOINT_FILE, R.CURVES_FILE, RUN_FILE}

    out = tmp_path / "resumed" / "b.pt"
    for stop in (4, 6):  # mid-epoch, then at an epoch boundary
        stopped = pretrain_backbone(out, stop_after=stop, **TINY)
        assert stopped["status"] == "stopped" and stopped["iteration"] == stop and stopped["report"] is None
        assert not out.exists()
    with open(out.parent / ".b.run" / R.CURVES_FILE, "a") as fh:
        fh.write("7,2,0.01,9.0,1.0\n")  # a row logged after the last checkpoint by a killed run: dropped
    done = pretrain_backbone(out, **TINY)
    assert done["status"] == "done" and done["report"]["iterations"] == 9
    assert out.read_bytes() == (tmp_path / "ref" / "b.pt").read_bytes()
    assert _report(out) == _report(tmp_path / "ref" / "b.pt")
    assert _curves(out.parent / ".b.run") == _curves(tmp_path / "ref" / ".b.run")
    log = (out.parent / ".b.run" / R.LOG_FILE).read_text()
    assert log.count("started:") == 1 and "resumed at iteration 4/9" in log and "resumed at iteration 6/9" in log

    # a finished run rerun: the same files again, no step taken
    again = pretrain_backbone(out, **TINY)
    assert again["report"] == done["report"] and out.read_bytes() == (tmp_path / "ref" / "b.pt").read_bytes()
    # another configuration in the same run directory starts afresh
    said = []
    other = pretrain_backbone(out, say=said.append, **{**TINY, "lr": 0.01})
    assert other["status"] == "done" and any("starting afresh" in m for m in said)
    assert out.read_bytes() != (tmp_path / "ref" / "b.pt").read_bytes()


def test_a_run_directory_of_something_else_is_refused(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=f"holds no {RUN_FILE}; choose another --run-dir"):
        pretrain_backbone(tmp_path / "b.pt", run_dir=tmp_path / "busy", **TINY)
    with pytest.raises(ConfigError, match="pretrain.epochs got 0; it must be"):
        pretrain_backbone(tmp_path / "b.pt", **{**TINY, "epochs": 0})


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(tmp_path, subprocess_env):
    """Kill -9 a real `fss pretrain` after a few checkpoints; the same command resumes and ends with
    the bytes of an uninterrupted run (both as subprocesses: the same thread settings)."""
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  images: 24\n  image_size: 32\n  epochs: 30\n  batch_size: 4\n  size: 33\n"
                      "  checkpoint_every: 1\n  log_every: 1\n")
    killed, reference = tmp_path / "killed" / "b.pt", tmp_path / "reference" / "b.pt"

    def cmd(out: Path) -> list[str]:
        return [FSS, "pretrain", "--device", "cpu", "--params", str(params), "--out", str(out)]

    proc = subprocess.Popen(cmd(killed), env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed.parent / ".b.run" / R.CHECKPOINT_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file():
            try:
                if R.load_checkpoint(ckpt)["iteration"] >= 8:
                    break
            except CheckpointError:
                pass  # being replaced right now
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; raise pretrain.epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = R.load_checkpoint(ckpt)["iteration"]
    assert 8 <= stopped_at < 180 and not killed.exists()
    done = subprocess.run(cmd(killed), env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at iteration {stopped_at}/180" in done.stdout + done.stderr
    ref = subprocess.run(cmd(reference), env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert killed.read_bytes() == reference.read_bytes()
    assert _report(killed) == _report(reference)
    assert _curves(killed.parent / ".b.run") == _curves(reference.parent / ".b.run")
