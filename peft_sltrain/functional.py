"""The SLTrain linear map, with a memory-saving autograd function.

    y = x @ W.T + bias,    W = weight + scaling * B @ A + S

`x` is (..., d_in), `A` is (r, d_in), `B` is (d_out, r), and the sparse `S` is `values` (nnz,) placed at the flat
row-major positions `indices` (nnz,) of a (d_out, d_in) matrix. `weight` is the frozen dense `W0` when fine-tuning and
`None` when pretraining from scratch.

Two exact ways to compute it (`path`):
- `"dense"`: rebuild `W` (d_out x d_in) and call one GEMM; backward forms the dense weight gradient `dW = dY^T X`
  and reads `dB`, `dA` and `dS = dW[support]` from it, then rebuilds `W` for `dX`. Memory: autograd through
  `F.linear(x, dense_weight(...))` would keep `W` alive until backward, one d_out x d_in matrix per layer for the
  whole step; this function saves only `x` and references to the factors, and its dense matrices are transient.
- `"factored"`: never forms a dense d_out x d_in matrix. `y = s (x A^T) B^T + x S^T (+ x W0^T)`, with the sparse
  products on numba's CPU kernels (`cpu_kernels.py`, which read the int32 support itself) or PyTorch's CSR kernels
  (`S`'s CSR layouts derived from the support per call); backward gets `dX = s (dY B) A + dY S (+ dY W0)`,
  `dA = s (dY B)^T X`, `dB = s dY^T (X A^T)` (recomputed, not saved) and `dS` as a sampled dense-dense product: only
  the nnz entries of `dY^T X`. It costs `2 N r (3 d_out + 4 d_in)` dense and `6 N nnz` sparse multiply-adds
  against `6 N d_in d_out + 8 r d_in d_out` for the dense path; `peft_sltrain.cost` picks between them.
Under `torch.func` transforms and with forward-mode tangents, which neither autograd function supports, and under
`torch.export` (whose program would not run the autograd functions' `out=` products with grad on), the map runs in
plain differentiable ops instead (`_plain_sltrain_linear`).

Timings in this module's comments without a results file named are development measurements (this project's 2-core
CPU, fp32, 2 threads, 2048 tokens unless they say otherwise), not kept; `benchmarks/results/` holds the kept ones.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import cpu_kernels
from .cost import check_factored_supported, exporting
from .support import MAX_LAYER_ENTRIES

# PyTorch warns once per process that CSR support is "in beta"; the factored path uses only its stable core
# (construction, `mm`, `sampled_addmm`), which the tests check against a dense reference.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def dense_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new (d_out, d_in) tensor `weight + scaling * B @ A + S` (`weight` may be `None`), in the tensors' dtype
    also under autocast (which would make the GEMM's result bf16 and leave `S`'s values fp32)."""
    if autocast_on(A.device.type):
        with torch.autocast(A.device.type, enabled=False):
            return dense_weight(A, B, values, indices, scaling, weight)
    if weight is None:
        W = _scaled_mm(B, A, scaling)  # (d_out, d_in)
    else:
        W = torch.addmm(weight, B, A, alpha=scaling)
    W.view(-1).index_add_(0, indices, values)
    return W


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`scaling * a @ b` in one kernel: the scaling rides in the GEMM (`beta=0` ignores the unset 0-d input). On a
    GPU, layer calls at the 60M-350M shapes are launch-bound (docs/compute_paths.md, "On a GPU"): every kernel
    saved counts, and so does every op dispatched (the 0-d input is made once per device and dtype)."""
    return torch.addmm(_unused_input(a), a, b, beta=0.0, alpha=scaling)


_UNUSED_INPUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _unused_input(like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of `like`'s device and dtype for `addmm`'s input where `beta=0` (never read, never written)."""
    if torch.compiler.is_compiling() or type(like) not in (torch.Tensor, torch.nn.Parameter):
        return like.new_empty(())  # in a traced graph, or a tensor subclass's own (FakeTensor, DTensor)
    key = (like.device, like.dtype)
    unused = _UNUSED_INPUTS.get(key)
    if unused is None:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever mode the first call ran in
            unused = torch.empty((), device=like.device, dtype=like.dtype)
        if type(unused) is not torch.Tensor:  # made under a mode (FakeTensorMode's): this call's only, never kept
            return unused
        _UNUSED_INPUTS[key] = unused
    return unused


class _SparseLowRankLinear(torch.autograd.Function):
    """Like `F.linear(x, dense_weight(A, B, values, indices, scaling, weight), bias)`, but saves no dense weight.

    `x` comes in the compute dtype; the other floating-point tensors may come in another (autocast's fp32 master
    weights): they are cast to x's dtype here, and autograd's engine casts their gradients back to their own dtype.
    The same bits as casting them before the call, without three cast nodes per layer in the autograd graph: on a GPU,
    60M-shaped steps on 32k tokens are bound by the CPU's work per op (docs/compute_paths.md, "On a GPU"). A double
    backward (`create_graph=True`, gradient penalties) casts them again, recorded, so that its terms reach the
    originals. The frozen `W0` (d_out x d_in) is saved as it is, not as its cast copy, and cast again in backward:
    under autocast `nn.Linear` keeps that copy alive until backward, one more dense matrix per layer."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, weight, bias):
        dtype = x.dtype
        # the factors cast below, with their versions, for a double backward to cast again (references, not packed:
        # no copies); those not cast are the saved tensors themselves, and a caller's pre-cast copy must not outlive
        # them. No version where there is none to read: an inference tensor's, or one traced by torch.compile (which
        # has no double backward)
        ctx.originals = tuple(None if t.dtype == dtype else (t, _version(t)) for t in (A, B, values))
        A, B, values = A.to(dtype), B.to(dtype), values.to(dtype)  # copies (kept for backward) only where cast
        bias = None if bias is None else bias.to(dtype)
        W = dense_weight(A, B, values, indices, scaling, None if weight is None else weight.to(dtype))  # transient
        y = _output(x, W.shape[0])
        if bias is None:
            torch.mm(x.reshape(-1, x.shape[-1]), W.t(), out=y.view(-1, W.shape[0]))
        else:
            torch.addmm(bias, x.reshape(-1, x.shape[-1]), W.t(), out=y.view(-1, W.shape[0]))
        ctx.save_for_backward(x, A, B, values, indices, weight)  # `weight` uncast (autograd checks its version)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _dense_path_backward(ctx, grad_y)


def _dense_path_backward(ctx, grad_y):
    """The dense path's backward, from the tensors either path saves (`x`, `A`, `B`, `values` in x's dtype or, on
    the dense path, in their own; the int32 support; `W0` uncast). The factored path hands it batched gradients."""
    x, A, B, values, indices, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the casts go into the graph, or the originals get no terms
        A, B, values = (_recast(t, original, x.dtype) for t, original in zip((A, B, values), ctx.originals))
    need_x, need_A, need_B, need_values, _, _, need_weight, need_bias = ctx.needs_input_grad
    scaling = ctx.scaling
    grad_x = grad_A = grad_B = grad_values = grad_weight = grad_bias = None
    dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, d_out)

    if need_A or need_B or need_values or need_weight:
        dW = dy.t().mm(x.reshape(-1, x.shape[-1]))  # (d_out, d_in), transient
        if need_B:
            grad_B = _scaled_mm(dW, A.t(), scaling)  # (d_out, r)
        if need_A:
            grad_A = _scaled_mm(B.t(), dW, scaling)  # (r, d_in)
        if need_values:  # (nnz,): only the sampled entries of dW (index_select takes the int32 support as is)
            grad_values = dW.view(-1).index_select(0, indices)
        if need_weight:
            grad_weight = dW
        del dW  # free before the next dense matrix is built

    if need_x:  # (W0's cast is recorded in a double backward)
        W0 = None if weight is None else weight.to(x.dtype)
        grad_x = dy.mm(dense_weight(A, B, values, indices, scaling, W0)).view(x.shape)  # also for N = 0
    if need_bias:
        grad_bias = dy.sum(0)
    return grad_x, grad_A, grad_B, grad_values, None, None, grad_weight, grad_bias


def _recast(saved: torch.Tensor | None, original: tuple | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`saved` where it was not cast; else its original cast again, recorded, after autograd's own check that it was
    not modified in place since forward (which a cast copy no longer shows)."""
    if original is None:
        return saved
    tensor, version = original
    if version is not None and tensor._version != version:
        raise RuntimeError(
            "An input of the SLTrain linear map was modified in place between its forward and a double backward "
            "(create_graph=True), which would use the new values; modify it after the backward."
        )
    return tensor.to(dtype)


def _version(tensor: torch.Tensor) -> int | None:
    """`tensor._version`, or None for an inference tensor (which has none) or under torch.compile's tracing (where
    reading it makes a symbol that never reaches an output, which torch 2.13's Dynamo refuses)."""
    if torch.compiler.is_compiling() or tensor.is_inference():
        return None
    return tensor._version


def _output(x: torch.Tensor, d_out: int) -> torch.Tensor:
    """A new (..., d_out) output for `x` (..., d_in), written through its 2-D view. Returned as it is, not as a view
    of a 2-D result, so that callers may modify it in place (`relu_()`), as they may `F.linear`'s."""
    return torch.empty(*x.shape[:-1], d_out, dtype=x.dtype, device=x.device)


def _refuse_double_backward() -> None:
    """A custom backward runs with grad mode on only under `create_graph=True`: the factored path's sparse kernels
    are not differentiable, so refuse there rather than return first derivatives without a graph (which would
    silently drop every second-order term)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "The factored SLTrain path has no second derivative (its sparse kernels are not differentiable); use "
            "the dense path for double backward, e.g. gradient penalties: `model.set_compute('dense')` on a PEFT "
            "model (or `SLTrainConfig(compute='dense')`), `path='dense'` in `sltrain_linear`."
        )


def _is_batched(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one of functorch's batched tensors: what `autograd.grad(..., is_grads_batched=True)` and
    `torch.autograd.functional.jacobian(..., vectorize=True)` hand a backward (a batch of gradients in one call)."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(tensor) or functorch.is_legacy_batchedtensor(tensor)


def csr_layout(indices: torch.Tensor, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row pointers (d_out + 1,), column indices (nnz,)), both int32, of the support as a (d_out, d_in) CSR matrix.
    Sorted flat row-major indices are exactly CSR order, so the values need no reordering; O(nnz), no sort."""
    rows, cols = indices.div(d_in, rounding_mode="floor"), indices.remainder(d_in)
    crow = torch.zeros(d_out + 1, dtype=torch.int32, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=d_out).cumsum(0)
    return crow, cols.to(torch.int32)


def sparse_csr(values: torch.Tensor, indices: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """`S` as a (d_out, d_in) CSR tensor, derived per call from the int32 support (see `csr_layout`)."""
    crow, cols = csr_layout(indices, d_out, d_in)
    return torch.sparse_csr_tensor(crow, cols, values, (d_out, d_in), check_invariants=False)


def sparse_csr_transposed(values: torch.Tensor, indices: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """`S^T` as a (d_in, d_out) CSR tensor, for the factored backward's `dY S`. Its layout needs a stable sort of the
    support's column indices (0.2-0.7 ms for 8k-21k nonzeros on this CPU, 1-3% of the layer's factored forward +
    backward), done per call and not kept: keeping it (8 bytes per nonzero) would put the factored path's memory
    above the dense path's, whose only index memory is the support itself."""
    rows, cols = indices.div(d_in, rounding_mode="floor"), indices.remainder(d_in)
    # indices are sorted row-major, so a stable sort by column gives S's column-major order = S^T's row-major order
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(d_in + 1, dtype=torch.int32, device=indices.device)
    crow[1:] = torch.bincount(cols, minlength=d_in).cumsum(0)
    return torch.sparse_csr_tensor(crow, rows[order], values[order], (d_in, d_out), check_invariants=False)


# Transient numbers per chunk of the factored path, per device type: a chunk of c rows of x takes about c (d_in +
# d_out) of them (the transposed copies of x and dY and the sparse product's output). On CPU, 2**19 (2 MiB in fp32)
# keeps MKL's CSR products in cache: 0.35x and 0.22x a dense GEMM at 512 x 1376 and 1024 x 2736 (`x S^T` in
# benchmarks/results/sparse_kernels_cpu.json), against 0.7-0.8x for 2048-row chunks in development measurements (and
# they waste time in per-call overhead on chunks of a few dozen rows). On CUDA there is no cache to stay
# in and every chunk costs kernel launches, so chunks are 32x larger (2**24 numbers: 64 MiB in fp32); on an H200, CPU's
# chunks in forward alone made the factored layer 1.2-2.4x slower (`factored_cpu_chunks` in
# benchmarks/results/layer_cuda_fp32.json, a run whose backward still took CUDA's chunks).
CHUNK_NUMBERS = {"cpu": 2**19, "cuda": 2**24}


def token_chunk(d_in: int, d_out: int, device_type: str = "cpu") -> int:
    """Rows of x the factored path handles at once on this device type: `CHUNK_NUMBERS[device_type] // (d_in +
    d_out)` (CPU's number on other device types), at least 64."""
    numbers = CHUNK_NUMBERS.get(device_type, CHUNK_NUMBERS["cpu"])
    return max(64, numbers // (d_in + d_out))


class _FactoredSparseLowRankLinear(torch.autograd.Function):
    """Like `_SparseLowRankLinear`, but never forms a dense (d_out, d_in) matrix, in forward or backward.

    The low-rank products are dense GEMMs; the sparse ones (`x S^T`, `dY S`, `dS`) run on one of two kernel sets:
    - CPU, fp32/fp64/bf16, with numba installed: `cpu_kernels`, which read the row-major activations directly (they
      transpose small blocks of tokens internally), all tokens in one call.
    - Otherwise PyTorch's CSR `mm` and `sampled_addmm` (MKL on CPU, cuSPARSE on CUDA), on chunks of `token_chunk(...)`
      rows of x (per device type). They want the token dimension contiguous, so they get transposed copies of each
      chunk, `x_c^T` (d_in, c) and `dY_c^T` (d_out, c); on CPU, transposing a (2048, 512) fp32 matrix took 0.1-0.3x
      the time of a 512 x 512 GEMM over it (12x a plain copy), measured on different days.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, weight, bias):
        d_out, d_in = B.shape[0], A.shape[1]
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        out = _output(x, d_out)  # (..., d_out)
        y = out.view(-1, d_out)  # (N, d_out)
        W0 = None if weight is None else weight.to(x.dtype)  # transient; `weight` itself is saved (see backward)
        kernels = cpu_kernels.supports(x.device, x.dtype)
        if kernels:  # they block the tokens themselves and need no transposed copies: one chunk (chunks of 2**19
            # numbers would bound the (N, r) intermediates, but cost up to 35% of the layer's time at 2048 tokens)
            x2, chunk = x2.contiguous(), max(len(x2), 1)
        else:
            S, chunk = sparse_csr(values, indices, d_out, d_in), token_chunk(d_in, d_out, x.device.type)
        for start in range(0, x2.shape[0], chunk):
            xc, yc = x2[start : start + chunk], y[start : start + chunk]  # (c, d_in), (c, d_out)
            if kernels:
                cpu_kernels.sparse_matmul_t(xc, indices, values, (d_out, d_in), out=yc)  # x S^T
            else:
                yc.copy_(torch.sparse.mm(S, xc.t().contiguous()).t())  # x S^T
            yc.addmm_(xc.mm(A.t()), B.t(), alpha=scaling)  # + s (x A^T) B^T
            if W0 is not None:
                yc.addmm_(xc, W0.t())
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, A, B, values, indices, weight)
        ctx.scaling, ctx.kernels, ctx.chunk = scaling, kernels, chunk  # backward uses the same kernels and chunks
        return out

    @staticmethod
    def backward(ctx, grad_y):
        _refuse_double_backward()
        if _is_batched(grad_y):  # vectorized Jacobians: the sparse kernels cannot run on functorch's batched tensors
            return _dense_path_backward(ctx, grad_y)  # the dense path's backward reads the same saved tensors
        x, A, B, values, indices, weight = ctx.saved_tensors
        need_x, need_A, need_B, need_values, _, _, need_weight, need_bias = ctx.needs_input_grad
        scaling = ctx.scaling
        d_out, d_in = B.shape[0], A.shape[1]
        dy = grad_y.reshape(-1, d_out)  # (N, d_out)
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        grad_x = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_x else None  # row-major
        grad_A = torch.zeros_like(A) if need_A else None
        grad_B = torch.zeros_like(B) if need_B else None
        grad_values = torch.zeros_like(values) if need_values else None
        # W0 cast again rather than its cast copy kept from forward: one dense matrix per layer less until backward
        W0 = None if weight is None or not need_x else weight.to(x.dtype)
        kernels = ctx.kernels
        if kernels:
            x2, dy, chunk = x2.contiguous(), dy.contiguous(), max(len(x2), 1)  # one chunk, as in forward
        else:
            St = sparse_csr_transposed(values, indices, d_out, d_in) if need_x else None
            # the sampled product writes the nnz entries of dY^T X in S's order, which is the values' order
            pattern = sparse_csr(torch.zeros_like(values), indices, d_out, d_in) if need_values else None
            chunk = ctx.chunk

        for start in range(0, x2.shape[0], chunk):
            xc, dyc = x2[start : start + chunk], dy[start : start + chunk]  # (c, d_in), (c, d_out)
            gx = grad_x[start : start + chunk] if need_x else None
            if kernels and need_values:  # dY S into gx (unless it is None), and dS (added, not kept alive)
                grad_values += cpu_kernels.sparse_grads(xc, dyc, indices, values, (d_out, d_in), gx, True)
            elif kernels and need_x:
                cpu_kernels.sparse_grads(xc, dyc, indices, values, (d_out, d_in), gx, False)
            elif need_x or need_values:
                dycT = dyc.t().contiguous()  # (d_out, c), shared by both products
                if need_x:
                    gx.copy_(torch.sparse.mm(St, dycT).t())  # dY S
                if need_values:  # mat2 column-major: each nonzero is a dot product of two contiguous rows
                    xcT = xc.t().contiguous().t()
                    grad_values += torch.sparse.sampled_addmm(pattern, dycT, xcT, beta=0.0).values()
            dycB = dyc.mm(B) if (need_x or need_A) else None  # (c, r)
            if need_x:
                gx.addmm_(dycB, A, alpha=scaling)  # + s (dY B) A
                if W0 is not None:
                    gx.addmm_(dyc, W0)
            if need_A:
                grad_A.addmm_(dycB.t(), xc, alpha=scaling)  # s (dY B)^T X
            dycB = None  # freed before X A^T is made: one (c, r) intermediate alive at a time, not two
            if need_B:
                grad_B.addmm_(dyc.t(), xc.mm(A.t()), alpha=scaling)  # s dY^T (X A^T), recomputed, not saved
        grad_weight = dy.t().mm(x2) if need_weight else None
        grad_bias = dy.sum(0) if need_bias else None
        grad_x = grad_x.view(x.shape) if need_x else None
        return grad_x, grad_A, grad_B, grad_values, None, None, grad_weight, grad_bias


PATHS = ("dense", "factored")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` computes in for input `x`: autocast's lower-precision dtype where autocast is on for x's
    device (it leaves float64 alone), else x's own."""
    if x.dtype != torch.float64 and autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_off(device_type: str):
    """A context with autocast off for the device type (nothing to turn off on meta, where asking raises)."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type; never on meta (where asking raises), so shapes still work there."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _check_for_csr_kernels(indices: torch.Tensor, entries: int) -> None:
    """What PyTorch's CSR kernels need and do not check themselves: a sorted support in range (numba's kernels check
    it in their row-start pass; the dtype is checked by `cost.check_factored_supported`). CPU only: on CUDA the check
    would synchronise every call; the layers' supports are valid."""
    if indices.numel() and not (
        int(indices[0]) >= 0 and int(indices[-1]) < entries and bool((indices[1:] > indices[:-1]).all())
    ):
        raise ValueError(f"`indices` must be strictly increasing flat indices in [0, {entries}).")


def _int32_support(indices: torch.Tensor, entries: int) -> torch.Tensor:
    """The support as int32, which the sparse kernels read; other integer dtypes are range-checked, then converted."""
    if indices.dtype == torch.int32:
        return indices
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"`indices` must be an integer tensor, got {indices.dtype}.")
    limit = min(entries, MAX_LAYER_ENTRIES + 1)  # past int32, .to(torch.int32) would wrap
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < limit):
        raise ValueError(f"`indices` must lie in [0, {limit}), got [{int(indices.min())}, {int(indices.max())}].")
    return indices.to(torch.int32)


def sltrain_linear(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    scaling: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    path: str = "dense",
) -> torch.Tensor:
    """Like `F.linear(x, weight + scaling * B @ A + S, bias)`, but nothing dense is kept for backward: `path="dense"`
    rebuilds the dense weight in backward, `path="factored"` never forms it. All floating-point tensors must share
    one dtype and device; `indices` are sorted flat row-major positions, int32 as the layers keep them (int64 is
    converted, one copy per call). Under autocast it computes in the dtype `F.linear` would (`compute_dtype`); the
    dense path then keeps the inputs it casts referenced until the graph is freed, for a double backward (in a
    layer these are its parameters)."""
    check_input(x, None)
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"`A` (r, d_in) and `B` (d_out, r) must share r, got shapes {tuple(A.shape)} and {tuple(B.shape)}."
        )
    if 0 in (*A.shape, B.shape[0]):  # an empty layer: reshapes to (-1, 0) fail deep inside torch
        raise ValueError(
            f"`A` (r, d_in) and `B` (d_out, r) must have r, d_in and d_out of at least 1, got shapes "
            f"{tuple(A.shape)} and {tuple(B.shape)}."
        )
    if indices.dim() != 1 or values.shape != indices.shape:  # shapes only: free, also on CUDA (no sync)
        raise ValueError(
            f"`values` and `indices` must be 1-D and of one length (a value per support entry), got shapes "
            f"{tuple(values.shape)} and {tuple(indices.shape)}."
        )
    check_input(x, A.shape[1])
    d_out, d_in = B.shape[0], A.shape[1]
    if weight is not None and tuple(weight.shape) != (d_out, d_in):
        raise ValueError(f"`weight` must be (d_out, d_in) = {(d_out, d_in)}, got shape {tuple(weight.shape)}.")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"`bias` must be (d_out,) = ({d_out},), got shape {tuple(bias.shape)}.")
    if indices.device != values.device:
        raise ValueError(f"`indices` must be on the values' device {values.device}, got {indices.device}.")
    if path not in PATHS:
        raise ValueError(f"`path` must be one of {PATHS}, got {path!r}.")
    if path == "factored":  # also on CUDA, where a missing kernel would only show in backward
        check_factored_supported(x.device, compute_dtype(x), setting="path='factored'")
    if autocast_on(x.device.type):
        x = x.to(compute_dtype(x))
        with torch.autocast(x.device.type, enabled=False):  # grads flow back to the originals, in their dtypes
            return _sltrain_linear_unchecked(x, A, B, values, indices, scaling, weight, bias, path)
    for name, t in (("A", A), ("B", B), ("values", values), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"`{name}` must have x's dtype {x.dtype}, got {t.dtype} (or call it under autocast).")
    return _sltrain_linear_unchecked(x, A, B, values, indices, scaling, weight, bias, path)


def _needs_plain_ops(*tensors: torch.Tensor | None) -> bool:
    """Whether a call runs under `torch.func` transforms or carries forward-mode tangents, which neither autograd
    function supports (neither has `setup_context` or `jvp`). Dynamo traces both checks (no graph break)."""
    if torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


def _plain_sltrain_linear(x, A, B, values, indices, scaling, weight=None, bias=None) -> torch.Tensor:
    """The same map in plain differentiable ops, which `torch.func` (grad, vmap, jacrev, jvp, per-sample gradients),
    forward-mode AD and `torch.export` take as any PyTorch code. Autograd keeps the built (d_out, d_in) weight until
    backward, as it would for `F.linear` on it: the memory the autograd functions save, not needed there."""
    W = plain_weight(A, B, values, indices, scaling, x.dtype, weight)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


def plain_weight(A, B, values, indices, scaling, dtype, weight=None) -> torch.Tensor:
    """`weight + scaling * B @ A + S` (d_out, d_in) in `dtype`, in plain differentiable ops (out of place, so
    vmap-able)."""
    A, B, values = A.to(dtype), B.to(dtype), values.to(dtype)
    W = scaling * (B @ A) if weight is None else weight.to(dtype) + scaling * (B @ A)
    return W.reshape(-1).index_add(0, indices, values).view(B.shape[0], A.shape[1])


def check_input(x: torch.Tensor, d_in: int | None) -> None:
    """`ValueError` unless `x` is a real floating-point tensor with `d_in` features in its last dimension (any number
    if `d_in` is None). Integers would be computed on truncated weights; complex would need conjugates in backward."""
    if not x.is_floating_point():
        raise ValueError(f"`x` must be a real floating-point tensor, got {x.dtype}.")
    if d_in is not None and (x.dim() == 0 or x.shape[-1] != d_in):
        raise ValueError(f"`x` must have d_in = {d_in} features in its last dimension, got shape {tuple(x.shape)}.")


def _sltrain_linear_unchecked(x, A, B, values, indices, scaling, weight, bias, path):
    """`sltrain_linear` after its checks (the layers run `check_input` alone: their tensors are valid), with autocast
    off and `x` in the compute dtype. The dense path takes the other floating-point tensors in any dtype (it casts them
    itself); the factored path casts the factors and the bias first, and `W0` inside (it saves `W0` uncast)."""
    plain = exporting() or _needs_plain_ops(x, A, B, values, weight, bias)
    if (plain or path == "dense") and indices.dtype not in (torch.int32, torch.int64):  # what `index_add` takes
        indices = _int32_support(indices, B.shape[0] * A.shape[1])
    if plain:
        return _plain_sltrain_linear(x, A, B, values, indices, scaling, weight, bias)
    if path == "dense":
        return _SparseLowRankLinear.apply(x, A, B, values, indices, scaling, weight, bias)
    if path == "factored":
        A, B, values = A.to(x.dtype), B.to(x.dtype), values.to(x.dtype)
        # W0 goes in uncast: a cast copy would be saved for backward, one more dense matrix per layer
        bias = None if bias is None else bias.to(x.dtype)
        indices = _int32_support(indices, B.shape[0] * A.shape[1])
        if x.device.type == "cpu" and not cpu_kernels.supports(x.device, x.dtype):
            _check_for_csr_kernels(indices, B.shape[0] * A.shape[1])
        return _FactoredSparseLowRankLinear.apply(x, A, B, values, indices, scaling, weight, bias)
    raise ValueError(f"`path` must be one of {PATHS}, got {path!r}.")
