"""A one-off GPU probe (issue 6): where SLTrain's extra step time goes at 60M on 32k tokens, and whether rebuilding W
in the fp32 master dtype, cast once (no casts of the factors, fp32 factor gradients), beats the dense path.

    python benchmarks/probes/cuda_step_overhead.py      # on a CUDA machine; writes $OUT (default /tmp)/
    DEV=cpu python benchmarks/probes/cuda_step_overhead.py   # a dry run of the script on tiny shapes

Parts: (A) one layer, forward + backward under bf16 autocast, CUDA events over 20 calls, 7 interleaved rounds;
(B) whole 60M steps (128 x 256 tokens, AdamW), one process, 6 interleaved rounds of 8 steps: full-rank, SLTrain's
dense path, and the candidate (the SLTrain layers' forward patched); (C) a profiler table of one step of each.
Results: benchmarks/results/probe_cuda_step_overhead_h100.json, measured at abbc502, before the dense path cast
inside its autograd function (`layer today` and `sltrain today` there are that commit's code)."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts")]
from step_bench import training_step  # noqa: E402

import peft_sltrain.layer as L  # noqa: E402
from peft_sltrain import SLTrainConfig  # noqa: E402
from peft_sltrain.functional import _scaled_mm, dense_weight, sltrain_linear  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
dev = torch.device(os.environ.get("DEV", "cuda"))
DRY = dev.type == "cpu"
bf16 = torch.bfloat16


class RebuildOnce(torch.autograd.Function):
    """The candidate: W built in A's dtype (fp32), cast once to x's dtype; the gradients of A, B and the values in
    their own dtype, from dW cast once."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling):
        W = dense_weight(A, B, values, indices, scaling).to(x.dtype)
        y = x.reshape(-1, x.shape[-1]).mm(W.t()).view(*x.shape[:-1], W.shape[0])
        ctx.save_for_backward(x, A, B, values, indices)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, gy):
        x, A, B, values, indices = ctx.saved_tensors
        s, dy = ctx.scaling, gy.reshape(-1, gy.shape[-1])
        dW = dy.t().mm(x.reshape(-1, x.shape[-1])).to(A.dtype)
        gB, gA, gv = _scaled_mm(dW, A.t(), s), _scaled_mm(B.t(), dW, s), dW.view(-1).index_select(0, indices)
        del dW
        gx = dy.mm(dense_weight(A, B, values, indices, s).to(dy.dtype)).view(x.shape)
        return gx, gA, gB, gv, None, None


PATCH = {"on": False}
_forward = L.Linear.forward


def patched_forward(self, x, *args, **kwargs):
    if not PATCH["on"]:
        return _forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    with torch.autocast(dev.type, enabled=False):
        tensors = (self.sltrain_A[name], self.sltrain_B[name], self.sltrain_values[name], self.sltrain_indices[name])
        return RebuildOnce.apply(x.to(bf16), *tensors, self.scaling[name])


L.Linear.forward = patched_forward


def sync():
    if not DRY:
        torch.cuda.synchronize()


def events_us(fn, iters=20) -> float:
    """Microseconds per call: CUDA events around `iters` calls (one timed call on CPU)."""
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3


def layer_row(d_in: int, d_out: int, n: int) -> dict:
    torch.manual_seed(0)
    r = 16 if DRY else 128
    lin = torch.nn.Linear(d_in, d_out, bias=False, device=dev)
    config = SLTrainConfig(r=r, sparsity=0.03, alpha=32, target_modules=["0"], from_scratch=True)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)), config).to(dev)
    layer = next(m for m in model.modules() if isinstance(m, L.Linear))
    A, B, v, idx = (getattr(layer, f"sltrain_{k}")["default"] for k in ("A", "B", "values", "indices"))
    with torch.no_grad():
        B.normal_()
    x = torch.randn(n, d_in, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(n, d_out, device=dev, dtype=bf16)
    s = layer.scaling["default"]

    def today():
        return sltrain_linear(x, A.to(bf16), B.to(bf16), v.to(bf16), idx, scaling=s)

    def once():
        return RebuildOnce.apply(x, A, B, v, idx, s)

    def fwd_bwd(f):
        def call():
            for p in (lin.weight, A, B, v, x):
                p.grad = None
            with torch.autocast(dev.type, dtype=bf16):
                y = f()
            y.backward(dy)

        return call

    variants = {"nn.Linear": fwd_bwd(lambda: lin(x)), "layer today": fwd_bwd(lambda: layer(x)),
                "function today": fwd_bwd(today), "rebuild once": fwd_bwd(once)}  # fmt: skip
    ref = sltrain_linear(x.float(), A, B, v, idx, scaling=s)  # fp32 reference

    def err(y):
        return ((y.float() - ref).norm() / ref.norm()).item()

    row = {"shape": f"{d_out}x{d_in}", "tokens": n, "rel_err_today": err(today()), "rel_err_once": err(once())}
    times = {k: [] for k in variants}
    for f in variants.values():
        f()
        f()
    for _ in range(7):
        for k, f in variants.items():
            times[k].append(events_us(f))
    return row | {k: round(statistics.median(t), 1) for k, t in times.items()}


def part_a(results):
    shapes = (
        ((64, 96, 128),) if DRY else ((512, 512, 32768), (512, 1376, 32768), (1376, 512, 32768), (512, 1376, 4096))
    )
    results["layer_us"] = [layer_row(*shape) for shape in shapes]
    for row in results["layer_us"]:
        print(json.dumps(row), flush=True)


def part_b(results, rounds=6, steps=8):
    rounds, steps = (1, 1) if DRY else (rounds, steps)
    size, batch, seq = ("tiny", 2, 64) if DRY else ("60m", 128, 256)
    variants = {}
    for name in ("full", "sltrain today", "sltrain rebuild once"):
        variants[name] = training_step(size, "full" if name == "full" else "sltrain-dense", batch, seq, dev, bf16)[1]

    def timed(name):
        PATCH["on"] = name == "sltrain rebuild once"
        sync()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            variants[name]()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for k in variants:
        timed(k), timed(k)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k in variants:
            times[k].append(timed(k))
    med = {k: statistics.median(t) for k, t in times.items()}
    results["step_60m_32k"] = {
        k: {"step_ms": round(med[k] * 1e3, 2), "rounds_ms": [round(t * 1e3, 2) for t in times[k]],
            "tokens_per_s_vs_full": round(med["full"] / med[k], 4),
            "rounds_vs_full": [round(f / t, 4) for f, t in zip(times["full"], times[k])]}
        for k in variants
    }  # fmt: skip
    print(json.dumps(results["step_60m_32k"], indent=1), flush=True)
    return variants


def part_c(results, variants):
    from torch.profiler import ProfilerActivity, profile

    kind = torch.autograd.DeviceType.CPU if DRY else torch.autograd.DeviceType.CUDA
    for name, step in variants.items():
        PATCH["on"] = name == "sltrain rebuild once"
        step()
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        kernels = [e for e in prof.events() if e.device_type == kind]
        gpu_ms = sum(e.device_time for e in kernels) / 1e3
        print(f"=== {name}: {len(kernels)} kernels, {gpu_ms:.2f} ms GPU time", flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22), flush=True)
        results.setdefault("profile", {})[name] = {"kernels": len(kernels), "gpu_ms": gpu_ms}


if __name__ == "__main__":
    results = {"device": "cpu" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__}
    part_a(results)
    part_c(results, part_b(results))
    with open(f"{OUT}/probe_cuda_step_overhead.json", "w") as f:
        json.dump(results, f, indent=1)
