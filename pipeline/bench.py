"""`fss bench`: time, FLOPs and memory of a training step and an evaluation episode.

For every method (default: all registered) and precision (fp32 and/or bf16 autocast) the
benchmark builds the model on ``--backbone`` with random weights, draws one batch of
random-but-valid episodes (ImageNet-normalised noise images; support and query masks with a
foreground rectangle, a 255 strip and, for CELP, base-class pixels) and measures, after
``--warmup`` untimed calls, ``--repeats`` timed calls of

* the **training step**: ``zero_grad`` + forward (training mode, losses) + backward +
  optimiser step (the training loss: ``--fg-weight`` is ``train.fg_weight``, passed to the
  model's constructor as ``fss train`` does; default the config's, 1) (SGD, momentum 0.9, weight decay 1e-4, lr 1e-6 so the repeated steps on one
  batch stay finite);
* the **evaluation step**: ``model.predict`` on the same ``--batch`` episodes in eval mode
  under ``no_grad`` (``eval_episode_s`` = that time / batch).

It reports the median (and every) time; the FLOPs of one call of each, counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv/bmm-type ops, forward and
backward; the optimiser's element-wise update is not counted) and the achieved rate
FLOPs / median time; the peak memory of one call (CUDA: ``torch.cuda.max_memory_allocated``
above what was allocated before the call; CPU: growth of the process peak RSS,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, after ``malloc_trim`` and a reset of the
peak through ``/proc/self/clear_refs``); and, in the same run, the machine's own rate of a
square fp32 and bf16 matrix multiply. Methods with a base method (``fss methods``: APANet,
CELP and DPNet on PFENet / CANet, SimPropNet on CANet) also get their training-step time
as a ratio to their base's at the same precision (bases missing from ``--method`` are
added). The JSON report carries the machine description (CPU model and count, torch
version, threads, device name).

``fss bench --data`` times the training augmentation per image instead, ours against the
references' operations, and the DataLoader workers a step rate needs: see
:mod:`pipeline.bench_data`.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from fss.errors import ConfigError
from fss.layout import channels_last_batch
from fss.models.registry import create_model, get_method, list_methods
from fss.precision import autocast
from pipeline.config import parse_set_values, resolve_device
from pipeline.config_schema import TrainLoopConfig
from pipeline.console import console
from pipeline.machine import machine_description
from pipeline.runs import write_json

BENCH_KIND = "fss-bench"
BENCH_VERSION = 1
PRECISIONS = ("fp32", "bf16")
#: lr of the benchmark's SGD: small, so repeated steps on one batch keep finite losses
BENCH_LR = 1e-6
#: the foreground weight of the loss timed when --fg-weight is not given: the training config's default
DEFAULT_FG_WEIGHT = TrainLoopConfig().fg_weight


# ---------------------------------------------------------------- the machine


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device, precision: str, size: int, warmup: int = 1, repeats: int = 3) -> dict:
    """FLOP/s of a square ``size x size`` matrix multiply (2 n^3 FLOPs) in ``precision``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b), warmup, repeats, device)
    seconds = statistics.median(times)
    return {"size": size, "seconds": seconds, "flop_rate": 2.0 * size**3 / seconds}


# ---------------------------------------------------------------- FLOPs and memory


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter; backward included if run)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Give freed heap back to the OS and reset the kernel's peak-RSS mark (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


#: how peak memory is measured, per device type (stored in the report)
MEMORY_MEASURES = {
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
    "cpu": "growth of the process peak RSS (resource.getrusage ru_maxrss) during one call, "
           "after malloc_trim and a peak reset via /proc/self/clear_refs",
    "cpu-noreset": "growth of the process peak RSS (resource.getrusage ru_maxrss) during one call; "
                   "the peak could not be reset, so this is a lower bound",
}


def peak_memory(fn: Callable[[], Any], device) -> tuple[int, str]:
    """Bytes of memory one call of ``fn`` needs beyond what was live before it, and how."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before), "cuda"
    reset = _reset_peak_rss()
    before = _rss_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, int(peak - before)) * 1024, "cpu" if reset else "cpu-noreset"


# ---------------------------------------------------------------- episodes and steps


def synthetic_episodes(batch: int, shot: int, size: int, device, seed: int = 0) -> dict:
    """A training/evaluation batch of random but valid 1-way episodes (see BATCH_KEYS).

    Images are N(0, 1) noise (ImageNet-normalised scale); every support and query mask has a
    foreground rectangle at a random place covering about a quarter of the image, 255 on the
    last rows; ``query_base_masks`` marks another rectangle as base-class pixels.
    """
    g = torch.Generator().manual_seed(seed)

    def masks(*lead: int) -> torch.Tensor:
        m = torch.zeros(*lead, size, size, dtype=torch.long)
        side = max(2, size // 2)
        flat = m.view(-1, size, size)
        for i in range(flat.shape[0]):
            top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
            flat[i, top:top + side, left:left + side] = 1
        flat[:, -max(1, size // 16):, :] = 255
        return m

    base = torch.zeros(batch, size, size, dtype=torch.long)
    base[:, : max(1, size // 4), : max(1, size // 4)] = 1
    query_masks = masks(batch)
    base[query_masks == 1] = 0
    base[query_masks == 255] = 255
    out = {
        "support_images": torch.randn(batch, shot, 3, size, size, generator=g),
        "support_masks": masks(batch, shot),
        "query_images": torch.randn(batch, 3, size, size, generator=g),
        "query_masks": query_masks,
        "query_base_masks": base,
        "class_ids": torch.arange(1, batch + 1),
    }
    return {k: v.to(device) for k, v in out.items()}


def build_bench_model(method: str, *, backbone: str, shot: int, knobs: dict, device, channels_last: bool,
                      seed: int = 0, fg_weight: float = DEFAULT_FG_WEIGHT):
    torch.manual_seed(seed)
    model = create_model(method, backbone=backbone, shot=shot, fg_weight=fg_weight, **knobs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_steps(model, batch: dict, precision: str, device):
    """(training step, evaluation step) closures; the training step returns the loss terms."""
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=BENCH_LR, momentum=0.9, weight_decay=1e-4)

    def train_step() -> dict:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            output = model(batch)
        output.losses["loss"].backward()
        optimizer.step()
        return output.losses

    def eval_step():
        model.eval()
        with torch.no_grad(), autocast(precision, device):
            return model.predict(batch["support_images"], batch["support_masks"], batch["query_images"])

    return train_step, eval_step


def bench_method(method: str, *, backbone: str, size: int, batch: int, shot: int, device, precision: str,
                 channels_last: bool, warmup: int, repeats: int, knobs: dict | None = None, seed: int = 0,
                 fg_weight: float = DEFAULT_FG_WEIGHT) -> dict:
    """Measurements of one method at one precision (see the module docstring)."""
    model = build_bench_model(method, backbone=backbone, shot=shot, knobs=dict(knobs or {}), device=device,
                              channels_last=channels_last, seed=seed, fg_weight=fg_weight)
    episodes = synthetic_episodes(batch, shot, size, device, seed=seed)
    if channels_last:
        episodes = channels_last_batch(episodes)
    train_step, eval_step = make_steps(model, episodes, precision, device)

    torch.manual_seed(seed)
    train_times = time_calls(train_step, warmup, repeats, device)
    eval_times = time_calls(eval_step, warmup, repeats, device)
    torch.manual_seed(seed)
    train_flops = count_flops(train_step)
    eval_flops = count_flops(eval_step)
    train_memory, measure = peak_memory(train_step, device)
    eval_memory, _ = peak_memory(eval_step, device)
    torch.manual_seed(seed)
    losses = {k: float(v.detach()) for k, v in train_step().items()}
    logits = eval_step()

    train_s, eval_s = statistics.median(train_times), statistics.median(eval_times)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {
        "method": method,
        "base": get_method(method).base,
        "precision": precision,
        "channels_last": channels_last,
        "train_step_s": train_s,
        "train_step_times_s": train_times,
        "eval_step_s": eval_s,
        "eval_episode_s": eval_s / batch,
        "eval_step_times_s": eval_times,
        "train_flops": train_flops,
        "eval_flops": eval_flops,
        "eval_flops_per_episode": eval_flops / batch,
        "train_flop_rate": train_flops / train_s,
        "eval_flop_rate": eval_flops / eval_s,
        "train_peak_memory_bytes": train_memory,
        "eval_peak_memory_bytes": eval_memory,
        "memory_measure": MEMORY_MEASURES[measure],
        "losses": losses,
        "finite": all(v == v and abs(v) != float("inf") for v in losses.values())
        and bool(torch.isfinite(logits.float()).all()),
        "logits_dtype": str(logits.dtype).replace("torch.", ""),
        "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------- the whole benchmark


def _knobs_for(method: str, knobs: dict) -> dict:
    spec = get_method(method)
    return {k: v for k, v in knobs.items() if k in spec.knobs}


def select_methods(methods: list[str] | None, backbone: str) -> tuple[list[str], list[str], list[str]]:
    """(methods to run in order, bases added for the ratios, default methods skipped because
    they do not support ``backbone``). Explicitly named methods must support it."""
    explicit = bool(methods)
    chosen = list(dict.fromkeys(methods)) if explicit else list_methods()
    skipped = []
    for name in list(chosen):
        spec = get_method(name)  # unknown name -> ConfigError listing the methods
        if spec.backbones and backbone not in spec.backbones:
            if explicit:
                raise ConfigError(
                    f"method '{name}' does not support backbone {backbone!r}; choose one of: {', '.join(spec.backbones)}."
                )
            chosen.remove(name)
            skipped.append(name)
    added = []
    for name in list(chosen):
        base = get_method(name).base
        if base is not None and base not in chosen and base not in added:
            spec = get_method(base)
            if not spec.backbones or backbone in spec.backbones:
                added.append(base)
    # bases first, so each ratio's denominator is measured before its method
    ordered = [m for m in added] + [m for m in chosen if get_method(m).base is None] + [
        m for m in chosen if get_method(m).base is not None]
    return ordered, added, skipped


def run_benchmark(
    methods: list[str] | None = None,
    *,
    backbone: str = "small",
    size: int = 97,
    batch: int = 2,
    shot: int = 1,
    device: str = "cpu",
    precisions: list[str] | tuple[str, ...] = PRECISIONS,
    channels_last: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    knobs: dict | None = None,
    matmul_size: int | None = None,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
    fg_weight: float = DEFAULT_FG_WEIGHT,
) -> dict:
    """Benchmark ``methods`` (default: all registered); returns the JSON report."""
    say = say or (lambda m: None)
    if size < 9:
        raise ConfigError(f"--size {size} is too small; use at least 9 (e.g. 33, 97, 473).")
    for name, value, low in (("--batch", batch, 1), ("--shot", shot, 1), ("--warmup", warmup, 0),
                             ("--repeats", repeats, 1)):
        if value < low:
            raise ConfigError(f"{name} {value} must be at least {low}.")
    precisions = list(dict.fromkeys(precisions))
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose one of: {', '.join(PRECISIONS)}.")
    dev = resolve_device(device)
    knobs = dict(knobs or {})
    ordered, added, skipped = select_methods(methods, backbone)
    if knobs:
        unused = [k for k in knobs if not any(_knobs_for(m, {k: 1}) for m in ordered)]
        if unused:
            raise ConfigError(f"--knob {unused[0]}: none of the benchmarked methods has this knob (see 'fss methods').")

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    n = matmul_size or (8192 if dev.type == "cuda" else 2048)
    matmul = {}
    for p in PRECISIONS:
        matmul[p] = matmul_rate(dev, p, n)
        say(f"matmul {p} {n}x{n}: {matmul[p]['flop_rate'] / 1e9:.1f} GFLOP/s")

    results = []
    for precision in precisions:
        for name in ordered:
            say(f"bench {name} {precision} ({backbone}, {size}x{size}, batch {batch}, {shot}-shot)")
            r = bench_method(name, backbone=backbone, size=size, batch=batch, shot=shot, device=dev,
                             precision=precision, channels_last=channels_last, warmup=warmup, repeats=repeats,
                             knobs=_knobs_for(name, knobs), seed=seed, fg_weight=fg_weight)
            r["added_as_base"] = name in added
            r["train_fraction_of_matmul_rate"] = r["train_flop_rate"] / matmul[precision]["flop_rate"]
            r["eval_fraction_of_matmul_rate"] = r["eval_flop_rate"] / matmul[precision]["flop_rate"]
            results.append(r)
    by_key = {(r["method"], r["precision"]): r for r in results}
    for r in results:
        base = by_key.get((r["base"], r["precision"])) if r["base"] else None
        r["train_step_ratio_to_base"] = r["train_step_s"] / base["train_step_s"] if base else None
        r["eval_step_ratio_to_base"] = r["eval_step_s"] / base["eval_step_s"] if base else None
    for p in precisions[1:]:
        for r in results:
            ref = by_key.get((r["method"], precisions[0]))
            if r["precision"] == p and ref is not None:
                r[f"train_speedup_vs_{precisions[0]}"] = ref["train_step_s"] / r["train_step_s"]
                r[f"eval_speedup_vs_{precisions[0]}"] = ref["eval_step_s"] / r["eval_step_s"]
    machine = machine_description(dev)
    machine["load_average_1min_before"] = load_before
    return {
        "kind": BENCH_KIND,
        "version": BENCH_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "methods": ordered, "added_bases": added, "skipped_for_backbone": skipped, "backbone": backbone,
            "size": size, "batch": batch, "shot": shot, "device": str(dev), "precisions": precisions,
            "channels_last": channels_last, "warmup": warmup, "repeats": repeats, "knobs": knobs, "seed": seed,
            "fg_weight": fg_weight,
            "weights": "random (timing does not depend on the values)", "optimizer": f"SGD lr {BENCH_LR} momentum 0.9 wd 1e-4",
        },
        "matmul": matmul,
        "memory_measure": results[0]["memory_measure"] if results else None,
        "results": results,
    }


# ---------------------------------------------------------------- output


def results_table(report: dict):
    """A rich table of the report (one row per method and precision)."""
    s, m = report["settings"], report["machine"]
    title = (f"fss bench: {s['backbone']} {s['size']}x{s['size']}, batch {s['batch']}, {s['shot']}-shot, "
             f"{s['device']} ({m['device_name']}, {m['cpu_count']} CPUs, {m['torch_threads']} threads, torch "
             f"{m['torch_version']}); median of {s['repeats']} after {s['warmup']} warm-up"
             + (", channels_last" if s["channels_last"] else ""))
    table = Table(title=title, title_justify="left")
    for col in ("method", "prec", "train s", "x base", "eval s/ep", "train GFLOP", "train GFLOP/s",
                "% matmul", "eval GFLOP/ep", "train MB", "eval MB", "loss"):
        table.add_column(col, justify="left" if col in ("method", "prec") else "right", no_wrap=True)
    for r in report["results"]:
        ratio = r["train_step_ratio_to_base"]
        table.add_row(
            r["method"] + (" (base)" if r["added_as_base"] else ""), r["precision"], f"{r['train_step_s']:.3f}",
            f"{ratio:.2f}" if ratio is not None else "-", f"{r['eval_episode_s']:.3f}", f"{r['train_flops'] / 1e9:.2f}",
            f"{r['train_flop_rate'] / 1e9:.1f}", f"{100 * r['train_fraction_of_matmul_rate']:.0f}",
            f"{r['eval_flops_per_episode'] / 1e9:.2f}", f"{r['train_peak_memory_bytes'] / 2**20:.0f}",
            f"{r['eval_peak_memory_bytes'] / 2**20:.0f}",
            f"{r['losses']['loss']:.3f}" if r["finite"] else "[red]non-finite[/red]",
        )
    mm = report["matmul"]
    caption = "matmul " + ", ".join(f"{p} {v['flop_rate'] / 1e9:.1f} GFLOP/s ({v['size']}^2)" for p, v in mm.items())
    table.caption = caption + f"; memory: {report['memory_measure']}"
    return table


def markdown_table(report: dict) -> str:
    """The report as a Markdown table (for docs/benchmarks.md), one row per method and precision."""
    s = report["settings"]
    mm = report["matmul"]
    lines = [
        f"{s['backbone']}, {s['size']}x{s['size']}, batch {s['batch']}, {s['shot']}-shot, {s['device']}"
        + (", channels_last" if s["channels_last"] else "")
        + f"; median of {s['repeats']} after {s['warmup']} warm-up; machine matmul "
        + ", ".join(f"{p} {v['flop_rate'] / 1e9:.0f} GFLOP/s" for p, v in mm.items()),
        "",
        "| method | precision | train step (s) | x base | vs fp32 | eval (s/episode) | train GFLOP | train GFLOP/s "
        "| eval GFLOP/episode | train peak MB | eval peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratio = r["train_step_ratio_to_base"]
        speedup = r.get("train_speedup_vs_fp32")
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['train_step_s']:.3f} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {r['eval_episode_s']:.3f} | {r['train_flops'] / 1e9:.2f} "
            f"| {r['train_flop_rate'] / 1e9:.1f} | {r['eval_flops_per_episode'] / 1e9:.2f} "
            f"| {r['train_peak_memory_bytes'] / 2**20:.0f} | {r['eval_peak_memory_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _parse_knobs(items: list[str] | None) -> dict:
    out = parse_set_values(items)
    return {k.removeprefix("knobs."): v for k, v in out.items()}


def bench_command(
    method: Optional[list[str]] = typer.Option(None, "--method", help="Method to benchmark; repeatable (default: every registered method). Base methods are added for the ratios."),
    backbone: str = typer.Option("small", help="Backbone (random weights): small, resnet50, resnet50v2, vgg16bn, ..."),
    size: int = typer.Option(97, help="Side of the square support and query images."),
    batch: int = typer.Option(2, help="Episodes per training step and per evaluation call."),
    shot: int = typer.Option(1, help="Shots per episode."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    precision: Optional[list[str]] = typer.Option(None, "--precision", help="fp32 or bf16 (autocast); repeatable (default: both)."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last", help="channels_last model and images."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout instead of the table."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table on stdout instead of the rich table."),
    out: Path = typer.Option(Path("bench.json"), help="JSON report file."),
    warmup: int = typer.Option(1, help="Untimed calls before timing."),
    repeats: Optional[int] = typer.Option(None, help="Timed calls (the median is reported; default 3, with --data 200 per preset and role)."),
    knob: Optional[list[str]] = typer.Option(None, "--knob", help="KEY=VALUE knob override for every method that has it (e.g. pyramid_bins=[6,3,1.0]); repeatable."),
    fg_weight: Optional[float] = typer.Option(None, "--fg-weight", help="train.fg_weight of the loss timed, as the training run's config sets it (the embedded benchmark: 3; default: the config's default, 1 = the papers' CE)."),
    threads: Optional[int] = typer.Option(None, help="torch.set_num_threads (default: torch's)."),
    matmul_size: Optional[int] = typer.Option(None, help="Side of the square matmul of the machine rate (default 2048 CPU, 8192 CUDA)."),
    data: bool = typer.Option(False, "--data", help="Time the training augmentation per image instead, ours against the references' operations (pipeline/bench_data.py); uses --preset, --batch, --shot, --warmup, --repeats, --threads (default 1), --step-rate."),
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="--data: augmentation preset to time (pfenet, panet, hsnet, canet); repeatable (default: all)."),
    step_rate: Optional[float] = typer.Option(None, "--step-rate", help="--data: training steps per second to feed; adds the workers needed (batch * (shot + 1) images per step)."),
) -> None:
    """Median time, FLOPs, FLOP/s and peak memory of a training step and an evaluation episode
    (with --data: the training augmentation's time per image)."""
    if data:
        from pipeline.bench_data import report_data_benchmark  # heavy: the references' torchvision calls

        report_data_benchmark(preset, batch=batch, shot=shot, warmup=warmup,
                              calls=200 if repeats is None else repeats, step_rate=step_rate,
                              threads=1 if threads is None else threads, out=out, as_json=as_json, markdown=markdown)
        return
    if preset or step_rate is not None:
        raise ConfigError("--preset and --step-rate time the augmentation: add --data.")
    repeats = 3 if repeats is None else repeats
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} must be at least 1.")
        torch.set_num_threads(threads)
    if matmul_size is not None and matmul_size < 1:
        raise ConfigError(f"--matmul-size {matmul_size} must be at least 1.")
    report = run_benchmark(
        method or None, backbone=backbone, size=size, batch=batch, shot=shot, device=device,
        precisions=precision or list(PRECISIONS), channels_last=channels_last, warmup=warmup, repeats=repeats,
        knobs=_parse_knobs(knob), matmul_size=matmul_size,
        fg_weight=DEFAULT_FG_WEIGHT if fg_weight is None else fg_weight,
        say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True),
    )
    write_json(out, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    elif markdown:
        typer.echo(markdown_table(report), nl=False)
    else:
        stdout = Console()
        if not stdout.is_terminal:
            stdout = Console(width=200)  # a file or pipe: keep every column readable
        stdout.print(results_table(report))
        console.print(f"report -> {out}", highlight=False, markup=False)
