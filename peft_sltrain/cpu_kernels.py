"""CPU kernels for the factored path's sparse products, compiled by numba (optional: `pip install peft-sltrain[cpu]`).

With `S` (d_out, d_in) given as the layer keeps it, `values` at the sorted int32 flat row-major positions
`indices` (`row * d_in + col`), and row-major activations `x` (N, d_in), `dy` (N, d_out):

    sparse_matmul_t(x, indices, values, shape, out)       x S^T into out (N, d_out)
    sparse_grads(x, dy, indices, values, shape, out_x)    dY S into out_x (N, d_in); returns dS: the nnz entries
                                                          of dY^T X, in `values`' order

Sorted flat indices are S's CSR column order already, so the kernels read the support itself: a numba pass over it
(O(nnz + d_out), 16 us for 21k nonzeros) checks it and finds the row starts (d_out + 1 ints), and each column is
`index - row * d_in`. No other layout exists, in memory or per call.

Why not PyTorch's CSR kernels: they want the token dimension contiguous, so every call pays transposed copies of
`x`, `y` and `dY` through memory, and a sparse multiply-add then costs about 11 dense ones on this CPU. These
kernels instead walk the tokens in blocks of `TOKEN_BLOCK`: each block is transposed, in tiles, into a buffer
(`xt`: (d_in, TOKEN_BLOCK), in L2), and every nonzero `S[j, c]` is then one fused multiply-add over the block's
`TOKEN_BLOCK` tokens (`yt[j] += v * xt[c]`), which vectorises. The backward visits each nonzero once per block for
both products, two nonzeros per pass: `dxt[c] += v * dyt[j]` and `dS[p] += dot(dyt[j], xt[c])`. No layout of
`S^T` is needed, and the only memory beyond the outputs is the row starts, the per-thread buffers, a (threads, nnz)
array of partial `dS` sums and, in bf16, an fp32 copy of the values.
The buffers, `threads * (2 d_in + d_out) * TOKEN_BLOCK` fp32/fp64 numbers in backward, are allocated inside the
kernels: passed in from PyTorch (so that its memory profiler would count them) the backward ran 12-18% slower,
likely because the compiler can then no longer assume that they alias nothing. PyTorch's profiler does not see them.

Deterministic: tokens are split over threads in fixed contiguous ranges and the partial sums of dS added in thread
order, so the same thread count gives the same bits (x S^T and dY S do not depend on it at all); dS's last bits also
depend on whether dY S is computed in the same pass (its loop pairs nonzeros, the dS-only loop does not). The kernels
(in `_numba_kernels`) compile on first use, for fp32, fp64 and bf16 at once (about 25 s), and numba keeps them on disk:
a later process loads them in well under a second, and numba and its compiler then add 105 MiB to the process's
RSS instead of 243 MiB (`benchmarks/results/numba_cache_cpu.json`). With numba's GNU OpenMP threading layer, a
process forked after its parent ran them must not run them itself (DataLoader workers do not; torchrun starts fresh
processes).

Timings in this module's comments without a results file named are development measurements (this project's 2-core
CPU, fp32, 2 threads, 2048 tokens unless they say otherwise), not kept; `benchmarks/results/` holds the kept ones.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import operator
import threading
import types

import numpy as np
import torch


def installed(module: str) -> bool:
    """Whether `module` is installed: a directory of that name on the path (a namespace package, such as a numba
    cache directory named `numba` beside a script) does not count. (The scripts check their extras with it too.)"""
    try:
        spec = importlib.util.find_spec(module)
    except ValueError:  # imported already, by something that left it without a spec
        return True
    return spec is not None and spec.origin is not None


# without numba the factored path uses PyTorch's CSR kernels; numba is imported on first use, not with the package
AVAILABLE = installed("numba")
# bf16 is computed in fp32 (loaded from and rounded back to bf16 per block of tokens), like PyTorch's bf16 GEMMs
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_COMPUTE_DTYPE = {torch.bfloat16: torch.float32}  # where the kernels compute in another dtype than their inputs
# tokens per block: 64 fp32 numbers are four AVX-512 vectors per fused multiply-add; 16 and 32 ran 1.5-3x slower
# (each (nonzero, block) pair pays a fixed loop overhead), 128 no faster
TOKEN_BLOCK = 64
# reassociation lets the sums vectorise; no `nnan`/`ninf`, so NaN and inf propagate as in PyTorch
FASTMATH = {"reassoc", "contract"}
# the block transposes move TILE x TILE numbers at a time: 4 and 16 ran up to 10% slower kernels than 8
TILE = 8
# numba picks its threading layer (tbb, omp, else workqueue); workqueue aborts the process if two Python threads
# launch kernels at once, so launches are serialised
_launch_lock = threading.Lock()


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether these kernels run the factored path's sparse products for tensors of this device and dtype."""
    return AVAILABLE and device.type == "cpu" and dtype in DTYPES and _numba_works()


_NUMBA_WORKS: list[bool] = []  # the answer of `_numba_works`, once known (not functools.cache: Dynamo warns on it)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def _numba_works() -> bool:
    """numba is installed, imports (it pins numpy versions) and compiles (NUMBA_DISABLE_JIT would run the kernels
    as Python loops): checked once, on the first factored call on CPU."""
    if not _NUMBA_WORKS:
        try:
            import numba

            _NUMBA_WORKS.append(not numba.config.DISABLE_JIT)
        except ImportError:
            _NUMBA_WORKS.append(False)
    return _NUMBA_WORKS[0]


def _threads() -> int:
    """As many threads as torch uses, up to what numba was configured with (it cannot start more)."""
    import numba

    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def _numba_threads():
    """Runs the kernels on `_threads()` numba threads, and gives the caller's numba thread count back afterwards.
    The first call starts numba's thread pool, which under its OpenMP layer resets OpenMP's thread count, torch's
    too: torch's count is put back, so that `torch.set_num_threads` keeps holding for torch and for these kernels."""
    import numba

    torch_threads, threads = torch.get_num_threads(), _threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)


# Under torch.compile both entry points run as opaque eager calls (a graph break): traced into, numba's dispatcher
# fails while it compiles a kernel (Dynamo's "exception table entry start instruction has no offset").
@torch.compiler.disable
def sparse_matmul_t(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:  # fmt: skip
    """Writes x S^T into `out` (N, d_out), for `x` (N, d_in) and `S` of `shape` (d_out, d_in); `out` row-major."""
    if out is None:
        raise ValueError("`out` must be an (N, d_out) tensor to write x S^T into, got None.")
    shape = _check(x, indices, values, shape, out=out)
    y = _out(out, "out")
    with _launch_lock, _numba_threads() as threads:
        crow = _row_starts(indices, *shape)
        _kernels().forward(_np(x), crow, _np(indices), _np(_compute(values)), y, threads)
    return out


@torch.compiler.disable
def sparse_grads(
    x: torch.Tensor, dy: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
    out_x: torch.Tensor | None, need_values: bool,
) -> torch.Tensor | None:  # fmt: skip
    """Writes dY S into `out_x` (N, d_in) unless it is None, and returns dS (nnz,) in `values`' order if
    `need_values`, for `x` (N, d_in), `dy` (N, d_out) and `S` of `shape` (d_out, d_in)."""
    shape = _check(x, indices, values, shape, dy=dy, out_x=out_x)
    need_x = out_x is not None
    dx = _out(out_x, "out_x") if need_x else _np(torch.empty(0, x.shape[1], dtype=x.dtype))  # unused placeholder
    vals = _compute(values)
    with _launch_lock, _numba_threads() as threads:
        crow = _row_starts(indices, *shape)
        partial = torch.zeros(threads, values.numel() if need_values else 0, dtype=vals.dtype)  # (threads, nnz)
        _kernels().backward(_np(x), _np(dy), crow, _np(indices), _np(vals), dx, partial.numpy(), need_x, need_values)
    return partial.sum(0).to(values.dtype) if need_values else None


def warm_up(dtypes=DTYPES) -> list[torch.dtype]:
    """Gets the kernels ready now (compiled, about 25 s for all dtypes, or loaded from numba's on-disk cache after the
    first process) and runs them for `dtypes` on a 2 x 2 problem, so that this does not land in the first training
    step and its timing. Skips a dtype the kernels do not run (numba missing or unusable: the factored path then
    uses PyTorch's kernels); returns the others."""
    indices, compiled = torch.tensor([0, 3], dtype=torch.int32), []
    for dtype in (d for d in dtypes if supports(torch.device("cpu"), d)):
        x, values = torch.ones(2, 2, dtype=dtype), torch.ones(2, dtype=dtype)
        sparse_matmul_t(x, indices, values, (2, 2), out=torch.empty(2, 2, dtype=dtype))
        sparse_grads(x, x, indices, values, (2, 2), out_x=torch.empty(2, 2, dtype=dtype), need_values=True)
        compiled.append(dtype)
    return compiled


def buffer_bytes(d_in: int, d_out: int, dtype: torch.dtype) -> int:
    """Bytes of the per-thread block buffers the backward allocates inside the kernels (the forward's are smaller),
    which PyTorch's memory profiler does not see: threads x (2 d_in + d_out) x TOKEN_BLOCK numbers, fp32 for bf16."""
    itemsize = torch.finfo(_COMPUTE_DTYPE.get(dtype, dtype)).bits // 8
    return _threads() * (2 * d_in + d_out) * TOKEN_BLOCK * itemsize


def _row_starts(indices: torch.Tensor, d_out: int, d_in: int) -> np.ndarray:
    """CSR row pointers (d_out + 1,) of the support, found in one O(nnz + d_out) pass that also checks what the
    unchecked kernels rely on: every index in [0, d_out * d_in) and strictly increasing."""
    crow = np.empty(d_out + 1, np.int64)
    bad = _kernels().row_starts(_np(indices), d_out, d_in, crow)
    if bad >= 0:
        raise ValueError(
            f"`indices` must be strictly increasing flat indices in [0, {d_out * d_in}) of a {d_out} x {d_in} "
            f"matrix; position {bad} holds {int(indices[bad])}" + (f" after {int(indices[bad - 1])}." if bad else ".")
        )
    return crow


def _check(x, indices, values, shape, out=None, dy=None, out_x=None) -> tuple[int, int]:
    """The kernels index without bounds checks, so every size they trust is checked here (and the indices
    themselves by `_row_starts`). Returns `shape` as two Python ints."""
    try:
        d_out, d_in = (operator.index(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"`shape` must be (d_out, d_in), two integers, got {shape!r}.") from None
    tensors = {"x": x, "indices": indices, "values": values, "out": out, "dy": dy, "out_x": out_x}
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.device.type != "cpu"):
            where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a CPU tensor for numba's kernels, got {where}.")
    if x.dtype not in DTYPES:
        raise ValueError(f"`x` must have one of the dtypes {DTYPES}, got {x.dtype}.")
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"`x` must be (N, d_in) = (N, {d_in}), got shape {tuple(x.shape)}.")
    n = x.shape[0]
    expected = {"out": (out, (n, d_out)), "dy": (dy, (n, d_out)), "out_x": (out_x, (n, d_in))}
    for name, (t, want) in expected.items():
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"`{name}` must have shape {want}, got {tuple(t.shape)}.")
    if indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"`indices` must be a 1-D int32 tensor, got {indices.dtype} of shape {tuple(indices.shape)}.")
    if values.dim() != 1:
        raise ValueError(f"`values` must be 1-D, one per nonzero, got shape {tuple(values.shape)}.")
    if indices.numel() != values.numel():
        raise ValueError(f"`indices` and `values` must have one entry per nonzero, got {indices.numel()} and "
                         f"{values.numel()}.")  # fmt: skip
    for name, t in (("values", values), ("out", out), ("dy", dy), ("out_x", out_x)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"`{name}` must have x's dtype {x.dtype}, got {t.dtype}.")
    return d_out, d_in


def _compute(values: torch.Tensor) -> torch.Tensor:
    """The values in the dtype the kernels compute in: fp32 for bf16."""
    return values.to(_COMPUTE_DTYPE.get(values.dtype, values.dtype))


def _out(t: torch.Tensor, name: str) -> np.ndarray:
    if not t.is_contiguous():
        raise ValueError(
            f"`{name}` must be row-major (contiguous), got strides {t.stride()} for shape {tuple(t.shape)}."
        )
    return _np(t)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of the tensor (of a contiguous copy if it is not contiguous); bf16, which numpy lacks, as its
    uint16 bits."""
    t = t.detach().contiguous()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


@functools.cache
def _kernels() -> types.ModuleType:
    """The kernels (`row_starts`, `forward`, `backward`): `_numba_kernels`, imported (with numba) on first call, which
    compiles them for every dtype or loads them from numba's on-disk cache."""
    from . import _numba_kernels

    return _numba_kernels
