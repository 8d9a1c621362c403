"""CPU kernels for the factored path's sparse products, compiled by numba (optional: `pip install peft-sltrain[cpu]`).

With `S` as CSR (row pointers `crow`, int32 column indices `cols`, `values`; (d_out, d_in)) and row-major
activations `x` (N, d_in), `dy` (N, d_out):

    sparse_matmul_t(x, ..., out)          x S^T into out (N, d_out)
    sparse_grads(x, dy, ..., out_x)       dY S into out_x (N, d_in); returns dS: the nnz entries of dY^T X, in
                                          `values`' order

Why not PyTorch's CSR kernels: they want the token dimension contiguous, so every call pays transposed copies of
`x`, `y` and `dY` through memory, and a sparse multiply-add then costs about 11 dense ones on this CPU. These
kernels instead walk the tokens in blocks of `TOKEN_BLOCK`: each block is transposed into a small per-thread buffer
(`xt`: (d_in, TOKEN_BLOCK), in L2), and every nonzero `S[j, c]` is then one fused multiply-add over the block's
`TOKEN_BLOCK` tokens (`yt[j] += v * xt[c]`), which vectorises. The backward visits each nonzero once per block for
both products: `dxt[c] += v * dyt[j]` and `dS[p] += dot(dyt[j], xt[c])`. No layout of `S^T` is needed, and the only
memory beyond the outputs is the per-thread buffers and a (threads, nnz) array of partial `dS` sums.

Deterministic: tokens are split over threads in fixed contiguous ranges and the partial sums of dS added in thread
order, so the same thread count gives the same bits (x S^T and dY S do not depend on it at all). The kernels compile
on first use per dtype (a few seconds; fp32, fp64). With numba's GNU OpenMP threading layer, a process forked after
its parent ran them must not run them itself (DataLoader workers do not; torchrun starts fresh processes).
"""

from __future__ import annotations

import functools
import importlib.util
import threading

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
    x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:  # fmt: skip
    """Writes x S^T into `out` (N, d_out), for `x` (N, d_in); both row-major (contiguous)."""
    _check(x, crow, cols, values, out=out)
    with _launch_lock:
        threads = _threads()
        _kernels()[0](_np(x), _np(crow), _np(cols), _np(values), _out(out), threads)
    return out


def sparse_grads(
    x: torch.Tensor, dy: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
    out_x: torch.Tensor | None, need_values: bool,
) -> torch.Tensor | None:  # fmt: skip
    """Writes dY S into `out_x` (N, d_in) unless it is None, and returns dS (nnz,) in `values`' order if
    `need_values`, for `x` (N, d_in) and `dy` (N, d_out)."""
    _check(x, crow, cols, values, dy=dy, out_x=out_x)
    need_x = out_x is not None
    dx = _out(out_x) if need_x else torch.empty(0, x.shape[1], dtype=x.dtype).numpy()  # unused placeholder
    with _launch_lock:
        threads = _threads()
        partial = torch.zeros(threads, values.numel() if need_values else 0, dtype=x.dtype)  # (threads, nnz)
        _kernels()[1](_np(x), _np(dy), _np(crow), _np(cols), _np(values), dx, partial.numpy(), need_x, need_values)
    return partial.sum(0) if need_values else None


def _check(x, crow, cols, values, out=None, dy=None, out_x=None) -> None:
    """The kernels index without bounds checks, so every size they trust is checked here (the column indices
    themselves are trusted to be below d_in: `functional.csr_layout` derives them from a validated support)."""
    if x.dim() != 2:
        raise ValueError(f"`x` must be (N, d_in), got shape {tuple(x.shape)}.")
    n, d_out = x.shape[0], crow.numel() - 1
    expected = {"out": (out, (n, d_out)), "dy": (dy, (n, d_out)), "out_x": (out_x, tuple(x.shape))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}.")
    nnz = values.numel()
    if cols.numel() != nnz or int(crow[-1]) != nnz:
        raise ValueError(f"`cols`, `values` and `crow[-1]` must equal nnz, got {cols.numel()}, {nnz}, {int(crow[-1])}")
    if crow.dtype != torch.int32 or cols.dtype != torch.int32:
        raise ValueError(f"`crow` and `cols` must be int32, got {crow.dtype} and {cols.dtype}.")
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
    """(forward, backward), compiled by numba for each dtype on first call."""
    from numba import njit, prange

    NB = TOKEN_BLOCK

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _forward(x, crow, cols, vals, y, threads):
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
                    p, p1 = crow[j], crow[j + 1]
                    while p + 3 < p1:  # four nonzeros per pass: one load and store of acc for four multiply-adds
                        x0, x1, x2, x3 = xt[cols[p]], xt[cols[p + 1]], xt[cols[p + 2]], xt[cols[p + 3]]
                        v0, v1, v2, v3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
                        for t in range(NB):
                            acc[t] += (v0 * x0[t] + v1 * x1[t]) + (v2 * x2[t] + v3 * x3[t])
                        p += 4
                    while p < p1:
                        xr, v = xt[cols[p]], vals[p]
                        for t in range(NB):
                            acc[t] += v * xr[t]
                        p += 1
                for t in range(nb):
                    for j in range(d_out):
                        y[n0 + t, j] = yt[j, t]

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _backward(x, dy, crow, cols, vals, dx, partial, need_x, need_values):
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
                    g = dyt[j]
                    for p in range(crow[j], crow[j + 1]):
                        c, v = cols[p], vals[p]
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

    return _forward, _backward
