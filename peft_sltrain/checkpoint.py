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
