"""dvc.yaml is generated (`fss graph`) and each stage depends on exactly the code it imports:
editing a method reruns that method and the methods built on it, editing evaluation code
reruns no training, and the check fails on a missing dep and on one that is not needed."""

from __future__ import annotations

import copy

import pytest
import yaml

from fss.models.registry import list_methods
from pipeline.codedeps import REPO, stage_code, train_code
from pipeline.config import REPO_PARAMS
from pipeline.graph import problems, render
from pipeline.runs import input_digests

from pipeline_helpers import run_fss


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _deps(stage: dict) -> list[str]:
    return stage.get("do", stage).get("deps", [])


def _stages_depending_on(path: str) -> set[str]:
    return {name for name, stage in _stages().items() if path in _deps(stage)}


def test_the_committed_dvc_yaml_is_the_generated_one(capsys):
    expected = render(yaml.safe_load(REPO_PARAMS.read_text()))
    assert (REPO / "dvc.yaml").read_text() == expected, "dvc.yaml is out of date: run 'uv run fss graph'"
    code, out, _ = run_fss(["graph", "--check", "--params", REPO_PARAMS, "--out", REPO / "dvc.yaml"], capsys)
    assert code == 0 and "matches" in out, out


def test_the_check_names_a_missing_dep_and_one_not_needed():
    expected = yaml.safe_load(render(yaml.safe_load(REPO_PARAMS.read_text())))
    edited = copy.deepcopy(expected)
    deps = edited["stages"]["train-canet"]["deps"]
    deps.remove("fss/models/blocks.py")
    deps.append("fss/models/methods/pfenet.py")
    found = problems(edited, expected)
    assert found == ["stage train-canet: dep fss/models/blocks.py is missing (its code runs it)",
                     "stage train-canet: dep fss/models/methods/pfenet.py is not needed (nothing it runs imports it)"]
    del edited["stages"]["evaluate-pfenet"]
    assert "stage evaluate-pfenet is missing" in problems(edited, expected)


def test_editing_canet_reruns_canet_and_the_methods_built_on_it_only():
    # and the aggregate (seconds): the table's row names, bases and floor come from every method's registration
    assert _stages_depending_on("fss/models/methods/canet.py") == {"aggregate"} | {
        f"{kind}-{m}" for kind in ("train", "evaluate") for m in ("canet", "simpropnet", "dpnet_canet")}
    pfenet_family = {f"{kind}-{m}" for kind in ("train", "evaluate") for m in ("pfenet", "apanet", "celp", "dpnet_pfenet")}
    assert pfenet_family <= _stages_depending_on("fss/models/methods/pfenet.py")
    assert "fss/models/methods/canet.py" not in train_code("dpnet_pfenet")
    assert "fss/models/methods/dpnet.py" in train_code("dpnet_canet")


def test_editing_evaluation_bench_or_report_code_reruns_no_training():
    assert not {s for s in _stages_depending_on("pipeline/evaluate.py") if not s.startswith("evaluate-")}
    assert not {s for s in _stages_depending_on("fss/models/feature_cache.py") if not s.startswith("evaluate-")}
    assert _stages_depending_on("pipeline/bench.py") == set()
    assert {s.split("-")[0] for s in _stages_depending_on("pipeline/sweep/report.py")} == {"sweep_report"}
    # a new method module (its import line in fss/models/methods/__init__.py) retrains nothing else;
    # the aggregate reruns (seconds): the registry's rows changed
    assert _stages_depending_on("fss/models/methods/__init__.py") == {"aggregate"}


#: the method modules each method's stages run: its own, its base's, and none other
METHOD_MODULES = {
    "prototype": {"prototype"}, "pfenet": {"pfenet"}, "canet": {"canet"}, "panet": {"panet"},
    "apanet": {"apanet", "pfenet"}, "celp": {"celp", "pfenet"}, "simpropnet": {"simpropnet", "canet"},
    "dpnet_pfenet": {"dpnet", "pfenet"}, "dpnet_canet": {"dpnet", "canet"},
}


def test_every_method_stage_runs_its_own_module_and_its_bases_only():
    assert set(METHOD_MODULES) == set(list_methods())
    stages = _stages()
    for method, names in METHOD_MODULES.items():
        expected = {f"fss/models/methods/{n}.py" for n in names}
        for kind in ("train", "evaluate"):
            listed = {f for f in _deps(stages[f"{kind}-{method}"]) if f.startswith("fss/models/methods/")}
            assert listed == expected, (kind, method)


def test_a_runs_code_digest_covers_the_files_its_stage_lists(tmp_path, monkeypatch):
    """input_digests' code digest changes with a file of the method's train stage, and not with another
    method's module."""
    import pipeline.codedeps as codedeps
    from pipeline.config import resolve_run_config

    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, backbone="small",
                                set_values=[f"data.root={tmp_path}", "backbone_weights=null"])
    before = input_digests(config)["code"]
    copy_root = tmp_path / "repo"
    for package in ("fss", "pipeline"):
        for f in (REPO / package).rglob("*.py"):
            target = copy_root / f.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    monkeypatch.setattr("pipeline.runs.REPO", copy_root)
    assert input_digests(config)["code"] == before
    (copy_root / "fss/models/methods/canet.py").write_text((REPO / "fss/models/methods/canet.py").read_text() + "# x\n")
    assert input_digests(config)["code"] == before
    (copy_root / "fss/models/methods/pfenet.py").write_text((REPO / "fss/models/methods/pfenet.py").read_text() + "# x\n")
    assert input_digests(config)["code"] != before
    assert codedeps.train_code("pfenet") == train_code("pfenet")


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_stage_entries_exist(kind):
    assert all((REPO / f).is_file() for f in stage_code(kind, ("apanet",)))
