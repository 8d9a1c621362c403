"""Layer micro-benchmark: forward + backward of one SLTrain linear against `nn.Linear` and against the plain
rebuild-the-dense-weight formulation, at LLaMA layer shapes, with the paper's ranks and sparsities.

    python benchmarks/layer_bench.py                  # CPU: writes benchmarks/results/layer_cpu.{json,png}
    python benchmarks/layer_bench.py --dtype bf16     # CPU, bf16: benchmarks/results/layer_cpu_bf16.{json,png}
    python benchmarks/layer_bench.py --device cuda    # GPU, bf16: benchmarks/results/layer_cuda.{json,png}

Variants, all computing y = x W^T for the same W:
- `dense`:    nn.Linear, the full-rank baseline (its weight gradient is what full-rank training pays for)
- `rebuild`:  F.linear(x, scaling * B @ A + S) through plain autograd: the dense W is kept alive for backward
- `sltrain`:  peft_sltrain.sltrain_linear(path="dense"), the memory-saving autograd function (W rebuilt in backward)
- `factored`: peft_sltrain.sltrain_linear(path="factored"): low-rank products plus sparse kernels, no dense W; the
              sparse products on numba's CPU kernels where numba is installed (`peft_sltrain/cpu_kernels.py`)
- `factored_torch`: the same on PyTorch's CSR kernels (`mm`, `sampled_addmm`), the path's fallback without numba
              (left out where PyTorch has no such kernels for the dtype: bf16 on CPU), and off CPU, where
              `factored` runs them already
- `factored_cpu_chunks` (CUDA only): `factored` cutting the tokens into CPU's smaller chunks (`functional.py`)
  (all factored variants are left out where the device has no sparse kernels for the dtype)
- `lowrank`:  (x A^T) B^T alone, through plain autograd: the part of the factored path that is not sparse, its floor
`factored_kappa_fit` is the cost of one sparse multiply-add relative to a dense GEMM's that makes `peft_sltrain.cost`'s
model reproduce the measured factored / dense-path time ratio (transposed copies included); `cost_model_fit` (and
`cost_model_fit_torch` for the CSR kernels) fits kappa_inf + kappa_row / (nonzeros per row) and the transposed-copy
cost tau to all rows, the form and constants `peft_sltrain/cost.py` uses.
Times are medians of forward+backward passes timed in interleaved rounds, reported as ratios to `dense` measured in
the same run. Peak memory is the most tensor memory allocated during forward+backward above what existed before it
(inputs and parameters not counted; CUDA: the allocator's peak; CPU: the profiler's allocation events); "saved" is
the bytes autograd keeps between forward and backward, counted exactly. numba's kernels allocate their per-thread
block buffers themselves, which the profiler does not see: `factored_numba_buffer_bytes` is their size, to add.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import (  # noqa: E402
    add_replace_flag,
    check_device,
    check_replaceable,
    environment,
    positive_int,
    recorded_command,
    write_results,
)

from peft_sltrain import cost, cpu_kernels, functional  # noqa: E402
from peft_sltrain.functional import dense_weight, sltrain_linear  # noqa: E402
from peft_sltrain.support import num_nonzeros, random_support  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (d_in, d_out) of the tiny preset's up projection and of LLaMA's attention and up projections at 60M, then the up
# projections at 350M, 1B and 7B, each with that size's r and sparsity (the paper's; the tiny preset's)
SHAPES = [
    ((128, 344), 32, 0.03), ((512, 512), 128, 0.03), ((512, 1376), 128, 0.03), ((1024, 2736), 256, 0.03),
    ((2048, 5461), 512, 0.03), ((4096, 11008), 1024, 0.05),
]  # fmt: skip
SWEEP_SHAPE = ((1024, 2736), 256, 0.03)  # 350M's up projection: r and sparsity are varied around it
SWEEP_RANKS, SWEEP_SPARSITIES = (32, 64, 128, 256, 512), (0.01, 0.03, 0.1, 0.3)


def plan(max_entries: float) -> tuple[list[tuple], dict[str, list[tuple]]]:
    """The layers to measure, each (d_in, d_out, r, sparsity), that have at most `max_entries` weight entries: of
    SHAPES, and of the rank and sparsity sweeps (all of SWEEP_SHAPE, so both sweeps are in or out)."""
    shapes = [(d_in, d_out, r, s) for (d_in, d_out), r, s in SHAPES if d_in * d_out <= max_entries]
    (d_in, d_out), r0, s0 = SWEEP_SHAPE
    sweeps = {
        "rank": [(d_in, d_out, r, s0) for r in SWEEP_RANKS],
        "sparsity": [(d_in, d_out, r0, s) for s in SWEEP_SPARSITIES],
    }
    if d_in * d_out > max_entries:
        sweeps = {key: [] for key in sweeps}
    return shapes, sweeps


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
    A, B, scaling = layer["A"], layer["B"], layer["scaling"]
    fns = {
        "dense": (lambda x: dense(x), [dense.weight]),
        "rebuild": (lambda x: F.linear(x, dense_weight(**layer)), factors),
        "sltrain": (lambda x: sltrain_linear(x, **layer, path="dense"), factors),
        "factored": (lambda x: sltrain_linear(x, **layer, path="factored"), factors),
        "factored_torch": (lambda x: with_torch_kernels(sltrain_linear, x, **layer, path="factored"), factors),
        "lowrank": (lambda x: (x @ A.t()) @ (scaling * B).t(), factors),
    }
    if device.type == "cpu":
        if not with_torch_kernels(cost.factored_supported, device, dtype):
            del fns["factored_torch"]
    else:  # off CPU the factored path always runs PyTorch's kernels: `factored_torch` would time the same thing
        del fns["factored_torch"]
        if cost.factored_supported(device, dtype):  # the same with CPU's small token chunks, to show what they cost
            fns["factored_cpu_chunks"] = (lambda x: with_cpu_chunks(sltrain_linear, x, **layer, path="factored"),
                                          factors)  # fmt: skip
    if not cost.factored_supported(device, dtype):  # e.g. no sparse kernels for this dtype on this device
        del fns["factored"]
    return fns


def with_torch_kernels(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with numba's CPU kernels switched off; the factored path's backward uses the kernels
    its forward used."""
    available = cpu_kernels.AVAILABLE
    cpu_kernels.AVAILABLE = False
    try:
        return fn(*args, **kwargs)
    finally:
        cpu_kernels.AVAILABLE = available


def with_cpu_chunks(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with the factored path cutting CUDA activations into CPU's token chunks."""
    numbers = functional.CHUNK_NUMBERS["cuda"]
    functional.CHUNK_NUMBERS["cuda"] = functional.CHUNK_NUMBERS["cpu"]
    try:
        return fn(*args, **kwargs)
    finally:
        functional.CHUNK_NUMBERS["cuda"] = numbers


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
    """Peak tensor memory allocated while `run()` executes, above what was allocated before it (inputs, parameters
    and anything else already alive are not counted). CUDA: the allocator's peak. CPU: the running sum of the
    profiler's allocation and free events. (PyTorch's memory-profiler timeline is not used: it loses the frees of
    sparse tensors' storage and reported the factored path at twice its real peak.)"""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def time_fwd_bwd(fns: dict, x, repeats: int, device, leaves=(), min_seconds: float = 1.0) -> dict[str, float]:
    """Median forward+backward time of each function, timed in interleaved rounds (one pass of each per round) so
    that drift of the machine's speed hits every variant alike; at least `repeats` rounds and `min_seconds`. Also
    `"rounds"`, how many were timed. The gradients of `x` and `leaves` are set to None before each pass (untimed), as
    training's `zero_grad()` does: accumulating into them would cost the dense layer a d_out x d_in add per pass."""

    def once(fn) -> float:
        clear_grads([x, *leaves])
        t0 = time.perf_counter()
        fn(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():  # warm-up; the first pass may include numba's compile (seconds)
        once(fn)
    warm = {name: once(fn) for name, fn in fns.items()}  # a second pass, warm, sizes the rounds
    rounds = max(repeats, min(100, int(min_seconds / max(sum(warm.values()), 1e-9))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(t) for name, t in times.items()} | {"rounds": rounds}


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def measure(d_in, d_out, r, sparsity, tokens, repeats, device, dtype) -> dict:
    layer = make_layer(d_in, d_out, r, sparsity, device, dtype)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    fns = variants(layer, d_in, d_out, device, dtype)
    row = {"d_in": d_in, "d_out": d_out, "r": r, "sparsity": sparsity, "tokens": tokens}
    leaves = [t for _, existing in fns.values() for t in existing if t.requires_grad]
    times = time_fwd_bwd({name: fn for name, (fn, _) in fns.items()}, x, repeats, device, leaves)
    row["rounds"] = times["rounds"]
    for name, (fn, existing) in fns.items():
        row[f"{name}_s"] = times[name]
        clear_grads([x, *leaves])
        row[f"{name}_peak_bytes"] = peak_bytes(lambda fn=fn: fn(x).sum().backward(), device)
        row[f"{name}_saved_bytes"] = saved_bytes(fn, x, existing)
    for name in fns:
        row[f"{name}_time_ratio"] = row[f"{name}_s"] / row["dense_s"]
    if cpu_kernels.supports(device, dtype):  # allocated inside numba's kernels, unseen by the profiler
        row["factored_numba_buffer_bytes"] = cpu_kernels.buffer_bytes(d_in, d_out, dtype)
    # the sparse cost factor that makes peft_sltrain.cost's model reproduce the measured factored / dense-path ratio
    nnz = layer["values"].numel()
    modeled_dense = cost.dense_cost(tokens, d_in, d_out, r)
    lowrank = cost.factored_cost(tokens, d_in, d_out, r, nnz, kappa=0.0, has_weight=False)
    for name in [name for name in ("factored", "factored_torch", "factored_cpu_chunks") if name in fns]:
        row[f"{name}_excess"] = row[f"{name}_s"] / row["sltrain_s"] * modeled_dense - lowrank  # GEMM multiply-adds
        row[f"{name}_kappa_fit"] = row[f"{name}_excess"] / (6.0 * tokens * nnz)
    row["nnz_per_row"] = nnz / d_out
    return row


def fit_cost_model(rows: list[dict], name: str = "factored") -> dict:
    """`cost.py`'s constants: least squares of what the factored path costs beyond its low-rank products,
        excess = (kappa_inf + kappa_row / k) * 6 N nnz + tau * N (3 d_in + 2 d_out)      (k = nnz / d_out),
    in relative terms (each row divided by 6 N nnz, so that big layers do not outweigh small ones). Constants are
    costs, so none may be negative: of the fits over each subset of the three terms, the best non-negative one."""
    feats, y = [], []
    for r in rows:
        sparse = 6.0 * r["tokens"] * r["nnz_per_row"] * r["d_out"]
        copies = cost.transposed_numbers(r["tokens"], r["d_in"], r["d_out"])
        feats.append([1.0, 1.0 / r["nnz_per_row"], copies / sparse])
        y.append(r[f"{name}_excess"] / sparse)
    if len(rows) < 3:  # three constants: any fit of fewer rows is exact, and says nothing
        return {"fit": None, "reason": f"{len(rows)} rows for 3 constants", "rows_fitted": len(rows)}
    X, Y = torch.tensor(feats, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    best = None
    for subset in ([0, 1, 2], [0, 1], [0, 2], [1, 2], [0], [1], [2]):
        coef = torch.zeros(3, dtype=torch.float64)
        coef[subset] = torch.linalg.lstsq(X[:, subset], Y[:, None]).solution[:, 0]
        error = ((X @ coef - Y) ** 2).sum().item()
        if (coef >= 0).all() and (best is None or error < best[0]):
            best = (error, coef)
    if best is None:  # (e.g. every row measured below the model's low-rank floor: noise, or too few rows)
        return {"fit": None, "reason": "no fit with non-negative constants", "rows_fitted": len(rows)}
    kappa_inf, kappa_row, tau = best[1].tolist()
    relative = ((X @ best[1] - Y) / Y).abs()
    return {"kappa_inf": kappa_inf, "kappa_row": kappa_row, "tau": tau, "max_relative_error": relative.max().item(),
            "rows_fitted": len(rows)}  # fmt: skip


STYLES = (("rebuild", "s-"), ("sltrain", "o-"), ("factored", "^-"), ("factored_torch", "^--"),
          ("factored_cpu_chunks", "^:"), ("lowrank", "v:"))  # fmt: skip


def plot(rows: list[dict], sweeps: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [key for key in ("rank", "sparsity") if sweeps[key]]  # none where --max-entries leaves SWEEP_SHAPE out
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(5 * (1 + len(swept)), 4), squeeze=False)
    axes = axes[0]
    labels = [f"{r['d_in']}x{r['d_out']}\nr={r['r']}, {r['sparsity']}" for r in rows]
    styles = [(name, style) for name, style in STYLES if f"{name}_time_ratio" in rows[0]]
    for name, style in styles:
        axes[0].plot(labels, [r[f"{name}_time_ratio"] for r in rows], style, label=name)
    axes[0].axhline(1.0, color="gray", lw=1, ls="--", label="dense (nn.Linear)")
    axes[0].set_ylabel("fwd+bwd time / dense")
    axes[0].set_title("LLaMA shapes (paper's r, sparsity)")
    axes[0].tick_params(axis="x", labelsize=7)
    for key, ax in zip(swept, axes[1:]):
        xlabel = {"rank": "rank r", "sparsity": "sparsity delta"}[key]
        sweep = sweeps[key]
        xs = [s["r"] if key == "rank" else s["sparsity"] for s in sweep]
        for name, style in styles:
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
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--tokens", type=positive_int, help="rows of x (default: 2048 on CPU, 8192 on GPU)")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--max-entries", type=float, default=5e7, help="skip shapes with more weight entries")
    p.add_argument(
        "--out", help="results file stem: STEM.json and STEM.png (default: benchmarks/results/layer_<device>)"
    )
    add_replace_flag(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    device = check_device(p, args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tokens = args.tokens if args.tokens is not None else (8192 if device.type == "cuda" else 2048)
    shapes, sweep_layers = plan(args.max_entries)
    if not shapes:  # refused now, not after the sweeps' minutes
        d_in, d_out = min((shape for shape, _, _ in SHAPES), key=lambda shape: shape[0] * shape[1])
        p.error(
            f"--max-entries {args.max_entries:g} leaves nothing to measure: the smallest shape, {d_in}x{d_out}, has "
            f"{d_in * d_out:,} weight entries"
        )
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    suffix = "" if dtype_name == default_dtype else f"_{dtype_name}"
    stem = Path(args.out) if args.out else RESULTS / f"layer_{device.type}{suffix}"
    stem = stem.with_suffix("") if stem.suffix in (".json", ".png") else stem  # (`layer_d0.03`: a stem, not .03)
    json_path, png_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".png")
    command = recorded_command(__file__, argv)
    check_replaceable(p, json_path, command, args.replace)
    env = environment(device)  # (now: the commit of the code measured)
    torch.manual_seed(0)

    for (d_in, d_out), _, _ in SHAPES:
        if d_in * d_out > args.max_entries:
            print(f"skip {d_in}x{d_out}: more than --max-entries")
    if not sweep_layers["rank"]:
        print(f"skip the rank and sparsity sweeps at {SWEEP_SHAPE[0][0]}x{SWEEP_SHAPE[0][1]}: more than --max-entries")
    rows = []
    for layer in shapes:
        rows.append(measure(*layer, tokens, args.repeats, device, dtype))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    sweeps = {key: [measure(*layer, tokens, args.repeats, device, dtype) for layer in layers]
              for key, layers in sweep_layers.items()}  # fmt: skip
    result = {
        "command": command,
        "environment": env,
        "dtype": str(dtype),
        "tokens": tokens,
        "shapes": rows,
        "sweeps": sweeps,
        "sparse_kernels": "numba" if cpu_kernels.supports(device, dtype) else "torch",
    }
    if "factored_excess" in rows[0]:  # else this device has no sparse kernels for the dtype: dense path only
        result["cost_model_fit"] = fit_cost_model(rows + sweeps["rank"] + sweeps["sparsity"])
    if "factored_torch_excess" in rows[0]:
        result["cost_model_fit_torch"] = fit_cost_model(rows + sweeps["rank"] + sweeps["sparsity"], "factored_torch")
    write_results(json_path, result)
    plot(rows, sweeps, png_path, f"One layer, fwd+bwd, {tokens} tokens, {dtype}, {platform.node()}")
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
