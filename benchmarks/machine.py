"""What the numbers were measured on: printed above every table and stored with the results."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict[str, str]:
    import onnxruntime
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "onnxruntime": f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})",
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return info
