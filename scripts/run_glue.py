r"""Fine-tune a sequence classifier on a GLUE task with SLTrain, LoRA or full fine-tuning, through the HF Trainer.

    # RoBERTa-base on MRPC with SLTrain and the task preset (network needed: model, data and metric come from the Hub)
    python scripts/run_glue.py --task_name mrpc --method sltrain --output_dir runs/glue/mrpc-sltrain

    # offline: a local model directory and local CSV/JSON files (`sentence` or `sentence1`/`sentence2`, `label`)
    python scripts/run_glue.py --task_name sst2 --model_name_or_path DIR --train_file train.csv.gz \
        --validation_file validation.csv.gz --max_seq_length 64 --output_dir runs/sst2-sltrain

    # then: a merged dense model, and the adapter with its model card on the Hub
    python scripts/run_glue.py ... --merge_to runs/mrpc-merged --push_to_hub --hub_model_id me/roberta-mrpc-sltrain

    # QLoRA-style: the pretrained weights loaded in 4 bits (nf4) by bitsandbytes and frozen under the adapter
    python scripts/run_glue.py --task_name mrpc --method sltrain --quantize 4bit --output_dir runs/mrpc-sltrain-4bit

In the style of transformers' `run_glue.py` (HfArgumentParser, Trainer, TrainingArguments; the Trainer's flags work,
but `--do_predict` and `--bf16_full_eval` / `--fp16_full_eval`, refused).
Reads top to bottom: presets and arguments, Hub check, data, model, training, evaluation, export. `--method` picks
what is trained: `sltrain` (W0 + (alpha/r) B A + S on the targeted projections), `lora` (W0 + (alpha/r) B A) or
`full` (every weight); the adapters also train the classifier, which PEFT saves through `modules_to_save`. Each task
has a preset (batch size, epochs, learning rate, rank, sparsity, alpha, max length) that every flag overrides.

`--task_name` and `--output_dir` are required. An output directory that already holds a run (an adapter or model,
summary.json or `checkpoint-*` folders) is refused, so that two runs never mix: continue it with
`--resume_from_checkpoint DIR/checkpoint-N` (a checkpoint in it; the Trainer's step, optimizer and schedule carry on,
and the method, adapter settings and `--quantize` must be the checkpoint's), or replace it with
`--overwrite_output_dir` (its checkpoints and finished-run files are deleted just before training).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

# Noise from dependencies, not about this run (as in pretrain.py): bitsandbytes (imported by PEFT where installed) logs
# on CPUs with AVX512-BF16 that an optional 4-bit kernel package is missing; PEFT 0.21 reads a property Transformers 5
# deprecates
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_sltrain.cpu_kernels import installed  # noqa: E402

# the `scripts` and `glue` extras, named in one line rather than a traceback from the imports below (also for --help);
# imported as a module (by tests), an ImportError that names them
_missing = [name for name in ("datasets", "scipy", "sklearn", "jinja2") if not installed(name)]
if _missing:
    _message = f"run_glue.py needs {', '.join(_missing)}: pip install 'peft-sltrain[scripts,glue]'."
    if __name__ == "__main__":
        sys.exit(_message)
    raise ModuleNotFoundError(_message)
from datasets import DatasetDict, load_dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import peft_sltrain  # noqa: E402  (registers SLTrain with PEFT)
from peft_sltrain.layer import keep_bnb_4bit_unpacked  # noqa: E402

import model_card  # noqa: E402
from glue_tasks import STSB_RANGE, TASKS, Task, get_task, load_metric, text_columns  # noqa: E402
from pretrain import DIVERGED, peak_memory_bytes, training_state_bytes  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    batch_size: int
    epochs: int
    lr_full: float  # learning rate of `--method full`
    lr_adapter: float  # learning rate of `--method sltrain` and `--method lora`
    rank: int = 8
    sparsity: float = 0.03
    alpha: float = 16.0
    max_seq_length: int = 512


# NOT the SLTrain paper's fine-tuning table (its Table 11: per-task learning rate, delta and alpha could not be
# re-read, see ../shared/PAPER.md). What is here, and why:
# - batch size, epochs (30), max length (512), rank (8) and the full fine-tuning learning rates: GaLore's RoBERTa-base
#   GLUE setup, which the SLTrain paper says it follows (GaLore's README: MRPC, rank 4, batch 16, lr 3e-5, 30 epochs,
#   length 512; the other tasks' batch sizes and learning rates are GaLore's rank-8 table as recalled, not re-read).
# - sparsity 0.03: the paper's delta at every size below 7B.
# - adapter learning rates: the LoRA paper's RoBERTa-base GLUE values (4e-4 / 5e-4). GaLore's 1e-5 to 3e-5 are for
#   full-parameter updates; a zero-initialised adapter barely moves at those rates (on Rotten Tomatoes, SLTrain at
#   3e-5 is far below SLTrain at 1e-3; see README, "GLUE fine-tuning").
# - alpha 16 (alpha / r = 2): in the Rotten Tomatoes sweep at r = 8 and lr 1e-3, alpha 16 and 32 were within one
#   validation example of each other (82.57% / 82.67%) and alpha 8 lower (81.86%).
PRESETS: dict[str, Preset] = {
    "mnli": Preset(batch_size=32, epochs=30, lr_full=1e-5, lr_adapter=5e-4),
    "sst2": Preset(batch_size=16, epochs=30, lr_full=2e-5, lr_adapter=5e-4),
    "mrpc": Preset(batch_size=16, epochs=30, lr_full=2e-5, lr_adapter=4e-4),
    "cola": Preset(batch_size=32, epochs=30, lr_full=1e-5, lr_adapter=4e-4),
    "qnli": Preset(batch_size=16, epochs=30, lr_full=1e-5, lr_adapter=4e-4),
    "qqp": Preset(batch_size=16, epochs=30, lr_full=2e-5, lr_adapter=5e-4),
    "rte": Preset(batch_size=16, epochs=30, lr_full=2e-5, lr_adapter=5e-4),
    "stsb": Preset(batch_size=16, epochs=30, lr_full=3e-5, lr_adapter=4e-4),
}
assert set(PRESETS) == set(TASKS)
METHODS = {
    "sltrain": "frozen W0 + (alpha/r) B A + S on the targeted projections, classifier trained",
    "lora": "frozen W0 + (alpha/r) B A on the targeted projections, classifier trained",
    "full": "every weight trained",
}
QUANTIZE, HEADS = model_card.QUANTIZE, model_card.UNQUANTIZED_HEADS  # --quantize: bitsandbytes' settings

# TrainingArguments that the preset fills when they are not given on the command line, and all it fills
PRESET_TRAINING_FIELDS = {"learning_rate", "num_train_epochs", "per_device_train_batch_size"}
PRESET_FIELDS = PRESET_TRAINING_FIELDS | {"rank", "sparsity", "alpha", "max_seq_length"}
# the adapter flags each method ignores
METHOD_IGNORES = {"full": ("rank", "sparsity", "alpha", "lora_dropout", "target_modules"), "lora": ("sparsity",),
                  "sltrain": ("lora_dropout",)}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="roberta-base", metadata={"help": "Hub id or local directory of the pretrained encoder."}
    )
    method: str = field(default="sltrain", metadata={"help": f"What is trained: {', '.join(METHODS)}."})
    rank: int | None = field(default=None, metadata={"help": "Rank r of SLTrain or LoRA (default: task preset)."})
    sparsity: float | None = field(
        default=None, metadata={"help": "SLTrain's delta: fraction of each weight in S (default: task preset)."}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "B A is scaled by alpha / r, for SLTrain and LoRA (default: task preset)."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Projections SLTrain or LoRA replaces, or `all-linear` alone: every linear layer but the "
            "classifier. Default: the model type's, the same for both methods: an encoder's query and value "
            "projections (BERT/RoBERTa `query value`, DistilBERT `q_lin v_lin`, DeBERTa-v2 `query_proj "
            "value_proj`), a decoder's every attention and MLP projection (peft_sltrain.TARGET_MODULES_MAPPING; "
            "else PEFT's LoRA defaults, else `query value` where the model has them)."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input (LoRA only)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a classifier of another size (a checkpoint fine-tuned elsewhere)."}
    )
    merge_to: str | None = field(
        default=None, metadata={"help": "After training, write a merged dense model (safetensors) to this directory."}
    )
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "Load the pretrained weights quantized by bitsandbytes, `4bit` (nf4) or `8bit`, and train the "
            "adapter on that frozen base (QLoRA-style; sltrain and lora only; the classifier stays unquantized)."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model for the model card (needed with a local --model_name_or_path)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run already in `--output_dir`: its checkpoints and finished-run files are deleted "
            "before training (without this flag, such a directory is refused unless resuming from a checkpoint in it)."
        },
    )


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={"help": f"The GLUE task: {', '.join(TASKS)}."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training data (.csv, .json, .jsonl, optionally .gz) instead of the Hub."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (same format)."})
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI only: local mismatched validation data."}
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Longer inputs are truncated (default: task preset); batches pad dynamically."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "Data set id for the model card (default: nyu-mll/glue, or the local train file's name without "
            "extensions and a trailing `_train`)."
        },
    )


REFUSED_FLAGS = ("do_predict", "bf16_full_eval", "fp16_full_eval")  # Trainer flags this script refuses (see below)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the module docstring as it is written, then every flag with its default (as HfArgumentParser's), but
    for defaults of None (a required flag's, or one that is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line, fill what it leaves unset from the task's preset, and check everything."""
    # no abbreviations: `--hub_tok SECRET` would be `--hub_token`, under a name that `redacted_command` might not know
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        allow_abbrev=False,
        usage="%(prog)s --task_name TASK --output_dir DIR [--method {sltrain,lora,full}] [options]",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    for action in parser._actions:  # not given: the preset decides, and --help says so rather than "(default: None)"
        if action.dest in PRESET_FIELDS:
            action.default = argparse.SUPPRESS
            if action.dest in PRESET_TRAINING_FIELDS:  # Transformers' help text, which names its own default
                action.help = f"{action.help.split(' (default')[0].rstrip('. ')} (default: task preset)."
        if action.dest in ("task_name", "output_dir"):
            action.help = f"Required. {action.help}"
        if action.dest in REFUSED_FLAGS:  # still parsed, so that they are refused by name, not as unknown
            action.help = argparse.SUPPRESS
    namespace = vars(parser.parse_args(argv))
    task = get_task(namespace["task_name"])
    if not namespace["output_dir"]:  # TrainingArguments would fall back to ./trainer_output
        raise ValueError("`--output_dir` is required: the adapter (or model), its card and summary.json go there.")
    if namespace["method"] not in METHODS:
        raise ValueError(f"Unknown `--method` {namespace['method']!r}; choose one of {list(METHODS)}.")
    unused = METHOD_IGNORES[namespace["method"]]  # given, it would be recorded in the card but change nothing
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    passed = [f"--{key}" for key in unused if f"--{key}" in flags]
    if passed:
        raise ValueError(f"`--method {namespace['method']}` does not use {', '.join(passed)}.")
    preset = PRESETS[task.name]
    from_preset = {
        "learning_rate": preset.lr_full if namespace["method"] == "full" else preset.lr_adapter,
        "num_train_epochs": preset.epochs,
        "per_device_train_batch_size": preset.batch_size,
        "rank": preset.rank,
        "sparsity": preset.sparsity,
        "alpha": preset.alpha,
        "max_seq_length": preset.max_seq_length,
    }
    for key, value in from_preset.items():
        if namespace.get(key) is None:
            namespace[key] = value
    for flag in ("bf16_full_eval", "fp16_full_eval"):  # the Trainer casts the model itself for them, in place
        if namespace[flag]:  # (refused here, before TrainingArguments' own device checks could refuse it otherwise)
            raise ValueError(
                f"`--{flag}` casts the model in place at the final evaluation, so the adapter (and a merged export, "
                "W0 included) would be saved in half precision; evaluate under autocast with `--bf16` / `--fp16`."
            )
    if namespace["fp16"] and not has_accelerator():  # (accelerate would turn it off: fp32, with no word of it)
        raise ValueError(
            "`--fp16` needs a GPU (or another accelerator); on a machine with only a CPU it would train in fp32. Use "
            "`--bf16`, which runs on CPUs, or neither."
        )
    if namespace["bf16"] and not has_accelerator():  # only a CPU: bf16 autocast there, which
        namespace["use_cpu"] = True  # TrainingArguments refuses unless told `--use_cpu` ("doesn't support bf16/gpu")
    model_args, data_args, training_args = (
        cls(**{f.name: namespace[f.name] for f in fields(cls) if f.init and f.name in namespace})
        for cls in (ModelArguments, DataArguments, TrainingArguments)
    )
    check_args(model_args, data_args, training_args)
    return model_args, data_args, training_args


def has_accelerator() -> bool:
    """Whether the machine has a device besides the CPU (`torch.accelerator` from torch 2.6; before it, by kind)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def check_args(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """A clear `ValueError` for every out-of-range setting, before anything is loaded."""
    positive = {
        "--learning_rate": training_args.learning_rate,
        "--num_train_epochs": training_args.num_train_epochs,
        "--per_device_train_batch_size": training_args.per_device_train_batch_size,
        "--per_device_eval_batch_size": training_args.per_device_eval_batch_size,
        "--max_seq_length": data_args.max_seq_length,
        "--max_train_samples": data_args.max_train_samples,
        "--max_eval_samples": data_args.max_eval_samples,
    }
    if model_args.method != "full":
        positive.update({"--rank": model_args.rank, "--alpha": model_args.alpha})
    numbers = {**positive, "--weight_decay": training_args.weight_decay, "--sparsity": model_args.sparsity,
               "--lora_dropout": model_args.lora_dropout, "--warmup_steps": training_args.warmup_steps}  # fmt: skip
    for flag, value in numbers.items():  # inf passes `> 0`, and NaN fails every comparison
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"`{flag}` must be a finite number, got {value}.")
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise ValueError(f"`{flag}` must be positive, got {value}.")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"`--max_steps` must be positive, or -1 (the default) to train `--num_train_epochs`; got "
            f"{training_args.max_steps}."
        )
    if training_args.gradient_accumulation_steps < 1:
        raise ValueError(f"`--gradient_accumulation_steps` must be at least 1, got "
                         f"{training_args.gradient_accumulation_steps}.")  # fmt: skip
    if training_args.weight_decay < 0:
        raise ValueError(f"`--weight_decay` must be 0 or more, got {training_args.weight_decay}.")
    if not 0 <= training_args.seed < 2**32:
        raise ValueError(f"`--seed` must be in [0, 2**32), got {training_args.seed}.")
    if model_args.method == "sltrain" and not 0 < model_args.sparsity < 1:
        raise ValueError(f"`--sparsity` must be in (0, 1), got {model_args.sparsity}.")
    if not 0 <= model_args.lora_dropout < 1:
        raise ValueError(f"`--lora_dropout` must be in [0, 1), got {model_args.lora_dropout}.")
    if model_args.quantize is not None:
        if model_args.quantize not in QUANTIZE:
            raise ValueError(f"`--quantize` must be one of {sorted(QUANTIZE)}, got {model_args.quantize!r}.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("`--quantize` needs bitsandbytes: pip install 'peft-sltrain[quantized]'.") from None
        if model_args.method == "full":
            raise ValueError("`--quantize` is for adapters (`--method sltrain` or `lora`): a quantized weight cannot "
                             "be trained, and `--method full` trains every weight.")  # fmt: skip
        if model_args.merge_to:
            raise ValueError(
                "`--merge_to` with `--quantize`: merging into a quantized base quantizes the sum again, so the merged "
                "model would not predict what the adapter does; keep the adapter, or train without `--quantize`."
            )
    if "all-linear" in (model_args.target_modules or ()) and len(model_args.target_modules) > 1:
        raise ValueError(f"`--target_modules all-linear` stands alone, got {list(model_args.target_modules)}.")
    for flag, path in (("--output_dir", training_args.output_dir), ("--merge_to", model_args.merge_to)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"`{flag}` {path!r} is a file, not a directory.")
    base = Path(model_args.model_name_or_path)
    for flag, path in (("--output_dir", training_args.output_dir), ("--merge_to", model_args.merge_to)):
        if path is not None and base.is_dir() and Path(path).resolve() in (base.resolve(), *base.resolve().parents):
            raise ValueError(
                f"`{flag}` {path!r} holds the base model (`--model_name_or_path` {model_args.model_name_or_path!r}): "
                "the run would write over it, or delete it; give another directory."
            )
    if training_args.do_predict:  # (`--do_train` and `--do_eval` are implied: every run trains, then evaluates)
        raise ValueError(
            "`--do_predict` is not supported: this script trains and then evaluates on the validation split(s); "
            "GLUE's test labels are hidden, so predict with the saved adapter or `--merge_to` model instead."
        )
    check_output_dir(
        Path(training_args.output_dir), training_args.resume_from_checkpoint, model_args.overwrite_output_dir
    )
    if training_args.resume_from_checkpoint is not None:
        check_resume_config(Path(training_args.resume_from_checkpoint), model_args, training_args)
    if model_args.merge_to:  # Transformers' from_pretrained would apply an adapter found there on top of the merge
        merge_to = Path(model_args.merge_to)
        if merge_to.resolve() == Path(training_args.output_dir).resolve():
            raise ValueError(
                f"`--merge_to` {model_args.merge_to!r} is `--output_dir`, which gets the adapter; give another "
                "directory."
            )
        if (merge_to / "adapter_config.json").exists():
            raise ValueError(
                f"`--merge_to` {model_args.merge_to!r} holds an adapter (adapter_config.json), which Transformers "
                "would load on top of the merged model; give another directory."
            )
        held = run_contents(merge_to)
        if held:  # never written over (not even with --overwrite_output_dir, which is about --output_dir)
            names = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
            raise ValueError(
                f"`--merge_to` {model_args.merge_to!r} already holds a model or run ({names}); give a new or empty "
                "directory (delete that one first to replace it)."
            )
    if bool(data_args.train_file) != bool(data_args.validation_file):
        raise ValueError("Give both `--train_file` and `--validation_file` (local data), or neither (the Hub's GLUE).")
    task = get_task(data_args.task_name)
    best = training_args.metric_for_best_model
    if best is not None and best.removeprefix("eval_") not in ("loss", *task.metrics):
        # (the Trainer would look it up at the first evaluation, after training up to it, and raise a KeyError)
        raise ValueError(
            f"`--metric_for_best_model` {best!r} is not among what `--task_name {task.name}` evaluates: loss, "
            f"{', '.join(task.metrics)}."
        )
    if task.is_regression and training_args.label_smoothing_factor > 0:
        raise ValueError(
            f"`--label_smoothing_factor` {training_args.label_smoothing_factor} smooths class labels, and "
            f"`--task_name {task.name}` is a regression (scores, not classes)."
        )
    if data_args.validation_mismatched_file and data_args.task_name != "mnli":
        raise ValueError(f"`--validation_mismatched_file` is for MNLI only, not `--task_name {data_args.task_name}`.")
    if data_args.validation_mismatched_file and not data_args.train_file:
        raise ValueError(
            "`--validation_mismatched_file` goes with local data (`--train_file` and `--validation_file`); without "
            "them MNLI comes from the Hub, with its own mismatched split."
        )
    for flag in ("train_file", "validation_file", "validation_mismatched_file"):
        path = getattr(data_args, flag)
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"`--{flag}` {path!r} does not exist.")
            file_format(path)  # raises on an unknown extension
    if training_args.push_to_hub and Path(model_args.model_name_or_path).is_dir() and not model_args.base_model_id:
        raise ValueError(
            f"`--push_to_hub` with a local `--model_name_or_path` ({model_args.model_name_or_path}): give "
            "`--base_model_id` (its Hub id), which the model card records as `base_model`."
        )


# These files (a run's, or a model's: a full run saves one), or a `checkpoint-N` folder, mean an output directory
# already holds a run; `--overwrite_output_dir` deletes them, so that two runs never mix.
RUN_FILES = ("summary.json", "adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
             "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")  # fmt: skip
WEIGHT_SHARDS = r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)"


def run_contents(out: Path) -> list[Path]:
    """What a run left in `out`: its checkpoints and finished-run files (empty when `out` holds no run)."""
    if not out.is_dir():
        return []
    checkpoints = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    shards = [p for p in out.iterdir() if p.is_file() and re.fullmatch(WEIGHT_SHARDS, p.name)]
    return sorted(checkpoints) + [out / name for name in RUN_FILES if (out / name).is_file()] + sorted(shards)


def check_output_dir(out: Path, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; a checkpoint to resume from must be a Trainer checkpoint."""
    if resume_from_checkpoint is not None:
        checkpoint = Path(resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a directory.")
        if not (checkpoint / "trainer_state.json").is_file():
            raise ValueError(
                f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a Trainer checkpoint (no "
                "trainer_state.json); give a `checkpoint-N` folder that a run saved (`--save_strategy`)."
            )
        check_checkpoint_files(checkpoint)
        if overwrite:
            raise ValueError(
                "`--overwrite_output_dir` deletes the checkpoints of the run in `--output_dir`: it cannot be combined "
                "with `--resume_from_checkpoint`."
            )
        if out.resolve() in checkpoint.resolve().parents:
            return  # continuing the run in `out`
    found = run_contents(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"`--output_dir` {str(out)!r} already holds a run ({names}). Continue it with "
            f"`--resume_from_checkpoint {out / 'checkpoint-N'}`, replace it with `--overwrite_output_dir`, or give "
            "another `--output_dir`."
        )


def check_checkpoint_files(checkpoint: Path) -> None:
    """`ValueError` naming a checkpoint's JSON or safetensors file that cannot be read (a damaged disk or a partial
    copy), before the Trainer fails on it deep inside."""
    from safetensors import safe_open

    for path in sorted(checkpoint.glob("*.json")) + sorted(checkpoint.glob("*.safetensors")):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with safe_open(path, framework="pt"):  # checks the header against the file's length
                    pass
        except Exception as error:  # JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError
            raise ValueError(
                f"`--resume_from_checkpoint` {str(checkpoint)!r} is damaged: {path.name} cannot be read "
                f"({one_line(error)}); resume from an earlier `checkpoint-N`."
            ) from None


# Adapter config fields that do not come from the arguments: paths, versions, and the modules PEFT and `main` add to
# `modules_to_save` (the head, and base weights the checkpoint lacks).
NOT_COMPARED = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "modules_to_save",
}
CONFIG_FLAGS = {"r": "--rank", "alpha": "--alpha", "lora_alpha": "--alpha", "sparsity": "--sparsity",
                "target_modules": "--target_modules", "lora_dropout": "--lora_dropout"}  # fmt: skip


# What a checkpoint records of the base model's loading, beside the adapter (whose config does not hold it)
BASE_SETTINGS_FILE = "run_glue_base.json"


class RecordBaseSettings(TrainerCallback):
    """Writes into each checkpoint what a resumed run must repeat and the adapter's config does not hold: the base
    (`--model_name_or_path`, `--quantize`) and the optimizer's settings, which the Trainer restores from the checkpoint
    whatever the flags say (a new `--learning_rate` would be recorded but not used)."""

    def __init__(self, model_args: ModelArguments, training_args: TrainingArguments, data: dict):
        self.settings = {**base_settings(model_args, training_args), **data}  # data: `train_data_settings`

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / BASE_SETTINGS_FILE).write_text(json.dumps(self.settings))


def base_settings(model_args: ModelArguments, training_args: TrainingArguments) -> dict:
    """What `RecordBaseSettings` writes into a checkpoint (a local base by its resolved path)."""
    base = model_args.model_name_or_path
    return {"quantize": model_args.quantize,
            "model_name_or_path": str(Path(base).resolve()) if Path(base).is_dir() else base,
            **{key: getattr(training_args, key) for key in (*OPTIMIZER_SETTINGS, *SCHEDULE_SETTINGS)}}  # fmt: skip


def train_data_settings(data_args: DataArguments, train_rows: int) -> dict:
    """What a checkpoint records of its training data, which sets the steps per epoch and the batches as much as the
    schedule's flags: the number of rows (after `--max_train_samples`) and the sha256 of `--train_file` (None for
    the Hub's GLUE)."""
    digest = None
    if data_args.train_file:
        digest = hashlib.sha256()
        with open(data_args.train_file, "rb") as file:
            for chunk in iter(lambda: file.read(2**20), b""):
                digest.update(chunk)
        digest = digest.hexdigest()
    return {"train_rows": train_rows, "train_file_sha256": digest}


# what the Trainer restores from a checkpoint's optimizer state whatever the flags say
OPTIMIZER_SETTINGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim")
# what sets the batches and the learning-rate schedule: changed on a resume, the run would be a mixture of two
SCHEDULE_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                     "seed", "data_seed", "lr_scheduler_type", "warmup_steps", "world_size")  # fmt: skip
SETTING_FLAGS = {"quantize": "--quantize", "model_name_or_path": "--model_name_or_path",
                 **{k: f"--{k}" for k in (*OPTIMIZER_SETTINGS, *SCHEDULE_SETTINGS) if k != "world_size"}}  # fmt: skip


DATA_SETTINGS = ("train_rows", "train_file_sha256")  # `train_data_settings`


def shown_setting(key: str, value) -> str:
    """A recorded setting as a command gives it: its flag, the number of processes or training rows, the data."""
    if key == "world_size":
        return f"{value} process{'es' if value != 1 else ''}"
    if key == "train_rows":
        return f"{value} training rows (`--max_train_samples`)"
    if key == "train_file_sha256":
        return f"a `--train_file` of sha256 {value[:12]}..." if value else "the Hub's GLUE training split"
    return f"`{SETTING_FLAGS[key]} {getattr(value, 'value', value)}`"  # (an enum's as typed: `--optim adafactor`)


def check_resume_config(checkpoint: Path, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Refuse to resume a checkpoint trained with another method, adapter config, base or optimizer settings than the
    arguments give."""

    def comparable(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value  # PEFT saves sets as lists

    def flag(key: str) -> str:
        return f" (`{CONFIG_FLAGS[key]}`)" if key in CONFIG_FLAGS else ""

    saved_file = checkpoint / "adapter_config.json"
    if not saved_file.is_file() and not (checkpoint / "config.json").is_file():
        return  # neither an adapter's nor a full model's checkpoint: the Trainer says what is missing
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
    current = adapter_config(model_args)
    saved_method = saved["peft_type"].lower() if saved is not None else "full"  # a full checkpoint has config.json
    if saved_method != model_args.method:
        differ = [f"`--method`: checkpoint {saved_method!r}, now {model_args.method!r}"]
    elif saved is None:  # a full model's checkpoint, resumed as one: no adapter config to compare
        differ = []
    else:
        current = current.to_dict()
        keys = (saved.keys() & current.keys()) - NOT_COMPARED
        if current["target_modules"] is None:  # the model type's defaults: `main` compares again once resolved
            keys.discard("target_modules")
            keys.discard("exclude_modules")  # (set by "all-linear": named then, beside the targets)
        if current["target_modules"] == "all-linear":  # saved as what it expanded to; not comparable without the model
            keys.discard("target_modules")
            keys.discard("exclude_modules")  # what "all-linear" left out (narrow or unreplaceable layers), by name
        differ = [
            f"{key}{flag(key)}: checkpoint {comparable(saved[key])!r}, now {comparable(current[key])!r}"
            for key in sorted(keys)
            if comparable(saved[key]) != comparable(current[key])
        ]
    if differ:
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} was trained with other settings ({'; '.join(differ)}); "
            "resume with the same ones, or start a new run."
        )
    check_resumed_base_settings(checkpoint, base_settings(model_args, training_args))


def check_resumed_base_settings(checkpoint: Path, now: dict) -> None:
    """Refuse another base, optimizer, schedule or training-data setting than the checkpoint's `RecordBaseSettings`
    file records (none in an older checkpoint, fewer keys in some: not checked), of those `now` gives."""
    base_file = checkpoint / BASE_SETTINGS_FILE
    recorded = json.loads(base_file.read_text()) if base_file.is_file() else {}
    differ = [key for key in (*SETTING_FLAGS, "world_size", *DATA_SETTINGS)
              if key in recorded and key in now and recorded[key] != now[key]]  # fmt: skip
    if "num_train_epochs" in differ and recorded.get("max_steps", -1) > 0 and now["max_steps"] > 0:
        differ.remove("num_train_epochs")  # `--max_steps` sets the schedule; the epochs are not read
    if differ:
        given = ", ".join(shown_setting(k, recorded[k]) for k in differ)
        now_given = ", ".join(shown_setting(k, now[k]) for k in differ)
        restored = set(differ) & set(OPTIMIZER_SETTINGS)
        why = " (the Trainer would restore the checkpoint's optimizer settings)" if restored else ""
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} was trained with {given}, and this run gives "
            f"{now_given}; resume with the same{why}, or start a new run."
        )


def best_model(state, training_args: TrainingArguments) -> dict | None:
    """With `--load_best_model_at_end`, the checkpoint whose weights the run ends with and exports (the Trainer's
    best by `--metric_for_best_model`), else None."""
    if not training_args.load_best_model_at_end or state.best_model_checkpoint is None:
        return None
    checkpoint = Path(state.best_model_checkpoint).name
    return {"checkpoint": checkpoint, "step": int(checkpoint.rsplit("-", 1)[-1]),
            "metric": training_args.metric_for_best_model, "value": state.best_metric}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------- data
def file_format(path: str) -> str:
    """The `datasets` builder of a local data file: csv or json (also .jsonl, and gzip-compressed)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    suffix = suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes or [""])[-1]
    formats = {".csv": "csv", ".json": "json", ".jsonl": "json"}
    if suffix not in formats:
        raise ValueError(f"Data file {path!r} must be .csv, .json or .jsonl (optionally .gz), got {suffix!r}.")
    return formats[suffix]


def load_raw_data(task: Task, data_args: DataArguments, cache_dir: str | None) -> DatasetDict:
    """The train and validation split(s): local files when given, else the Hub's GLUE."""
    if not data_args.train_file:
        try:
            raw = load_dataset("nyu-mll/glue", task.name, cache_dir=cache_dir)
        except OSError as error:  # ConnectionError included: offline, or the Hub unreachable
            raise model_card.HubError(
                f"Cannot load nyu-mll/glue ({task.name}) from the Hub ({one_line(error)}); offline, give local data "
                "with `--train_file` and `--validation_file`."
            ) from None
        return DatasetDict({split: raw[split] for split in ("train", *task.validation_splits)})
    files = {"train": ("train_file", data_args.train_file)}
    files[task.validation_splits[0]] = ("validation_file", data_args.validation_file)
    if data_args.validation_mismatched_file:
        files["validation_mismatched"] = ("validation_mismatched_file", data_args.validation_mismatched_file)
    # one file at a time: loaded together, files whose columns or label types differ fail deep in `datasets`
    return DatasetDict({split: load_data_file(flag, path, cache_dir) for split, (flag, path) in files.items()})


def load_data_file(flag: str, path: str, cache_dir: str | None):
    """One local data file as a `Dataset`; an empty or malformed one is a clear error naming `--flag` and the path."""
    builder = file_format(path)
    try:
        return load_dataset(builder, data_files={"rows": path}, cache_dir=cache_dir)["rows"]
    except Exception as error:  # `datasets` fails deep inside, often wrapped or without a message
        cause = error.__cause__ or error  # DatasetGenerationError wraps the parser's error
        # an empty .jsonl stops the json builder's iteration; a header-only .csv leaves its split without data
        empty = isinstance(cause, StopIteration) or "corresponds to no data" in str(cause)
        reason = "no rows" if empty else one_line(cause)
        raise ValueError(f"`--{flag}` {path!r} cannot be read as {builder.upper()}: {reason}.") from None


def label_ids(task: Task, labels: list, where: str) -> list:
    """Labels as the model needs them (class ids, or STS-B scores), checked against the task's range."""
    if task.is_regression:
        low, high = STSB_RANGE
        bad = [x for x in labels if isinstance(x, (str, bool)) or x is None or not low <= x <= high]
        if bad:
            raise ValueError(f"stsb labels must be scores in [{low}, {high}]; {where} has {bad[:5]}.")
        return [float(x) for x in labels]
    missing = [row for row, x in enumerate(labels) if x is None or (isinstance(x, float) and math.isnan(x))]
    if missing:  # (pandas reads a CSV column with an empty cell as floats, NaN there)
        raise ValueError(f"{where} has rows without a label: rows {missing[:5]} (counted from 0, after the header).")
    labels = [int(x) if isinstance(x, float) and x.is_integer() else x for x in labels]  # 1.0 from such a column
    names = dict(task.label2id)
    names.update({str(i): i for i in range(task.num_labels)})  # ids written as text ("0" in a JSON file)
    ids = [names.get(x.strip(), x) if isinstance(x, str) else x for x in labels]  # class names ("entailment") too
    bad = [x for x in ids if isinstance(x, (str, bool, float)) or x is None or not 0 <= x < task.num_labels]
    if bad:
        raise ValueError(
            f"{task.name} labels must be class ids in [0, {task.num_labels - 1}] or the names {list(task.labels)}; "
            f"{where} has {bad[:5]}."
        )
    return ids


def prepare_split(dataset, task: Task, tokenizer, max_seq_length: int, where: str, limit: int | None):
    """Tokenized rows with `labels`, everything else dropped; bad columns or labels fail here, before training."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{where} holds no rows.")
    columns = text_columns(task, dataset.column_names, where)
    if "label" not in dataset.column_names:
        raise ValueError(f"{task.name} needs a `label` column in {where}; found {dataset.column_names}.")
    labels = label_ids(task, dataset["label"], where)

    def tokenize(batch):
        texts = [[str(t) if t is not None else "" for t in batch[c]] for c in columns]
        return tokenizer(*texts, truncation=True, max_length=max_seq_length)

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {where}")
    return tokenized.add_column("labels", labels)


# ------------------------------------------------------------------------------------------------------------ model
def default_target_modules(model, model_name_or_path: str) -> list[str]:
    """`--target_modules` left unset: the same for LoRA as for SLTrain, so that they compare like for like. The
    library's defaults for the model type (encoders: the query and value projections; decoders: every attention and
    MLP projection), else PEFT's LoRA defaults, else `query` and `value` where the model has modules of those names
    (the BERT-like ALBERT, Longformer...)."""
    model_type = model.config.model_type
    for mapping in (peft_sltrain.TARGET_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
        if model_type in mapping:
            return list(mapping[model_type])
    if {"query", "value"} <= {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}:
        return ["query", "value"]
    raise ValueError(
        f"`--target_modules` has no default for model type {model_type!r} (`--model_name_or_path` "
        f"{model_name_or_path!r}), whose layers have no `query` and `value`; name the projections to adapt (e.g. "
        "`--target_modules q_proj v_proj`), or give `--target_modules all-linear`."
    )


def adapter_config(model_args: ModelArguments):
    """The PEFT config of `--method` (None for full fine-tuning)."""
    targets = model_args.target_modules and list(model_args.target_modules)  # None: the model type's defaults
    targets = "all-linear" if targets == ["all-linear"] else targets  # PEFT's shorthand is a string, not a name
    common = dict(r=model_args.rank, target_modules=targets, task_type="SEQ_CLS")
    if model_args.method == "sltrain":
        return peft_sltrain.SLTrainConfig(sparsity=model_args.sparsity, alpha=model_args.alpha, **common)
    if model_args.method == "lora":
        return LoraConfig(lora_alpha=model_args.alpha, lora_dropout=model_args.lora_dropout, **common)
    return None


def max_positions(model) -> int | None:
    """The longest input `model`'s position embeddings take (None: it has none, as `max_position_embeddings` or as
    DeBERTa's relative positions, `position_biased_input=False`, which take any length)."""
    if getattr(model.config, "position_biased_input", True) is False:
        return None
    limit = getattr(model.config, "max_position_embeddings", None)
    embeddings = getattr(model.base_model, "embeddings", None)
    if limit is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        limit -= embeddings.padding_idx + 1  # RoBERTa family: positions count from pad_token_id + 1 (514 -> 512)
    return limit


def fresh_keys(loading_info: dict) -> set[str]:
    """The weights the checkpoint did not give: missing, or of another shape (`--ignore_mismatched_sizes`)."""
    return set(loading_info["missing_keys"]) | {key for key, *_ in loading_info["mismatched_keys"]}


def newly_initialised_modules(model, loading_info: dict) -> list[str]:
    """Modules with weights the checkpoint lacks (randomly initialised), other than the head that PEFT saves anyway.

    Frozen and left out of the adapter, such a module (BERT saved without its pooler, say) would be initialised anew,
    differently, wherever the adapter is loaded: `main` adds these to the adapter's `modules_to_save`.
    """
    parameters = dict(model.named_parameters())
    keys = fresh_keys(loading_info)
    heads = peft_sltrain.config.HEADS_PEFT_ADDS["SEQ_CLS"]
    modules = set()
    for key in keys & parameters.keys():
        module = key.rpartition(".")[0]
        if not module:
            raise ValueError(
                f"`--model_name_or_path` lacks {key!r}, a parameter of no submodule, which an adapter cannot save."
            )
        parts = module.split(".")
        if not any(".".join(parts[:i]).endswith(head) for i in range(1, len(parts) + 1) for head in heads):
            modules.add(module)  # (PEFT matches `modules_to_save` by suffix, the head at any depth)
    return sorted(modules)


@torch.no_grad()
def predict_logits(model, dataset, collator, batch_size: int) -> torch.Tensor:
    """Logits of `model` on `dataset`, in order and on the CPU: what the merged export is checked against."""
    model.eval()
    device = next(model.parameters()).device  # where the Trainer left it; the collator's batches are on the CPU
    rows = [dataset[i] for i in range(len(dataset))]
    outputs = []
    for start in range(0, len(rows), batch_size):
        batch = collator([{k: v for k, v in row.items() if k != "labels"} for row in rows[start : start + batch_size]])
        outputs.append(model(**batch.to(device)).logits.float().cpu())
    return torch.cat(outputs)  # (N, num_labels)


def resumed_from(checkpoint: str | None) -> dict | None:
    """The checkpoint a resumed run continued, and its step: the summary's train time and loss cover what followed."""
    if checkpoint is None:
        return None
    return {
        "checkpoint": checkpoint,
        "step": json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"],
    }


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def card_base_model(name_or_path: str) -> str:
    """What the model card names as the base: a Hub id as given, a local directory as an absolute path, so that the
    card's loading code works from any working directory (a card for the Hub gets `--base_model_id` instead)."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def card_dataset_id(data_args: DataArguments) -> str:
    """What the model card names as the data set: `--dataset_id`, the Hub's GLUE, or the local train file's name."""
    if data_args.dataset_id:
        return data_args.dataset_id
    if not data_args.train_file:
        return "nyu-mll/glue"
    path = Path(data_args.train_file).resolve()  # a bare train.csv.gz: named after the directory it is in
    # rt_train -> rt, train -> (its directory's name); pretrain, constrain: kept whole
    return re.sub(r"(?:^|[-_.])train$", "", path.name.split(".")[0]) or path.parent.name or "local"


def redacted_command(argv: list[str], secrets: Sequence[str | None] = ()) -> str:
    """The command line that produced this run, for summary.json and the model card (both uploaded), with the Hub
    token hidden: the value of `--hub_token` in any spelling argparse could take for it (`--hub-token`, `--hub_tok`,
    `--hub_token=...`), and each of `secrets` (the token in use) wherever it appears."""
    secrets = [s for s in secrets if s]
    args, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        # `--hub_token` or a prefix argparse could expand to it: down to `--hub_t`, where the other `--hub_*` part
        abbreviation = len(name) >= len("hub_t") and "hub_token".startswith(name)
        token_flag = arg.startswith("--") and (abbreviation or name.startswith("hub_tok"))
        if hide_next:
            arg, hide_next = "***", False
        elif token_flag:
            arg, hide_next = (f"{flag}=***", False) if eq else (arg, True)
        for secret in secrets:
            arg = arg.replace(secret, "***")
        args.append(arg)
    return shlex.join(["python", "scripts/run_glue.py", *args])


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, training_args = parse_args(argv)
    task = get_task(data_args.task_name)
    out = Path(training_args.output_dir)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we upload ourselves, after checking
    training_args.dataloader_pin_memory &= torch.cuda.is_available()  # pinning is for GPU transfers
    hub = None
    if push:  # fail now, not after hours of training
        hub = model_card.check_hub_access(
            training_args.hub_token, training_args.hub_model_id, out.name, private=training_args.hub_private_repo
        )
        print(f"Hub: logged in as {hub.user}; will upload to {hub.repo_id}")

    # ------------------------------------------------------------------------------------------------------ data
    raw = load_raw_data(task, data_args, model_args.cache_dir)
    if model_card.no_such_folder(model_args.model_name_or_path):
        raise ValueError(
            f"`--model_name_or_path` {model_args.model_name_or_path!r}: no such folder (nor a Hub id, 'name' or "
            "'namespace/name')."
        )
    try:  # the first look at the model: a wrong name, or no Hub, shows here
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    except OSError as error:
        raise model_card.HubError(
            f"Cannot load `--model_name_or_path` {model_args.model_name_or_path!r} ({one_line(error)}); offline, give "
            "a local model directory."
        ) from None
    except ValueError as error:  # e.g. a directory with no tokenizer files: Transformers blames sentencepiece
        raise ValueError(
            f"`--model_name_or_path` {model_args.model_name_or_path!r}: no tokenizer loads from it "
            f"({one_line(error)}); give a directory holding a model and its tokenizer (of a pretrain.py run, its "
            "`merged/` export)."
        ) from None
    if len(tokenizer) <= len(tokenizer.all_special_ids):  # Transformers 5 builds an empty one where none is saved
        raise ValueError(
            f"`--model_name_or_path` {model_args.model_name_or_path!r} holds no tokenizer: the one loaded knows only "
            f"its {len(tokenizer)} special tokens and would drop every word; save the model's tokenizer beside it."
        )
    max_length = tokenizer.model_max_length
    if max_length < 1e9 and data_args.max_seq_length > max_length:
        raise ValueError(
            f"`--max_seq_length` {data_args.max_seq_length} exceeds the tokenizer's model_max_length {max_length}; "
            "pass a smaller `--max_seq_length`."
        )
    sources = {"train": data_args.train_file, "validation_mismatched": data_args.validation_mismatched_file}
    splits = {}
    for split in raw:
        where = f"{split} ({sources.get(split, data_args.validation_file) or 'nyu-mll/glue ' + task.name})"
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        splits[split] = prepare_split(raw[split], task, tokenizer, data_args.max_seq_length, where, limit)
    eval_splits = [s for s in task.validation_splits if s in splits]
    train_data = train_data_settings(data_args, len(splits["train"]))
    if training_args.resume_from_checkpoint is not None:  # (the other settings were checked before loading)
        check_resumed_base_settings(Path(training_args.resume_from_checkpoint), train_data)
    cut = data_args.max_eval_samples
    eval_subset = cut is not None and any(len(raw[s]) > cut for s in eval_splits)  # metrics of the first rows only
    metric, metric_source = load_metric(task.name)

    # ----------------------------------------------------------------------------------------------------- model
    set_seed(training_args.seed)
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=task.num_labels,
        finetuning_task=task.name,
        cache_dir=model_args.cache_dir,
    )
    saved_labels = []  # the checkpoint's label names, in its order (checked once we know whether its head loads)
    if task.is_regression:
        config.problem_type = "regression"
    else:
        saved_labels = [str(config.id2label[i]).lower() for i in sorted(config.id2label)] if config.id2label else []
        config.id2label, config.label2id = task.id2label, task.label2id

    def load(skip_quantizing: list[str]):
        quantization = None
        if model_args.quantize is not None:
            from transformers import BitsAndBytesConfig

            compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
            settings = {**QUANTIZE[model_args.quantize], "llm_int8_skip_modules": skip_quantizing}  # trained ones
            quantization = BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=compute)
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path,
                config=copy.deepcopy(config),  # loading quantized records its quantization in the config
                cache_dir=model_args.cache_dir,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                output_loading_info=True,
                quantization_config=quantization,
            )
        except OSError as error:  # its config and tokenizer loaded: no weights there (or none reachable)
            where = Path(model_args.model_name_or_path)
            adapter = (where / "adapter_config.json").is_file()
            hint = (
                "it holds an adapter (adapter_config.json), not a base model: fine-tune its merged model instead "
                "(`pretrain.py --merge` writes one to merged/; PEFT's `merge_and_unload()` makes one)"
                if adapter
                else "give a directory with the model's weights (model.safetensors), or a Hub id"
            )
            raise ValueError(
                f"Cannot load the weights of `--model_name_or_path` {model_args.model_name_or_path!r} "
                f"({one_line(error)}); {hint}."
            ) from None

    unquantized = HEADS  # with --quantize: the modules loaded unquantized (recorded, so the model card loads them so)
    model, loading_info = load(unquantized)
    if model_args.quantize is not None:
        # weights the checkpoint lacks are trained (see `newly_initialised_modules`), so their layers must not be
        # bitsandbytes': known only once loaded (a BERT saved without its pooler, BART's `classification_head`)
        import bitsandbytes as bnb

        fresh = newly_initialised_modules(model, loading_info)
        bnb_layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        if any(isinstance(m, bnb_layers) for name in fresh for m in model.get_submodule(name).modules()):
            unquantized = HEADS + fresh
            model, loading_info = load(unquantized)
        keep_bnb_4bit_unpacked(model)  # bitsandbytes' CPU repacking breaks training after an evaluation
    glue_order = [name.lower() for name in task.labels]
    head_loaded = not any(key.split(".")[0] in HEADS for key in fresh_keys(loading_info))
    if not task.is_regression and head_loaded and sorted(saved_labels) == sorted(glue_order) != saved_labels:
        raise ValueError(
            f"`--model_name_or_path` {model_args.model_name_or_path!r} has a classifier for {task.name}'s labels in "
            f"another order ({saved_labels}, GLUE's is {list(task.labels)}): its rows would be read in GLUE's order "
            "and every prediction relabelled. Fine-tune its encoder with a fresh head (a checkpoint without the "
            "classifier), or reorder the classifier's rows and `id2label` to GLUE's order first."
        )
    limit = max_positions(model)  # the tokenizer may not know it; too long an input fails mid-training
    if limit is not None and data_args.max_seq_length > limit:
        raise ValueError(
            f"`--max_seq_length` {data_args.max_seq_length} exceeds {limit}, the longest input the position "
            f"embeddings of {model_args.model_name_or_path!r} take; pass a smaller `--max_seq_length`."
        )
    if model_args.method != "full" and model_args.target_modules is None:
        model_args.target_modules = default_target_modules(model, model_args.model_name_or_path)
        if training_args.resume_from_checkpoint is not None:  # the targets it had left unset, now known
            check_resume_config(Path(training_args.resume_from_checkpoint), model_args, training_args)
    base_params = peft_sltrain.module_parameter_counts(model).total
    peft_config = adapter_config(model_args)
    if peft_config is not None:
        fresh = newly_initialised_modules(model, loading_info)
        if fresh:
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *fresh]
            print(
                f"not in the checkpoint, so trained and saved with the adapter (modules_to_save): {', '.join(fresh)}"
            )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as error:  # the library names its config fields (`r`): say which flags set them
            raise ValueError(
                f"The adapter's settings do not fit {model_args.model_name_or_path!r} (`--rank` is `r`, `--sparsity` "
                f"and `--alpha` their own, `--target_modules` the targets): {error}"
            ) from None
    counts = peft_sltrain.module_parameter_counts(model)
    print(
        f"{task.name} / {model_args.method} ({METHODS[model_args.method]}): {counts.trainable:,} trainable of "
        f"{base_params:,} parameters ({100 * counts.trainable / base_params:.2f}%); "
        f"train {len(splits['train']):,} rows, metric from {metric_source}"
    )

    # -------------------------------------------------------------------------------------------------- training
    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric(predictions, prediction.label_ids)

    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits[eval_splits[0]],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[RecordBaseSettings(model_args, training_args, train_data)],
    )
    stale = [] if training_args.resume_from_checkpoint else run_contents(out)
    if stale:  # only with --overwrite_output_dir (check_output_dir), and only now that everything has loaded
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"--overwrite_output_dir: deleted the previous run's {', '.join(p.name for p in stale)} in {out}")
    t0 = time.perf_counter()
    train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
    train_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ evaluation
    metrics = {}
    for split in eval_splits:  # MNLI: matched, then mismatched with the suffix `_mm` (as transformers' run_glue)
        result = trainer.evaluate(eval_dataset=splits[split])
        suffix = "_mm" if split == "validation_mismatched" else ""
        metrics.update({f"{k}{suffix}": v for k, v in result.items() if not k.startswith("epoch")})
    losses = {"train_loss": train_metrics.get("train_loss")}
    losses.update({k: v for k, v in metrics.items() if k.startswith("eval_loss")})
    diverged = {k: v for k, v in losses.items() if isinstance(v, float) and not math.isfinite(v)}
    if diverged:  # before anything is exported: the Trainer's checkpoints are all that is left
        found = ", ".join(f"{k} {v}" for k, v in diverged.items())
        raise FloatingPointError(f"Training diverged ({found}); lower `--learning_rate`. Nothing was exported.")
    # a correlation of constant predictions (or labels) is undefined: null in summary.json (strict JSON has no NaN)
    undefined = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    metrics.update(dict.fromkeys(undefined))
    memory, memory_kind = peak_memory_bytes(training_args.device)
    resumed = resumed_from(training_args.resume_from_checkpoint)
    train_steps = trainer.state.global_step - (resumed["step"] if resumed else 0)  # this process's optimizer steps
    summary = {
        "task": task.name,
        "method": model_args.method,
        "model": model_args.model_name_or_path,
        "quantize": model_args.quantize,
        "unquantized_modules": unquantized if model_args.quantize else None,
        "metrics": metrics,
        "undefined_metrics": undefined,  # null in `metrics`: constant predictions or labels have no correlation
        "metric_source": metric_source,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "base_params": base_params,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        **training_state_bytes(model, trainer.optimizer),
        "train_seconds": train_seconds,  # resumed: of this process's steps only, as train_loss and train_steps
        # null where no step ran (a finished run's last checkpoint resumed: the Trainer reports a loss of 0.0)
        "train_loss": train_metrics.get("train_loss") if train_steps else None,
        "train_steps": train_steps,
        "resumed_from": resumed,
        "best_model": best_model(trainer.state, training_args),  # --load_best_model_at_end: whose weights these are
        "train_rows": len(splits["train"]),
        "eval_rows": {split: len(splits[split]) for split in eval_splits},
        "eval_subset": eval_subset,  # --max_eval_samples cut a split: its metrics are of the first rows only
        "ignore_mismatched_sizes": model_args.ignore_mismatched_sizes,  # the card's loading code repeats it
        "hyperparameters": {
            "learning_rate": training_args.learning_rate,
            # --max_steps overrides the epochs (the Trainer ignores them then); optimizer_steps is what ran in all
            **(
                {"max_steps": training_args.max_steps}
                if training_args.max_steps > 0
                else {"num_train_epochs": training_args.num_train_epochs}
            ),
            "optimizer_steps": trainer.state.global_step,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "lr_scheduler_type": str(
                getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
            ),
            "warmup_steps": training_args.warmup_steps,  # below 1: a fraction of the steps
            "weight_decay": training_args.weight_decay,
            "max_seq_length": data_args.max_seq_length,
            "seed": training_args.seed,
            **({"target_modules": list(model_args.target_modules)} if peft_config is not None else {}),
            **({"rank": model_args.rank, "alpha": model_args.alpha} if peft_config is not None else {}),
            **({"sparsity": model_args.sparsity} if model_args.method == "sltrain" else {}),
            **({"lora_dropout": model_args.lora_dropout} if model_args.method == "lora" else {}),
        },
        "command": redacted_command(argv, secrets=[training_args.hub_token, hub.token if hub else None]),
        "versions": model_card.versions(),
        "device": str(training_args.device),
    }

    # ---------------------------------------------------------------------------------------------------- export
    out.mkdir(parents=True, exist_ok=True)
    if hub is not None and peft_config is not None and model_args.base_model_id:
        for config in model.peft_config.values():  # the uploaded adapter names its base by its Hub id, not a folder
            config.base_model_name_or_path = model_args.base_model_id
    model.save_pretrained(out)  # SLTrain / LoRA: the adapter and the classifier; full: the whole model
    tokenizer.save_pretrained(out)
    public = model_card.public_summary if hub is not None else dict  # what leaves the machine: no local folders
    card = model_card.build_card(
        public(summary),
        peft_config=peft_config.to_dict() if peft_config is not None else None,
        base_model=model_args.base_model_id or card_base_model(model_args.model_name_or_path),
        dataset_id=card_dataset_id(data_args),
        repo_id=hub.repo_id if hub else None,
    )
    card.save(out / "README.md")
    if model_args.merge_to:
        summary["merged_check"] = export_merged(model, tokenizer, splits[eval_splits[0]], collator, model_args)
    (out / "summary.json").write_text(json.dumps(public(summary), indent=2))
    if hub is not None:
        url = model_card.upload(out, hub, private=training_args.hub_private_repo)
        print(f"uploaded the adapter and its model card to {url}")
    shown = ", ".join(
        f"{k}={'undefined' if v is None else f'{v:.4f}'}"
        for k, v in metrics.items()
        if k.removeprefix("eval_").split("_mm")[0] in task.metrics
    )
    print(
        f"final {task.name} / {model_args.method}: {shown} trainable={counts.trainable:,} "
        f"params+grads+optimizer={summary['training_state_bytes'] / 2**20:.1f}MiB peak_mem={memory / 2**20:.0f}MiB "
        f"({memory_kind}) train={train_seconds:.0f}s -> {out}"
    )
    return summary


def export_merged(model, tokenizer, dataset, collator, model_args: ModelArguments, check_rows: int = 512) -> dict:
    """Write the dense merged model and check that plain Transformers loads it and predicts what `model` predicts.
    It is written into a temporary directory (inside `--merge_to` where that exists, else beside it) and moved into
    place only once checked."""
    rows = dataset.select(range(min(check_rows, len(dataset))))
    expected = predict_logits(model, rows, collator, batch_size=32)
    dense = model.merge_and_unload() if isinstance(model, PeftModel) else model
    target = Path(model_args.merge_to).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # inside an existing target (`.`, a mount point: on its file system, whose parent may not be writable)
    name = f".{target.name or 'merged'}.tmp-{os.getpid()}"
    tmp = target / name if target.is_dir() else target.with_name(name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dense.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp)
        got = predict_logits(reloaded.to(next(dense.parameters()).device), rows, collator, batch_size=32)
        check = {
            "rows": len(rows),
            "max_abs_logit_diff": (got - expected).abs().max().item(),
            "predictions_equal": bool(torch.equal(got.argmax(-1), expected.argmax(-1))) if got.shape[-1] > 1 else None,
        }
        if check["max_abs_logit_diff"] > 1e-4 or check["predictions_equal"] is False:
            raise RuntimeError(f"The merged model does not predict what the adapter does ({check}); not written.")
        if tmp.parent == target:  # empty, or holding no model (`check_args`): the files move in one by one
            for path in tmp.iterdir():
                os.replace(path, target / path.name)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"merged dense model -> {model_args.merge_to}: {check['rows']} validation rows, same predictions, "
        f"max |logit difference| {check['max_abs_logit_diff']:.2e}"
    )
    return check


def cli(argv: list[str] | None = None) -> None:
    """`main` as a command: bad input or no Hub stops with one clear line (status 1), a diverged loss with status
    `DIVERGED` (as pretrain.py's), Ctrl-C with where to resume from (status 130); no traceback."""
    try:
        main(argv)
    except (ValueError, model_card.HubError) as error:
        raise SystemExit(f"run_glue.py: error: {error}") from None
    except FloatingPointError as error:
        print(f"run_glue.py: error: {error}", file=sys.stderr)
        raise SystemExit(DIVERGED) from None
    except KeyboardInterrupt:
        print(f"run_glue.py: interrupted; {interrupted_hint(argv)}", file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_hint(argv: list[str] | None) -> str:
    """Where an interrupted run can go on from: its newest Trainer checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--output_dir=")]  # (not parse_args: it checks)
    given += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--output_dir"]
    if not given:
        return "resume with `--resume_from_checkpoint OUTPUT_DIR/checkpoint-N` where a checkpoint was saved."
    out = Path(given[-1])
    steps = [p for p in run_contents(out) if p.is_dir()]  # its checkpoint-N folders
    if not steps:
        return f"{out} has no checkpoint to resume from (`--save_strategy` saves them)."
    newest = max(steps, key=lambda p: int(p.name.removeprefix("checkpoint-")))
    return f"run the same command with `--resume_from_checkpoint {newest}` to continue."


if __name__ == "__main__":
    cli()
