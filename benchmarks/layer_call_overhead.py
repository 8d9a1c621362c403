"""The CPU's work per layer call: what bounds SLTrain's GPU steps at 60M on 32k tokens (issue 6, docs/compute_paths.md
"On a GPU"). A GPU waits on the CPU to launch each op, so the Python and dispatcher time of one layer's forward +
backward, measured here on layers too small for their arithmetic to count (16 x 16, 32 tokens), is the time a GPU step
loses per layer where it is launch-bound. Ratios to `nn.Linear` in the same run, interleaved rounds.

    python benchmarks/layer_call_overhead.py                       # -> benchmarks/results/layer_call_overhead_cpu.json
    python benchmarks/layer_call_overhead.py --lib ../old/tree     # another checkout's peft_sltrain (a before/after)

Variants: `nn.Linear`; SLTrain's layer from scratch and fine-tuned (a frozen `W0`), on the dense path (the one CUDA
bf16 runs) and, in fp32, the factored path; each under bf16 autocast (as GPU training runs) and in fp32. Also counted:
the ops each forward + backward dispatches (views included; the second call, so that gradients accumulate).

A layer called alone never takes the batched rebuild (`compute="batched"`, which `"auto"` takes on a GPU): that works
per pass of a model. So `passes` times the forward (bf16 autocast) and the backward of passes of a model that is
nothing but the 60M preset's 56 linear layers (narrowed to 16 and 43 wide; 8 tokens), each on its own input (which
needs a gradient, as in a LLaMA), backward from the outputs (no loss), per layer call: full-rank, and SLTrain from
scratch on the dense path and batched.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_env import (  # noqa: E402
    RESULTS,
    add_replace_flag,
    check_replaceable,
    environment,
    git_commit,
    positive_int,
    recorded_command,
    write_results,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", type=Path, default=ROOT, help="the checkout whose peft_sltrain to measure")
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--calls", type=positive_int, default=2000, help="forward + backward calls per variant and round")
    p.add_argument("--passes", type=positive_int, default=100, help="passes of the 56 layers per variant and round")
    p.add_argument("--out", type=Path, default=RESULTS / "layer_call_overhead_cpu.json")
    add_replace_flag(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = recorded_command(__file__, argv)
    check_replaceable(p, args.out, command, args.replace)
    sys.path.insert(0, str(args.lib.resolve()))  # before this checkout's, which bench_env put first
    warnings.simplefilter("ignore")

    import torch
    from peft import get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    import peft_sltrain

    if Path(peft_sltrain.__file__).resolve().parent.parent != args.lib.resolve():  # (not one found elsewhere)
        p.error(f"--lib {args.lib}: no peft_sltrain there (the import found {Path(peft_sltrain.__file__).parent})")
    torch.set_num_threads(1)  # one thread: the work per call, not a thread pool's wake-up
    env = environment()  # (now: the commit of the code measured, and the one thread)
    library_commit = git_commit() if args.lib.resolve() == ROOT else _commit_of(args.lib)

    torch.manual_seed(0)
    d, tokens = 16, 32

    def sltrain(from_scratch: bool, compute: str) -> torch.nn.Module:
        config = peft_sltrain.SLTrainConfig(
            r=4, sparsity=0.1, alpha=1, target_modules=["0"], from_scratch=from_scratch, compute=compute
        )
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(d, d)), config).base_model.model[0]

    variants = {
        "nn.Linear": lambda: torch.nn.Linear(d, d),
        "sltrain scratch dense": lambda: sltrain(True, "dense"),
        "sltrain fine-tune dense": lambda: sltrain(False, "dense"),
        "sltrain scratch factored": lambda: sltrain(True, "factored"),
    }
    settings = {"bf16 autocast": torch.bfloat16, "fp32": None}
    x = torch.randn(tokens, d, requires_grad=True)

    def call(layer, autocast_dtype):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = layer(x)
        y.backward(torch.ones_like(y))

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    cases = [(v, s) for s in settings for v in variants if not (s != "fp32" and "factored" in v)]
    layers = {v: variants[v]() for v in variants}
    ops = {}
    for v, s in cases:
        call(layers[v], settings[s])
        with Count() as counted:
            call(layers[v], settings[s])
        ops[f"{v}, {s}"] = dict(collections.Counter(counted.ops).most_common())
    seconds = collections.defaultdict(list)
    for _ in range(args.rounds):
        for v, s in cases:
            layer, dtype = layers[v], settings[s]
            for _ in range(100):
                call(layer, dtype)
            start = time.perf_counter()
            for _ in range(args.calls):
                call(layer, dtype)
            seconds[(v, s)].append((time.perf_counter() - start) / args.calls)

    rows = []
    for v, s in cases:
        us = statistics.median(seconds[(v, s)]) * 1e6
        base = statistics.median(seconds[("nn.Linear", s)]) * 1e6
        rows.append({"variant": v, "setting": s, "us_per_call": round(us, 2), "vs_nn_linear": round(us / base, 3),
                     "extra_us": round(us - base, 2), "ops": sum(ops[f"{v}, {s}"].values()),
                     "us_rounds": [round(t * 1e6, 2) for t in seconds[(v, s)]]})  # fmt: skip
        print(f"{s:14s} {v:26s} {us:7.1f} us  {us / base:5.2f}x nn.Linear  {rows[-1]['ops']:3d} ops")
    pass_rows = passes(args.rounds, args.passes, Count)
    result = {
        "command": command,
        "library_commit": library_commit,
        "shape": {"d_in": d, "d_out": d, "tokens": tokens, "r": 4, "sparsity": 0.1},
        "environment": env,
        "rows": rows,
        "ops_by_name": ops,
        "passes": {"shapes": SHAPES, "blocks": BLOCKS, "layers": LAYERS, "tokens": TOKENS, "rows": pass_rows},
    }
    write_results(args.out, result, indent=1)


# the 60M preset's linear layers (configs/llama_60m.json: 8 blocks of 7; 512 -> 512 and 512 <-> 1376 there), narrowed
BLOCKS, HIDDEN, MLP = 8, 16, 43
SHAPES = {**{name: (HIDDEN, HIDDEN) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
          "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}  # fmt: skip
LAYER_NAMES = [name for _ in range(BLOCKS) for name in SHAPES]  # (each layer's kind, in a LLaMA's order)
LAYERS, TOKENS = len(LAYER_NAMES), 8


def passes(rounds: int, count: int, count_mode) -> list[dict]:
    """`count` passes per variant and round (interleaved, always in the same order) of a model that is nothing but
    the 60M preset's 56 linear layers, each called on its own input (8 tokens, which needs a gradient) in a LLaMA's
    order: a pass's forward (bf16 autocast) and its backward from the outputs (no loss), timed apart (not the making
    of the inputs, nor zeroing the gradients), per layer: full-rank `nn.Linear`s and SLTrain from scratch on the dense
    path and batched (which works per pass of a model, so a layer called alone never takes it). Rows: microseconds per
    layer call (medians over the rounds), the ratio of their sum to full-rank's, the ops dispatched in the two timed
    windows."""
    import torch
    from peft import get_peft_model
    from torch import nn

    import peft_sltrain

    class Linears(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.ModuleDict({name: nn.Linear(*shape, bias=False) for name, shape in SHAPES.items()})
                for _ in range(BLOCKS)
            )

        def forward(self, inputs: list) -> list:  # (one input per layer, in a LLaMA's order)
            layers = (block[name] for block in self.blocks for name in SHAPES)
            return [layer(x) for layer, x in zip(layers, inputs)]

    def build(compute: str | None) -> nn.Module:
        torch.manual_seed(0)
        if compute is None:
            return Linears()
        config = peft_sltrain.SLTrainConfig(r=4, sparsity=0.1, alpha=1, target_modules=list(SHAPES),
                                            from_scratch=True, compute=compute)  # fmt: skip
        return get_peft_model(Linears(), config)

    data = [torch.randn(TOKENS, SHAPES[name][0]) for name in LAYER_NAMES]

    def one_pass(model, counted=None) -> tuple[float, float]:
        """(forward, backward) seconds of one pass; `counted`: a context around both, and nothing else."""
        counted = counted or contextlib.nullcontext()
        # each layer its own input, which needs a gradient, as in a LLaMA (so each backward computes dx: on the dense
        # and batched paths it rebuilds W again); fresh each pass, so autocast casts each, as a LLaMA's activations
        inputs = [x.detach().requires_grad_() for x in data]
        with counted:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(inputs)
            forward = time.perf_counter() - start
        grads = [torch.ones_like(y) for y in outputs]  # (not timed: no loss, and no zero_grad below)
        with counted:
            start = time.perf_counter()
            torch.autograd.backward(outputs, grads)
            backward = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return forward, backward

    models = {"full-rank": build(None), "sltrain dense": build("dense"), "sltrain batched": build("batched")}
    ops = {}
    for name, model in models.items():
        one_pass(model)
        counted = count_mode()
        one_pass(model, counted)
        ops[name] = dict(collections.Counter(counted.ops).most_common())
    seconds = {name: ([], []) for name in models}  # (forward, backward) per round
    for _ in range(rounds):
        for name, model in models.items():
            for _ in range(5):
                one_pass(model)
            timed = [one_pass(model) for _ in range(count)]
            for i in (0, 1):
                seconds[name][i].append(sum(t[i] for t in timed) / count / LAYERS)
    full = sum(statistics.median(seconds["full-rank"][i]) for i in (0, 1))
    rows = []
    for name in models:
        forward, backward = (statistics.median(seconds[name][i]) * 1e6 for i in (0, 1))
        rows.append({"variant": name, "forward_us_per_layer": round(forward, 2),
                     "backward_us_per_layer": round(backward, 2),
                     "vs_full_rank": round((forward + backward) / (full * 1e6), 3),
                     "ops_per_pass": sum(ops[name].values()), "ops_by_name": ops[name],
                     "forward_us_rounds": [round(t * 1e6, 2) for t in seconds[name][0]],
                     "backward_us_rounds": [round(t * 1e6, 2) for t in seconds[name][1]]})  # fmt: skip
        print(f"in a pass      {name:26s} {forward:7.1f} + {backward:5.1f} us  {rows[-1]['vs_full_rank']:5.2f}x "
              f"full-rank  {rows[-1]['ops_per_pass']:4d} ops")  # fmt: skip
    return rows


def _commit_of(checkout: Path) -> str:
    """The commit another checkout (`--lib`) is at, else its path."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else str(checkout)


if __name__ == "__main__":
    main()
