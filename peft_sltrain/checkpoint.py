"""Checks on a saved adapter directory, so that a bad file fails with a clear message before any model is touched."""

from __future__ import annotations

import os

from safetensors import safe_open

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT writes with `safe_serialization=False`


def check_adapter_file(directory: str) -> None:
    """Raise `ValueError` if `directory` holds no readable `adapter_model.safetensors` (missing, truncated, corrupt).

    Reads the header and checks that the file is exactly as long as the tensors it declares; the tensor data itself
    is read later by PEFT.
    """
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, PICKLED_WEIGHTS_NAME)):
        raise ValueError(
            f"{directory!r} holds {PICKLED_WEIGHTS_NAME!r}, a pickle written by `save_pretrained(..., "
            "safe_serialization=False)`; SLTrain adapters load from safetensors only (unpickling can run code). "
            "Save the adapter again with the default `safe_serialization=True`."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"No SLTrain adapter weights at {path!r} (expected a `save_pretrained` directory; to read a directory "
            "that holds only the config, use `peft.PeftConfig.from_pretrained`)."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"The adapter file {path!r} is truncated or corrupt: {error}") from error
    if not keys:
        raise ValueError(f"The adapter file {path!r} holds no tensors.")


def check_hub_adapter_file(repo_id: str, subfolder: str | None, download: dict) -> None:
    """`check_adapter_file` for an adapter on the Hub: fetches `adapter_model.safetensors` as PEFT would (into the
    same cache, with the download options PEFT passes it: `download`) and checks it. A repository
    without it (a pickled `adapter_model.bin` only) is refused; where the Hub cannot be asked (offline and not
    cached, unreachable, no such repository), nothing is checked here and PEFT reports it when it loads."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(repo_id, ADAPTER_WEIGHTS_NAME, subfolder=subfolder or None, **download)
    except LocalEntryNotFoundError:  # offline and not cached; a pickle alone in the cache is refused as online
        try:
            hf_hub_download(repo_id, PICKLED_WEIGHTS_NAME, subfolder=subfolder or None, **download)
        except Exception:  # noqa: BLE001 (not cached either: nothing to check)
            return
        raise ValueError(
            f"The Hub repository {repo_id!r} holds no {ADAPTER_WEIGHTS_NAME!r} in the cache but a pickled "
            f"{PICKLED_WEIGHTS_NAME!r}; SLTrain adapters load from safetensors only (unpickling can run code)."
        ) from None
    except EntryNotFoundError:
        raise ValueError(
            f"The Hub repository {repo_id!r} holds no {ADAPTER_WEIGHTS_NAME!r}; SLTrain adapters load from "
            f"safetensors only (a pickled {PICKLED_WEIGHTS_NAME!r} is refused: unpickling can run code)."
        ) from None
    except Exception:  # noqa: BLE001 (the Hub client's network and repository errors differ between versions)
        return
    check_adapter_file(os.path.dirname(path))
