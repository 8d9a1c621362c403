"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory `step_000120/` holding `model.safetensors`, `state.safetensors` (optimizer, scheduler
and RNG tensors) and `state.json` (the rest, with `{"__tensor__": key}` where a tensor was). It is written under a
temporary name and renamed into place only when complete, so a kill mid-save leaves no directory that looks done;
the next save (or resume) deletes what such a kill left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step_"


def flatten(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """`obj` with every tensor moved into `tensors` and replaced by a reference; dict keys become strings."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [flatten(k, tensors, f"{path}.k{i}"), flatten(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot checkpoint a {type(obj).__name__} at {path} without pickle.")


def unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the temporary checkpoints in `root` that killed saves left: this process's own (it saves one at a time)
    and those of processes no longer running. Only the main process of a run saves; a temporary directory whose
    process still runs (another run's save, or a reused PID) is kept. Returns what was deleted."""
    root, stale = Path(root), []
    pattern = re.compile(rf"\.{re.escape(CHECKPOINT_PREFIX)}\d+\.tmp-(\d+)")
    for path in sorted(root.glob(f".{CHECKPOINT_PREFIX}*.tmp-*")) if root.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and (int(match[1]) == os.getpid() or not _process_alive(int(match[1]))):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], state: dict) -> Path:
    """Write `directory` atomically; refuses to replace an existing checkpoint."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"Checkpoint {directory} already exists; refusing to overwrite it.")
    remove_stale_temporaries(directory.parent)  # full-size leftovers of killed saves
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    # safetensors refuses shared storage (tied weights): store each tensor once, and its other names as aliases
    first, unique, aliases = {}, {}, {}
    for key, value in model_state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr in first:
            aliases[key] = first[ptr]
        else:
            first[ptr] = key
            unique[key] = value.detach().cpu().contiguous()
    save_file(unique, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten(state, tensors)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta))
    for path in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state, state) of a checkpoint; `ValueError` naming the file if one is missing or damaged (saves are
    atomic, so only a damaged disk, a partial copy or a hand edit does that)."""
    directory = Path(directory)
    name = "model.safetensors"
    try:
        model_state = load_file(directory / name)
        with safe_open(directory / name, framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        model_state.update({alias: model_state[key] for alias, key in aliases.items()})
        name = "state.json"
        meta = json.loads((directory / name).read_text())
        name = "state.safetensors"
        state = unflatten(meta, load_file(directory / name))
    except MemoryError:
        raise
    except Exception as error:  # safetensors' own error types, a missing file, JSONDecodeError, a missing key
        reason = f"{type(error).__name__}: {error}"
        # permissions or I/O, not the file's bytes (safetensors reports any failure to open as FileNotFoundError)
        if isinstance(error, OSError) and (directory / name).exists():
            raise ValueError(f"Checkpoint {directory}: {name} cannot be read ({reason}).") from None
        steps = _checkpoints(directory.parent)
        this = next((step for step, path in steps.items() if path.name == directory.name), None)
        earlier = [path for step, path in steps.items() if this is not None and step < this]
        advice = f"delete it to resume from {earlier[-1].name}" if earlier else "no earlier checkpoint is left"
        raise ValueError(f"Checkpoint {directory} is damaged: {name} cannot be read ({reason}); {advice}.") from None
    return model_state, state


def _checkpoints(root: Path) -> dict[int, Path]:
    """The complete checkpoints in `root` by step, in step order (temporary, incomplete ones are ignored)."""
    pattern = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")
    steps = {}  # by step number, not name: step_1000000 comes after step_999999
    for path in root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            steps[int(match[1])] = path
    return dict(sorted(steps.items()))


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints in `root`; returns what was deleted."""
    older = list(_checkpoints(Path(root)).values())[:-keep] if keep > 0 else []
    for path in older:  # renamed first: a kill mid-delete leaves a temporary (deleted later), not a partial step_N
        doomed = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    return older


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint in `out_dir/checkpoints`."""
    steps = _checkpoints(Path(out_dir) / "checkpoints")
    return steps[max(steps)] if steps else None
