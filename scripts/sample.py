"""Generate text with a model that `pretrain.py` trained (any method), as nanoGPT's sample.py does.

    python scripts/sample.py runs/tiny-sltrain --prompt "It is a truth universally acknowledged"
    python scripts/sample.py runs/tiny-full/final --num-samples 1 --temperature 0    # greedy

The path is a run directory (its `final/` export is used) or an export itself (`final/` or `merged/`). An SLTrain
export is a PEFT adapter holding every trained tensor plus the architecture (`config.json`): it is loaded onto an
empty model and merged into plain dense weights, which generate faster than the factored layers token by token.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# Noise from dependencies, not about this run: bitsandbytes (imported by PEFT where installed) logs on CPUs with
# AVX512-BF16 that an optional 4-bit kernel package is missing; PEFT 0.21 reads a property Transformers 5 deprecates
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
from peft import PeftModel  # noqa: E402

import peft_sltrain  # noqa: E402, F401  (registers SLTrain with PEFT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a pretrain.py run directory, or its final/ or merged/ export")
    p.add_argument("--prompt", default="", help="text to continue (default: none, start a new document)")
    p.add_argument("--num-samples", type=int, default=3, help="texts to write (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens per text (default: %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy) (default: %(default)s)"
    )
    p.add_argument(
        "--top-k", type=int, default=200, help="sample among the k most likely tokens (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=1337, help="in [0, 2**64) (default: %(default)s)")
    args = p.parse_args(argv)
    if not 0 <= args.seed < 2**64:  # (torch.manual_seed's range; past it torch says only "Overflow")
        raise ValueError(f"`--seed` must be in [0, 2**64), got {args.seed}.")
    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(args, name)}.")
    if not args.temperature >= 0 or args.temperature == float("inf"):  # also NaN
        raise ValueError(f"`--temperature` must be a finite number >= 0, got {args.temperature}.")
    return args


def find_export(path: str | Path) -> Path:
    """`path` itself if it holds an export, else the run directory's `final/`."""
    path = Path(path)
    for directory in (path, path / "final"):
        if (directory / "config.json").is_file():
            check_causal_lm(directory)
            return directory
    adapters = [d / "adapter_config.json" for d in (path, path / "final") if (d / "adapter_config.json").is_file()]
    if adapters:
        adapter = json.loads(adapters[0].read_text())
        if adapter.get("peft_type") != "SLTRAIN" or adapter.get("task_type") == "SEQ_CLS":
            raise ValueError(
                f"{adapters[0].parent} holds a {adapter.get('peft_type')} adapter of no pretrain.py run (a "
                "classifier's, from run_glue.py?): it writes no text."
            )
        raise ValueError(
            f"{path} holds an SLTrain adapter without config.json (the architecture), from a pretrain.py older than "
            "that: build the model under `init_empty_weights()` from a LlamaConfig of the run's `model_config` "
            "(run_config.json) with the tokenizer's vocabulary size, and load the adapter with "
            "`PeftModel.from_pretrained`."
        )
    if (path / "run_config.json").is_file():
        raise ValueError(
            f"{path} is a pretrain.py run that has not exported its model yet (no final/): finish it with the same "
            "command and `--resume`."
        )
    raise ValueError(f"{path} is no pretrain.py run or export: neither it nor {path / 'final'} has a config.json.")


def check_causal_lm(directory: Path) -> None:
    """A model that writes text: a classifier (run_glue.py's) would load with an untrained LM head and write noise."""
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    if architectures and not any(name.endswith("ForCausalLM") for name in architectures):
        raise ValueError(
            f"{directory} holds a {', '.join(architectures)}, no language model that writes text (pretrain.py "
            "exports a ...ForCausalLM)."
        )


def load(directory: str | Path) -> tuple[torch.nn.Module, AutoTokenizer]:
    """The model and tokenizer of an export directory, as its README.md shows, SLTrain merged into dense weights."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        config = AutoConfig.from_pretrained(directory)
        with init_empty_weights():  # nothing to initialise: every tensor comes from the adapter file
            base = AutoModelForCausalLM.from_config(config)
        model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(directory)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def streamed(export: Path) -> bool:
    """Whether the run of an export trained on a streamed `--dataset` (whose documents it joined by EOS; local text is
    tokenised as it is), by its run_config.json; False where there is none (an export copied elsewhere)."""
    try:
        return bool(json.loads((export.resolve().parent / "run_config.json").read_text()).get("dataset"))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    export = find_export(args.path)
    model, tokenizer = load(export)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    given, limit = len(prompt), model.config.max_position_embeddings
    if not prompt or streamed(export):  # a streamed dataset's documents were joined by EOS: a text starts after one
        prompt = [tokenizer.eos_token_id, *prompt]  # (and generation needs a first token)
    if len(prompt) + args.max_new_tokens > limit:
        room = limit - (len(prompt) - given)  # positions left after the EOS put in front
        raise ValueError(
            f"The prompt ({given} tokens) plus `--max-new-tokens` {args.max_new_tokens} exceed the model's {room} "
            "positions."
        )
    torch.manual_seed(args.seed)
    greedy = args.temperature == 0
    sampling = (
        {"do_sample": False} if greedy else {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    )
    samples = []
    with torch.no_grad():
        for _ in range(args.num_samples):
            ids = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            samples.append(tokenizer.decode(ids[0], skip_special_tokens=True))  # (a leading EOS is special)
            print(samples[-1], end="\n" + "-" * 40 + "\n", flush=True)
    return samples


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        raise SystemExit(f"sample.py: error: {error}") from None
