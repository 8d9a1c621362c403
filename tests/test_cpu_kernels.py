"""numba's CPU kernels for the factored path's sparse products, against dense PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peft_sltrain import cpu_kernels
from peft_sltrain.functional import sltrain_linear
from peft_sltrain.support import random_support

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")


def sparse_problem(n=150, d_in=37, d_out=23, nnz=90, dtype=torch.float64, seed=0):
    """150 tokens: two full blocks of 64 and a partial one, so both threads and the zero padding are exercised."""
    g = torch.Generator().manual_seed(seed)
    indices = random_support(d_out, d_in, nnz, seed=seed)
    values = torch.randn(nnz, generator=g, dtype=torch.float64).to(dtype)
    S = torch.zeros(d_out * d_in, dtype=dtype).index_put((indices.long(),), values).view(d_out, d_in)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(n, d_out, generator=g, dtype=torch.float64).to(dtype)
    return x, dy, values, indices, S


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 64, 150])
# the block transposes go in 8 x 8 tiles: widths with and without a remainder, and narrower than one tile
@pytest.mark.parametrize("d_in, d_out", [(37, 23), (16, 8), (5, 3)])
def test_kernels_match_dense_products(dtype, n, d_in, d_out):
    nnz = min(90, d_in * d_out // 2)
    x, dy, values, indices, S = sparse_problem(n=n, d_in=d_in, d_out=d_out, nnz=nnz, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    out = torch.full((n, S.shape[0]), float("nan"), dtype=dtype)
    y = cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=out)
    torch.testing.assert_close(y, x @ S.t(), **tol)
    dx = torch.full_like(x, float("nan"))
    dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, dx, need_values=True)
    torch.testing.assert_close(dx, dy @ S, **tol)
    torch.testing.assert_close(dvalues, (dy.t() @ x).view(-1)[indices.long()], **tol)


@pytest.mark.parametrize("n", [1, 150])
@pytest.mark.parametrize("d_in, d_out", [(37, 23), (16, 8)])
def test_bf16_kernels_round_the_fp32_result_once(n, d_in, d_out):
    """bf16 is loaded into fp32, computed there and rounded once per output: within one bf16 rounding of the fp32
    product of the same bf16 inputs (the sums' order differs, so an fp32 result next to a rounding boundary may go
    either way); dS comes back in bf16 too."""
    x, dy, values, indices, S = sparse_problem(n=n, d_in=d_in, d_out=d_out, dtype=torch.bfloat16)
    x32, dy32, S32 = x.float(), dy.float(), S.float()
    out = torch.full((n, S.shape[0]), float("nan"), dtype=torch.bfloat16)
    y = cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=out)
    one_rounding = dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(y.float(), x32 @ S32.t(), **one_rounding)
    dx = torch.full_like(x, float("nan"))
    dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, dx, need_values=True)
    torch.testing.assert_close(dx.float(), dy32 @ S32, **one_rounding)
    assert dvalues.dtype == torch.bfloat16
    torch.testing.assert_close(dvalues.float(), (dy32.t() @ x32).view(-1)[indices.long()], **one_rounding)


def test_bf16_rounding_is_pytorchs():
    """Each output here is the sum of two bf16 numbers, exact in fp32, so its bf16 rounding is known: the kernels'
    must be bit-equal to PyTorch's fp32 -> bf16 conversion (nearest, ties to even), overflow to inf and NaN
    included, in the forward's output (through its four-nonzero loop) and in the backward's dY S."""
    g = torch.Generator().manual_seed(0)
    n, m = 200, 6
    terms = torch.randn(n, 2 * m, generator=g) * torch.logspace(-3, 3, 2 * m)
    terms[:, 1::2] *= 2.0**-8  # the second term at about half an ulp of the first: many exact ties
    specials = [  # (first term, second term, the bf16 sum)
        (1.0, 2**-8, 1.0),  # a tie, to even: down
        (1 + 2**-7, 2**-8, 1 + 2**-6),  # a tie, to even: up
        (-1.0, -(2**-8), -1.0),
        (3.3895e38, 2.0**119, float("inf")),  # bf16's largest plus half its ulp: the rounding overflows
        (3.3895e38, 3.3895e38, float("inf")),  # the fp32 sum overflows
        (float("inf"), 1.0, float("inf")),
        (float("-inf"), float("inf"), float("nan")),
        (float("nan"), 1.0, float("nan")),
    ]
    terms[: len(specials), :2] = torch.tensor([s[:2] for s in specials])
    terms = terms.to(torch.bfloat16)  # (n, 2m): output j sums columns 2j and 2j + 1
    expected = (terms[:, 0::2].float() + terms[:, 1::2].float()).to(torch.bfloat16)
    torch.testing.assert_close(expected[: len(specials), 0].float(), torch.tensor([s[2] for s in specials]),
                               equal_nan=True)  # fmt: skip
    j = torch.arange(m)

    # forward, y = x S^T: row j of S is 1 at columns 4j and 4j + 1 and 0 at 4j + 2 and 4j + 3 (finite x there)
    x = torch.randn(n, 4 * m, generator=g).to(torch.bfloat16)
    x[:, 0::4], x[:, 1::4] = terms[:, 0::2], terms[:, 1::2]
    indices = (j[:, None] * 4 * m + 4 * j[:, None] + torch.arange(4)).flatten().int()  # (m, 4m) support, sorted
    values = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(m).to(torch.bfloat16)
    y = cpu_kernels.sparse_matmul_t(x, indices, values, (m, 4 * m), torch.empty(n, m, dtype=torch.bfloat16))
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)

    # backward, dX = dY S with dY = terms: column c of S (2m, m) is 1 at rows 2c and 2c + 1
    indices = torch.stack([2 * j * m + j, (2 * j + 1) * m + j], 1).flatten().int()
    dx = torch.empty(n, m, dtype=torch.bfloat16)
    x = torch.randn(n, m, generator=g).to(torch.bfloat16)
    cpu_kernels.sparse_grads(x, terms, indices, torch.ones(2 * m, dtype=torch.bfloat16), (2 * m, m), dx, False)
    torch.testing.assert_close(dx, expected, rtol=0, atol=0, equal_nan=True)


def test_kernels_compute_only_what_is_needed():
    x, dy, values, indices, S = sparse_problem()
    dx = torch.full_like(x, float("nan"))
    assert cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, dx, need_values=False) is None
    torch.testing.assert_close(dx, dy @ S, rtol=1e-12, atol=1e-12)
    dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, None, need_values=True)
    torch.testing.assert_close(dvalues, (dy.t() @ x).view(-1)[indices.long()], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frozen", ["x", "values", "factors"])
def test_factored_path_with_frozen_inputs(frozen):
    """Gradients that are needed match the dense path's; those that are not stay None."""
    x, _, values, indices, _ = sparse_problem(n=70)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 37, generator=g, dtype=torch.float64), torch.randn(23, 4, generator=g, dtype=torch.float64)
    results = []
    for path in ("dense", "factored"):
        inputs = {"x": x.clone(), "A": A.clone(), "B": B.clone(), "values": values.clone()}
        trainable = {"x": ["A", "B", "values"], "values": ["x", "A", "B"], "factors": ["x", "values"]}[frozen]
        for name in trainable:
            inputs[name].requires_grad_()
        y = sltrain_linear(**inputs, indices=indices, scaling=0.5, path=path)
        y.pow(2).sum().backward()
        results.append({name: t.grad for name, t in inputs.items()})
    for name in ("x", "A", "B", "values"):
        if results[0][name] is None:
            assert results[1][name] is None
        else:
            torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads to compare against 1")
def test_same_bits_every_call_and_across_thread_counts():
    """Each output element of x S^T and dY S is computed by one thread in a fixed order: the same bits for any thread
    count. dS adds one partial sum per thread: the same bits for the same count, close across counts."""
    x, dy, values, indices, S = sparse_problem(n=300, d_in=200, d_out=150, nnz=900, dtype=torch.float32)

    def run():
        dx = torch.empty_like(x)
        dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, dx, need_values=True)
        return cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=torch.empty(300, 150)), dx, dvalues

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])
    torch.testing.assert_close(first[2], single[2], rtol=1e-5, atol=1e-5)


def test_the_callers_numba_thread_count_is_kept():
    numba = pytest.importorskip("numba")
    x, dy, values, indices, S = sparse_problem(n=300, d_in=200, d_out=150, nnz=900, dtype=torch.float32)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread: the kernels would set the count the caller set")
    previous, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    try:
        numba.set_num_threads(1)
        torch.set_num_threads(2)  # the kernels run on torch's count, 2: then the caller's 1 must come back
        cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=torch.empty(300, 150))
        cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, torch.empty_like(x), need_values=True)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)
        torch.set_num_threads(torch_threads)


def test_numba_without_its_jit_is_not_used(monkeypatch):
    """`NUMBA_DISABLE_JIT=1` would run the kernels as Python loops: the factored path then takes PyTorch's kernels."""
    numba = pytest.importorskip("numba")
    assert cpu_kernels.supports(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(cpu_kernels, "_NUMBA_WORKS", [])  # asked again, with the JIT off
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert not cpu_kernels.supports(torch.device("cpu"), torch.float32)


def test_the_kernels_follow_torch_set_num_threads(monkeypatch):
    """`torch.set_num_threads` sets the kernels' thread count too, up to numba's own limit: dS adds one partial sum
    per thread, so its bits follow the count, which a resumed run must be able to fix. The per-thread buffers the
    backward allocates scale with it."""
    numba = pytest.importorskip("numba")
    x, dy, values, indices, S = sparse_problem()
    used, set_num_threads = [], numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: (used.append(n), set_num_threads(n))[1])
    threads, block = torch.get_num_threads(), cpu_kernels.TOKEN_BLOCK
    try:
        torch.set_num_threads(1)
        assert cpu_kernels._threads() == 1
        for dtype in (torch.float32, torch.bfloat16):  # bf16 is buffered as fp32
            assert cpu_kernels.buffer_bytes(37, 23, dtype) == (2 * 37 + 23) * block * 4
        cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, torch.empty_like(x), need_values=True)
        assert used[0] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert cpu_kernels._threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
    assert cpu_kernels.buffer_bytes(37, 23, torch.float64) == cpu_kernels._threads() * 97 * block * 8


@pytest.mark.parametrize("support", [[], [1, 2, 17, 19], [19], [0], [15, 16, 17, 18, 19], [0, 1, 2, 3, 4]])
def test_empty_rows_and_few_nonzeros(support):
    """Supports of a 4 x 5 `S` with no nonzero at all, empty rows inside (1 and 2), or only the first or the last
    row filled: the row starts and both kernels."""
    x, dy, _, _, _ = sparse_problem(n=100, d_in=5, d_out=4, nnz=4)
    indices = torch.tensor(support, dtype=torch.int32)
    values = torch.arange(1.0, len(indices) + 1, dtype=torch.float64)
    S = torch.zeros(20, dtype=torch.float64).index_put((indices.long(),), values).view(4, 5)
    y = cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=torch.full((100, 4), float("nan"), dtype=x.dtype))
    torch.testing.assert_close(y, x @ S.t(), rtol=1e-12, atol=1e-12)
    dx = torch.full_like(x, float("nan"))
    dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, dx, need_values=True)
    torch.testing.assert_close(dx, dy @ S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dvalues, (dy.t() @ x).view(-1)[indices.long()], rtol=1e-12, atol=1e-12)


def test_bad_sizes_and_dtypes_are_refused():
    """The kernels do not check bounds: a wrong size must stop in Python, with the argument named."""
    x, dy, values, indices, S = sparse_problem(dtype=torch.float32)
    good_out = torch.empty(150, S.shape[0])
    cases = [
        (dict(out=torch.empty(149, S.shape[0])), "`out` must have shape"),
        (dict(out=torch.empty(150, S.shape[0] + 1)), "`out` must have shape"),
        (dict(values=values[:-1]), "one entry per nonzero"),
        (dict(values=values.double()), "`values` must have x's dtype"),
        (dict(out=good_out.double()), "`out` must have x's dtype"),
        (dict(indices=indices.long()), "`indices` must be a 1-D int32"),
        (dict(x=x[None]), "`x` must be"),
        (dict(x=x[:, :-1]), r"`x` must be \(N, d_in\) = \(N, 37\), got shape \(150, 36\)"),
        (dict(x=x.half(), values=values.half(), out=good_out.half()), "`x` must have one of the dtypes"),
        (dict(values=values[None]), r"`values` must be 1-D, one per nonzero, got shape \(1, 90\)"),
        (dict(shape=(23, 37.0)), r"`shape` must be \(d_out, d_in\), two integers, got \(23, 37.0\)"),
        (dict(shape=(23,)), r"`shape` must be \(d_out, d_in\), two integers"),
        (dict(out=None), "`out` must be an \\(N, d_out\\) tensor"),
        (dict(out=good_out.to("meta")), "`out` must be a CPU tensor for numba's kernels, got meta"),
        (dict(indices=indices.numpy()), "`indices` must be a CPU tensor for numba's kernels, got ndarray"),
    ]
    for change, message in cases:
        args = dict(x=x, indices=indices, values=values, shape=S.shape, out=good_out) | change
        with pytest.raises(ValueError, match=message):
            cpu_kernels.sparse_matmul_t(**args)
    with pytest.raises(ValueError, match="`dy` must have shape"):
        cpu_kernels.sparse_grads(x, dy[:, :-1], indices, values, S.shape, None, need_values=True)
    with pytest.raises(ValueError, match="`out_x` must have shape"):
        cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, torch.empty(150, 3), need_values=False)


def test_broken_supports_are_refused_before_the_kernels_run():
    """The kernels read columns as `index - row * d_in` without bounds checks: a support that is unsorted, repeats an
    index or leaves the matrix must stop with a ValueError that names `indices`, the position and the value."""
    x, dy, _, _, _ = sparse_problem(n=10, d_in=5, d_out=4, nnz=4)
    cases = [
        ([3, 2, 7, 9], "position 1 holds 2 after 3"),
        ([3, 3, 7, 9], "position 1 holds 3 after 3"),
        ([-1, 2, 7, 9], "position 0 holds -1"),
        ([1, 2, 7, 20], r"in \[0, 20\).*position 3 holds 20"),
    ]
    for bad, message in cases:
        indices, values = torch.tensor(bad, dtype=torch.int32), torch.ones(4, dtype=x.dtype)
        out = torch.full((10, 4), 7.0, dtype=x.dtype)
        with pytest.raises(ValueError, match=f"`indices` must be strictly increasing.*{message}"):
            cpu_kernels.sparse_matmul_t(x, indices, values, (4, 5), out=out)
        assert (out == 7).all()  # nothing was written
        dx = torch.full_like(x, 7.0)
        with pytest.raises(ValueError, match=message):
            cpu_kernels.sparse_grads(x, dy, indices, values, (4, 5), dx, need_values=True)
        assert (dx == 7).all()


def test_nan_and_inf_propagate():
    """The kernels allow reassociation but not `nnan`/`ninf`, so NaN and inf in x reach y as in PyTorch's sparse
    product (only through nonzeros of S, unlike a dense product, where NaN * 0 spreads them to every output)."""
    x, dy, values, indices, S = sparse_problem(dtype=torch.float32)
    x[3, :] = float("nan")
    x[5, :] = float("inf")
    y = cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=torch.empty(150, S.shape[0]))
    expected = torch.sparse.mm(S.to_sparse_csr(), x.t()).t()
    assert expected.isnan().any() and expected.isinf().any()
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isinf(), expected.isinf())


@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("need_x", [False, True])
def test_inf_in_backward_reaches_ds_as_inf_not_nan(where, need_x):
    """dS with an inf in x or dY is +-inf, as the dense product gives: the zero padding of the last, partial block
    must not multiply a stale inf from the block before by 0 (NaN). 202 tokens on one thread: blocks of 64, 64, 64
    and 10; token 148 is in lane 20 of the third block, a lane the last one pads."""
    x, dy, values, indices, S = sparse_problem(n=202, dtype=torch.float64)
    (x if where == "x" else dy)[148] = float("inf")
    expected = (dy.t() @ x).view(-1)[indices.long()]
    assert expected.isinf().all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_x = torch.empty_like(x) if need_x else None
        dvalues = cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, out_x, need_values=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(dvalues, expected, rtol=1e-12, atol=1e-12)


def test_non_contiguous_input_and_bad_output():
    x, dy, values, indices, S = sparse_problem()
    x_t = x.t().contiguous().t()  # same values, column-major
    y = cpu_kernels.sparse_matmul_t(x_t, indices, values, S.shape, out=torch.empty(150, S.shape[0], dtype=x.dtype))
    torch.testing.assert_close(y, x @ S.t(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"`out` must be row-major \(contiguous\)"):
        cpu_kernels.sparse_matmul_t(x, indices, values, S.shape, out=torch.empty(S.shape[0], 150, dtype=x.dtype).t())
    out_x = torch.empty(S.shape[1], 150, dtype=x.dtype).t()  # written into a copy, it would come back unchanged
    with pytest.raises(ValueError, match=r"`out_x` must be row-major \(contiguous\), got strides \(1, 150\)"):
        cpu_kernels.sparse_grads(x, dy, indices, values, S.shape, out_x=out_x, need_values=False)


def test_concurrent_calls_from_python_threads():
    """numba's workqueue threading layer aborts the process on concurrent launches; the kernels serialise them. Run
    in a fresh process with that layer forced, so that the test fails (the process dies) without the lock."""
    script = textwrap.dedent(
        """
        import threading, torch
        from peft_sltrain import cpu_kernels
        from peft_sltrain.support import random_support

        indices = random_support(256, 256, 4000, seed=0)
        values, x = torch.randn(4000), torch.randn(8000, 256)
        S = torch.zeros(256 * 256).index_put((indices.long(),), values).view(256, 256)
        outs = [torch.empty(8000, 256) for _ in range(4)]

        def work(out):
            for _ in range(10):  # ~10 ms per call: launches from different threads overlap
                cpu_kernels.sparse_matmul_t(x, indices, values, (256, 256), out)

        workers = [threading.Thread(target=work, args=(out,)) for out in outs]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert all(torch.allclose(out, x @ S.t(), atol=1e-4) for out in outs)
        import numba
        print("layer", numba.threading_layer())
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layer workqueue" in done.stdout


def check_a_damaged_cache_is_named(index: Path, run) -> str:
    """Cuts numba's cache index `index` short: the next process (`run()`) fails with an error that names the cache's
    folder, not numba's unpickling error from deep inside its cache code. Its stderr."""
    index.write_bytes(index.read_bytes()[:20])
    damaged = run()
    assert damaged.returncode != 0
    assert "numba could not use its on-disk cache of peft_sltrain's CPU kernels (UnpicklingError" in damaged.stderr
    assert f" in {index.parent} " in damaged.stderr
    return damaged.stderr


CACHED_KERNEL = """
from peft_sltrain._numba_kernels import _cached_njit


@_cached_njit(["float64(float64[:])"])
def total(a):
    s = 0.0
    for v in a:
        s += v
    return s
"""


def test_a_later_process_loads_a_kernel_from_numbas_disk_cache(tmp_path):
    """The kernels' caching (`_cached_njit`) on a small kernel of its own, in seconds: the first process compiles and
    keeps it on disk under the versioned name, the next loads it, a damaged cache file is named in the error. (The
    kernels themselves, compiled for three dtypes in a fresh cache: `pytest -m slow`.)"""
    (tmp_path / "cached_kernel.py").write_text(CACHED_KERNEL)
    script = "import numpy, cached_kernel as k; print(k.total.stats.cache_hits.total(), k.total(numpy.arange(5.0)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)

    first = run()
    assert first.returncode == 0 and first.stdout.split() == ["0", "10.0"], first.stderr[-2000:]  # compiled
    second = run()
    assert second.returncode == 0 and second.stdout.split() == ["1", "10.0"], second.stderr[-2000:]  # loaded
    from peft_sltrain import _numba_kernels

    index = next(tmp_path.rglob("cached_kernel.total_*.nbi"))
    assert index.name.startswith(f"cached_kernel.total_{_numba_kernels._VERSION_KEY}-")
    check_a_damaged_cache_is_named(index, run)


@pytest.mark.slow
def test_a_later_process_loads_the_kernels_from_numbas_disk_cache(tmp_path):
    """The first process compiles the kernels (each for fp32, fp64 and bf16) and numba keeps them on disk; the next
    loads them (no compile) and computes the same bits. A damaged cache file is named in the error, not left as
    numba's unpickling error."""
    script = textwrap.dedent(
        """
        import torch
        from peft_sltrain import cpu_kernels
        from peft_sltrain.support import random_support

        indices, g = random_support(23, 37, 90, seed=0), torch.Generator().manual_seed(0)
        values, x = torch.randn(90, generator=g), torch.randn(150, 37, generator=g)
        dy = torch.randn(150, 23, generator=g)
        y = cpu_kernels.sparse_matmul_t(x, indices, values, (23, 37), torch.empty(150, 23))
        dx = torch.empty(150, 37)
        ds = cpu_kernels.sparse_grads(x, dy, indices, values, (23, 37), dx, need_values=True)
        kernels = cpu_kernels._kernels()
        for kernel in (kernels.row_starts, kernels.forward, kernels.backward):
            print(kernel.__name__, kernel.stats.cache_hits.total(), kernel.stats.cache_misses.total())
        print("bits", hash(tuple(torch.cat([y.flatten(), dx.flatten(), ds]).tolist())))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)

    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-2000:]
    lines = [line.split() for line in first.stdout.splitlines() + second.stdout.splitlines()]
    assert lines[:3] == [["row_starts", "0", "1"], ["forward", "0", "3"], ["backward", "0", "3"]]  # compiled
    assert lines[4:7] == [["row_starts", "1", "0"], ["forward", "3", "0"], ["backward", "3", "0"]]  # loaded
    assert lines[3][0] == "bits" and lines[3] == lines[7]
    index = next(tmp_path.rglob("_numba_kernels.forward_*.nbi"))
    assert index.name.startswith(f"_numba_kernels.forward_{cpu_kernels._kernels()._VERSION_KEY}-")
    assert f"delete the files `_numba_kernels.*` in {index.parent} " in check_a_damaged_cache_is_named(index, run)


def test_the_kernels_compile_without_a_disk_cache_where_numba_has_none(monkeypatch):
    """No writable place for numba's cache (it raises "no locator available"): the kernels compile per process."""
    from numba.core import caching

    from peft_sltrain import _numba_kernels

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def twice(a):
        return 2 * a

    kernel = _numba_kernels._cached_njit(["int64(int64)"])(twice)
    assert kernel(21) == 42 and kernel.stats.cache_path is None


def test_the_cache_is_keyed_on_the_sources_numba_and_the_cpu(monkeypatch):
    """numba keys its cache on a file's modification time and size only: the kernels' cache files are named after a
    hash of both sources' bytes, numba's and llvmlite's versions, numba's code settings and the CPU, so that no
    version ever loads another's code."""
    numba = pytest.importorskip("numba")
    kernels = cpu_kernels._kernels()
    assert kernels._version_key() == kernels._VERSION_KEY
    monkeypatch.setattr(numba, "__version__", "0.0.0")
    assert kernels._version_key() != kernels._VERSION_KEY
    monkeypatch.undo()
    monkeypatch.setattr(numba.config, "CPU_NAME", "another-cpu")
    assert kernels._version_key() != kernels._VERSION_KEY
    monkeypatch.undo()
    changed = [(kernels.llvmlite, "__version__", "0.0.0"), (numba.config, "OPT", 0), (numba.config, "BOUNDSCHECK", 1)]
    changed += [(numba.config, name, not getattr(numba.config, name)) for name in ("LOOP_VECTORIZE", "SLP_VECTORIZE")]
    for module, name, value in changed + [(numba.config, "ENABLE_AVX", not numba.config.ENABLE_AVX)]:
        monkeypatch.setattr(module, name, value)
        assert kernels._version_key() != kernels._VERSION_KEY, name
        monkeypatch.undo()
    read_bytes = Path.read_bytes
    monkeypatch.setattr(
        Path, "read_bytes", lambda path: read_bytes(path) + (b"#" if path.name == "cpu_kernels.py" else b"")
    )
    assert kernels._version_key() != kernels._VERSION_KEY

    def no_sources(path):  # installed as bytecode only: the package's version stands for the sources
        raise FileNotFoundError(2, "No such file", str(path))

    monkeypatch.setattr(Path, "read_bytes", no_sources)
    without = kernels._version_key()
    assert without != kernels._VERSION_KEY and without == kernels._version_key()


def test_a_cache_that_cannot_be_saved_is_warned_about_and_the_kernel_still_compiles(monkeypatch):
    """A full disk while numba saves: a warning, and the kernel compiled without its cache (not an import error)."""
    from numba.core import caching

    from peft_sltrain import _numba_kernels

    def full(self, overloads):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caching.IndexDataCacheFile, "_save_index", full)

    def thrice(a):
        return 3 * a

    with pytest.warns(
        RuntimeWarning, match="could not save the compiled `thrice` kernel to its cache .*No space left"
    ):
        kernel = _numba_kernels._cached_njit(["int64(int64)"])(thrice)
    assert kernel(14) == 42 and kernel.stats.cache_path is None


def test_warm_up_skips_what_the_kernels_do_not_run(monkeypatch):
    """numba installed but unusable (built for another numpy, say): the factored path falls back to PyTorch's
    kernels, and warming up must not fail where the layers would not."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", True)
    monkeypatch.setattr(cpu_kernels, "_NUMBA_WORKS", [False])

    def no_kernels():
        raise AssertionError("compiled although numba does not work")

    monkeypatch.setattr(cpu_kernels, "_kernels", no_kernels)
    assert cpu_kernels.warm_up() == []  # nothing to compile, nothing raised
