"""What a results file records about where it was measured: versions, machine, device."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """`$BENCH_COMMIT` if set (the tree was copied to another machine, whose git state may be stale), else the
    checkout's commit with "+dirty" if it has uncommitted changes; None outside a git checkout."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def environment(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    packages = ["torch", "transformers", "peft", "accelerate", "peft-sltrain", "galore-torch", "fira", "bitsandbytes",
                "numba", "llvmlite", "numpy"]  # fmt: skip
    env = {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
        "commit": git_commit(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # what else decides thread counts (numba's threading layer is chosen when its kernels first run)
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")
        },  # fmt: skip
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# -------------------------------------------------------------------------------------- command-line checks
def positive_int(text: str) -> int:
    """An argparse `type`: an integer of at least 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # how argparse names the type in "invalid positive integer value: '0'"


def check_device(parser, device: str) -> torch.device:
    """`device` as a torch.device, or a usage error (not an assertion from deep inside torch) if it is not here."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {device}: only cpu and cuda are benchmarked")
    return device
