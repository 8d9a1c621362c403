"""A one-off GPU probe (issue 6): which operations make SLTrain's dense-path step at 60M on 32k tokens slower than
full-rank's, by GPU time.

    python benchmarks/probes/cuda_step_breakdown.py          # on a CUDA machine; writes $OUT (default /tmp)/
    DEV=cpu python benchmarks/probes/cuda_step_breakdown.py  # a dry run of the script on the tiny preset

One process: full-rank and SLTrain's dense path (128 x 256 tokens, bf16 autocast, AdamW), each warmed up, then
one profiled step of each, 3 times interleaved. Per ATen operator (the GPU time of the kernels it launched) and per
kernel: the time and the calls, the median over the 3 profiles; those SLTrain spends more on, and less on, than
full-rank; and each profiled step's total kernel time.
Results: benchmarks/results/probe_cuda_step_breakdown_h200.json (an H200, written before the total was fixed: its
`gpu_ms_per_profiled_step` counts every kernel twice)."""

import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_bench import training_step  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
dev = torch.device(os.environ.get("DEV", "cuda"))
DRY = dev.type == "cpu"
SIZE, BATCH, SEQ = ("tiny", 2, 64) if DRY else ("60m", 128, 256)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def profiled(step) -> tuple[dict, float]:
    """{operator or kernel: (GPU microseconds, calls)} of one step, and its kernels' total in ms (CPU time and event
    counts on a dry run). The key averages hold operators and kernels both: each kernel's time shows under the
    operator that launched it and under its own name."""
    with profile(activities=[ProfilerActivity.CPU] + ([] if DRY else [ProfilerActivity.CUDA])) as prof:
        step()
        sync()
    table = {}
    for e in prof.key_averages():
        us = e.self_cpu_time_total if DRY else e.self_device_time_total
        if us > 0:
            table[e.key] = (us, e.count)
    kind = torch.autograd.DeviceType.CPU if DRY else torch.autograd.DeviceType.CUDA
    total_us = sum(e.self_cpu_time_total if DRY else e.device_time for e in prof.events() if e.device_type == kind)
    return table, total_us / 1e3


def main():
    steps = {name: training_step(SIZE, variant, BATCH, SEQ, dev, torch.bfloat16)[1]
             for name, variant in (("full", "full"), ("sltrain", "sltrain-dense"))}  # fmt: skip
    for step in steps.values():
        for _ in range(3):
            step()
    sync()
    tables, totals = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            table, total_ms = profiled(step)
            tables[name].append(table)
            totals[name].append(round(total_ms, 3))

    def median_us(name, op):
        return statistics.median(t.get(op, (0, 0))[0] for t in tables[name])

    ops = sorted(set().union(*(t.keys() for ts in tables.values() for t in ts)))
    rows = [{"op": op, "full_us": round(median_us("full", op), 1), "sltrain_us": round(median_us("sltrain", op), 1),
             "full_calls": tables["full"][0].get(op, (0, 0))[1],
             "sltrain_calls": tables["sltrain"][0].get(op, (0, 0))[1]} for op in ops]  # fmt: skip
    for row in rows:
        row["extra_us"] = round(row["sltrain_us"] - row["full_us"], 1)
    rows.sort(key=lambda row: -abs(row["extra_us"]))
    results = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__,
               "size": SIZE, "tokens": BATCH * SEQ, "kernel_ms_per_profiled_step": totals,
               "ops_by_extra_time": rows[:40]}  # fmt: skip
    print(json.dumps({k: v for k, v in results.items() if k != "ops_by_extra_time"}), flush=True)
    for row in rows[:25]:
        print(json.dumps(row), flush=True)
    with open(f"{OUT}/probe_cuda_step_breakdown.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
