"""What every benchmark record carries: the machine, the versions, the date and the command."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys

import torch


def describe(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    from resnet_fused.bench import anchors

    env.update(anchors.versions())  # onnxruntime, openvino: when installed
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sm_count=props.multi_processor_count,
            driver=_driver_version(),
        )
    else:
        env["device"] = f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    return env


def _command() -> str:
    # `python -m resnet_fused.bench ...` shows up as .../resnet_fused/bench/__main__.py in argv
    argv = list(sys.argv)
    if argv and argv[0].endswith("resnet_fused/bench/__main__.py"):
        argv[0:1] = ["-m", "resnet_fused.bench"]
    return " ".join(shlex.quote(a) for a in ["python", *argv])


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
