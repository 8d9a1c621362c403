"""Which exact compute path is cheaper for one SLTrain layer call: rebuild the dense weight, or stay factored.

The model counts multiply-adds of forward + backward (see `functional.py` for where they come from):

    dense:     6 N d_in d_out + 8 r d_in d_out          (three dense GEMMs, plus B @ A twice, dA and dB)
    factored:  2 N r (3 d_out + 4 d_in)                  (the low-rank products)
               + kappa * 6 N nnz                         (three sparse products: x S^T, dY S, dS)
               + tau * N (3 d_in + 2 d_out)              (transposed copies of x, y, dY, x again and dX)
               (+ 4 N d_in d_out with a frozen W0)

Where no backward follows (the layers tell by grad mode: `torch.no_grad()`, inference mode), only the forward's
share counts: `2 N d_in d_out + 2 r d_in d_out` dense against `2 N r (d_in + d_out) + kappa * 2 N nnz + tau * N (d_in
+ d_out) (+ 2 N d_in d_out)`. With a frozen `W0` the factored forward adds its products to the same GEMM, so it loses
there: it saves time only in backward, where it skips `dW`.

`kappa` is what one multiply-add of a sparse product (CSR x dense, sampled dense-dense) costs relative to one of a
dense GEMM on the same device and dtype. Sparse kernels are least efficient on short rows, so it is modelled as
`kappa = kappa_inf + kappa_row / k`, with `k = nnz / d_out` the nonzeros per row of `S`. `tau` is what moving one
number through a transposed copy costs, in GEMM multiply-adds: the sparse kernels want the token dimension
contiguous, so the factored path transposes its activations (whole chunks for PyTorch's CSR kernels, blocks of 64
tokens inside numba's), and on CPU that is most of its cost at narrow widths.
The three constants per device type, dtype and kernel set (numba's CPU kernels, or PyTorch's CSR kernels; see
`functional.py`) are fitted by `benchmarks/layer_bench.py`. The choice is deterministic: the same call takes the
same path in every process (a resumed run reproduces the uninterrupted one bit for bit). Where neither kernel set
has the dtype (fp16 on CPU; bf16 on CPU without numba), only the dense path exists.
"""

from __future__ import annotations

import contextlib

import torch

from . import cpu_kernels

COMPUTE_CHOICES = ("auto", "dense", "factored", "batched")  # "batched": `batched.py` (else the dense path)

# (kappa_inf, kappa_row, tau) per (device type, dtype), for PyTorch's CSR kernels. CPU fp32: `cost_model_fit` of
# benchmarks/results/layer_cpu_torch_kernels.json (a run from before the numba kernels existed; 15 layer shapes from
# 128 x 344 to 4096 x 11008, r 32-1024, delta 0.01-0.3; 2 cores, torch 2.13): the transposed copies explain most of
# what narrow layers pay, the short-row term little. It predicts the measured factored / dense-path time ratio within
# 0.08 on the LLaMA shapes and 0.17 on the rank sweep, and overestimates it at delta >= 0.1 (all in sample). A later
# run in benchmarks/results/layer_cpu.json fitted (9.0, 0.0, 124.1), closer on its own layers (0.07 on the LLaMA
# shapes, where these constants miss by up to 0.22; later runs fitted (9.5, 5.6, 141) and, the one now in that file,
# (7.8, 0.0, 201)), but it would send the 60M attention projections (512 x 512, measured 0.985x and 1.02x the dense
# path there: the edge) factored, and whole 60M steps on these kernels ran slower so (1.12x full-rank, every layer
# factored) than with them dense (0.97x; step_cpu.json as committed before c952cd2). fp64 assumed alike.
SPARSE_RELATIVE_COST: dict[tuple[str, torch.dtype], tuple[float, float, float]] = {
    ("cpu", torch.float32): (11.1, 4.5, 138.0),
    ("cpu", torch.float64): (11.1, 4.5, 138.0),
    # CUDA fp32: `cost_model_fit` of benchmarks/results/layer_cuda_fp32.json (one H200, torch 2.11, cuSPARSE, 8192
    # tokens per call, against the dense path as it was before 5dd44ec fused its scaling). The model has no per-call
    # term, and at these sizes a GPU layer call is largely kernel launches, so it fits poorly and misses both ways (in
    # sample, predicted / measured factored-to-dense ratio): 0.79 / 1.06 at delta = 0.01 and 0.97 / 1.04 at r = 32
    # (sent factored, slower), 1.10 / 0.94 and 1.38 / 0.97 at the 1B and 7B shapes (sent dense, slightly slower),
    # 7.36 / 3.16 at delta = 0.3. On 8192-token calls it picks dense at every paper shape, where factored measured
    # 1.27-2.31x up to 350M. It picks factored on smaller calls, from scratch in training up to 1.5k-3.6k tokens at
    # the 1B and 7B shapes, 172-1137 at the 60M-350M ones and 13-23 at the tiny preset's (fewer with a frozen W0 or
    # without grad): unmeasured, launch-bound ground.
    # bf16 and fp16 have no entry, so no factored path: torch 2.11's CUDA `sampled_addmm` lacks them.
    ("cuda", torch.float32): (23.6, 0.0, 427.4),
}


# The same for numba's CPU kernels (`cpu_kernels.py`), used wherever they run. fp32: `cost_model_fit` of
# benchmarks/results/layer_cpu.json as committed in c96e21a (same shapes and machine, the current kernels): a sparse
# multiply-add costs 3.3 dense ones, with no short-row penalty, and the in-kernel block transposes take the tau term.
# It predicted that run's factored / dense-path time ratio within 0.02 on the LLaMA shapes and within 0.03 on the rank
# and sparsity sweeps, and predicts the run now in the file (the harness corrected: gradients cleared between passes,
# rounds sized warm) out of sample within 0.05 on the LLaMA shapes (0.011 from 512 x 512 up), 0.028 on the rank sweep
# and 0.025 up to delta = 0.1 (1.20 for a measured 1.12 at 0.3); that run fits (3.0, 23.7, 44.7). Narrow layers are the
# noisiest: the same 128 x 344 layer measured 0.60, 0.87, 0.76, 0.78 and 0.81 in five runs. Fitted with 2 threads on
# 2048 tokens: with many threads and few tokens (fewer than 64 per thread leaves threads idle) the sparse part costs
# relatively more. fp64 assumed alike.
# bf16: `cost_model_fit` of benchmarks/results/layer_cpu_bf16.json as committed in c96e21a. The kernels run about as
# fast as in fp32 (they compute in fp32 and move half the bytes), but this CPU's bf16 GEMMs are 1.9-2.5x its fp32
# ones, so against them a sparse multiply-add costs more: 7.3 plus a short-row term. It predicted that run's ratio
# within 0.06 on the LLaMA shapes and 0.03 on the rank sweep (1.47 predicted, 1.46 measured at 128 x 344, which goes
# dense; 1.01 and 1.01 at 512 x 512), and overestimated it at delta >= 0.1 (2.30 for a measured 1.95 at 0.3). The run
# now in the file (harness corrected) it predicts within 0.14 on the LLaMA shapes (1.32 measured at 128 x 344, 0.93 at
# 512 x 512) and 0.32 on the rank sweep, in a run whose repeats of the 1024 x 2736 layer measured 0.59, 0.92 and 0.70.
NUMBA_RELATIVE_COST: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float32: (3.3, 0.0, 74.9),
    torch.float64: (3.3, 0.0, 74.9),
    torch.bfloat16: (7.3, 59.7, 107.7),
}


def relative_costs(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float]:
    """(kappa_inf, kappa_row, tau) of the sparse kernels the factored path uses on this device and dtype."""
    if cpu_kernels.supports(device, dtype):
        return NUMBA_RELATIVE_COST[dtype]
    return SPARSE_RELATIVE_COST[(device.type, dtype)]


def sparse_relative_cost(device: torch.device, dtype: torch.dtype, nnz: int, d_out: int) -> float:
    """kappa for a sparse matrix of `nnz` nonzeros over `d_out` rows, on this device and dtype."""
    kappa_inf, kappa_row, _ = relative_costs(device, dtype)
    return kappa_inf + kappa_row * d_out / max(nnz, 1)


def transposed_numbers(n: int, d_in: int, d_out: int, backward: bool = True) -> int:
    """Numbers the factored path moves through transposed copies in one forward (+ backward) of n rows."""
    return n * (3 * d_in + 2 * d_out) if backward else n * (d_in + d_out)


def factored_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the factored path's sparse products run on this device and dtype: numba's CPU kernels, or PyTorch's
    CSR product and sampled product, whose pair the cost model must know and which must run in this PyTorch build
    (checked once per pair)."""
    if cpu_kernels.supports(device, dtype):
        return True
    return (device.type, dtype) in SPARSE_RELATIVE_COST and _sparse_kernels_run(device, dtype)


def check_factored_supported(device: torch.device, dtype: torch.dtype, setting: str = "compute='factored'") -> None:
    """`ValueError` naming what to do unless the factored path runs on this device and dtype (`factored_supported`);
    `setting`: what asked for it (a config's `compute='factored'`, `sltrain_linear`'s `path='factored'`)."""
    if factored_supported(device, dtype):
        return
    if device.type == "cpu" and dtype in cpu_kernels.DTYPES:
        hint = "numba's CPU kernels would cover it: `pip install 'peft-sltrain[cpu]'`, or"
    elif device.type == "cpu":
        hint = "numba's CPU kernels cover only float32, float64 and bfloat16;"
    else:
        hint = "numba's kernels run on CPU only;"
    instead = "path='dense'" if setting.startswith("path") else "compute='auto' or 'dense'"
    raise ValueError(
        f"`{setting}` needs sparse kernels for {dtype} on {device.type}, which PyTorch lacks ({hint} use {instead})."
    )


def exporting() -> bool:
    """Whether `torch.export` is tracing (not plain `torch.compile`); known from torch 2.6 (`is_exporting`)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


_KERNELS_RUN: dict[tuple[torch.device, torch.dtype], bool] = {}  # `_sparse_kernels_run`'s answers (see cpu_kernels)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def _sparse_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Runs the factored path's two sparse kernels on a 2 x 2 problem. Their dtype support varies by PyTorch
    version and build (torch 2.13's `sampled_addmm` rejects bf16 and fp16 on CPU, and torch 2.11's on CUDA), so it
    is probed, once per device and dtype, rather than assumed."""
    if (device, dtype) not in _KERNELS_RUN:
        runs = False
        # outside any `torch.func` transform and autocast the call may run in (they would make the products fail, and
        # the answer is kept)
        with (
            torch._C._DisableFuncTorch(),
            torch.autocast(device.type, enabled=False),
            contextlib.suppress(RuntimeError, NotImplementedError),
        ):
            S = torch.eye(2, dtype=dtype, device=device).to_sparse_csr()
            dense = torch.ones(2, 2, dtype=dtype, device=device)
            torch.sparse.mm(S, dense)
            torch.sparse.sampled_addmm(S, dense, dense, beta=0.0)
            runs = True
        _KERNELS_RUN[(device, dtype)] = runs  # set once: another thread never sees a provisional answer
    return _KERNELS_RUN[(device, dtype)]


def dense_cost(n: int, d_in: int, d_out: int, r: int, backward: bool = True) -> float:
    if not backward:
        return 2.0 * n * d_in * d_out + 2.0 * r * d_in * d_out
    return 6.0 * n * d_in * d_out + 8.0 * r * d_in * d_out


def factored_cost(
    n: int, d_in: int, d_out: int, r: int, nnz: int, kappa: float, has_weight: bool, tau: float = 0.0,
    backward: bool = True,
) -> float:  # fmt: skip
    if not backward:
        lowrank, sparse, frozen = 2.0 * n * r * (d_out + d_in), 2.0 * n * nnz, 2.0 * n * d_in * d_out
    else:
        lowrank, sparse, frozen = 2.0 * n * r * (3 * d_out + 4 * d_in), 6.0 * n * nnz, 4.0 * n * d_in * d_out
    copies = transposed_numbers(n, d_in, d_out, backward)
    return lowrank + kappa * sparse + tau * copies + (frozen if has_weight else 0.0)


def choose_path(
    compute: str, n: int, d_in: int, d_out: int, r: int, nnz: int, device: torch.device, dtype: torch.dtype,
    has_weight: bool, backward: bool = True,
) -> str:  # fmt: skip
    """The path for one call: `compute` if forced, else the cheaper by the cost model, counting the backward only
    where one will follow (`backward`). Dense on the meta device (shapes only) and under `torch.export`, where no
    kernel runs."""
    if n < 0 or r < 1 or not 0 <= nnz <= d_in * d_out:
        raise ValueError(
            f"`choose_path` needs n >= 0, r >= 1 and nnz in [0, d_in * d_out], got n={n}, r={r}, nnz={nnz} for a "
            f"{d_out} x {d_in} layer."
        )
    if not isinstance(device, torch.device):  # a string such as "cpu" (the layers pass devices: no work per call)
        device = torch.device(device)
    if compute not in COMPUTE_CHOICES:
        raise ValueError(f"`compute` must be one of {COMPUTE_CHOICES}, got {compute!r}.")
    # on meta only shapes are computed (no kernel runs); under torch.export the map runs in plain ops, whatever the
    # path (`functional._sltrain_linear_unchecked`): no kernel probed while tracing
    if compute in ("dense", "batched") or device.type == "meta" or exporting():
        return "dense"
    if compute == "factored":
        check_factored_supported(device, dtype)
        return "factored"
    if not factored_supported(device, dtype):
        return "dense"
    kappa, tau = sparse_relative_cost(device, dtype, nnz, d_out), relative_costs(device, dtype)[2]
    factored = factored_cost(n, d_in, d_out, r, nnz, kappa, has_weight, tau, backward)
    cheaper = factored < dense_cost(n, d_in, d_out, r, backward)
    return "factored" if cheaper else "dense"
