"""Which exact compute path is cheaper for one SLTrain layer call: rebuild the dense weight, or stay factored.

The model counts multiply-adds of forward + backward (see `functional.py` for where they come from):

    dense:     6 N d_in d_out + 8 r d_in d_out                   (three dense GEMMs, plus B @ A twice, dA and dB)
    factored:  2 N r (3 d_out + 4 d_in) + kappa * 6 N nnz        (+ 4 N d_in d_out with a frozen W0)

`kappa` is what one multiply-add of a sparse product (CSR x dense, sampled dense-dense) costs relative to one of a
dense GEMM on the same device and dtype. It is a fixed constant per device type and dtype, measured by
`benchmarks/layer_bench.py`, so the choice is deterministic: the same call takes the same path in every process
(a resumed run reproduces the uninterrupted one bit for bit). Where PyTorch has no sparse kernel for a dtype
(bf16 / fp16 on CPU), only the dense path exists.
"""

from __future__ import annotations

import torch

COMPUTE_CHOICES = ("auto", "dense", "factored")

# kappa per (device type, dtype); see benchmarks/results/layer_cpu.json ("kappa" rows) for the CPU measurement.
SPARSE_RELATIVE_COST: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float32): 20.0,
    ("cpu", torch.float64): 20.0,
    # not measured here (no GPU was available): cuSPARSE has no tensor-core path, so against bf16/fp16 GEMMs a
    # sparse multiply-add is assumed far dearer. Measure with `layer_bench.py --device cuda` and adjust.
    ("cuda", torch.float32): 20.0,
    ("cuda", torch.bfloat16): 60.0,
    ("cuda", torch.float16): 60.0,
}


def factored_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch has the CSR product and sampled product the factored path needs for this device and dtype."""
    return (device.type, dtype) in SPARSE_RELATIVE_COST


def dense_cost(n: int, d_in: int, d_out: int, r: int) -> float:
    return 6.0 * n * d_in * d_out + 8.0 * r * d_in * d_out


def factored_cost(n: int, d_in: int, d_out: int, r: int, nnz: int, kappa: float, has_weight: bool) -> float:
    return 2.0 * n * r * (3 * d_out + 4 * d_in) + kappa * 6.0 * n * nnz + (4.0 * n * d_in * d_out if has_weight else 0)


def choose_path(
    compute: str, n: int, d_in: int, d_out: int, r: int, nnz: int, device: torch.device, dtype: torch.dtype,
    has_weight: bool,
) -> str:  # fmt: skip
    """The path for one call: `compute` if forced, else the cheaper by the cost model."""
    if compute == "dense":
        return "dense"
    supported = factored_supported(device, dtype)
    if compute == "factored":
        if not supported:
            raise ValueError(
                f"`compute='factored'` needs sparse kernels for {dtype} on {device.type}, which PyTorch lacks; "
                "use compute='auto' or 'dense'."
            )
        return "factored"
    if compute != "auto":
        raise ValueError(f"`compute` must be one of {COMPUTE_CHOICES}, got {compute!r}.")
    if not supported:
        return "dense"
    kappa = SPARSE_RELATIVE_COST[(device.type, dtype)]
    cheaper = factored_cost(n, d_in, d_out, r, nnz, kappa, has_weight) < dense_cost(n, d_in, d_out, r)
    return "factored" if cheaper else "dense"
