"""Which sparse kernels compute the factored path's sparse products fastest, against the dense GEMM `x W^T`:
numba's CPU kernels (`peft_sltrain/cpu_kernels.py`, what `functional.py` uses where numba is installed), PyTorch's
CSR product (its fallback, on the token chunks it uses), or an index-based gather + segment-sum.

    python benchmarks/sparse_kernels.py     # CPU, fp32: benchmarks/results/sparse_kernels_cpu.json

Forward variants, all computing the same (N, d_out) product x S^T for 2048 rows of x:
- `numba`:      cpu_kernels.sparse_matmul_t on all rows at once (blocks of 64 tokens inside)
- `csr`:        torch.sparse.mm(S, x_c^T) per chunk, S a CSR tensor built per call (the factored path's forward
                without numba)
- `gather`:     y_c.index_add_(1, rows, x_c[:, cols] * values): one gathered column of x per nonzero
- `gather_xT`:  the same on x^T, so that each gathered row is contiguous in the token dimension
Backward variants, both computing dY S and dS (the nnz entries of dY^T X):
- `numba_bwd`:  cpu_kernels.sparse_grads, one pass over the nonzeros per token block for both
- `csr_bwd`:    S^T's CSR layout (a sort), then per chunk torch.sparse.mm(S^T, dY_c^T) and sampled_addmm
And `regenerate`: `random_support` from the layer's seed, what keeping no support at all (0 bytes per nonzero in
memory) would add to every forward and every backward.
Times are medians of interleaved rounds (each variant and the dense GEMM once per round, every one allocating its
output), reported as ratios to the dense GEMM of the same shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import add_replace_flag, check_replaceable, environment, recorded_command, write_results  # noqa: E402

from peft_sltrain import cpu_kernels  # noqa: E402
from peft_sltrain.functional import sparse_csr, sparse_csr_transposed, token_chunk  # noqa: E402
from peft_sltrain.support import num_nonzeros, random_support  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [((512, 1376), 0.03), ((1024, 2736), 0.03)]  # 60M's and 350M's up projections
TOKENS = 2048
ROUNDS = 20  # of every variant and the dense GEMM in turn


def interleaved_medians(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function over `rounds` rounds of one call each, after a warm-up round (numba compiles
    there): machine drift hits every variant and the baseline alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(d_in: int, d_out: int, sparsity: float) -> dict:
    nnz = num_nonzeros(d_out, d_in, sparsity)
    indices = random_support(d_out, d_in, nnz, seed=0)
    values = torch.randn(nnz)
    rows, cols = indices.div(d_in, rounding_mode="floor").long(), indices.remainder(d_in).long()
    W = torch.randn(d_out, d_in)
    x, chunk = torch.randn(TOKENS, d_in), token_chunk(d_in, d_out)
    starts = range(0, TOKENS, chunk)

    def csr():  # S's CSR layout derived per call, as the factored path does
        S, y = sparse_csr(values, indices, d_out, d_in), torch.empty(TOKENS, d_out)
        for s in starts:
            y[s : s + chunk].copy_(torch.sparse.mm(S, x[s : s + chunk].t().contiguous()).t())

    def gather():
        y = torch.zeros(TOKENS, d_out)
        for s in starts:
            y[s : s + chunk].index_add_(1, rows, x[s : s + chunk, cols] * values)

    def gather_xT():
        y, xT = torch.zeros(d_out, TOKENS), x.t().contiguous()
        for s in starts:
            y[:, s : s + chunk].index_add_(0, rows, xT[cols, s : s + chunk] * values[:, None])

    dy = torch.randn(TOKENS, d_out)

    def csr_bwd():
        St, pattern = sparse_csr_transposed(values, indices, d_out, d_in), sparse_csr(values, indices, d_out, d_in)
        dx, dvalues = torch.empty(TOKENS, d_in), torch.zeros(nnz)
        for s in starts:
            dyT = dy[s : s + chunk].t().contiguous()
            dx[s : s + chunk].copy_(torch.sparse.mm(St, dyT).t())
            dvalues += torch.sparse.sampled_addmm(pattern, dyT, x[s : s + chunk].t().contiguous().t(), beta=0).values()

    def numba():
        cpu_kernels.sparse_matmul_t(x, indices, values, (d_out, d_in), out=torch.empty(TOKENS, d_out))

    def numba_bwd():
        cpu_kernels.sparse_grads(x, dy, indices, values, (d_out, d_in), torch.empty(TOKENS, d_in), need_values=True)

    def regenerate():
        random_support(d_out, d_in, nnz, seed=0)

    def dense_gemm():  # allocates its output, as every variant does
        torch.mm(x, W.t())

    variants = {"dense_gemm": dense_gemm, "csr": csr, "gather": gather, "gather_xT": gather_xT, "csr_bwd": csr_bwd,
                "regenerate": regenerate}  # fmt: skip
    if cpu_kernels.AVAILABLE:
        variants |= {"numba": numba, "numba_bwd": numba_bwd}
    row = {"d_in": d_in, "d_out": d_out, "sparsity": sparsity, "nnz": nnz, "tokens": TOKENS, "chunk": chunk,
           "rounds": ROUNDS}  # fmt: skip
    for name, seconds in interleaved_medians(variants, ROUNDS).items():
        row[f"{name}_s"] = seconds
    for name in variants:
        if name != "dense_gemm":
            row[f"{name}_vs_gemm"] = row[f"{name}_s"] / row["dense_gemm_s"]
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / "sparse_kernels_cpu.json", help="the results file")
    add_replace_flag(p)
    args = p.parse_args(argv)
    command = recorded_command(__file__, argv)
    check_replaceable(p, args.out, command, args.replace)
    env = environment(torch.device("cpu"))  # (now: the commit of the code measured)
    torch.manual_seed(0)
    rows = []
    for (d_in, d_out), sparsity in SHAPES:
        rows.append(measure(d_in, d_out, sparsity))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    result = {"command": command, "environment": env, "rows": rows}
    write_results(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
