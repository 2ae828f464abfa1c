"""`fss methods` and `fss checkpoint import` as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fss.models.checkpoints import IMPORT_REPORT_FIELDS, load_model_file, read_model_file, save_model_file
from fss.models.registry import list_methods
from tests.conftest import CHECKPOINT_KEYS
from tests.pipeline.pipeline_helpers import assert_one_line_error, run_fss

FSS = str(Path(sys.executable).with_name("fss"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FSS, *args], capture_output=True, text=True, timeout=300)


def _listing_state(name: str, prefix: str = "", zeros: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in a reference format from its key listing (random, or zeros for speed)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in (CHECKPOINT_KEYS / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if dtype == "int64" or zeros:
            state[prefix + key] = torch.zeros(dims, dtype=torch.int64 if dtype == "int64" else torch.float32)
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
    out = _run("checkpoint", "import", str(src), "--format", "panet", "--out", str(out_file), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # JSON alone on stdout
    assert tuple(report) == (*IMPORT_REPORT_FIELDS, "train_shot", "out")  # the same fields as pfenet/celp
    assert report["method"] == "panet" and report["backbone"] == "vgg16" and report["epoch"] is None
    assert report["matched"] == report["file_keys"] == 26 and report["dataset"] is None and report["knobs"] == {}
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


def _evaluate_args(model_file: Path, root: Path, out: Path, *extra) -> list:
    return ["evaluate", "--model", model_file, "--root", root, "--fold", 0, "--episodes", 4, "--size", 33,
            "--device", "cpu", "--no-feature-cache", "--out", out, *extra]


def test_pfenet_import_needs_the_dataset_and_evaluate_refuses_another(tmp_path, synthetic_root, capsys):
    """A COCO PFENet imported without --dataset used to load as PASCAL (both have four bins)."""
    src = tmp_path / "train_epoch_50.pth"  # PFENet's container, DataParallel keys
    torch.save({"epoch": 50, "state_dict": _listing_state("pfenet_vgg16bn.txt", "module.", zeros=True),
                "optimizer": {}}, src)
    out_file = tmp_path / "pfenet-coco.pt"
    code, _, err = run_fss(["checkpoint", "import", src, "--format", "pfenet", "--out", out_file], capsys)
    assert_one_line_error(code, err, "--dataset pascal or coco", str(src))
    assert not out_file.exists()
    # the human report shows the dataset and the bins
    code, stdout, err = run_fss(["checkpoint", "import", src, "--format", "pfenet", "--out", out_file,
                                 "--dataset", "coco"], capsys)
    assert code == 0, err
    assert "dataset: coco" in stdout and "pyramid_bins=[1.0, 0.5, 0.25, 0.125]" in stdout and "epoch 50" in stdout
    code, stdout, err = run_fss(["checkpoint", "import", src, "--format", "pfenet", "--out", out_file,
                                 "--dataset", "coco", "--train-shot", 5, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert tuple(report) == (*IMPORT_REPORT_FIELDS, "train_shot", "out")
    assert report["dataset"] == "coco" and report["knobs"] == {"pyramid_bins": [1.0, 0.5, 0.25, 0.125]}
    assert report["backbone"] == "vgg16bn" and report["epoch"] == 50 and report["train_shot"] == 5
    blob = read_model_file(out_file)
    assert blob["dataset"] == "coco" and blob["knobs"]["pyramid_bins"] == [1.0, 0.5, 0.25, 0.125]
    # evaluation on another dataset is refused in one line, before any data is read ...
    for dataset in ("pascal", "synthetic"):
        code, _, err = run_fss(_evaluate_args(out_file, synthetic_root, tmp_path / "e.json", "--dataset", dataset),
                               capsys)
        assert_one_line_error(code, err, "coco", dataset, "--allow-dataset-mismatch")
    assert not (tmp_path / "e.json").exists()
    # ... unless asked for explicitly
    code, _, err = run_fss(_evaluate_args(out_file, synthetic_root, tmp_path / "e.json", "--dataset", "synthetic",
                                          "--allow-dataset-mismatch"), capsys)
    assert code == 0, err
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["knobs"]["pyramid_bins"] == [1.0, 0.5, 0.25, 0.125] and evaluation["train_shot"] == 5
    assert "imported for coco" in err


def test_imported_panet_evaluates_two_way_from_the_cli(tmp_path, synthetic_root, capsys):
    """PANet's ways are chosen at evaluation: the file records none, `--ways 2` rebuilds the model."""
    src = tmp_path / "panet.pth"
    torch.save(_listing_state("panet_vgg16.txt", prefix="module."), src)
    out_file = tmp_path / "panet.pt"
    code, _, err = run_fss(["checkpoint", "import", src, "--format", "panet", "--out", out_file], capsys)
    assert code == 0, err
    out = tmp_path / "panet-2way.json"
    code, _, err = run_fss(_evaluate_args(out_file, synthetic_root, out, "--dataset", "synthetic",
                                          "--protocol", "panet", "--ways", 2, "--shot", 1), capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["ways"] == 2 and report["knobs"]["ways"] == 2 and report["episodes"] == 4
    assert 0.0 <= report["miou"] <= 1.0
    model, meta = load_model_file(out_file, ways=2)
    assert model.ways == 2 and meta["knobs"]["ways"] == 2


def test_one_way_methods_refuse_ways_in_one_line(tmp_path, synthetic_root, capsys):
    from fss.models import create_model

    model_file = tmp_path / "prototype.pt"
    save_model_file(model_file, create_model("prototype", backbone="small"), method="prototype", backbone="small",
                    shot=1, knobs={})
    code, _, err = run_fss(_evaluate_args(model_file, synthetic_root, tmp_path / "e.json", "--dataset", "synthetic",
                                          "--protocol", "panet", "--ways", 2), capsys)
    assert_one_line_error(code, err, "1-way episodes only", "--ways 1")
