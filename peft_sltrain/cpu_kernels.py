"""CPU kernels for the factored path's sparse products, compiled by numba (optional: `pip install peft-sltrain[cpu]`).

With `S` (d_out, d_in) given as the layer keeps it, `values` at the sorted int32 flat row-major positions
`indices` (`row * d_in + col`), and row-major activations `x` (N, d_in), `dy` (N, d_out):

    sparse_matmul_t(x, indices, values, shape, out)       x S^T into out (N, d_out)
    sparse_grads(x, dy, indices, values, shape, out_x)    dY S into out_x (N, d_in); returns dS: the nnz entries
                                                          of dY^T X, in `values`' order

Sorted flat indices are S's CSR column order already, so the kernels read the support itself: a numba pass over it
(O(nnz), 16 us for 21k nonzeros) checks it and finds the row starts (d_out + 1 ints), and each column is
`index - row * d_in`. No other layout exists, in memory or per call.

Why not PyTorch's CSR kernels: they want the token dimension contiguous, so every call pays transposed copies of
`x`, `y` and `dY` through memory, and a sparse multiply-add then costs about 11 dense ones on this CPU. These
kernels instead walk the tokens in blocks of `TOKEN_BLOCK`: each block is transposed into a small per-thread buffer
(`xt`: (d_in, TOKEN_BLOCK), in L2), and every nonzero `S[j, c]` is then one fused multiply-add over the block's
`TOKEN_BLOCK` tokens (`yt[j] += v * xt[c]`), which vectorises. The backward visits each nonzero once per block for
both products: `dxt[c] += v * dyt[j]` and `dS[p] += dot(dyt[j], xt[c])`. No layout of `S^T` is needed, and the only
memory beyond the outputs is the row starts, the per-thread buffers and a (threads, nnz) array of partial `dS` sums.

Deterministic: tokens are split over threads in fixed contiguous ranges and the partial sums of dS added in thread
order, so the same thread count gives the same bits (x S^T and dY S do not depend on it at all). The kernels compile
on first use per dtype (a few seconds; fp32, fp64). With numba's GNU OpenMP threading layer, a process forked after
its parent ran them must not run them itself (DataLoader workers do not; torchrun starts fresh processes).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import types

import numpy as np
import torch

# without numba the factored path uses PyTorch's CSR kernels; numba is imported on first use, not with the package
AVAILABLE = importlib.util.find_spec("numba") is not None
DTYPES = (torch.float32, torch.float64)
# tokens per block: 64 fp32 numbers are four AVX-512 vectors per fused multiply-add; 16 and 32 ran 1.5-3x slower
# (each (nonzero, block) pair pays a fixed loop overhead), 128 no faster
TOKEN_BLOCK = 64
# reassociation lets the sums vectorise; no `nnan`/`ninf`, so NaN and inf propagate as in PyTorch
FASTMATH = {"reassoc", "contract"}
# numba picks its threading layer (tbb, omp, else workqueue); workqueue aborts the process if two Python threads
# launch kernels at once, so launches are serialised
_launch_lock = threading.Lock()


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether these kernels run the factored path's sparse products for tensors of this device and dtype."""
    return AVAILABLE and device.type == "cpu" and dtype in DTYPES and _numba_works()


@functools.cache
def _numba_works() -> bool:
    """numba is installed, imports (it pins numpy versions) and compiles (NUMBA_DISABLE_JIT would run the kernels
    as Python loops): checked once, on the first factored call on CPU."""
    try:
        import numba
    except ImportError:
        return False
    return not numba.config.DISABLE_JIT


def _threads() -> int:
    """As many numba threads as torch uses (numba cannot start more than it was configured with)."""
    import numba

    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads


def sparse_matmul_t(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:  # fmt: skip
    """Writes x S^T into `out` (N, d_out), for `x` (N, d_in) and `S` of `shape` (d_out, d_in); `out` row-major."""
    _check(x, indices, values, shape, out=out)
    with _launch_lock:
        threads = _threads()
        crow = _row_starts(indices, *shape)
        _kernels().forward(_np(x), crow, _np(indices), _np(values), _out(out), threads)
    return out


def sparse_grads(
    x: torch.Tensor, dy: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
    out_x: torch.Tensor | None, need_values: bool,
) -> torch.Tensor | None:  # fmt: skip
    """Writes dY S into `out_x` (N, d_in) unless it is None, and returns dS (nnz,) in `values`' order if
    `need_values`, for `x` (N, d_in), `dy` (N, d_out) and `S` of `shape` (d_out, d_in)."""
    _check(x, indices, values, shape, dy=dy, out_x=out_x)
    need_x = out_x is not None
    dx = _out(out_x) if need_x else torch.empty(0, x.shape[1], dtype=x.dtype).numpy()  # unused placeholder
    with _launch_lock:
        threads = _threads()
        crow = _row_starts(indices, *shape)
        partial = torch.zeros(threads, values.numel() if need_values else 0, dtype=x.dtype)  # (threads, nnz)
        _kernels().backward(_np(x), _np(dy), crow, _np(indices), _np(values), dx, partial.numpy(), need_x, need_values)
    return partial.sum(0) if need_values else None


def _row_starts(indices: torch.Tensor, d_out: int, d_in: int) -> np.ndarray:
    """CSR row pointers (d_out + 1,) of the support, found in one pass that also checks what the unchecked kernels
    rely on: every index in [0, d_out * d_in) and strictly increasing."""
    crow = np.empty(d_out + 1, np.int64)
    bad = _kernels().row_starts(_np(indices), d_out, d_in, crow)
    if bad >= 0:
        raise ValueError(
            f"`indices` must be strictly increasing flat indices in [0, {d_out * d_in}) of a {d_out} x {d_in} "
            f"matrix; position {bad} holds {int(indices[bad])}" + (f" after {int(indices[bad - 1])}." if bad else ".")
        )
    return crow


def _check(x, indices, values, shape, out=None, dy=None, out_x=None) -> None:
    """The kernels index without bounds checks, so every size they trust is checked here (and the indices
    themselves by `_row_starts`)."""
    d_out, d_in = shape
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"`x` must be (N, d_in) = (N, {d_in}), got shape {tuple(x.shape)}.")
    n = x.shape[0]
    expected = {"out": (out, (n, d_out)), "dy": (dy, (n, d_out)), "out_x": (out_x, (n, d_in))}
    for name, (t, want) in expected.items():
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"`{name}` must have shape {want}, got {tuple(t.shape)}.")
    if indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"`indices` must be a 1-D int32 tensor, got {indices.dtype} of shape {tuple(indices.shape)}.")
    if indices.numel() != values.numel():
        raise ValueError(f"`indices` and `values` must have one entry per nonzero, got {indices.numel()} and "
                         f"{values.numel()}.")  # fmt: skip
    for name, t in (("values", values), ("out", out), ("dy", dy), ("out_x", out_x)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"`{name}` must have x's dtype {x.dtype}, got {t.dtype}.")


def _out(t: torch.Tensor) -> np.ndarray:
    if not t.is_contiguous():
        raise ValueError(f"output buffers must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t.detach().numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


@functools.cache
def _kernels():
    """The kernels (`row_starts`, `forward`, `backward`), compiled by numba on first call (per dtype for the last
    two)."""
    from numba import njit, prange

    NB = TOKEN_BLOCK

    @njit(nogil=True, cache=False)
    def _row_starts(indices, d_out, d_in, crow):
        """Fills crow (d_out + 1,); returns the first position that breaks the support's invariants, else -1."""
        j, previous, row_end, end = 0, -1, d_in, d_out * d_in  # row pointers are filled up to row j
        crow[0] = 0
        for p in range(indices.shape[0]):
            index = np.int64(indices[p])
            if index <= previous or index >= end:
                return p
            previous = index
            while index >= row_end:  # rows j + 1 .. the row of p start at p (no division per nonzero)
                j += 1
                crow[j] = p
                row_end += d_in
        while j < d_out:
            j += 1
            crow[j] = indices.shape[0]
        return -1

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _forward(x, crow, indices, vals, y, threads):
        N, d_in = x.shape
        d_out = y.shape[1]
        blocks = (N + NB - 1) // NB
        for tid in prange(threads):  # thread tid takes a fixed contiguous range of blocks, with its own buffers
            xt = np.zeros((d_in, NB), x.dtype)  # the block of x, transposed; zero past the last token
            yt = np.empty((d_out, NB), x.dtype)
            for b in range(tid * blocks // threads, (tid + 1) * blocks // threads):
                n0 = b * NB
                nb = min(NB, N - n0)
                if nb < NB:
                    xt[:] = 0
                for t in range(nb):
                    for i in range(d_in):
                        xt[i, t] = x[n0 + t, i]
                for j in range(d_out):
                    acc = yt[j]
                    acc[:] = 0
                    p, p1, base = crow[j], crow[j + 1], j * d_in  # column = index - base
                    while p + 3 < p1:  # four nonzeros per pass: one load and store of acc for four multiply-adds
                        x0, x1 = xt[indices[p] - base], xt[indices[p + 1] - base]
                        x2, x3 = xt[indices[p + 2] - base], xt[indices[p + 3] - base]
                        v0, v1, v2, v3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
                        for t in range(NB):
                            acc[t] += (v0 * x0[t] + v1 * x1[t]) + (v2 * x2[t] + v3 * x3[t])
                        p += 4
                    while p < p1:
                        xr, v = xt[indices[p] - base], vals[p]
                        for t in range(NB):
                            acc[t] += v * xr[t]
                        p += 1
                for t in range(nb):
                    for j in range(d_out):
                        y[n0 + t, j] = yt[j, t]

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _backward(x, dy, crow, indices, vals, dx, partial, need_x, need_values):
        N, d_in = x.shape
        d_out = dy.shape[1]
        blocks = (N + NB - 1) // NB
        threads = partial.shape[0]
        for tid in prange(threads):  # thread tid takes a fixed contiguous range of blocks and its own dS row
            xt = np.zeros((d_in, NB), x.dtype)
            dyt = np.zeros((d_out, NB), x.dtype)
            dxt = np.zeros((d_in, NB), x.dtype)
            dvals = partial[tid]
            zero = x.dtype.type(0)
            for b in range(tid * blocks // threads, (tid + 1) * blocks // threads):
                n0 = b * NB
                nb = min(NB, N - n0)
                if nb < NB:  # the last block: zero padding, so padded tokens add nothing to dS
                    xt[:] = 0
                    dyt[:] = 0
                dxt[:] = 0
                for t in range(nb):
                    for i in range(d_in):
                        xt[i, t] = x[n0 + t, i]
                    for j in range(d_out):
                        dyt[j, t] = dy[n0 + t, j]
                for j in range(d_out):
                    g, base = dyt[j], j * d_in
                    for p in range(crow[j], crow[j + 1]):
                        c, v = indices[p] - base, vals[p]
                        dr, xr = dxt[c], xt[c]
                        s = zero
                        if need_x and need_values:  # one pass over the block for both products
                            for t in range(NB):
                                dr[t] += v * g[t]
                                s += g[t] * xr[t]
                        elif need_x:
                            for t in range(NB):
                                dr[t] += v * g[t]
                        else:
                            for t in range(NB):
                                s += g[t] * xr[t]
                        if need_values:
                            dvals[p] += s
                if need_x:
                    for t in range(nb):
                        for i in range(d_in):
                            dx[n0 + t, i] = dxt[i, t]

    return types.SimpleNamespace(row_starts=_row_starts, forward=_forward, backward=_backward)
