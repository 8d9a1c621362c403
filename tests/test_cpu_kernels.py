"""numba's CPU kernels for the factored path's sparse products, against dense PyTorch references."""

from __future__ import annotations

import threading

import pytest
import torch

from peft_sltrain import cpu_kernels
from peft_sltrain.functional import csr_layout, sltrain_linear
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
def test_kernels_match_dense_products(dtype, n):
    x, dy, values, indices, S = sparse_problem(n=n, dtype=dtype)
    crow, cols = csr_layout(indices, *S.shape)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    y = cpu_kernels.sparse_matmul_t(x, crow, cols, values, out=torch.full((n, S.shape[0]), float("nan"), dtype=dtype))
    torch.testing.assert_close(y, x @ S.t(), **tol)
    dx = torch.full_like(x, float("nan"))
    dvalues = cpu_kernels.sparse_grads(x, dy, crow, cols, values, dx, need_values=True)
    torch.testing.assert_close(dx, dy @ S, **tol)
    torch.testing.assert_close(dvalues, (dy.t() @ x).view(-1)[indices.long()], **tol)


def test_kernels_compute_only_what_is_needed():
    x, dy, values, indices, S = sparse_problem()
    crow, cols = csr_layout(indices, *S.shape)
    dx = torch.full_like(x, float("nan"))
    assert cpu_kernels.sparse_grads(x, dy, crow, cols, values, dx, need_values=False) is None
    torch.testing.assert_close(dx, dy @ S, rtol=1e-12, atol=1e-12)
    dvalues = cpu_kernels.sparse_grads(x, dy, crow, cols, values, None, need_values=True)
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


def test_same_bits_every_call_and_close_across_thread_counts():
    x, dy, values, indices, S = sparse_problem(n=300, d_in=200, d_out=150, nnz=900, dtype=torch.float32)
    crow, cols = csr_layout(indices, *S.shape)

    def run():
        dx = torch.empty_like(x)
        dvalues = cpu_kernels.sparse_grads(x, dy, crow, cols, values, dx, need_values=True)
        return cpu_kernels.sparse_matmul_t(x, crow, cols, values, out=torch.empty(300, 150)), dx, dvalues

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_propagate():
    """The kernels allow reassociation but not `nnan`/`ninf`, so NaN and inf in x reach y as in PyTorch's sparse
    product (only through nonzeros of S, unlike a dense product, where NaN * 0 spreads them to every output)."""
    x, dy, values, indices, S = sparse_problem(dtype=torch.float32)
    x[3, :] = float("nan")
    x[5, :] = float("inf")
    crow, cols = csr_layout(indices, *S.shape)
    y = cpu_kernels.sparse_matmul_t(x, crow, cols, values, out=torch.empty(150, S.shape[0]))
    expected = torch.sparse.mm(S.to_sparse_csr(), x.t()).t()
    assert expected.isnan().any() and expected.isinf().any()
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isinf(), expected.isinf())


def test_non_contiguous_input_and_bad_output():
    x, _, values, indices, S = sparse_problem()
    crow, cols = csr_layout(indices, *S.shape)
    x_t = x.t().contiguous().t()  # same values, column-major
    y = cpu_kernels.sparse_matmul_t(x_t, crow, cols, values, out=torch.empty(150, S.shape[0], dtype=x.dtype))
    torch.testing.assert_close(y, x @ S.t(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="output buffers must be contiguous"):
        cpu_kernels.sparse_matmul_t(x, crow, cols, values, out=torch.empty(S.shape[0], 150, dtype=x.dtype).t())


def test_concurrent_calls_from_python_threads():
    """numba's default threading layer aborts on concurrent launches; the kernels serialise them."""
    x, _, values, indices, S = sparse_problem(n=2000, d_in=64, d_out=48, nnz=300)
    crow, cols = csr_layout(indices, *S.shape)
    outs = [torch.empty(2000, 48, dtype=x.dtype) for _ in range(4)]
    workers = [
        threading.Thread(target=cpu_kernels.sparse_matmul_t, args=(x, crow, cols, values), kwargs={"out": out})
        for out in outs
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for out in outs:
        torch.testing.assert_close(out, x @ S.t(), rtol=1e-12, atol=1e-12)
