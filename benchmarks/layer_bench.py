"""Layer micro-benchmark: forward + backward of one SLTrain linear against `nn.Linear` and against the plain
rebuild-the-dense-weight formulation, at LLaMA layer shapes, with the paper's ranks and sparsities.

    python benchmarks/layer_bench.py                  # CPU: writes benchmarks/results/layer_cpu.{json,png}
    python benchmarks/layer_bench.py --device cuda    # GPU, bf16: benchmarks/results/layer_cuda.{json,png}

Variants, all computing y = x W^T for the same W:
- `dense`:    nn.Linear, the full-rank baseline (its weight gradient is what full-rank training pays for)
- `rebuild`:  F.linear(x, scaling * B @ A + S) through plain autograd: the dense W is kept alive for backward
- `sltrain`:  peft_sltrain.sltrain_linear(path="dense"), the memory-saving autograd function (W rebuilt in backward)
- `factored`: peft_sltrain.sltrain_linear(path="factored"): low-rank products plus CSR sparse kernels, no dense W
`kappa_fit` is the cost of one sparse multiply-add relative to a dense GEMM's that makes `peft_sltrain.cost`'s
model reproduce the measured factored / dense-path time ratio; `kappa_model_fit` fits it as
kappa_inf + kappa_row / (nonzeros per row), the form and constants `peft_sltrain/cost.py` uses.
Times are medians of repeated forward+backward passes, reported as ratios to `dense` measured in the same run.
Peak memory is the highest live tensor memory during forward+backward (CUDA: the allocator's peak; CPU: PyTorch's
memory profiler timeline), with the inputs and parameters counted in; "saved" is the bytes autograd keeps between
forward and backward, counted exactly.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402

from peft_sltrain import cost  # noqa: E402
from peft_sltrain.functional import dense_weight, sltrain_linear  # noqa: E402
from peft_sltrain.support import num_nonzeros, random_support  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (d_in, d_out) of LLaMA's up projection at 60M, 350M, 1B and 7B, with that size's r and sparsity from the paper
SHAPES = [((512, 1376), 128, 0.03), ((1024, 2736), 256, 0.03), ((2048, 5461), 512, 0.03), ((4096, 11008), 1024, 0.05)]


def make_layer(d_in, d_out, r, sparsity, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def param(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    nnz = num_nonzeros(d_out, d_in, sparsity)
    return {
        "A": param(r, d_in, scale=d_in**-0.5),
        "B": param(d_out, r, scale=r**-0.5),
        "values": param(nnz, scale=d_in**-0.5),
        "indices": random_support(d_out, d_in, nnz, seed=seed).to(device),
        "scaling": 0.25,
    }


def variants(layer, d_in, d_out, device, dtype):
    """{name: (fn, tensors that exist anyway)}."""
    dense = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    factors = [v for v in layer.values() if torch.is_tensor(v)]
    return {
        "dense": (lambda x: dense(x), [dense.weight]),
        "rebuild": (lambda x: F.linear(x, dense_weight(**layer)), factors),
        "sltrain": (lambda x: sltrain_linear(x, **layer, path="dense"), factors),
        "factored": (lambda x: sltrain_linear(x, **layer, path="factored"), factors),
    }


def saved_bytes(fn, x, existing: list[torch.Tensor]) -> int:
    """Bytes autograd keeps between forward and backward that are new allocations (the input and the parameters,
    saved by reference, exist anyway and are not counted)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    seen = {t.untyped_storage().data_ptr() for t in [x, *existing]}
    total = 0
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def peak_bytes(run, device) -> int:
    """Peak live tensor bytes while `run()` executes (CUDA: above what was allocated before; CPU: everything the
    memory profiler sees, inputs and parameters included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # internal, but the only CPU peak we have

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return int(max(sum(row) for row in sizes))


def time_fwd_bwd(fn, x, repeats: int, device) -> float:
    def once():
        fn(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(d_in, d_out, r, sparsity, tokens, repeats, device, dtype) -> dict:
    layer = make_layer(d_in, d_out, r, sparsity, device, dtype)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    fns = variants(layer, d_in, d_out, device, dtype)
    row = {"d_in": d_in, "d_out": d_out, "r": r, "sparsity": sparsity, "tokens": tokens}
    for name, (fn, existing) in fns.items():
        row[f"{name}_s"] = time_fwd_bwd(fn, x, repeats, device)
        row[f"{name}_peak_bytes"] = peak_bytes(lambda fn=fn: fn(x).sum().backward(), device)
        row[f"{name}_saved_bytes"] = saved_bytes(fn, x, existing)
    for name in fns:
        row[f"{name}_time_ratio"] = row[f"{name}_s"] / row["dense_s"]
    # the sparse cost factor that makes peft_sltrain.cost's model reproduce the measured factored / dense-path ratio
    nnz = layer["values"].numel()
    modeled_dense = cost.dense_cost(tokens, d_in, d_out, r)
    lowrank = cost.factored_cost(tokens, d_in, d_out, r, nnz, kappa=0.0, has_weight=False)
    row["kappa_fit"] = (row["factored_s"] / row["sltrain_s"] * modeled_dense - lowrank) / (6.0 * tokens * nnz)
    row["nnz_per_row"] = nnz / d_out
    row["auto_path"] = cost.choose_path("auto", tokens, d_in, d_out, r, nnz, device, dtype, has_weight=False)
    return row


def fit_kappa(rows: list[dict]) -> dict:
    """Least squares of kappa_fit = kappa_inf + kappa_row / k (k = nonzeros per row of S): `cost.py`'s constants."""
    k = torch.tensor([r["nnz_per_row"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["kappa_fit"] for r in rows], dtype=torch.float64)
    kappa_inf, kappa_row = torch.linalg.lstsq(torch.stack([torch.ones_like(k), 1 / k], 1), y[:, None]).solution[:, 0]
    return {"kappa_inf": kappa_inf.item(), "kappa_row": kappa_row.item()}


def plot(rows: list[dict], sweeps: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [f"{r['d_in']}x{r['d_out']}\nr={r['r']} d={r['sparsity']}" for r in rows]
    for name, style in (("rebuild", "s-"), ("sltrain", "o-"), ("factored", "^-")):
        axes[0].plot(labels, [r[f"{name}_time_ratio"] for r in rows], style, label=name)
    axes[0].axhline(1.0, color="gray", lw=1, ls="--", label="dense (nn.Linear)")
    axes[0].set_ylabel("fwd+bwd time / dense")
    axes[0].set_title("LLaMA shapes (paper's r, sparsity)")
    for key, ax, xlabel in (("rank", axes[1], "rank r"), ("sparsity", axes[2], "sparsity delta")):
        sweep = sweeps[key]
        xs = [s["r"] if key == "rank" else s["sparsity"] for s in sweep]
        for name, style in (("rebuild", "s-"), ("sltrain", "o-"), ("factored", "^-")):
            ax.plot(xs, [s[f"{name}_time_ratio"] for s in sweep], style, label=name)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{sweep[0]['d_in']}x{sweep[0]['d_out']}, varying {xlabel}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, help="rows of x (default: 2048 on CPU, 8192 on GPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-entries", type=float, default=5e7, help="skip shapes with more weight entries")
    p.add_argument("--out", help="results file stem (default: benchmarks/results/layer_<device>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (8192 if device.type == "cuda" else 2048)
    torch.manual_seed(0)

    rows = []
    for (d_in, d_out), r, sparsity in SHAPES:
        if d_in * d_out > args.max_entries:
            print(f"skip {d_in}x{d_out}: more than --max-entries")
            continue
        rows.append(measure(d_in, d_out, r, sparsity, tokens, args.repeats, device, dtype))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    (d_in, d_out), r0, s0 = SHAPES[1]
    sweeps = {
        "rank": [measure(d_in, d_out, r, s0, tokens, args.repeats, device, dtype) for r in (32, 64, 128, 256, 512)],
        "sparsity": [measure(d_in, d_out, r0, s, tokens, args.repeats, device, dtype) for s in (0.01, 0.03, 0.1, 0.3)],
    }
    stem = Path(args.out) if args.out else RESULTS / f"layer_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + (argv or sys.argv[1:])),
        "environment": environment(device),
        "dtype": str(dtype),
        "tokens": tokens,
        "shapes": rows,
        "sweeps": sweeps,
        "kappa_fit_median": statistics.median(r["kappa_fit"] for r in rows + sweeps["rank"] + sweeps["sparsity"]),
        "kappa_model_fit": fit_kappa(rows + sweeps["rank"] + sweeps["sparsity"]),
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, sweeps, stem.with_suffix(".png"), f"One layer, fwd+bwd, {tokens} tokens, {dtype}, {platform.node()}")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
