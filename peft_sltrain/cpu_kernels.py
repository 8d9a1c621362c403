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
depend on whether dY S is computed in the same pass (its loop pairs nonzeros, the dS-only loop does not). The
kernels compile on first use per dtype (about 10 s each; fp32, fp64, bf16). With numba's GNU OpenMP threading
layer, a process forked after its parent ran them must not run them itself (DataLoader workers do not; torchrun
starts fresh processes).

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

# without numba the factored path uses PyTorch's CSR kernels; numba is imported on first use, not with the package
AVAILABLE = importlib.util.find_spec("numba") is not None
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
        forward = _kernels().forward_bf16 if x.dtype == torch.bfloat16 else _kernels().forward
        forward(_np(x), crow, _np(indices), _np(_compute(values)), y, threads)
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
        backward = _kernels().backward_bf16 if x.dtype == torch.bfloat16 else _kernels().backward
        backward(_np(x), _np(dy), crow, _np(indices), _np(vals), dx, partial.numpy(), need_x, need_values)
    return partial.sum(0).to(values.dtype) if need_values else None


def warm_up(dtypes=DTYPES) -> list[torch.dtype]:
    """Compiles the kernels for `dtypes` now (about 10 s each, once per process) by running them on a 2 x 2
    problem, so that the compile does not land in the first training step and its timing. Skips a dtype the kernels
    do not run (numba missing or unusable: the factored path then uses PyTorch's kernels); returns the others."""
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

    # Blocks of tokens move between the row-major activations and the transposed per-thread buffers as they are
    # for fp32/fp64; for bf16 (passed as uint16 bits) the buffers are fp32, a load widens the bits (bf16 is the top
    # half of an fp32) and a store rounds to nearest even, as PyTorch's conversion does (NaN stays NaN: PyTorch
    # writes the canonical 0x7FC0, this keeps the sign and the top of the payload).
    @njit(inline="always")
    def same(a):
        return a

    @njit(inline="always")
    def buffer(rows, x):
        return np.zeros((rows, NB), x.dtype)

    @njit(inline="always")
    def fp32_bits(buf):
        return buf.view(np.uint32)

    @njit(inline="always")
    def widen_bf16(h):
        return np.uint32(h) << 16

    @njit(inline="always")
    def round_bf16(b):
        if b & 0x7FFFFFFF > 0x7F800000:  # NaN: the top half, made quiet (rounding could turn it into inf)
            return np.uint16((b >> 16) | 0x40)
        return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)  # ties to even; overflow to inf, as it should

    @njit(inline="always")
    def buffer_fp32(rows, x):
        return np.zeros((rows, NB), np.float32)

    load, store = _transposes(same, same, same, njit)
    load_bf16, store_bf16 = _transposes(fp32_bits, widen_bf16, round_bf16, njit)
    forward, backward = _build(load, store, buffer, njit, prange)
    forward_bf16, backward_bf16 = _build(load_bf16, store_bf16, buffer_fp32, njit, prange)
    return types.SimpleNamespace(
        row_starts=_row_starts, forward=forward, backward=backward, forward_bf16=forward_bf16,
        backward_bf16=backward_bf16,
    )  # fmt: skip


def _transposes(as_buffer, widen, narrow, njit):
    """(load, store): a block of `nb` tokens from row-major `x` into a (d, TOKEN_BLOCK) buffer, transposed, and back.
    `as_buffer` views a buffer as what `widen` writes and `narrow` reads (see `_kernels`).

    They go TILE rows of tokens at a time, in TILE x TILE tiles. Against a token at a time (each element stored to
    another cache line) that made the fp32 kernels 0.61-0.85x as long in forward and 0.65-0.94x in backward (2048
    tokens, 2 threads, layers 128 x 344 to 2736 x 1024; the narrow ones gain most). Tiles over the features first
    (reading T rows of x in T-wide pieces, 64 rows at once) were 3-10% slower than a token at a time on the widest
    layers. What the transposes still cost, measured by skipping them: 20-41% of the kernels' time at 512-1376 wide
    layers."""
    T = TILE

    @njit(inline="always")
    def load(x, xt, n0, nb):  # xt[:, :nb] = x[n0 : n0 + nb].T
        dst, d = as_buffer(xt), x.shape[1]
        dt, nt = d - d % T, nb - nb % T  # the parts that full tiles cover
        for t0 in range(0, nt, T):  # T rows of x at a time, read front to back
            for i0 in range(0, dt, T):
                for t in range(t0, t0 + T):
                    for i in range(i0, i0 + T):
                        dst[i, t] = widen(x[n0 + t, i])
            for i in range(dt, d):
                for t in range(t0, t0 + T):
                    dst[i, t] = widen(x[n0 + t, i])
        for t in range(nt, nb):
            for i in range(d):
                dst[i, t] = widen(x[n0 + t, i])

    @njit(inline="always")
    def store(yt, y, n0, nb):  # y[n0 : n0 + nb] = yt[:, :nb].T
        src, d = as_buffer(yt), y.shape[1]
        dt, nt = d - d % T, nb - nb % T
        for t0 in range(0, nt, T):  # T rows of y at a time, written front to back
            for j0 in range(0, dt, T):
                for t in range(t0, t0 + T):
                    for j in range(j0, j0 + T):
                        y[n0 + t, j] = narrow(src[j, t])
            for j in range(dt, d):
                for t in range(t0, t0 + T):
                    y[n0 + t, j] = narrow(src[j, t])
        for t in range(nt, nb):
            for j in range(d):
                y[n0 + t, j] = narrow(src[j, t])

    return load, store


def _build(load, store, buffer, njit, prange):
    """(forward, backward) for one way of loading and storing blocks of tokens (see `_kernels`)."""
    NB = TOKEN_BLOCK

    @njit(inline="always")
    def column(index, base):
        """The column of the flat index `index` in the row that starts at `base`, as an unsigned int: numba then
        skips its wraparound of negative indices (5-8% of the forward, measured)."""
        return np.uint64(index - base)

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _forward(x, crow, indices, vals, y, threads):
        N, d_in = x.shape
        d_out = y.shape[1]
        blocks = (N + NB - 1) // NB
        for tid in prange(threads):  # thread tid takes a fixed contiguous range of blocks, with its own buffers
            xt = buffer(d_in, x)  # the block of x, transposed; zero past the last token
            yt = buffer(d_out, x)
            for b in range(tid * blocks // threads, (tid + 1) * blocks // threads):
                n0 = b * NB
                nb = min(NB, N - n0)
                if nb < NB:
                    xt[:] = 0
                load(x, xt, n0, nb)
                for j in range(d_out):
                    acc = yt[j]
                    acc[:] = 0
                    p, p1, base = crow[j], crow[j + 1], j * d_in
                    while p + 3 < p1:  # four nonzeros per pass: one load and store of acc for four multiply-adds
                        x0, x1 = xt[column(indices[p], base)], xt[column(indices[p + 1], base)]
                        x2, x3 = xt[column(indices[p + 2], base)], xt[column(indices[p + 3], base)]
                        v0, v1, v2, v3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
                        for t in range(NB):
                            acc[t] += (v0 * x0[t] + v1 * x1[t]) + (v2 * x2[t] + v3 * x3[t])
                        p += 4
                    while p < p1:
                        xr, v = xt[column(indices[p], base)], vals[p]
                        for t in range(NB):
                            acc[t] += v * xr[t]
                        p += 1
                store(yt, y, n0, nb)

    @njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=False)
    def _backward(x, dy, crow, indices, vals, dx, partial, need_x, need_values):
        N, d_in = x.shape
        d_out = dy.shape[1]
        blocks = (N + NB - 1) // NB
        threads = partial.shape[0]
        for tid in prange(threads):  # thread tid takes a fixed contiguous range of blocks and its own dS row
            xt = buffer(d_in, x)
            dyt = buffer(d_out, x)
            dxt = buffer(d_in, x)
            dvals = partial[tid]
            zero = xt.dtype.type(0)
            for b in range(tid * blocks // threads, (tid + 1) * blocks // threads):
                n0 = b * NB
                nb = min(NB, N - n0)
                if nb < NB:  # the last block: zero padding, so padded tokens add nothing to dS
                    xt[:] = 0
                    dyt[:] = 0
                dxt[:] = 0
                load(x, xt, n0, nb)
                load(dy, dyt, n0, nb)
                for j in range(d_out):
                    g, base = dyt[j], j * d_in
                    p, p1 = crow[j], crow[j + 1]
                    if need_x and need_values:  # one pass over the block for both products, two nonzeros at
                        while p + 1 < p1:  # a time: 10-17% faster than one, four 15% slower
                            c0, c1 = column(indices[p], base), column(indices[p + 1], base)
                            v0, v1, d0, d1, x0, x1 = vals[p], vals[p + 1], dxt[c0], dxt[c1], xt[c0], xt[c1]
                            s0 = zero
                            s1 = zero
                            for t in range(NB):
                                gt = g[t]  # read once: written out four times, the gain was half
                                d0[t] += v0 * gt
                                d1[t] += v1 * gt
                                s0 += gt * x0[t]
                                s1 += gt * x1[t]
                            dvals[p] += s0
                            dvals[p + 1] += s1
                            p += 2
                    for q in range(p, p1):  # the last nonzero of the row, or all if one product is needed
                        c, v = column(indices[q], base), vals[q]
                        dr, xr = dxt[c], xt[c]
                        s = zero
                        if need_x and need_values:
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
                            dvals[q] += s
                if need_x:
                    store(dxt, dx, n0, nb)

    return _forward, _backward
