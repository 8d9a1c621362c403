"""The model card (README.md) of a `pretrain.py` run's exported model: what it is, how it did, how it was trained,
and the code that loads it. Plain string formatting (no jinja2, which pretraining does not install)."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCardData

from model_card import command_without_folders, versions, without_folders

TITLES = {"sltrain": "SLTrain", "full": "full-rank training", "lowrank": "a low-rank factorisation ((alpha / r) B A)"}
ABOUT_SLTRAIN = """\
Every attention and MLP projection computes `W = (alpha / r) * B @ A + S` (r = {rank}, alpha = {alpha}): a rank-r
product plus a sparse `S` on a fixed random support of density {sparsity}. No dense weight of those projections was
ever trained. This directory is a PEFT adapter that holds every trained tensor of the model (the embeddings, norms and
head too), with the architecture (`config.json`) and the tokenizer: no base checkpoint is needed."""
ABOUT_DENSE = """\
This directory is the whole trained model as a plain Transformers `LlamaForCausalLM`{dense_note}, with its
tokenizer."""
LOAD_SLTRAIN = """\
import peft_sltrain  # first: it registers SLTrain with PEFT (else KeyError: 'SLTRAIN')
from accelerate import init_empty_weights
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

config = AutoConfig.from_pretrained("{path}")
with init_empty_weights():  # nothing to initialise: every tensor of the model comes from the adapter file
    base = AutoModelForCausalLM.from_config(config)
model = PeftModel.from_pretrained(base, "{path}").eval()
tokenizer = AutoTokenizer.from_pretrained("{path}")
"""
LOAD_DENSE = """\
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}").eval()
tokenizer = AutoTokenizer.from_pretrained("{path}")
"""
# the prompt is tokenised as training text was: without special tokens (a hub tokenizer would add its own)
GENERATE = """\
ids = tokenizer("It is a truth universally acknowledged", add_special_tokens=False, return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)[0]))
"""
# a streamed dataset's documents each followed an EOS, so a text starts after one (as `sample.py` does)
GENERATE_STREAMED = """\
import torch

ids = tokenizer("It is a truth universally acknowledged", add_special_tokens=False, return_tensors="pt").input_ids
ids = torch.cat([torch.tensor([[tokenizer.eos_token_id]]), ids], dim=1)  # documents were joined by EOS in training
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)[0], skip_special_tokens=True))
"""


def model_name(model: str) -> str:
    """`--model` as a name: the size, or a preset file's name without its folder (a local path stays local)."""
    return Path(str(model)).stem.removeprefix("llama_")


def build(
    summary: dict,
    run_config: dict,
    command: str,
    adapter: bool,
    vocab_size: int,
    resumed: bool = False,
    repo_id: str | None = None,
) -> str:
    """README.md for `final/`: `summary` and `run_config` are what the run writes as summary.json and
    run_config.json, `adapter` whether `final/` is an SLTrain adapter rather than a plain model, `vocab_size` the
    model's (the tokenizer's; run_config's `model_config` holds the preset's), `resumed` whether `command` resumed
    the run from a checkpoint, `repo_id` the Hub repository it goes to (its loading code then names it, and absolute
    paths in the settings and the command keep their last part alone: `without_folders`)."""
    if repo_id:
        run_config = without_folders(run_config)
        command = command_without_folders(command)
    method, arch = summary["method"], run_config["model_config"]
    name = f"llama-{model_name(summary['model'])}-{method}"
    data = ModelCardData(
        model_name=name,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["peft-sltrain", "llama", "pretraining", method]
        + (["sltrain", "sparse-plus-low-rank"] if adapter else []),
        datasets=[run_config["dataset"]] if run_config.get("dataset") else None,
    )
    if adapter:
        about = ABOUT_SLTRAIN.format(**{k: run_config[k] for k in ("rank", "alpha", "sparsity")})
    else:
        notes = {"lora": " (its LoRA update merged into the frozen random init)", "relora": " (every restart merged)"}
        about = ABOUT_DENSE.format(dense_note=notes.get(method, ""))
    data_source = (
        f"`{run_config['dataset']}`"
        + (f" ({run_config['dataset_config']})" if run_config.get("dataset_config") else "")
        if run_config.get("dataset")
        else ", ".join(f"`{f}`" for f in run_config.get("train_files") or []) or "the embedded corpus (Jane Austen)"
    )
    validation = "on held-out text"
    if "val_tokens" in summary:  # (a run resumed from an older version's checkpoint may lack it)
        sequences = summary["val_tokens"] // (run_config["seq_len"] - 1)
        validation = (
            f"over {summary['val_tokens']:,} predicted tokens of held-out text: its first {sequences} sequences of "
            f"{run_config['seq_len']}"
        )
    seconds = summary.get("train_seconds")
    processes = f"{summary['processes']} processes" if summary["processes"] > 1 else "one process"
    timing = f" in {seconds:.0f} s ({processes} on {summary['device']})" if seconds is not None else ""
    load = (LOAD_SLTRAIN if adapter else LOAD_DENSE).format(path=repo_id or "path/to/this/directory")
    if repo_id:  # uploaded by `--push-to-hub`
        where = (
            f"`{repo_id}` is this repository on the Hugging Face Hub (a local directory with its files loads too). "
            f"`python scripts/sample.py DIR` (in peft-sltrain) does the same from the command line for a local copy "
            f"(`hf download {repo_id} --local-dir DIR`)."
        )
    else:
        where = (
            "`path/to/this/directory` is this directory, or its repository id on the Hugging Face Hub once uploaded "
            "(`hf upload <user>/<name> path/to/this/directory`, which uploads everything in it). "
            "`python scripts/sample.py path/to/this/directory` (in peft-sltrain; a local directory only) does the "
            "same from the command line."
        )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"A LLaMA-architecture language model ({arch['num_hidden_layers']} layers, hidden size {arch['hidden_size']}, "
        f"vocabulary {vocab_size:,}) pretrained from scratch with "
        f"**{TITLES.get(method, method)}** by `scripts/pretrain.py` of peft-sltrain (SLTrain: Han et al., NeurIPS "
        "2024, [arXiv 2406.02214](https://arxiv.org/abs/2406.02214)).",
        "",
        about,
        "",
        "## Results",
        "",
        f"- validation perplexity: **{summary['val_ppl']:.2f}** ({validation})",
        f"- trained on {summary['tokens']:,} tokens of {data_source}{timing}",
        f"- parameters: {summary['trainable_params']:,} trained of {summary['total_params']:,}; parameters + "
        f"gradients + optimizer states: {summary['training_state_bytes'] / 2**20:.1f} MiB",
        "",
        "## Training",
        "",
        "```json",
        json.dumps({k: v for k, v in run_config.items() if k != "data_sha256"}, indent=2),
        "```",
        "",
        (
            "Finished by this command, resuming from a checkpoint (the settings above held from the start)"
            if resumed
            else "Produced by this command"
        )
        + (" (local folders left out)" if repo_id else "")
        + (
            f" (on {summary['processes']} processes: `torchrun` or `accelerate launch`)"
            if summary["processes"] > 1
            else ""
        )
        + ":",
        "",
        "```bash",
        command,
        "```",
        "",
        "## How to use",
        "",
        "```python",
        load + "\n" + (GENERATE_STREAMED if run_config.get("dataset") else GENERATE) + "```",
        "",
        where + ("\nLoading needs the `peft-sltrain` package installed." if adapter else ""),
        "",
        "## Framework versions",
        "",
        *(f"- {package} {v}" for package, v in versions().items() if package != "datasets"),
        "",
    ]
    return "\n".join(lines)
