"""`fss bench` (pipeline/bench.py): the report's fields, FLOP counting, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench import count_flops, markdown_table, matmul_rate, run_benchmark, synthetic_episodes

FSS = str(Path(sys.executable).with_name("fss"))
TINY_KNOBS = ["--knob", "pyramid_bins=[6,3,1.0]", "--knob", "reduce_dim=16"]

RESULT_FIELDS = {
    "method", "base", "precision", "channels_last", "train_step_s", "train_step_times_s", "eval_step_s",
    "eval_episode_s", "eval_step_times_s", "train_flops", "eval_flops", "eval_flops_per_episode",
    "train_flop_rate", "eval_flop_rate", "train_peak_memory_bytes", "eval_peak_memory_bytes", "memory_measure",
    "losses", "finite", "logits_dtype", "trainable_parameters", "parameters", "added_as_base",
    "train_fraction_of_matmul_rate", "eval_fraction_of_matmul_rate", "train_step_ratio_to_base",
    "eval_step_ratio_to_base",
}
MACHINE_FIELDS = {"cpu_model", "cpu_count", "torch_threads", "torch_version", "device", "device_name"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([FSS, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_bench_cli_writes_every_field_with_the_ratio_to_the_base(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("bench", "--method", "apanet", "--size", "33", "--batch", "2", "--shot", "1", "--device", "cpu",
                "--precision", "fp32", "--warmup", "1", "--repeats", "2", "--threads", "1", "--matmul-size", "256",
                *TINY_KNOBS, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["kind"] == "fss-bench"
    assert MACHINE_FIELDS <= set(report["machine"])
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_version"] == torch.__version__
    for precision in ("fp32", "bf16"):  # the machine's matmul rate in both, whatever is benchmarked
        assert report["matmul"][precision]["size"] == 256 and report["matmul"][precision]["flop_rate"] > 0
    assert report["settings"]["added_bases"] == ["pfenet"]
    results = {r["method"]: r for r in report["results"]}
    assert set(results) == {"pfenet", "apanet"}
    for r in results.values():
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert len(r["train_step_times_s"]) == 2 and len(r["eval_step_times_s"]) == 2
        assert r["train_step_s"] == pytest.approx(sorted(r["train_step_times_s"])[0] / 2 + sorted(r["train_step_times_s"])[1] / 2)
        assert r["train_flops"] > r["eval_flops"] > 0  # backward is counted in the training step
        assert r["train_flop_rate"] == pytest.approx(r["train_flops"] / r["train_step_s"])
        assert r["eval_episode_s"] == pytest.approx(r["eval_step_s"] / 2)
        assert r["train_peak_memory_bytes"] >= 0 and "ru_maxrss" in r["memory_measure"]
        assert r["finite"] and r["precision"] == "fp32"
    apanet, pfenet = results["apanet"], results["pfenet"]
    assert apanet["base"] == "pfenet" and pfenet["added_as_base"] and not apanet["added_as_base"]
    assert apanet["train_step_ratio_to_base"] == pytest.approx(apanet["train_step_s"] / pfenet["train_step_s"])
    assert pfenet["train_step_ratio_to_base"] is None
    # APANet's inference is PFENet's: same FLOPs; its training adds the class-agnostic branch
    assert apanet["eval_flops"] == pfenet["eval_flops"]
    assert apanet["train_flops"] > pfenet["train_flops"]
    assert "class_agnostic" in apanet["losses"]


@pytest.mark.slow  # the first optimiser imports torch._dynamo (tens of seconds without .pyc files)
def test_flop_count_is_positive_and_identical_between_two_runs():
    def once():
        return run_benchmark(["pfenet"], backbone="small", size=33, batch=1, shot=1, device="cpu",
                             precisions=["fp32"], warmup=0, repeats=1, matmul_size=64,
                             knobs={"pyramid_bins": [6, 3, 1.0], "reduce_dim": 16})

    report = once()
    first, second = report["results"][0], once()["results"][0]
    assert first["train_flops"] > 0 and first["eval_flops"] > 0
    assert (first["train_flops"], first["eval_flops"]) == (second["train_flops"], second["eval_flops"])
    table = markdown_table(report).splitlines()
    assert table[-1].startswith(f"| pfenet | fp32 | {first['train_step_s']:.3f} | - |")


def test_count_flops_and_matmul_rate_follow_the_formulas():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 8 * 4 * 9 * 25
    rate = matmul_rate(torch.device("cpu"), "fp32", 64, warmup=0, repeats=1)
    assert rate["flop_rate"] == pytest.approx(2 * 64**3 / rate["seconds"])


def test_synthetic_episodes_are_valid():
    b = synthetic_episodes(3, 2, 33, torch.device("cpu"), seed=1)
    assert b["support_images"].shape == (3, 2, 3, 33, 33) and b["query_images"].shape == (3, 3, 33, 33)
    for key in ("support_masks", "query_masks", "query_base_masks"):
        assert b[key].dtype == torch.long and set(b[key].unique().tolist()) <= {0, 1, 255}
    # every support and every query has foreground
    assert ((b["support_masks"] == 1).flatten(2).sum(2) > 0).all()
    assert ((b["query_masks"] == 1).flatten(1).sum(1) > 0).all()
    # base-class pixels never overlap the target
    assert not ((b["query_base_masks"] == 1) & (b["query_masks"] == 1)).any()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--precision", "fp16"], "unknown precision 'fp16'"),
        (["--method", "panet", "--knob", "pyramid_bins=[6]"], "--knob pyramid_bins"),
        (["--method", "dpnet_pfenet", "--backbone", "vgg16bn"], "does not support backbone 'vgg16bn'"),
        (["--size", "3"], "--size 3"),
    ],
)
def test_user_errors_are_one_line(args, needle, tmp_path, capsys):
    from pipeline.cli import main

    old, sys.argv = sys.argv, ["fss", "bench", *args, "--out", str(tmp_path / "b.json")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "b.json").exists()
