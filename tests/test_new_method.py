"""A new method is its module, one import line and its params.yaml section: nothing else.

The test copies the code (``fss/``, ``pipeline/``, ``params.yaml``, ``docs/methods.md`` and the
registry-driven tests) to a temporary folder, makes exactly those three edits there for a
throw-away method ``tinynet``, and runs every consumer of method facts on the copy, in one
subprocess: ``fss methods`` (JSON and the generated docs), ``fss graph`` (train and evaluate
stages), the stage code derivation (pipeline/codedeps.py), a tiny ``fss train`` + ``fss
evaluate`` + ``fss aggregate``, a sweep study of its test-time knob, ``fss bench`` (with the
training's ``fg_weight``), and the contract and docs tests. If a method fact lived anywhere
else (a hand-kept dict of knobs, names or widths), one of these steps would fail for tinynet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

#: edit 1: the method's module
MODULE = '''"""TinyNet: a throw-away method of tests/test_new_method.py (1x1 head on frozen features)."""

from __future__ import annotations

import torch
from torch import nn

from fss.models.backbones import build_backbone, stage_outputs
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import masked_average_pool, resize_bilinear
from fss.models.registry import Knob, register_method

TINYNET_KNOBS = {
    "width": Knob(64, int, "head width", low=1, high=512, small=4, table="Table 1"),
    "gain": Knob(1.0, float, "logit scale at inference only", low=0.1, high=10.0, test_time=True),
}


@register_method("tinynet", base=None, knobs=TINYNET_KNOBS, display="TinyNet", backbones=("small",))
class TinyNet(FSSModel):
    """TinyNet: a 1x1 head on the query feature and its cosine to the support prototype."""

    def __init__(self, backbone: str = "small", shot: int = 1, backbone_weights: str | None = None, *,
                 width: int, gain: float, fg_weight: float) -> None:
        super().__init__(fg_weight=fg_weight)
        self.shot, self.gain = shot, gain
        self.backbone = build_backbone(backbone, weights=backbone_weights)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        channels = self.backbone.stage_channels["layer2"]
        self.head = nn.Sequential(nn.Conv2d(channels + 1, width, 1), nn.ReLU(), nn.Conv2d(width, 2, 1))

    def _logits(self, support_images, support_masks, query_images):
        def stages(rows):
            return stage_outputs(self.backbone, images[rows], ("layer2",))

        images = torch.cat([support_images.flatten(0, 1), query_images])
        with torch.no_grad():
            (feats,) = self.frozen_features("tinynet.layer2", stages, images)
        batch, shots = support_masks.shape[:2]
        support, query = feats[: batch * shots], feats[batch * shots:]
        fg = resize_bilinear((support_masks.flatten(0, 1).unsqueeze(1) == 1).float(), support.shape[-2:])
        proto = masked_average_pool(support, fg, 5e-4).unflatten(0, (batch, shots)).mean(1)
        cosine = torch.nn.functional.cosine_similarity(query, proto[..., None, None], dim=1).unsqueeze(1)
        return resize_bilinear(self.head(torch.cat([query, cosine], 1)), query_images.shape[-2:])

    def forward_infer(self, support_images, support_masks, query_images):
        return self._logits(support_images, support_masks, query_images) * self.gain

    def forward_train(self, batch) -> ModelOutput:
        logits = self._logits(batch["support_images"], batch["support_masks"], batch["query_images"])
        loss = self.segmentation_ce(logits, batch["query_masks"])
        return ModelOutput(logits=logits, losses={"main": loss, "loss": loss})
'''

#: runs in the copy: every consumer of the registry, with the three edits and nothing else
DRIVER = '''
import contextlib, io, json, sys
from pathlib import Path

import yaml

from pipeline.cli import main

root = sys.argv[1]


def fss(*args):
    out, old, code = io.StringIO(), sys.argv, 0
    sys.argv = ["fss", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    assert code in (0, None), (args, code, out.getvalue())
    return out.getvalue()


# fss methods: the registry lists it, with every fact of its module
listed = {d["name"]: d for d in json.loads(fss("methods", "--json"))}
tiny = listed["tinynet"]
assert tiny["display"] == "TinyNet" and tiny["training_free"] is False, tiny
assert tiny["knobs"]["gain"]["test_time"] is True and tiny["knobs"]["width"]["table"] == "Table 1"

# the generated docs: rewritten by the generator, then the docs test (below) passes
fss("methods", "--markdown", "--write", "docs/methods.md")
assert "### tinynet" in Path("docs/methods.md").read_text()

# fss graph: train and evaluate stages whose deps hold its module and no other method's
fss("graph")
stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
for stage in ("train-tinynet", "evaluate-tinynet"):
    deps = stages[stage]["deps"]
    assert "fss/models/methods/tinynet.py" in deps, (stage, deps)
    assert not any(d.startswith("fss/models/methods/") and d != "fss/models/methods/tinynet.py" for d in deps), deps
assert "fss/models/methods/tinynet.py" not in stages["train-pfenet"]["deps"]
assert "methods.tinynet" in stages["train-tinynet"]["params"]
fss("graph", "--check")

# the stage code derivation (a run's code digest hashes the same files)
from pipeline.codedeps import train_code
assert "fss/models/methods/tinynet.py" in train_code("tinynet")

# a tiny train + evaluate + aggregate, at the registry's small widths
from fss.models.registry import get_method
small = [f"knobs.{k}={v}" for k, v in get_method("tinynet").small_knobs.items()]
sets = [f"data.root={root}", "data.train_size=33", "train.batch_size=2", "train.log_every=1", "train.fg_weight=3.0",
        "train.checkpoint_minutes=0", "test.size=33", "test.episodes=4", "test.batch_size=2",
        "test.figure_episodes=0", "data.num_workers=0", *small]
fss("train", "--method", "tinynet", "--dataset", "synthetic", "--fold", 0, "--shot", 1, "--iterations", 2,
    "--device", "cpu", *sum((["--set", s] for s in sets), []), "--out", "runs/tinynet/fold0")
curves = Path("runs/tinynet/fold0/curves.csv").read_text().splitlines()
assert len(curves) == 3, curves
fss("evaluate", "--run", "runs/tinynet/fold0", "--shot", 1, "--device", "cpu", "--out", "evals/tinynet/fold0-1shot.json")
assert 0.0 <= json.loads(Path("evals/tinynet/fold0-1shot.json").read_text())["miou"] <= 1.0
fss("aggregate", "--runs", "evals", "--out", "results")
assert "tinynet" in Path("results/table_miou.md").read_text()

# a sweep of its test-time knob re-evaluates the checkpoint (the registry says which knobs)
from pipeline.sweep.study import load_study
Path("sweeps").mkdir(exist_ok=True)
Path("sweeps/tiny_gain.yaml").write_text(yaml.safe_dump({
    "method": "tinynet", "dataset": "synthetic", "folds": [0], "checkpoint": "runs/tinynet/fold{fold}",
    "params": {"knobs.gain": {"values": [0.5, 2.0]}}}))
assert load_study("sweeps/tiny_gain.yaml", check_configs=False).test_time

# fss bench: the training loss, with the training's fg_weight
from pipeline.bench import bench_method
import torch
runs = [bench_method("tinynet", backbone="small", size=33, batch=1, shot=1, device=torch.device("cpu"),
                     precision="fp32", channels_last=False, warmup=0, repeats=1,
                     knobs=get_method("tinynet").small_knobs, fg_weight=w)["losses"]["loss"] for w in (1.0, 3.0)]
assert runs[0] != runs[1], runs

# the registry-driven tests: the contract (parametrised over the registry) and the docs test
import pytest
assert pytest.main(["-q", "-p", "no:cacheprovider", "tests/models/test_contract.py", "-k", "tinynet",
                    "tests/models/test_methods_doc.py"]) == 0
print("tinynet: every consumer OK")
'''

#: what the copy holds: the code, its params and docs, and the registry-driven tests
COPIED = ("fss", "pipeline", "params.yaml", "pyproject.toml", "docs/methods.md", "tests/conftest.py",
          "tests/models/episodes.py", "tests/models/test_contract.py", "tests/models/test_methods_doc.py")


def _copy_repo(dest: Path) -> None:
    for rel in COPIED:
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def _add_tinynet(repo: Path) -> None:
    """The three places: the module, its import line, its params.yaml section (and grid entry)."""
    (repo / "fss/models/methods/tinynet.py").write_text(MODULE)
    init = repo / "fss/models/methods/__init__.py"
    text = init.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("from fss.models.methods import "))
    text = text.replace(line, line + "\nfrom fss.models.methods import tinynet  # noqa: F401")
    init.write_text(text)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["methods"]["tinynet"] = {"optim": {"lr": 0.001}, "train": {"batch_size": 2, "iterations": 2}}
    params["benchmark"]["methods"].append("tinynet")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow  # one subprocess: a tiny train, evaluate, bench and the contract tests (~20 s on 2 cores)
def test_a_new_method_needs_its_module_one_import_line_and_its_params_section(tmp_path, synthetic_root):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _add_tinynet(repo)
    (repo / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(repo), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "driver.py", str(synthetic_root)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "tinynet: every consumer OK" in done.stdout

