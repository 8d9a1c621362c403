"""What a results file records about where it was measured: versions, machine, device, and the code: importing this
module puts this checkout's library first on the import path, so that a benchmark measures the code whose commit it
records (not an older installed copy)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def checkout_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) for a child process that must import this checkout's library too."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def recorded_command(script: str, argv: list[str] | None) -> str:
    """The command line a results file records, shell-quoted so that it reruns as written: `script` (a benchmark's
    `__file__`) with `argv` (None: this process's arguments)."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


_ANNOUNCED: set[Path] = set()  # committed results files this process has said it replaces


def write_results(path: Path, result: dict, indent: int = 2) -> None:
    """Write a results file whole or not at all (a temporary file, renamed), making its folder; says so (once) when it
    replaces a committed result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() not in _ANNOUNCED and path.is_file() and committed(path):
        _ANNOUNCED.add(path.resolve())
        print(f"replacing {path} (committed results: `git checkout -- {path}` brings them back)")
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=indent) + "\n")
    os.replace(partial, path)


def add_replace_flag(parser) -> None:
    """`--replace`, the flag `check_replaceable` reads."""
    parser.add_argument("--replace", action="store_true", help="replace committed results that another command made")


def check_replaceable(parser, path: Path, command: str, replace: bool) -> None:
    """A usage error, before any measuring, if this run would replace a committed results file that another command
    made (a reduced or changed run over the numbers the README quotes), unless `replace` (`--replace`). The command is
    read from the committed file, not the working copy (which an uncommitted run may have replaced)."""
    path = Path(path)
    if replace or not path.is_file():
        return
    text = _committed_text(path)
    if text is None:
        return  # not committed: one's own earlier results
    try:
        recorded = json.loads(text).get("command")
    except (ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and _arguments(recorded) == _arguments(command):
        return  # the same run again
    made_by = f"`{recorded}`" if isinstance(recorded, str) else "a command it does not record"
    parser.error(
        f"{path} holds committed results, made by {made_by}; this run (`{command}`) is not that command word for "
        "word, and would replace them: pass --out to write elsewhere, or --replace to replace them"
    )


def _arguments(command: str) -> list[str]:
    """A recorded command's words, less `--replace` (it changes where results go, not what they are)."""
    try:
        words = shlex.split(command)
    except ValueError:  # an unquoted record from before recorded_command
        words = command.split()
    return [word for word in words if word != "--replace"]


def _committed_text(path: Path) -> str | None:
    """The committed contents of the file `path` (HEAD's, else the index's for a file added since), or None where git
    holds none (an untracked file, a copy outside git, no git)."""
    for spec in (f"HEAD:./{path.name}", f":./{path.name}"):
        try:
            done = subprocess.run(["git", "show", spec], cwd=path.resolve().parent, capture_output=True, text=True)
        except OSError:
            return None
        if done.returncode == 0:
            return done.stdout
    return None


def committed(path: Path) -> bool:
    """Whether git tracks `path` in this checkout."""
    try:
        done = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(path.resolve())], cwd=ROOT, capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


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

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != ROOT:  # inside another repository: its HEAD holds
            git("ls-files", "--error-unmatch", "benchmarks/bench_env.py")  # this code only where it tracks it (not a
            # copy); else CalledProcessError
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


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
        "library": _library(),  # the peft_sltrain measured: this checkout's, unless an import came first
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _library() -> str | None:
    """Where the peft_sltrain measured lies: the one imported, else the one an import (or a child process given
    `checkout_env`) would find."""
    module = sys.modules.get("peft_sltrain")
    origin = (
        module.__file__ if module is not None else getattr(importlib.util.find_spec("peft_sltrain"), "origin", None)
    )
    if origin is None:
        return None
    where = Path(origin).resolve().parent
    return str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)


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
