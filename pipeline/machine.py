"""What a measurement ran on: CPU model and count, torch and Python versions, accelerator (the
machine block of `fss bench` and `fss bench --data` reports)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pipeline.config import cpu_has_bf16


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device) -> dict:
    """CPU model and count, torch version and threads, accelerator name."""
    out = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _cpu_model(),
        # other processes competing for the CPU make every CPU timing slower
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # AVX512-BF16 or AMX: without them CPU bf16 is emulated (see the bf16 matmul rate)
        "cpu_bf16_instructions": cpu_has_bf16(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device_name"] = torch.cuda.get_device_name(device)
        out["device_memory_bytes"] = int(props.total_memory)
        out["cuda_version"] = torch.version.cuda
    return out
