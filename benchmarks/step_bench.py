r"""Whole training steps: SLTrain's dense and factored compute paths against full-rank, at the paper's r and sparsity.

    python benchmarks/step_bench.py                   # CPU, fp32: tiny and 60M-shaped LLaMA
    python benchmarks/step_bench.py --dtype bf16      # CPU, bf16 autocast: step_cpu_bf16.json
    python benchmarks/step_bench.py --sizes 60m --variants full,sltrain-dense,sltrain-auto --rounds 11 \
        --out step_cpu_60m.json
    python benchmarks/step_bench.py --device cuda     # GPU, bf16 autocast: 60M and 350M shapes

One step = forward + backward + AdamW update on one batch. Each variant is timed over several steps after a warm-up
(median), each in a fresh process, in interleaved rounds, and reported as the median ratio to full-rank. `lowrank`,
the pure low-rank model at the same r, is the floor of any factored step (it does a subset of the factored work).
Memory: `peak_bytes`, the most tensor memory alive at once in a fresh run of three steps (model built inside it, so
parameters and optimizer state count; CUDA: allocator peak; CPU: the profiler's allocation events), measured in the
first round; `peak_rss_bytes`, the process's peak (RSS on CPU, max allocated on CUDA).
Results: benchmarks/results/step_<device>[_<dtype>][_batch<N>][_compiled[_<mode>]].json unless `--out` names
another file.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_env import (  # noqa: E402
    add_replace_flag,
    check_device,
    check_replaceable,
    checkout_env,
    committed,
    environment,
    positive_int,
    recorded_command,
    write_results,
)
from layer_bench import peak_bytes  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

import peft_sltrain  # noqa: E402
from peft_sltrain import batched, cost  # noqa: E402

from methods import METHODS, Hyper  # noqa: E402
from pretrain import SIZES, peak_memory_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"full": None, "sltrain-dense": "dense", "sltrain-factored": "factored", "sltrain-auto": "auto",
            "sltrain-batched": "batched", "lowrank": None}  # fmt: skip
# `lowrank` is the pure low-rank model (x A^T) B^T at SLTrain's r with no sparse part: the factored path does all of
# its work and more (the sparse products), so its step time is a floor for any factored SLTrain step.


def build(size: str, variant: str, device: torch.device) -> torch.nn.Module:
    preset = json.loads((ROOT / "configs" / f"llama_{size}.json").read_text())
    config = LlamaConfig(**preset["model"])
    torch.manual_seed(0)
    if variant == "full":
        return METHODS["full"].build(config, Hyper()).to(device)
    sl = preset["sltrain"]
    hyper = Hyper(rank=sl["rank"], sparsity=sl["sparsity"], alpha=sl["alpha"])
    if variant == "lowrank":
        return METHODS["lowrank"].build(config, hyper).to(device)
    model = METHODS["sltrain"].build(config, hyper)
    for layer in model.modules():
        if isinstance(layer, peft_sltrain.SLTrainLayer):
            layer.compute["default"] = VARIANTS[variant]
    return model.to(device)


def training_step(
    size: str, variant: str, batch: int, seq_len: int, device, autocast_dtype, compile: str | None = None
):  # fmt: skip
    """(model, step): a fresh model and AdamW, and a function that runs one step on a fixed batch; `compile`: a
    `torch.compile` mode ("default", "reduce-overhead": CUDA graphs, ...) for the model's forward, compiled in the
    warm-up steps, or None for eager."""
    model = build(size, variant, device).train()
    if compile:
        model.compile(mode=compile)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 4096
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def measure(
    size: str, variant: str, batch: int, seq_len: int, steps: int, device, autocast_dtype, with_peak: bool = True,
    compile: str | None = None,
) -> dict:  # fmt: skip
    model, step = training_step(size, variant, batch, seq_len, device, autocast_dtype, compile)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up, and AdamW's state exists from here on
        step()
    seconds = statistics.median(timed() for _ in range(steps))
    dtype = autocast_dtype or torch.float32
    paths = sorted(
        "batched" if not compile and batched.takes_batched(layer, "default", torch.empty(0, device=device)) else
        cost.choose_path(layer.compute["default"], batch * seq_len, layer.in_features, layer.out_features,
                         layer.r["default"], layer.sltrain_values["default"].numel(), device, dtype, False)
        for layer in model.modules() if isinstance(layer, peft_sltrain.SLTrainLayer)
    )  # fmt: skip
    row = {"size": size, "variant": variant, "tokens": batch * seq_len, "step_s": seconds,
           "tokens_per_s": batch * seq_len / seconds, "peak_rss_bytes": peak_memory_bytes(device)[0],
           "layers_by_path": {p: paths.count(p) for p in sorted(set(paths))}}  # fmt: skip
    print(json.dumps(row), flush=True)  # the timing survives if the memory profiler below crashes the process
    if not with_peak:
        return row
    model = step = None  # freed before the fresh run below
    gc.collect()

    def fresh_run():  # everything a run allocates: parameters, optimizer state, activations
        _, step = training_step(size, variant, batch, seq_len, device, autocast_dtype, compile)
        for _ in range(3):
            step()

    row["peak_bytes"] = peak_bytes(fresh_run, device)
    print(json.dumps(row), flush=True)
    return row


def measure_in_subprocess(
    size: str, variant: str, batch: int, seq_len: int, steps: int, device: str, dtype: str, with_peak: bool,
    compile: str | None,
) -> dict:  # fmt: skip
    """One variant in a fresh process: no allocator state or warm caches carried over from another variant, and
    its own peak RSS. Should the profiler crash the child, the row keeps its time and RSS and `peak_bytes` is None."""
    cmd = [sys.executable, __file__, "--one", size, variant, str(batch), str(seq_len), "--steps", str(steps),
           "--device", device, "--dtype", dtype]  # fmt: skip
    cmd += ([] if with_peak else ["--no-peak"]) + (["--compile", compile] if compile else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=checkout_env())  # this checkout's library
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{size} / {variant} failed:\n{done.stderr[-3000:]}")
    return {"peak_bytes": None, **rows[-1]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="autocast dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per run (median), after 2 warm-up steps")
    p.add_argument("--rounds", type=positive_int, default=5, help="runs of every variant, interleaved")
    p.add_argument(
        "--sizes",
        help="comma-separated sizes (default: the device's, CPU: tiny,60m; GPU: 60m,350m); any other size runs "
        "256-token sequences, 1 per step on CPU and 64 on a GPU unless --batch says otherwise",
    )
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}; full is always run")
    p.add_argument(
        "--batch", type=positive_int, help="sequences per step, for every size (default: the device's settings)"
    )
    p.add_argument(
        "--out",
        help="results file name in benchmarks/results (default: "
        "step_<device>[_<dtype>][_batch<N>][_compiled[_<mode>]].json)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile every variant's model (`model.compile(mode=...)`; mode: default if not given)",
    )
    p.add_argument(
        "--no-peak",
        action="store_true",
        help="skip the memory measurement (a fresh run per variant in the first round; compiled, it compiles again)",
    )
    add_replace_flag(p)
    p.add_argument("--one", nargs=4, metavar=("SIZE", "VARIANT", "BATCH", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = check_device(p, args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype_name == "bf16" else None
    if args.one:  # a child process of the loop below
        size, variant, batch, seq_len = args.one
        return measure(
            size, variant, int(batch), int(seq_len), args.steps, device, autocast_dtype, not args.no_peak, args.compile
        )
    if device.type == "cuda":  # (size, batch, seq_len), bf16 autocast: micro-batches of 32k / 16k tokens, where a
        # GPU's time goes to the GEMMs (the paper's steps are 512 x 256 tokens); far fewer leave it waiting on launches
        settings = [("60m", 128, 256), ("350m", 64, 256)]
    else:
        settings = [("tiny", 32, 128), ("60m", 8, 256)]
    if args.batch is not None:
        settings = [(size, args.batch, seq_len) for size, _, seq_len in settings]
    if args.sizes:  # the default sizes at their settings, any other at 256-token sequences (CPU: 1, GPU: 64)
        sizes = args.sizes.split(",")
        unknown = set(sizes) - set(SIZES)
        if unknown:
            p.error(f"--sizes: {sorted(unknown)} not among {SIZES}")
        defaults = {size for size, _, _ in settings}
        other = [size for size in sizes if size not in defaults]
        batch = args.batch or (64 if device.type == "cuda" else 1)
        settings = [s for s in settings if s[0] in sizes] + [(size, batch, 256) for size in other]
    variants = list(VARIANTS)
    if args.variants:
        chosen = args.variants.split(",")
        if set(chosen) - set(VARIANTS):
            p.error(f"--variants: {sorted(set(chosen) - set(VARIANTS))} not among {list(VARIANTS)}")
        variants = [v for v in VARIANTS if v == "full" or v in chosen]
    suffix = "" if dtype_name == ("bf16" if device.type == "cuda" else "fp32") else f"_{dtype_name}"
    suffix += (f"_batch{args.batch}" if args.batch else "") + ("_compiled" if args.compile else "")
    suffix += f"_{args.compile}" if args.compile not in (None, "default") else ""
    path = RESULTS / (args.out or f"step_{device.type}{suffix}.json")
    command = recorded_command(__file__, argv)
    check_replaceable(p, path, command, args.replace)
    # the sizes finished so far are written after each; over committed results, to a side file until the last one
    interim = path.with_name(path.stem + "_incomplete.json") if path.is_file() and committed(path) else path
    rows = []
    result = {
        "command": command,
        "environment": environment(device),  # (read now: the commit of the code measured)
        "autocast": str(autocast_dtype),
        "compiled": args.compile is not None,
        "compile_mode": args.compile,
        "rows": rows,
        "complete": False,  # until the last size is measured (the file is written after each)
    }
    for size, batch, seq_len in settings:
        # rounds of all variants, so that slow drifts of the machine hit every variant alike; each ratio is taken
        # against full-rank of the same round, and the row reports the medians
        runs = {v: [] for v in variants}
        with tqdm(total=args.rounds * len(variants), desc=f"{size}, {batch} x {seq_len} tokens") as bar:
            for i in range(args.rounds):  # memory is deterministic: measured in the first round only
                for variant in variants:
                    bar.set_postfix_str(f"round {i + 1}, {variant}")
                    with_peak = i == 0 and not args.no_peak
                    row = measure_in_subprocess(
                        size, variant, batch, seq_len, args.steps, args.device, dtype_name, with_peak, args.compile
                    )
                    runs[variant].append(row)
                    bar.update()
        full = runs["full"]
        for measured in runs.values():
            row = dict(measured[0])
            row |= {"batch": batch, "seq_len": seq_len, "timed_steps": args.steps, "rounds": args.rounds}
            row["step_s_rounds"] = [m["step_s"] for m in measured]
            row["step_s"] = statistics.median(row["step_s_rounds"])
            row["tokens_per_s"] = row["tokens"] / row["step_s"]
            row["time_vs_full_rounds"] = [m["step_s"] / f["step_s"] for m, f in zip(measured, full)]
            row["time_vs_full"] = statistics.median(row["time_vs_full_rounds"])
            for key in ("peak_bytes", "peak_rss_bytes"):
                if row[key] is not None and full[0][key] is not None:
                    row[key.replace("_bytes", "_vs_full")] = row[key] / full[0][key]
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
        result["complete"] = (size, batch, seq_len) == settings[-1]
        done = path if result["complete"] else interim  # an interrupted run keeps the sizes it finished
        write_results(done, result)
        print(f"wrote {done} ({len(rows)} rows)")
    if interim != path:
        interim.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()
