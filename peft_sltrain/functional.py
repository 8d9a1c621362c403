"""The SLTrain linear map, with a memory-saving autograd function.

    y = x @ W.T + bias,    W = weight + scaling * B @ A + S

`x` is (..., d_in), `A` is (r, d_in), `B` is (d_out, r), and the sparse `S` is `values` (nnz,) placed at the flat
row-major positions `indices` (nnz,) of a (d_out, d_in) matrix. `weight` is the frozen dense `W0` when fine-tuning and
`None` when pretraining from scratch.

Memory: autograd through `F.linear(x, dense_weight(...))` would keep the dense `W` alive until backward, one
d_out x d_in matrix per layer for the whole step. The function below saves only `x` and references to the factors
and rebuilds `W` inside backward; the only dense matrices it makes are transient (one at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new (d_out, d_in) tensor `weight + scaling * B @ A + S` (`weight` may be `None`)."""
    if weight is None:
        W = torch.mm(B, A).mul_(scaling)  # (d_out, d_in)
    else:
        W = torch.addmm(weight, B, A, alpha=scaling)
    W.view(-1).index_add_(0, indices, values)
    return W


class _SparseLowRankLinear(torch.autograd.Function):
    """Like `F.linear(x, dense_weight(A, B, values, indices, scaling, weight), bias)`, but saves no dense weight."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, weight, bias):
        y = F.linear(x, dense_weight(A, B, values, indices, scaling, weight), bias)
        ctx.save_for_backward(x, A, B, values, indices, weight)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, values, indices, weight = ctx.saved_tensors
        need_x, need_A, need_B, need_values, _, _, need_weight, need_bias = ctx.needs_input_grad
        scaling = ctx.scaling
        grad_x = grad_A = grad_B = grad_values = grad_weight = grad_bias = None
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, d_out)

        if need_A or need_B or need_values or need_weight:
            dW = dy.t().mm(x.reshape(-1, x.shape[-1]))  # (d_out, d_in), transient
            if need_B:
                grad_B = dW.mm(A.t()).mul_(scaling)  # (d_out, r)
            if need_A:
                grad_A = B.t().mm(dW).mul_(scaling)  # (r, d_in)
            if need_values:
                grad_values = dW.view(-1)[indices]  # (nnz,): only the sampled entries of dW
            if need_weight:
                grad_weight = dW
            del dW  # free before the next dense matrix is built

        if need_x:
            grad_x = dy.mm(dense_weight(A, B, values, indices, scaling, weight)).view(*grad_y.shape[:-1], -1)
        if need_bias:
            grad_bias = dy.sum(0)
        return grad_x, grad_A, grad_B, grad_values, None, None, grad_weight, grad_bias


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
) -> torch.Tensor:
    """Like `F.linear(x, weight + scaling * B @ A + S, bias)`, but backward rebuilds the dense weight instead of
    keeping it from forward. All floating-point tensors must share one dtype and device."""
    return _SparseLowRankLinear.apply(x, A, B, values, indices, scaling, weight, bias)
