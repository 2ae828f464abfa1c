"""`fss methods` and `fss checkpoint import` as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from fss.models.checkpoints import load_model_file
from fss.models.registry import list_methods
from tests.conftest import CHECKPOINT_KEYS

FSS = str(Path(sys.executable).with_name("fss"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FSS, *args], capture_output=True, text=True, timeout=300)


def _listing_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in (CHECKPOINT_KEYS / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if dtype == "int64":
            state[prefix + key] = torch.zeros(dims, dtype=torch.int64)
        else:
            state[prefix + key] = torch.randn(dims, generator=g) * 0.01
    return state


def test_methods_json_lists_every_registered_method_with_knobs():
    out = _run("methods", "--json")
    assert out.returncode == 0, out.stderr
    described = json.loads(out.stdout)
    assert [d["name"] for d in described] == list_methods()
    by_name = {d["name"]: d for d in described}
    assert by_name["apanet"]["base"] == "pfenet"
    assert by_name["apanet"]["knobs"]["n_clusters"]["default"] == 3
    assert by_name["apanet"]["knobs"]["n_clusters"]["range"] == [0, 5]
    assert set(by_name["panet"]["knobs"]) >= {"par", "lambda_par", "alpha", "ways"}


def test_checkpoint_import_panet_writes_a_loadable_model_file(tmp_path):
    state = _listing_state("panet_vgg16.txt", prefix="module.")
    src = tmp_path / "panet.pth"
    torch.save(state, src)
    out_file = tmp_path / "panet.pt"
    out = _run("checkpoint", "import", str(src), "--format", "panet", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["method"] == "panet" and report["backbone"] == "vgg16"
    model, meta = load_model_file(out_file)
    assert meta["method"] == "panet"
    key = "module.encoder.backbone.features.8.4.weight"
    loaded = dict(model.named_parameters())["backbone.features.8.4.weight"]
    assert torch.equal(loaded, state[key])


def test_checkpoint_import_wrong_format_is_one_line(tmp_path):
    src = tmp_path / "panet.pth"
    torch.save(_listing_state("panet_vgg16.txt", prefix="module."), src)
    out = _run("checkpoint", "import", str(src), "--format", "pfenet", "--out", str(tmp_path / "x.pt"))
    assert out.returncode != 0
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "error" in lines[0].lower(), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "x.pt").exists()
