"""The fixed random support of the sparse factor `S`.

Each SLTrain layer keeps `nnz = num_nonzeros(d_out, d_in, sparsity)` trainable values at positions drawn uniformly at
random without replacement from the `d_out * d_in` entries of the weight, once, and never moved. Positions are flat
row-major indices (`row * d_in + col`), sorted, stored as int32: 4 bytes per nonzero, half of int64.
"""

from __future__ import annotations

import hashlib
import math

import torch

# Flat indices are int32, so a layer may hold at most 2**31 - 1 weight entries (LLaMA-7B's largest: 45M).
MAX_LAYER_ENTRIES = 2**31 - 1


def num_nonzeros(d_out: int, d_in: int, sparsity: float) -> int:
    """Number of trainable sparse values of a `d_out x d_in` layer: `round(sparsity * d_out * d_in)`, at least 1."""
    return max(1, round(sparsity * d_out * d_in))


def layer_seed(seed: int, layer_name: str) -> int:
    """A 63-bit seed derived from the config's `seed` and the layer's module name.

    A stable hash (not Python's salted `hash`), so the same seed and name give the same support in every process,
    and different layers get different supports.
    """
    digest = hashlib.sha256(f"{seed}/{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_support(d_out: int, d_in: int, nnz: int, seed: int) -> torch.Tensor:
    """Sorted int32 flat indices of `nnz` distinct entries of a `d_out x d_in` matrix, uniform without replacement.

    `torch.randperm(d_out * d_in)` would cost 8 bytes and ~40 ns per entry of the dense matrix (1.8 s for one
    4096 x 11008 layer). Instead draw about `nnz` uniform positions, deduplicate, and keep a uniform subset of `nnz`
    of the distinct ones; by symmetry every `nnz`-subset is equally likely, exactly as with `randperm`. Above half
    density the `n - nnz` left-out entries are drawn that way instead (the complement of a uniform subset is
    uniform), so that the draws never turn into collecting nearly every entry. Always drawn on the CPU, whatever
    the default device, so that a seed gives the same support everywhere.
    """
    n = d_out * d_in
    if n > MAX_LAYER_ENTRIES:
        raise ValueError(
            f"A {d_out} x {d_in} layer has {n} entries, more than int32 indices can address ({n} > 2**31 - 1)."
        )
    if not 0 < nnz <= n:
        raise ValueError(f"`nnz` must be in [1, {n}] for a {d_out} x {d_in} layer, got {nnz}.")
    if nnz == n:
        return torch.arange(n, dtype=torch.int32, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if 2 * nnz > n:
        kept = torch.ones(n, dtype=torch.bool, device="cpu")
        kept[_uniform_subset(n, n - nnz, generator)] = False
        return kept.nonzero().view(-1).to(torch.int32)
    return _uniform_subset(n, nnz, generator).sort().values.to(torch.int32)


def _uniform_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct int64 values of [0, n), each `k`-subset equally likely, in no particular order (`k <= n / 2`)."""
    # expected number of draws to see `k` distinct values among n: -n * log(1 - k / n), plus a small margin
    draws = min(4 * n, int(-n * math.log1p(-k / n) * 1.02) + 64)
    candidates = torch.unique(torch.randint(n, (draws,), generator=generator, device="cpu"))
    while candidates.numel() < k:
        more = torch.randint(n, (draws,), generator=generator, device="cpu")
        candidates = torch.unique(torch.cat([candidates, more]))
    keep = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:k]
    return candidates[keep]


def check_support(indices: torch.Tensor, d_out: int, d_in: int, nnz: int, name: str) -> None:
    """Raise `ValueError` unless `indices` is a valid support: int32, `nnz` strictly increasing values in range."""
    if indices.dtype != torch.int32 or indices.dim() != 1 or indices.numel() != nnz:
        raise ValueError(
            f"`{name}` must be a 1-D int32 tensor of {nnz} indices for a {d_out} x {d_in} layer, got "
            f"{indices.dtype} of shape {tuple(indices.shape)}."
        )
    if indices.device.type == "meta" or nnz == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= d_out * d_in:
        raise ValueError(
            f"`{name}` holds indices in [{lo}, {hi}], outside [0, {d_out * d_in}) of a {d_out} x {d_in} layer."
        )
    if nnz > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"`{name}` must be strictly increasing (sorted, no duplicates); the file looks corrupt.")


def support_fingerprint(indices: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of a support (1-element int64 tensor): what an adapter saved without its supports keeps, so
    that loading can check that the regenerated supports are the ones it was trained with."""
    digest = hashlib.sha256(indices.detach().cpu().contiguous().numpy().tobytes()).digest()
    return torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64)
