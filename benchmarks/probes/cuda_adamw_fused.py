"""A one-off GPU probe (issue 6): does AdamW's per-tensor work explain part of SLTrain's gap at 60M on 32k tokens?
SLTrain's model has three trainable tensors per layer where full-rank has one.

    python benchmarks/probes/cuda_adamw_fused.py     # on a CUDA machine; writes $OUT (default /tmp)/

Full-rank and SLTrain's dense path, each with AdamW's default (foreach) and fused implementations; four models in one
process, 5 interleaved rounds of 8 steps (128 x 256 tokens, bf16 autocast). Results:
benchmarks/results/probe_cuda_adamw_fused_h100.json."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_bench import build  # noqa: E402

dev, bf16 = torch.device("cuda"), torch.bfloat16
ids = torch.randint(0, 32000, (128, 256), generator=torch.Generator().manual_seed(0)).to(dev)


def make_step(variant: str, fused: bool):
    model = build("60m", variant, dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused)

    def step():
        with torch.autocast("cuda", dtype=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, n=8) -> float:
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


if __name__ == "__main__":
    V = {
        f"{v} {'fused' if f else 'foreach'}": make_step(v, f) for v in ("full", "sltrain-dense") for f in (False, True)
    }
    for s in V.values():
        s()
        s()
    T = {k: [] for k in V}
    for _ in range(5):
        for k, s in V.items():
            T[k].append(timed(s))
    res = {k: {"step_ms": round(statistics.median(t) * 1e3, 2), "rounds_ms": [round(x * 1e3, 2) for x in t]}
           for k, t in T.items()}  # fmt: skip
    for opt in ("foreach", "fused"):
        f, s = T[f"full {opt}"], T[f"sltrain-dense {opt}"]
        res[f"tokens_per_s_ratio_{opt}"] = round(statistics.median(f) / statistics.median(s), 4)
        res[f"rounds_ratio_{opt}"] = [round(a / b, 4) for a, b in zip(f, s)]
    res |= {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": os.environ.get("BENCH_COMMIT"),
    }
    print(json.dumps(res, indent=1))
    with open(os.environ.get("OUT", "/tmp") + "/probe_cuda_adamw_fused.json", "w") as f:
        json.dump(res, f, indent=1)
