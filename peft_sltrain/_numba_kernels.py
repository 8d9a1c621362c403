"""The numba kernels behind `cpu_kernels` (whose docstring explains them), imported on their first use: this module
imports numba, which the package does not.

Every kernel is a module-level function, so numba keeps what it compiles on disk (`cache=True`: in `__pycache__` next
to this file, else in its user-wide cache directory, or in `NUMBA_CACHE_DIR`) and a later process loads it instead of
compiling again. numba names a function's cache files after its qualified name, and here that name carries a hash of
what decides the compiled code: this file's and `cpu_kernels.py`'s bytes (the constants), the numba and llvmlite
versions, numba's settings that change the generated code (`NUMBA_OPT`, `NUMBA_BOUNDSCHECK`, `NUMBA_LOOP_VECTORIZE`,
`NUMBA_SLP_VECTORIZE`, `NUMBA_ENABLE_AVX`) and the CPU (triple, name, features). Each version of the kernels, of numba
or of the CPU thus has files of its own: numba's own key (the file's modification time and size) would reuse the
numbered data files of an earlier version, which a process starting while another rewrites them could load, stale,
without an error.

One function per kernel serves fp32, fp64 and bf16: the helpers that load and store blocks of tokens pick their code
from the array types when numba compiles them (`overload`), so bf16, passed as its uint16 bits, computes in fp32
buffers. Each kernel is compiled (or loaded) for its explicit signatures, all three dtypes, in a fixed order, when
this module is imported: about 25 s the first time, 0.5 s from the cache (and 25 s in every process where numba has
no writable cache directory). In a fixed order, processes that compile at once number the cache entries alike.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import traceback
import warnings
from pathlib import Path

import llvmlite
import llvmlite.binding
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .cpu_kernels import FASTMATH, TILE, TOKEN_BLOCK


def _version_key() -> str:
    """A hash of what decides the compiled code besides the signatures (see the module docstring)."""
    digest = hashlib.sha256()
    for source in (Path(__file__), Path(__file__).with_name("cpu_kernels.py")):
        try:
            digest.update(source.read_bytes())
        except OSError:  # installed without its sources (bytecode only): the package's version stands for them
            digest.update(f"{source.name} of peft-sltrain {_package_version()}".encode())
    cpu = (
        llvmlite.binding.get_process_triple(),
        llvmlite.binding.get_host_cpu_name(),
        llvmlite.binding.get_host_cpu_features().flatten(),
        numba.config.CPU_NAME,
        numba.config.CPU_FEATURES,
    )
    config = numba.config  # the settings that change the generated code (NUMBA_OPT, NUMBA_LOOP_VECTORIZE, ...)
    settings = (repr(config.OPT), config.BOUNDSCHECK, config.LOOP_VECTORIZE, config.SLP_VECTORIZE, config.ENABLE_AVX)
    codegen = (numba.__version__, llvmlite.__version__, settings)
    digest.update(repr((codegen, cpu)).encode())
    return digest.hexdigest()[:16]


def _package_version() -> str:
    try:
        return importlib.metadata.version("peft-sltrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VERSION_KEY = _version_key()
_CACHE_CODE = os.path.join("numba", "core", "caching.py")  # where numba reads and writes its cache


def _cached_njit(signatures, **options):
    """numba's `njit` for `signatures`, with its on-disk cache under a name that carries `_VERSION_KEY`; without the
    cache where numba finds no writable place for it, or cannot save into it (a full disk: warned). A cache file that
    numba cannot read (numba writes them whole, so only a damaged disk or a hand edit) is named, not left as numba's
    unpickling error from deep inside its cache code."""

    def decorate(fn):
        fn.__qualname__ = f"{fn.__qualname__}_{_VERSION_KEY}"  # what numba names the cache files after
        try:
            return njit(signatures, cache=True, **options)(fn)
        except Exception as e:
            frames = [f for f, _ in traceback.walk_tb(e.__traceback__) if f.f_code.co_filename.endswith(_CACHE_CODE)]
            saving = any(f.f_code.co_name.lstrip("_").startswith("save") for f in frames)
            if isinstance(e, RuntimeError) and "no locator available" in str(e):
                pass  # "cannot cache function ...: no locator available": compile per process
            elif saving and isinstance(e, OSError):
                warnings.warn(f"numba could not save the compiled `{fn.__name__}` kernel to its cache ({e}); "
                              "compiling it without the cache.", RuntimeWarning, stacklevel=2)  # fmt: skip
            elif frames and not saving:  # reading the cache
                paths = (getattr(f.f_locals.get("self"), "_cache_path", None) for f in reversed(frames))
                where = next((path for path in paths if path), "numba's cache directory")
                raise RuntimeError(
                    f"numba could not use its on-disk cache of peft_sltrain's CPU kernels ({type(e).__name__}: {e}): "
                    f"delete the files `_numba_kernels.*` in {where} (numba compiles the kernels again), or set "
                    "NUMBA_CACHE_DIR to another directory."
                ) from e
            else:
                raise
        return njit(signatures, cache=False, **options)(fn)

    return decorate


# The signatures: activations (x, y, dy, dx) row-major fp32, fp64 or bf16 bits; values and dS partial sums in the
# compute dtype (fp32 for bf16); indices int32; row starts int64.
_DTYPES = ((types.float32, types.float32), (types.float64, types.float64), (types.uint16, types.float32))
_FORWARD = [
    types.void(types.Array(act, 2, "C"), types.int64[::1], types.int32[::1], types.Array(comp, 1, "C"),
               types.Array(act, 2, "C"), types.int64)
    for act, comp in _DTYPES
]  # fmt: skip
_BACKWARD = [
    types.void(types.Array(act, 2, "C"), types.Array(act, 2, "C"), types.int64[::1], types.int32[::1],
               types.Array(comp, 1, "C"), types.Array(act, 2, "C"), types.Array(comp, 2, "C"), types.boolean,
               types.boolean)
    for act, comp in _DTYPES
]  # fmt: skip


@_cached_njit([types.int64(types.int32[::1], types.int64, types.int64, types.int64[::1])], nogil=True)
def row_starts(indices, d_out, d_in, crow):
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


# Blocks of tokens move between the row-major activations and the transposed per-thread buffers as they are for
# fp32/fp64; for bf16 (passed as uint16 bits) the buffers are fp32, a load widens the bits (bf16 is the top half of
# an fp32) and a store rounds to nearest even, as PyTorch's conversion does (NaN stays NaN: PyTorch writes the
# canonical 0x7FC0, this keeps the sign and the top of the payload). The stubs below are what Python would call;
# numba compiles the `overload` beside each for the types at hand.
def _is_bf16(x) -> bool:
    """For a numba type: an array of bf16 bits."""
    return isinstance(x, types.Array) and x.dtype == types.uint16


def buffer(rows, x):
    """A zeroed (rows, TOKEN_BLOCK) block buffer for activations like `x`: fp32 for bf16, else x's dtype."""


def as_bits(buf, x):
    """The buffer as what a load writes into it and a store reads: its fp32 bits for bf16 `x`, else itself."""


def widen(h):
    """An element of `x` as a buffer element."""


def narrow(b):
    """A buffer element as an element of the output."""


@overload(buffer, inline="always")
def _buffer(rows, x):
    if _is_bf16(x):
        return lambda rows, x: np.zeros((rows, TOKEN_BLOCK), np.float32)
    return lambda rows, x: np.zeros((rows, TOKEN_BLOCK), x.dtype)


@overload(as_bits, inline="always")
def _as_bits(buf, x):
    if _is_bf16(x):
        return lambda buf, x: buf.view(np.uint32)
    return lambda buf, x: buf


@overload(widen, inline="always")
def _widen(h):
    if isinstance(h, types.Integer):  # bf16 bits
        return lambda h: np.uint32(h) << 16
    return lambda h: h


@overload(narrow, inline="always")
def _narrow(b):
    if isinstance(b, types.Integer):  # fp32 bits, to bf16 bits

        def round_bf16(b):
            if b & 0x7FFFFFFF > 0x7F800000:  # NaN: the top half, made quiet (rounding could turn it into inf)
                return np.uint16((b >> 16) | 0x40)
            return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)  # ties to even; overflow to inf, as it should

        return round_bf16
    return lambda b: b


# The transposes go TILE rows of tokens at a time, in TILE x TILE tiles. Against a token at a time (each element
# stored to another cache line) that made the fp32 kernels 0.61-0.85x as long in forward and 0.65-0.94x in backward
# (2048 tokens, 2 threads, layers 128 x 344 to 2736 x 1024; the narrow ones gain most). Tiles over the features first
# (reading T rows of x in T-wide pieces, 64 rows at once) were 3-10% slower than a token at a time on the widest
# layers. What the transposes still cost, measured by skipping them: 20-41% of the kernels' time at 512-1376 wide
# layers.
@njit(inline="always")
def load(x, xt, n0, nb):  # xt[:, :nb] = x[n0 : n0 + nb].T
    T = TILE
    dst, d = as_bits(xt, x), x.shape[1]
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
    T = TILE
    src, d = as_bits(yt, y), y.shape[1]
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


@njit(inline="always")
def column(index, base):
    """The column of the flat index `index` in the row that starts at `base`, as an unsigned int: numba then skips
    its wraparound of negative indices (5-8% of the forward, measured)."""
    return np.uint64(index - base)


@_cached_njit(_FORWARD, parallel=True, fastmath=FASTMATH, nogil=True)
def forward(x, crow, indices, vals, y, threads):
    NB = TOKEN_BLOCK
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


@_cached_njit(_BACKWARD, parallel=True, fastmath=FASTMATH, nogil=True)
def backward(x, dy, crow, indices, vals, dx, partial, need_x, need_values):
    NB = TOKEN_BLOCK
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
