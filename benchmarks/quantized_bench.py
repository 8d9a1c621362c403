"""Fine-tuning on a quantized base: what bitsandbytes' 4- and 8-bit `W0` saves, for SLTrain and for QLoRA.

    python benchmarks/quantized_bench.py      # CPU, fp32 compute: benchmarks/results/quantized_cpu.json

A 60M-shaped LLaMA (configs/llama_60m.json, random weights: memory and time do not depend on them) is fine-tuned
with its attention and MLP projections frozen as `W0` and an adapter on each, on four bases: fp32 (SLTrain and LoRA)
and bitsandbytes 8-bit and 4-bit nf4 (SLTrain; LoRA on 4-bit is QLoRA). SLTrain: r = 32, delta = 0.03, alpha = 32;
LoRA's rank gives the same number of trainable parameters per layer on average (r = 42). Embeddings, norms and
head stay fp32 and frozen (bitsandbytes does not quantize them).

Per variant: `weights_bytes`, the bytes the model holds (parameters, buffers and bitsandbytes' quantization
constants), and `w0_bytes`, those of the targeted layers' frozen weights alone; `step_peak_bytes`, the most tensor
memory a fresh AdamW run of three steps allocates on top of them (gradients, optimizer state, activations; the
profiler's allocation events: bitsandbytes' transient dequantized weights would count, but the peak falls where the
vocabulary logits are alive, after them); and the median step time (forward, backward, AdamW) over interleaved rounds,
as a ratio to SLTrain on the fp32 base. bitsandbytes' CPU kernels are not its CUDA kernels: the times say what this
CPU does, not what a GPU would.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import transformers  # noqa: E402
from bench_env import (  # noqa: E402
    add_replace_flag,
    check_replaceable,
    environment,
    positive_int,
    recorded_command,
    write_results,
)
from layer_bench import peak_bytes  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_sltrain  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLTRAIN = {"r": 32, "sparsity": 0.03, "alpha": 32}
# (base, method) per variant; the first is the baseline of the time ratios
VARIANTS = {
    "sltrain-fp32": ("fp32", "sltrain"),
    "sltrain-8bit": ("8bit", "sltrain"),
    "sltrain-4bit": ("4bit", "sltrain"),
    "lora-fp32": ("fp32", "lora"),
    "qlora-4bit": ("4bit", "lora"),
}


def lora_rank(config: LlamaConfig) -> int:
    """LoRA's rank with SLTrain's trainable parameters over the targeted layers: sum r (d_in + d_out) + nnz."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]  # (d_in, d_out) per projection
    sltrain = sum(peft_sltrain.sltrain_layer_parameters(i, o, SLTRAIN["r"], SLTRAIN["sparsity"]) for i, o in shapes)
    return round(sltrain / sum(i + o for i, o in shapes))


def load(path: Path, base: str, method: str, config: LlamaConfig) -> torch.nn.Module:
    quantization = {
        "fp32": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    }[base]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes on input casts
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    if method == "sltrain":
        adapter = peft_sltrain.SLTrainConfig(**SLTRAIN, target_modules=TARGETS)
    else:
        adapter = LoraConfig(r=lora_rank(config), lora_alpha=2 * lora_rank(config), target_modules=TARGETS)
    return get_peft_model(model, adapter).train()


def weights_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization constants (kept beside its 4-bit weights)."""
    total = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += sum(t.nbytes for t in (state.absmax, state.code) if t is not None)
            if state.nested:
                total += sum(t.nbytes for t in (state.state2.absmax, state.state2.code))
        total += getattr(p, "SCB", None).nbytes if getattr(p, "SCB", None) is not None else 0
    return total


def w0_bytes(model: torch.nn.Module) -> int:
    """The frozen `W0` of the targeted layers alone: their base layers' weights and quantization constants."""
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return sum(weights_bytes(base) - (base.bias.nbytes if base.bias is not None else 0) for base in bases)


def make_step(model: torch.nn.Module, ids: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--rounds", type=positive_int, default=5, help="timing rounds, one step of every variant per round")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--preset", default=str(ROOT / "configs" / "llama_60m.json"), help="its `model` section is built")
    p.add_argument("--out", default="quantized_cpu.json", help="a file under benchmarks/results/, or an absolute path")
    add_replace_flag(p)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}.")
    if not Path(args.preset).is_file():
        p.error(f"--preset: no file {args.preset}")
    command = recorded_command(__file__, argv)
    check_replaceable(p, RESULTS / args.out, command, args.replace)

    env = environment(torch.device("cpu"))  # (now: the commit of the code measured)
    transformers.utils.logging.disable_progress_bar()
    config = LlamaConfig(**json.loads(Path(args.preset).read_text())["model"])
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        for name in names:  # memory: each variant alone, loaded fresh
            base, method = VARIANTS[name]
            model = load(Path(tmp), base, method, config)
            step = make_step(model, ids)
            counts = peft_sltrain.module_parameter_counts(model)
            rows[name] = {"variant": name, "base": base, "method": method, "trainable": counts.trainable,
                          "weights_bytes": weights_bytes(model), "w0_bytes": w0_bytes(model)}  # fmt: skip
            three_steps = lambda step=step: [step() for _ in range(3)]  # noqa: E731
            rows[name]["step_peak_bytes"] = peak_bytes(three_steps, torch.device("cpu"))
            print(json.dumps(rows[name]), flush=True)
            del model, step
            gc.collect()
        models = {name: load(Path(tmp), *VARIANTS[name], config) for name in names}  # time: all side by side
    steps = {name: make_step(model, ids) for name, model in models.items()}
    for step in steps.values():
        step()  # warm-up (numba compiles, AdamW's state appears)
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    baseline = names[0]
    for name in names:
        rows[name]["step_s"] = statistics.median(times[name])
        rows[name]["time_vs_" + baseline] = statistics.median(t / b for t, b in zip(times[name], times[baseline]))
        for key in ("weights", "w0", "step_peak"):
            rows[name][f"{key}_vs_{baseline}"] = rows[name][f"{key}_bytes"] / rows[baseline][f"{key}_bytes"]
        print(json.dumps(rows[name]), flush=True)

    result = {"command": command,
              "environment": env, "sltrain": SLTRAIN, "lora_rank": lora_rank(config),
              "tokens_per_step": args.batch * args.seq_len, "rows": list(rows.values())}  # fmt: skip
    write_results(RESULTS / args.out, result)
    print(f"wrote {RESULTS / args.out}")
    return result


if __name__ == "__main__":
    main()
