r"""Pretrain a LLaMA-architecture model from scratch with SLTrain (or a baseline), on one CPU or many GPUs.

    # the README's main job: a tiny LLaMA on the embedded Austen corpus, on a CPU, in a few minutes
    python scripts/pretrain.py --model tiny --method sltrain --out-dir runs/tiny-sltrain

    # the paper's 60M setting on C4 (network needed), 4 GPUs with DDP, bf16
    accelerate launch --num_processes 4 scripts/pretrain.py --model 60m --method sltrain \
        --dataset allenai/c4 --dataset-config en --tokenizer t5-base --out-dir runs/60m-sltrain

Reads top to bottom: configuration, data, model, optimizer, training loop, final evaluation and export. Methods
(`full`, `lowrank`, `sltrain`, ...) live in `methods.py`; a size preset (`configs/llama_<size>.json`) gives the
architecture, the method's rank/sparsity/alpha and the training schedule, and every flag below overrides it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import resource
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType, PartialState
from accelerate.utils import broadcast
from tqdm.auto import tqdm
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Noise from dependencies, not about this run: bitsandbytes (imported by PEFT where installed) logs on CPUs with
# AVX512-BF16 that an optional 4-bit kernel package is missing; PEFT 0.21 reads a property Transformers 5 deprecates;
# torch 2.13 deprecates DDP's `broadcast_buffers`, which accelerate passes on and cannot replace by its successor
# (`broadcast_buffers=False` below keeps DDP from re-sending the supports, the same on every rank, at each forward)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
import peft_sltrain  # noqa: E402
from peft_sltrain.cost import COMPUTE_CHOICES  # noqa: E402
from peft_sltrain.cpu_kernels import installed  # noqa: E402  (whether a package is installed, for the extras)

import checkpointing  # noqa: E402
import model_card  # noqa: E402
import pretrain_card  # noqa: E402
import pretrain_data as data  # noqa: E402  (scripts/pretrain_data.py, not the corpora in data/)
from methods import METHODS, Hyper, adamw, get_method, parse_method_args  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HUB_FLAGS = model_card.HubFlags("--push-to-hub", "--hub-model-id", "--out-dir", "--hub-private", token=None)


def _by_size(name: str) -> tuple:
    """tiny, 60m, 130m, ..., 1b, 7b: smallest first (1.5b and 125M too; a preset named otherwise goes last)."""
    number, unit = name[:-1], name[-1:].lower()
    if name == "tiny":
        return (0, 0.0)
    try:
        return (1, float(number) * {"m": 1, "b": 1000}[unit])
    except (ValueError, KeyError):
        return (2, name)


SIZES = sorted((p.stem.removeprefix("llama_") for p in CONFIGS.glob("llama_*.json")), key=_by_size)
DIVERGED = 3  # exit status of a run whose loss became NaN or infinite, or validation past 709 nats (`cli`)


# ------------------------------------------------------------------------------------------------- configuration
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = ", ".join(SIZES)
    p.add_argument("--model", default="tiny", help=f"size preset ({presets}) or a preset JSON (default: %(default)s)")
    p.add_argument("--method", default="sltrain", help=f"one of: {', '.join(sorted(METHODS))} (default: %(default)s)")
    p.add_argument("--rank", type=int, help="rank r (default: the size preset's)")
    p.add_argument("--sparsity", type=float, help="SLTrain's delta (default: the size preset's)")
    p.add_argument(
        "--alpha", type=float, help="B A is scaled by alpha / r (sltrain, lowrank, lora, relora; default: preset)"
    )
    p.add_argument(
        "--compute",
        choices=COMPUTE_CHOICES,
        help="how SLTrain's layers compute (sltrain only; default: auto): auto takes batched for training on a GPU "
        "(not under FSDP) and otherwise picks dense or factored per call; batched rebuilds like-shaped layers' "
        "weights in batched GEMMs, in forward and again in backward, for GPUs (faster where steps are bound by "
        "kernel launches: docs/compute_paths.md)",
    )
    p.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method-specific setting, e.g. relora_every=200 (repeatable)",
    )
    # data
    p.add_argument("--train-files", nargs="+", help="local .txt/.txt.gz training text (default: embedded corpus)")
    p.add_argument("--validation-files", nargs="+", help="local held-out text for validation perplexity")
    p.add_argument("--dataset", help="a Hugging Face dataset to stream instead, e.g. allenai/c4")
    p.add_argument("--dataset-config", help="its config, e.g. en")
    p.add_argument(
        "--tokenizer",
        default="train",
        help="'train' (byte-level BPE on the training text) or a hub name / directory, e.g. t5-base (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary of the tokenizer trained with `--tokenizer train` (default: the preset's model.vocab_size: "
        "4096 for tiny, 32000 for 60m-7b, LlamaConfig's 32000 for a preset without one); a hub tokenizer brings its "
        "own",
    )
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    # optimisation (every default: the size preset's, see configs/)
    p.add_argument("--lr", type=float, help="peak learning rate (default: preset)")
    p.add_argument(
        "--min-lr-ratio", type=float, help="the cosine schedule ends at this fraction of --lr (default: preset)"
    )
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: preset)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: preset)")
    p.add_argument(
        "--global-batch", type=int, help="sequences per optimizer step, over all processes (default: preset)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="sequences per forward pass per process (default: preset; on --resume, the run's own; another may be "
        "given there, the global batches stay the same)",
    )
    p.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay (default: preset)")
    p.add_argument("--grad-clip", type=float, help="max global gradient norm; 0 disables (default: preset)")
    p.add_argument("--optimizer", choices=["adamw", "adam8bit"], help="(default: preset)")
    p.add_argument(
        "--per-layer-updates",
        action="store_true",
        help="step each parameter's optimizer in its gradient hook: gradients are never all resident",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 = autocast mixed precision, fp32 master weights")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's forward, in place (parameter names, checkpoints and exports are unchanged); "
        "compiling takes a while at the first step and at the first evaluation",
    )
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**32) (default: %(default)s)")
    p.add_argument(
        "--ddp-timeout", type=int, default=1800,
        help="seconds that processes wait for each other in a collective before the run fails, as the Trainer's "
        "`ddp_timeout` (torch's process-group timeout); the main process alone trains the tokenizer and writes each "
        "checkpoint meanwhile, longer on big corpora and models (default: %(default)s)",
    )  # fmt: skip
    # evaluation, checkpoints, output
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps and at the end (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument(
        "--eval-blocks", type=int, default=256, help="validation sequences per evaluation (default: %(default)s)"
    )
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end (0: never)")
    p.add_argument(
        "--keep-last", type=int, default=0,
        help="keep only the N newest checkpoints, deleting older ones once a newer one is saved (0, the default: all)",
    )  # fmt: skip
    p.add_argument("--out-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out-dir and start over")
    p.add_argument("--merge", action="store_true", help="also write a merged dense model to OUT/merged")
    p.add_argument(
        "--push-to-hub", action="store_true",
        help="at the end, upload OUT/final (the adapter or model, tokenizer and card) to the Hugging Face Hub, whose "
        "access is checked before training; the token comes from `hf auth login` or HF_TOKEN (no flag: the command "
        "goes into the card)",
    )  # fmt: skip
    p.add_argument("--hub-model-id", help="with --push-to-hub: the repository, USER/NAME (default: your user and "
                   "--out-dir's name)")  # fmt: skip
    p.add_argument("--hub-private", action="store_true", help="with --push-to-hub: a private repository (an existing "
                   "public one is refused before training)")  # fmt: skip
    return p


# what a preset's "train" section must give and its "sltrain" section may (a flag may override each, and each value
# gets its flag's check); "model" is the LlamaConfig
PRESET_TRAIN_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "global_batch", "micro_batch", "seq_len",
                     "weight_decay", "grad_clip", "optimizer", "dtype")  # fmt: skip
PRESET_SLTRAIN_KEYS = ("rank", "sparsity", "alpha")


def load_preset(model: str) -> dict:
    path = Path(model) if model.endswith(".json") else CONFIGS / f"llama_{model}.json"
    if not path.is_file():
        raise ValueError(f"Unknown `--model` {model!r}: choose one of {SIZES} or give a preset JSON file.")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"`--model` {model!r} is not valid JSON: {error}.") from None
    valid = (
        isinstance(preset, dict) and isinstance(preset.get("model"), dict) and isinstance(preset.get("train"), dict)
    )
    if not valid or not isinstance(preset.get("sltrain", {}), dict):  # "sltrain" is optional
        raise ValueError(
            f'`--model` {model!r} needs a "model" object (the LlamaConfig), a "train" object and optionally an '
            '"sltrain" one (see configs/).'
        )
    flags = {action.dest: action for action in build_parser()._actions}
    for section, keys in (("train", PRESET_TRAIN_KEYS), ("sltrain", PRESET_SLTRAIN_KEYS)):
        for key, value in preset.get(section, {}).items():
            where = f'`--model` {model!r}: its "{section}" object'
            if key not in keys:
                raise ValueError(
                    f"{where} sets {key!r}, which a preset cannot set; it may set {sorted(keys)} (pass other settings "
                    f"as flags, e.g. --{key.replace('_', '-')})."
                )
            preset[section][key] = preset_value(where, key, value, flags[key])
    return preset


def preset_value(where: str, key: str, value, flag: argparse.Action):
    """A preset's value checked as its flag's would be (argparse checks only flags): its choices, or its type."""
    if flag.choices is not None:
        if value not in flag.choices:
            raise ValueError(f"{where} sets {key!r} to {value!r}; choose one of {list(flag.choices)}.")
        return value
    kind = flag.type  # int or float
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise ValueError(f"{where} sets {key!r} to {value!r}, which is no {kind.__name__}.")
    return kind(value)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset flag from the size preset, then check the combination before anything runs."""
    preset = load_preset(args.model)
    method = get_method(args.method)
    args.global_batch_given = args.global_batch is not None
    args.micro_batch_given = args.micro_batch is not None  # a preset's micro-batch may be lowered to fit processes
    warmup_given, optimizer_given = args.warmup_steps is not None, args.optimizer is not None
    unused = [key for key in PRESET_SLTRAIN_KEYS if key not in method.reads]
    passed = [f"--{key}" for key in unused if getattr(args, key) is not None]
    notes = []  # it would train as if they were not given, yet the run's config and card would record them
    if passed:
        reads = ", ".join(f"--{key}" for key in (method.reads or PRESET_SLTRAIN_KEYS))
        notes.append(f"{', '.join(passed)} ({'it reads' if method.reads else 'it reads none of'} {reads})")
    if args.compute is not None and method.name != "sltrain":
        notes.append("--compute (SLTrain's compute path: only `--method sltrain` reads it)")
    if notes:
        raise ValueError(f"`--method {method.name}` does not use {'; nor '.join(notes)}.")
    if method.name == "sltrain" and args.compute is None:
        args.compute = "auto"  # the library's default, recorded as such (a resume compares it)
    for key, value in {**preset["train"], **preset.get("sltrain", {})}.items():
        if getattr(args, key, None) is None and key not in unused:
            setattr(args, key, value)
    args.model_config = preset["model"]
    try:
        llama_config = LlamaConfig(**args.model_config)
    except Exception as error:  # noqa: BLE001 (Transformers' validators raise ValueError, TypeError or their own)
        reason = " ".join(str(error).split())  # one line
        raise ValueError(f'`--model` {args.model!r}: its "model" object is no valid LlamaConfig: {reason}') from None
    # LlamaConfig keeps a key it does not know as it is (a typo would train a model of its default size)
    unknown = sorted(set(llama_config.to_dict()) - set(LlamaConfig().to_dict()))
    if unknown:
        where = f'`--model` {args.model!r}: its "model" object'
        raise ValueError(f"{where} sets {unknown}, which LlamaConfig does not know.")
    heads, kv_heads = llama_config.num_attention_heads, llama_config.num_key_value_heads
    if not (isinstance(kv_heads, int) and 0 < kv_heads <= heads and heads % kv_heads == 0):
        raise ValueError(
            f'`--model` {args.model!r}: its "model" object\'s num_key_value_heads {kv_heads!r} must divide '
            f"num_attention_heads {heads} (each key/value head serves a group of query heads)."
        )
    missing = [key for key in (*PRESET_TRAIN_KEYS, *method.reads) if getattr(args, key, None) is None]
    if missing:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in missing)
        raise ValueError(f"`--model` {args.model!r} sets no {missing}: add them to its preset or pass {flags}.")
    args.method_extra = parse_method_args(method, args.method_arg)
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "sparsity", "alpha"):
        value = getattr(args, name)  # NaN passes every comparison below, inf turns clipping off like 0
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"`--{name.replace('_', '-')}` must be a finite number, got {value}.")
    for name in (
        "lr",
        "max_steps",
        "global_batch",
        "micro_batch",
        "seq_len",
        "eval_every",
        "eval_blocks",
        "ddp_timeout",
    ):
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name.replace('_', '-')}` must be positive, got {getattr(args, name)}.")
    if args.seq_len < 2:
        raise ValueError(f"`--seq-len` must be at least 2 (n tokens give n - 1 targets), got {args.seq_len}.")
    for name in ("weight_decay", "grad_clip", "save_every", "keep_last"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name.replace('_', '-')}` must be 0 or more, got {getattr(args, name)}.")
    if args.keep_last and not args.save_every:
        raise ValueError(f"`--keep-last {args.keep_last}` keeps checkpoints; without `--save-every` none is saved.")
    if (args.hub_model_id is not None or args.hub_private) and not args.push_to_hub:
        given = f"`--hub-model-id {args.hub_model_id}`" if args.hub_model_id is not None else "`--hub-private`"
        raise ValueError(f"{given} is for the upload; without `--push-to-hub` nothing is uploaded.")
    if not 0 <= args.seed < 2**32:  # (the data order seeds `seed * 100_003 + epoch`, which must fit in 64 bits)
        raise ValueError(f"`--seed` must be in [0, 2**32), got {args.seed}.")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"`--min-lr-ratio` must be in [0, 1], got {args.min_lr_ratio}.")
    if args.resume and args.overwrite:
        raise ValueError("`--resume` continues the run in --out-dir and `--overwrite` deletes it: pass one of them.")
    if args.dataset and args.train_files:
        raise ValueError("`--dataset` and `--train-files` both name the training text: pass one of them.")
    if args.dataset and args.tokenizer == "train":
        raise ValueError("With `--dataset`, give a hub tokenizer (e.g. `--tokenizer t5-base`, the paper's).")
    args.vocab_size_given = args.vocab_size is not None  # (a resume keeps the run's own size where it is not given)
    args.resume_notes = []  # what `check_out_dir` took from the run it resumes, or changed, a printed line each
    if args.tokenizer == "train" and args.vocab_size is None:  # the preset's (LlamaConfig's default if it has none)
        args.vocab_size = llama_config.vocab_size
        if args.vocab_size < 300 and not args.resume:  # (train_tokenizer's bound, named by where the size came from;
            # a resume first takes the run's own size, `check_out_dir`)
            raise ValueError(
                f"`--model` {args.model!r} sets model.vocab_size {args.vocab_size}, which a trained byte-level BPE "
                "cannot have (at least 300: 256 bytes plus merges); pass `--vocab-size`."
            )
    elif args.tokenizer != "train" and args.vocab_size is not None:  # it would be ignored, yet recorded
        raise ValueError(
            f"`--vocab-size` is the size of a tokenizer trained here (`--tokenizer train`); `--tokenizer "
            f"{args.tokenizer!r}` brings its own vocabulary: leave out --vocab-size."
        )
    args.tokenizer_typed = args.tokenizer  # (runs before the line below recorded it so: they resume with it)
    if args.tokenizer != "train" and Path(args.tokenizer).is_dir():  # a local one by where it is (a resume compares
        args.tokenizer = str(Path(args.tokenizer).resolve())  # it: its vocabulary digest misses merges, normaliser)
    if args.per_layer_updates and method.make_optimizer is not adamw:
        raise ValueError(f"`--per-layer-updates` works with AdamW-trained methods, not `--method {method.name}`.")
    max_positions = args.model_config.get("max_position_embeddings", args.seq_len)
    if args.seq_len > max_positions:
        raise ValueError(f"`--seq-len` {args.seq_len} exceeds the model's max_position_embeddings {max_positions}.")
    if not 0 <= args.warmup_steps < args.max_steps:
        source = "" if warmup_given else f" (the preset's; pass a `--warmup-steps` below --max-steps {args.max_steps})"
        raise ValueError(f"`--warmup-steps` must be in [0, --max-steps), got {args.warmup_steps}{source}.")
    if "rank" in method.reads and args.rank <= 0:
        raise ValueError(f"`--rank` must be positive, got {args.rank}.")
    if "sparsity" in method.reads and not 0 < args.sparsity < 1:  # (named as the flag, not as SLTrainConfig's field)
        raise ValueError(f"`--sparsity` must be in (0, 1), got {args.sparsity}.")
    if "alpha" in method.reads and not args.alpha > 0:
        raise ValueError(f"`--alpha` must be positive (B A is scaled by alpha / r), got {args.alpha}.")
    if method.requires and not installed(method.requires):
        raise ValueError(
            f"`--method {method.name}` needs the {method.requires} package: pip install 'peft-sltrain[bench]'."
        )
    # what the `scripts` extra installs, checked now: the loss plot comes after the last step, and a run that fails
    # there has trained for nothing (no final model, no summary)
    needed = {"matplotlib": "for loss.png", **({"datasets": "for --dataset"} if args.dataset else {})}
    missing = [f"{name} ({why})" for name, why in needed.items() if not installed(name)]
    if missing:
        raise ValueError(
            f"this run needs {' and '.join(missing)}, not installed: pip install 'peft-sltrain[scripts]'."
        )
    if args.compile and not torch.cuda.is_available() and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise ValueError(
            "`--compile` on a CPU needs a C++ compiler (torch.compile builds C++ with `$CXX`, else g++), and none is "
            "found: install one, or leave out --compile."
        )
    if method.check is not None:
        method.check(llama_config, hyper_from_args(args))
    if method.make_optimizer is not adamw and args.optimizer != "adamw":
        preset_sets = f"the preset {args.model!r} sets {args.optimizer}"
        source = "" if optimizer_given else f" ({preset_sets}: pass --optimizer adamw)"
        raise ValueError(f"`--method {method.name}` brings its own optimizer; `--optimizer` must stay adamw{source}.")
    if args.per_layer_updates and args.grad_clip > 0:
        raise ValueError(
            "`--per-layer-updates` steps each parameter alone, so it cannot clip the global gradient "
            f"norm; set `--grad-clip 0` (got {args.grad_clip})."
        )
    if args.optimizer == "adam8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                "`--optimizer adam8bit` needs bitsandbytes: pip install 'peft-sltrain[adam8bit]'."
            ) from error
        if not torch.cuda.is_available():
            raise ValueError(
                "`--optimizer adam8bit` needs a CUDA GPU (bitsandbytes' 8-bit Adam); none is available. "
                "Use `--optimizer adamw` on a CPU."
            )
    return args


def hyper_from_args(args: argparse.Namespace) -> Hyper:
    return Hyper(
        rank=args.rank,
        sparsity=args.sparsity,
        alpha=args.alpha,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        extra=args.method_extra,
        compute=args.compute or "auto",
    )


def fit_micro_batch(args: argparse.Namespace, world: int) -> tuple[int, str | None]:
    """Gradient accumulation steps for `--global-batch` over `world` processes, and a note when `args.micro_batch`
    was lowered to the largest that divides it. Only the preset's is lowered, never one passed with `--micro-batch`:
    the global batch alone fixes the loss curve, the micro-batch only how much of it one forward pass holds."""
    note = None
    if args.global_batch % (args.micro_batch * world) and not args.micro_batch_given:
        fits = [m for m in range(args.micro_batch, 0, -1) if args.global_batch % (m * world) == 0]
        if fits:
            note = (
                f"--micro-batch {fits[0]}: the preset's {args.micro_batch} x {world} processes does not divide "
                f"--global-batch {args.global_batch}"
            )
            args.micro_batch = fits[0]
    if args.global_batch % world:
        source = "" if args.global_batch_given else " (the preset's)"
        raise ValueError(
            f"`--global-batch` {args.global_batch}{source} does not divide over {world} processes: pass a multiple of "
            f"{world}, or run on a number of processes that divides it."
        )
    per_step = args.micro_batch * world
    if args.global_batch % per_step:
        raise ValueError(
            f"`--global-batch` {args.global_batch} must be a multiple of --micro-batch x processes = {per_step}."
        )
    return args.global_batch // per_step, note


def trajectory_config(args: argparse.Namespace, world_size: int) -> dict:
    """Everything that determines the loss curve; a resumed run must match it exactly."""
    keys = [
        "model_config",
        "method",
        "rank",
        "sparsity",
        "alpha",
        "method_extra",
        "compute",
        "train_files",
        "validation_files",
        "dataset",
        "dataset_config",
        "tokenizer",
        "vocab_size",
        "seq_len",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "max_steps",
        "global_batch",
        "micro_batch",
        "weight_decay",
        "grad_clip",
        "optimizer",
        "per_layer_updates",
        "dtype",
        "seed",
        "eval_blocks",  # what val_ppl measures: a resume must log the same
    ]
    version = get_method(args.method).version
    return {**{k: getattr(args, k) for k in keys}, "method_version": version, "world_size": world_size}


# what a run writes in --out-dir (and a killed export's temporaries), all deleted by `--overwrite`
RUN_FILES = ("run_config.json", "checkpoints", "final", "merged", "tokenizer", "log.jsonl", "summary.json", "loss.png",
             ".run_config.json.tmp", ".final.tmp", ".merged.tmp", ".summary.json.tmp")  # fmt: skip


def check_out_dir(args: argparse.Namespace, config: dict) -> Path | None:
    """The checkpoint to resume from (or None), after making sure nothing saved is overwritten by mistake."""
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`--out-dir` {str(out)!r} is a file, not a directory.")
    run_file = out / "run_config.json"
    if args.resume:
        if not run_file.is_file():
            raise ValueError(f"`--resume`: {out} holds no run to resume (no run_config.json).")
        try:
            saved = json.loads(run_file.read_text())
        except ValueError as error:
            raise ValueError(f"`--resume`: {run_file} is damaged ({error}); it cannot be resumed.") from None
        saved.setdefault("method_version", 1)  # (not recorded before there was a second)
        saved.setdefault("compute", "auto" if saved.get("method") == "sltrain" else None)  # (nor before `--compute`)
        own = saved.get("vocab_size")
        if (
            config["tokenizer"] == "train"
            and not args.vocab_size_given
            and isinstance(own, int)
            and own >= 300
            and own != config["vocab_size"]
        ):
            # runs before the preset's size became the default were trained at 4096: a resume continues at the run's
            # own size (the vocabulary itself is compared with the data), as a given --vocab-size would set it
            args.vocab_size = config["vocab_size"] = own
            args.resume_notes.append(f"--vocab-size {own}, the run's own")
        keys = (set(saved) | set(config)) - {"data_sha256"}  # checked once the data is read (`check_same_data`)
        # not compared: a setting the method does not read (older runs recorded the preset's), what older runs did
        # not record (`eval_blocks`), and the vocabulary size of a hub tokenizer (older runs recorded the unused
        # flag; the vocabulary itself is compared with the data)
        keys -= {k for k in PRESET_SLTRAIN_KEYS if config.get(k) is None} | ({"eval_blocks"} - set(saved))
        keys -= {"vocab_size"} if config["tokenizer"] != "train" else set()
        # the data files by the digest of their text (`check_same_data`), not by the paths as typed: the same files
        # named from another working directory, or absolutely, resume
        keys -= {"train_files", "validation_files"} if saved.get("data_sha256") else set()
        keys -= {"tokenizer"} if saved.get("tokenizer") == args.tokenizer_typed else set()
        # the micro-batch only sets how much of a global batch one forward pass holds (its blocks and their order
        # come from the step alone, `data.BlockSampler`): a resume may lower it to fit another machine's memory
        keys -= {"micro_batch"}
        if saved.get("micro_batch") != config["micro_batch"]:
            args.resume_notes.append(
                f"--micro-batch {config['micro_batch']} (the run trained with {saved.get('micro_batch')}): the same "
                "global batches, so the losses follow the run's up to rounding (not bit for bit)"
            )
        differ = sorted(k for k in keys if saved.get(k) != config.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {config.get(k)!r}" for k in differ[:4])
            detail += f", and {len(differ) - 4} more: {', '.join(differ[4:])}" if len(differ) > 4 else ""
            raise ValueError(f"`--resume`: {out} was trained with a different config or method ({detail}).")
        if finished_run(out, args):
            merge = (" (for a dense `merged/` model, load `final/` with PEFT and call `merge_and_unload()`)"
                     if args.merge and not (out / "merged").is_dir() else "")  # fmt: skip
            raise ValueError(
                f"`--resume`: the run in {out} is complete ({args.max_steps} steps); nothing to resume{merge}."
            )
        checkpoint = checkpointing.latest_checkpoint(out)
        if checkpoint is None:
            raise ValueError(f"`--resume`: {out} has no complete checkpoint yet; start it over with `--overwrite`.")
        return checkpoint  # if it is the last step's (an export killed before its summary), only the export runs
    found = [name for name in RUN_FILES if (out / name).exists()]
    theirs = [name for name in found if not name.startswith(".")]  # (not a killed save's or export's temporaries)
    if theirs and not run_file.is_file():
        # what `--overwrite` would delete, but no run of this script (every run writes run_config.json first, and
        # `--overwrite` deletes it last): someone else's files, never deleted
        raise ValueError(
            f"{out} holds {', '.join(theirs)} but no run_config.json, so no pretrain.py run: choose another "
            "`--out-dir` (nothing there is deleted, even with `--overwrite`)."
        )
    if found and not args.overwrite:
        raise ValueError(
            f"{out} already holds a run ({', '.join(found[:3])}); pass `--resume` to continue it or `--overwrite` to "
            "delete it and start over."
        )
    return None


def data_digest(tokenizer: data.Tokenizer, texts: dict[str, str]) -> dict[str, str]:
    """sha256 (16 hex digits) of each text and of the tokenizer's vocabulary. run_config.json names the data files
    and the tokenizer; this is what they held, so that a resumed run can tell that it continues on the same."""
    digest = {name: hashlib.sha256(text.encode()).hexdigest()[:16] for name, text in texts.items()}
    vocabulary = json.dumps(tokenizer.hf.get_vocab(), sort_keys=True).encode()
    return {**digest, "vocabulary": hashlib.sha256(vocabulary).hexdigest()[:16]}


def check_same_data(out: Path, digest: dict[str, str]) -> None:
    """Refuses to resume the run in `out` on other text or another vocabulary than it was trained on (the files
    named the same, their content changed). A run saved before the digest was recorded is not checked."""
    saved = json.loads((out / "run_config.json").read_text()).get("data_sha256")
    if saved is not None and saved != digest:
        changed = sorted(k for k in set(saved) | set(digest) if saved.get(k) != digest.get(k))
        detail = ", ".join(f"{k}: saved {saved.get(k)} vs now {digest.get(k)}" for k in changed)
        raise ValueError(
            f"`--resume`: the data or tokenizer of {out} changed since it was trained ({detail}); a run must "
            "continue on what it started with."
        )


def logged_step(line: str) -> float:
    """The step of one line of log.jsonl; infinity for a line cut off by a kill (dropped, as rows after a checkpoint
    are)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def finished_run(out: Path, args: argparse.Namespace) -> bool:
    """Whether the run in `out` trained all its steps and exported them: its summary is written last and counts
    every token (its newest checkpoint need not be the last step: a resumed command may run without --save-every)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (out / "final").is_dir() and summary.get("tokens") == args.max_steps * args.global_batch * args.seq_len


def init_out_dir(args: argparse.Namespace, config: dict, accelerator: Accelerator) -> None:
    """Start a fresh run directory (deleting an earlier run only when `--overwrite` asked for it)."""
    out = Path(args.out_dir)
    if accelerator.is_main_process:
        for name in reversed(RUN_FILES):  # run_config.json last: a kill meanwhile leaves a run `--overwrite` finds
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, config)
    accelerator.wait_for_everyone()


def write_run_config(out: Path, config: dict) -> None:
    temporary = out / ".run_config.json.tmp"  # written whole, then renamed: a kill leaves no half of it
    temporary.write_text(json.dumps(config, indent=2))
    os.replace(temporary, out / "run_config.json")


def saved_micro_batch(out_dir: str) -> int | None:
    """The micro-batch that run_config.json in `out_dir` records, or None (no readable one: `check_out_dir` says
    why, if it matters)."""
    try:
        micro_batch = json.loads((Path(out_dir) / "run_config.json").read_text()).get("micro_batch")
    except (OSError, ValueError, AttributeError):
        return None
    return micro_batch if type(micro_batch) is int and micro_batch > 0 else None


def record_micro_batch(out: Path, micro_batch: int) -> None:
    """A resume with another `--micro-batch`, once a checkpoint trained with it is saved: run_config.json records the
    one the run goes on with (not before: a resume that fails first leaves the run as it was). Main process only."""
    config = json.loads((out / "run_config.json").read_text())
    if config.get("micro_batch") != micro_batch:
        write_run_config(out, {**config, "micro_batch": micro_batch})


# ----------------------------------------------------------------------------------------------------- optimizer
def lr_lambda(args: argparse.Namespace, method, hyper: Hyper):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak (times the method's own factor, if any)."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            base = (step + 1) / args.warmup_steps
        else:
            progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
            base = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return base * (method.lr_multiplier(step, hyper) if method.lr_multiplier else 1.0)

    return factor


def plain_optimizer(params, hyper: Hyper, optimizer_name: str) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit Adam (the paper's 7B setting), over `params`."""
    if optimizer_name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=hyper.lr, betas=hyper.betas, weight_decay=hyper.weight_decay)
    return torch.optim.AdamW(params, lr=hyper.lr, betas=hyper.betas, weight_decay=hyper.weight_decay)


def make_optimizer(model, method, hyper: Hyper, optimizer_name: str) -> torch.optim.Optimizer:
    if method.make_optimizer is not adamw:  # e.g. GaLore: the method brings its own optimizer (resolve checked)
        return method.make_optimizer(model, hyper)
    return plain_optimizer([p for p in model.parameters() if p.requires_grad], hyper, optimizer_name)


class PerLayerOptimizer:
    """One optimizer and schedule per parameter, stepped from the parameter's post-accumulate-grad hook.

    Each gradient is applied and freed as soon as backward has produced it, so the gradients of the whole model are
    never resident at once (the paper's per-layer trick, after GaLore). Single process, no accumulation, no global
    clipping. For elementwise optimizers such as AdamW the result equals one ordinary optimizer step.
    """

    def __init__(self, named_params, make, schedule):
        self.names = {}
        self.optimizers, self.schedulers = {}, {}
        for name, param in named_params:
            self.names[param] = name
            self.optimizers[name] = make([param])
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name], schedule)
            param.register_post_accumulate_grad_hook(self._step_param)

    def _step_param(self, param: torch.Tensor) -> None:
        optimizer = self.optimizers[self.names[param]]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_schedules(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict:
        return {
            name: {"optimizer": self.optimizers[name].state_dict(), "scheduler": self.schedulers[name].state_dict()}
            for name in self.optimizers
        }

    def load_state_dict(self, state: dict) -> None:
        for name, entry in state.items():
            self.optimizers[name].load_state_dict(entry["optimizer"])
            self.schedulers[name].load_state_dict(entry["scheduler"])

    @property
    def lr(self) -> float:
        return next(iter(self.schedulers.values())).get_last_lr()[0]


def training_state_bytes(model, optimizer, shards: Accelerator | None = None) -> dict[str, int]:
    """Exact bytes of parameters, gradients and optimizer states: the memory a method is designed to save.
    (bitsandbytes' quantization constants, beside a quantized base's weights, are no parameters: not counted.)
    With `shards` (under FSDP, where each process holds a shard of each) they are summed over its processes."""
    params = list(model.parameters())
    trainable = [local_bytes(p) for p in params if p.requires_grad]
    per_layer = isinstance(optimizer, PerLayerOptimizer)
    counts = {
        "param_bytes": sum(local_bytes(p) for p in params),
        "grad_bytes": max(trainable, default=0) if per_layer else sum(trainable),  # per-layer: one gradient at a time
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
    }
    if shards is not None:
        summed = shards.reduce(torch.tensor(list(counts.values()), device=shards.device), reduction="sum")
        counts = dict(zip(counts, map(int, summed.tolist())))
    return {**counts, "training_state_bytes": sum(counts.values())}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state, including those inside helper objects (GaLore's projectors)."""
    optimizers = optimizer.optimizers.values() if isinstance(optimizer, PerLayerOptimizer) else [optimizer]
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                tensors = [value] if torch.is_tensor(value) else list(getattr(value, "__dict__", {}).values())
                total += sum(local_bytes(t) for t in tensors if torch.is_tensor(t))
    return total


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes of `tensor` that this process holds: of a DTensor (FSDP2's parameters, gradients and their
    optimizer states), its local shard, where `numel()` counts the whole tensor: summed over FSDP's processes, each
    tensor then counts once."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


# ----------------------------------------------------------------------------------------------------- utilities
def counted(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, micro_batch: int, accelerator: Accelerator) -> float:
    """Validation perplexity: exp of the mean next-token loss over `blocks`, sharded over processes. Every process
    runs the same number of forwards (a shorter shard is padded with ignored rows): under FSDP each forward gathers
    the weights with all processes, and under DDP a forward may broadcast buffers, so uneven counts would hang."""
    model.eval()
    processes = accelerator.num_processes
    mine = blocks[accelerator.process_index :: processes]  # (rows, seq_len); empty where blocks < processes
    rows = -(-len(blocks) // processes)  # the longest shard's
    padding = blocks[:1].expand(rows - len(mine), -1)  # any real block: its labels are ignored
    labels = torch.cat([mine, torch.full_like(padding, -100)]).long()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, tokens)
    for batch, target in zip(torch.cat([mine, padding]).long().split(micro_batch), labels.split(micro_batch)):
        batch, target = batch.to(accelerator.device), target.to(accelerator.device)
        with accelerator.autocast():
            loss = model(input_ids=batch, labels=target).loss  # the mean over the predicted, not ignored, tokens
        n = int((target[:, 1:] != -100).sum())  # each real sequence predicts seq_len - 1 tokens
        if n:  # (a batch of padding alone has a NaN mean)
            total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    mean = total[0].item() / total[1].item()
    if not math.isfinite(mean):
        raise FloatingPointError(f"Validation loss became {mean}; lower `--lr` or use `--grad-clip`.")
    if mean >= 709:  # exp overflows past 709.78 nats (uniform guessing is ln(vocab), about 10): a diverged model, and
        raise FloatingPointError(  # an infinite perplexity would make summary.json invalid JSON (`Infinity`)
            f"Validation loss became {mean:.1f} nats per token, a perplexity beyond a float's range; lower `--lr` or "
            "use `--grad-clip`."
        )
    return math.exp(mean)


def plot_losses(log_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_ppl" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if val:
        ax.plot([r["tokens"] for r in val], [math.log(r["val_ppl"]) for r in val], "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- export
def publish(directory: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary directory, then rename it to `directory` (replacing an earlier one), so that a
    kill mid-write leaves no `directory` that looks complete."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export
    write(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def export(method, model, out: Path, merge: bool, tokenizer: data.Tokenizer, card: str) -> None:
    """OUT/final, and with `merge` a dense OUT/merged, from the whole trained `model` (unwrapped, in one process).

    final is SLTrain's PEFT adapter, which holds every trained tensor, with the architecture (config.json) so that it
    loads without a base checkpoint, or any other method's dense Transformers model (LoRA merged, low-rank multiplied
    out), which plain `from_pretrained` loads; both with the tokenizer and `card` as README.md.
    """
    # the adapter is saved before `to_dense`, which merges and unloads it in place
    dense = None if method.saves_adapter else method.to_dense(model)

    def write_final(tmp: Path) -> None:
        if method.saves_adapter:
            model.save_pretrained(tmp)
            model.get_base_model().config.save_pretrained(tmp)
        else:
            dense.save_pretrained(tmp)
        tokenizer.save(tmp)
        (tmp / "README.md").write_text(card)  # replaces PEFT's empty template

    publish(out / "final", write_final)
    if merge:
        if dense is None:
            dense = method.to_dense(model)
        publish(out / "merged", lambda tmp: (dense.save_pretrained(tmp), tokenizer.save(tmp)))


def check_hub(args: argparse.Namespace, accelerator: Accelerator) -> model_card.HubTarget | None:
    """Where `--push-to-hub` uploads, on the main process (None on the others); a `HubError` on every process where
    the main one's check fails, so that all stop alike (the others would fail at their next collective, noisily)."""
    hub = failure = None
    if accelerator.is_main_process:
        try:
            name = Path(args.out_dir).resolve().name
            hub = model_card.check_hub_access(None, args.hub_model_id, name, HUB_FLAGS, args.hub_private)
        except model_card.HubError as error:
            failure = error
    if accelerator.num_processes > 1:
        failed = broadcast(torch.tensor([failure is not None], dtype=torch.int32, device=accelerator.device))
        if failed.item() and failure is None:
            failure = model_card.HubError("`--push-to-hub`: the main process's check of the Hub failed (its error).")
    if failure is not None:
        raise failure
    if hub is not None:
        final = Path(args.out_dir) / "final"
        print(f"pretrain.py: Hub: logged in as {hub.user}; {final} goes to {hub.repo_id} at the end")
    return hub


def whole_model(method, model_config: LlamaConfig, hyper: Hyper, state_dict: dict) -> torch.nn.Module:
    """The trained model on the CPU, built afresh and loaded from its full `state_dict` (FSDP's, gathered to the main
    process), so that `export` writes what it writes without FSDP. Holds a second copy of the weights."""
    model = method.build(model_config, hyper)
    model.load_state_dict(state_dict)
    return model


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = resolve(parse_args(argv))
    method = get_method(args.method)
    cpu = not torch.cuda.is_available()  # lets `torchrun --nproc_per_node N` run DDP over gloo on a CPU machine
    # the process group, with its timeout, before the Accelerator (as Transformers makes it): accelerate's
    # InitProcessGroupKwargs passes a timeout only where it differs from its own default, so 600 s would be dropped
    PartialState(cpu=cpu, timeout=timedelta(seconds=args.ddp_timeout))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],  # supports are identical per rank
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.resume and not args.micro_batch_given:  # the run's own, unless another is given
        args.micro_batch = saved_micro_batch(args.out_dir) or args.micro_batch
    grad_accum, micro_note = fit_micro_batch(args, world)
    if args.per_layer_updates and (world > 1 or grad_accum > 1):
        raise ValueError(
            "`--per-layer-updates` needs one process and no gradient accumulation "
            f"(got {counted(world, 'process', 'processes')}, "
            f"{counted(grad_accum, 'accumulation step', 'accumulation steps')})"
            + (f": pass `--micro-batch {args.global_batch}` if it fits in memory." if world == 1 else ".")
        )
    if not method.checkpointable and (args.save_every or args.resume):
        raise ValueError(
            f"`--method {args.method}` keeps optimizer state that cannot be saved without pickle; "
            "`--save-every` and `--resume` are not available for it."
        )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and (args.resume or args.save_every or args.per_layer_updates):
        raise ValueError(
            "Under FSDP the optimizer state is sharded; `--save-every`, `--resume` and "
            "`--per-layer-updates` are not supported there yet (the final model is still saved)."
        )
    if fsdp and args.compute == "batched":
        raise ValueError(
            "`--compute batched` rebuilds like-shaped layers' weights together, and FSDP shards them: use "
            "`--compute auto` (or dense) under FSDP, or run with DDP."
        )
    if fsdp and (method.after_step is not None or method.make_optimizer is not adamw):
        raise ValueError(  # ReLoRA merges whole weights; GaLore and Fira project whole 2-D gradients
            f"`--method {args.method}` needs each weight whole on every process, and FSDP shards them: run it with "
            "DDP (`accelerate launch --multi_gpu`, or torchrun)."
        )
    hub = None
    if args.push_to_hub:  # fail now, not after the training (nor after an --overwrite)
        hub = check_hub(args, accelerator)
    config = trajectory_config(args, world)
    resume_from = check_out_dir(args, config)
    if accelerator.is_main_process:
        for note in args.resume_notes:
            print(f"pretrain.py: --resume: {note}")
    out = Path(args.out_dir)
    if accelerator.is_main_process:
        if micro_note:
            print(f"pretrain.py: {micro_note}")
        processes = counted(world, "process", "processes")
        print(  # (`accelerate launch --cpu` starts one process whatever --num_processes says: this line shows it)
            f"pretrain.py: {processes}, global batch {args.global_batch} = micro-batch {args.micro_batch} x "
            f"{counted(grad_accum, 'accumulation step', 'accumulation steps')} x {processes}"
        )

    # ------------------------------------------------------------------------------------------------------ data
    cache = out.parent / ".cache"  # trained tokenizers, by content hash
    cached_before = set(cache.glob("tokenizer-*.json")) if cache.is_dir() else None
    if accelerator.is_main_process:  # what the first seconds (up to a minute on a large corpus) before the bar do
        what = "streaming" if args.dataset else "reading"
        trains = " and training its tokenizer (cached by content)" if args.tokenizer == "train" else ""
        print(f"pretrain.py: {what} the data{trains}, tokenising it", flush=True)
    try:
        if args.dataset:
            train_texts = data.stream_hf_dataset(args.dataset, args.dataset_config, "train")
            tokenizer = data.load_tokenizer(args.tokenizer)
            if args.validation_files:  # for a dataset without a validation split: local held-out text
                val_text = data.read_texts(args.validation_files, "--validation-files")
                val_tokens = data.tokenize_text(tokenizer, val_text)
            else:  # its first 2000 validation documents, joined by EOS as the training documents are
                val_split = data.stream_hf_dataset(args.dataset, args.dataset_config, "validation")
                val_tokens = data.tokenize_documents(tokenizer, itertools.islice(val_split, 2000))
        else:
            train_text, val_text = data.local_corpus(args.train_files, args.validation_files)
            if args.tokenizer == "train":
                with accelerator.main_process_first():  # one process trains it, the others read the cache
                    tokenizer = data.train_tokenizer(train_text, args.vocab_size, cache_dir=cache)
            else:
                tokenizer = data.load_tokenizer(args.tokenizer)
            val_tokens = data.tokenize_text(tokenizer, val_text)
        texts = {} if args.dataset else {"train": train_text}
        if not args.dataset or args.validation_files:
            texts["validation"] = val_text
        config["data_sha256"] = data_digest(tokenizer, texts)
        if resume_from is not None:
            check_same_data(out, config["data_sha256"])
        val_blocks = data.to_blocks(val_tokens, args.seq_len)[: args.eval_blocks]
        if len(val_blocks) == 0:
            raise ValueError(f"The validation text is shorter than one sequence of {args.seq_len} tokens.")
        if len(val_blocks) < args.eval_blocks and accelerator.is_main_process:
            print(f"pretrain.py: the validation text has {len(val_blocks):,} sequences of {args.seq_len} tokens, "
                  f"fewer than --eval-blocks {args.eval_blocks:,}: all of them are scored")  # fmt: skip
        if args.dataset:
            sampler = data.StreamingBlocks(train_texts, tokenizer, args.seq_len, args.micro_batch, grad_accum, world)
        else:
            train_blocks = data.to_blocks(data.tokenize_text(tokenizer, train_text), args.seq_len)
            sampler = data.BlockSampler(train_blocks, args.micro_batch, grad_accum, world, seed=args.seed)
    except ValueError:  # the data checks need the tokenizer: a command that fails them keeps no cache of it
        if cache.is_dir():  # every process (they all fail alike) removes what was cached since it looked
            for path in set(cache.glob("tokenizer-*.json")) - (cached_before or set()):
                path.unlink(missing_ok=True)
            if cached_before is None:
                with suppress(OSError):  # not empty, or already removed by another process
                    cache.rmdir()
        raise

    # ----------------------------------------------------------------------------------------------------- model
    if args.tokenizer == "train" and tokenizer.vocab_size < args.vocab_size and accelerator.is_main_process:
        print(  # (BPE stops where the text has no pair left to merge: the embedded corpus gives 27,664 of 32,000)
            f"pretrain.py: the trained tokenizer has {tokenizer.vocab_size:,} tokens, fewer than --vocab-size "
            f"{args.vocab_size:,} (the training text has no more merges); the model's vocabulary is the tokenizer's"
        )
    model_config = LlamaConfig(**{**args.model_config, "vocab_size": tokenizer.vocab_size})
    # EOS separates documents in the packed blocks, which have no padding: no `pad_token_id`, since LLaMA zeroes the
    # embedding of that id and never trains it (`sample.py` gives `generate` its pad id)
    model_config.eos_token_id, model_config.pad_token_id = tokenizer.eos_token_id, None
    model_config.bos_token_id = None
    hyper = hyper_from_args(args)
    torch.manual_seed(args.seed)
    model = method.build(model_config, hyper)
    counts = peft_sltrain.module_parameter_counts(model)
    if args.activation_checkpointing:
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(hf_model, "activation_checkpointing_enable"):  # Transformers' new name (the old one warns)
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device).train()
    if args.compile:
        model.compile()

    # ------------------------------------------------------------------------------------------------- optimizer
    schedule = lr_lambda(args, method, hyper)
    if args.per_layer_updates:
        make = lambda params: plain_optimizer(params, hyper, args.optimizer)  # noqa: E731
        optimizer = PerLayerOptimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], make, schedule)
        scheduler = None
    else:
        optimizer = make_optimizer(model, method, hyper, args.optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        model, optimizer = accelerator.prepare(model, optimizer)

    if resume_from is None:  # data, model and optimizer are fine: only now does the run directory change
        init_out_dir(args, config, accelerator)
    if accelerator.is_main_process:
        tokenizer.save(out / "tokenizer")

    start_step, tokens_seen, earlier_seconds = 0, 0, 0.0  # earlier_seconds: training time before this command
    timed_tokens = 0  # the tokens of the steps in the training time (all but a compiling first step, see below)
    if resume_from is not None:
        if accelerator.is_main_process:
            checkpointing.remove_stale_temporaries(out / "checkpoints")
        model_state, state = checkpointing.load_checkpoint(resume_from)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank], accelerator.device)
        start_step, tokens_seen = state["step"], state["tokens"]
        timed_tokens = state.get("timed_tokens", tokens_seen)  # (not in a checkpoint from before it was recorded)
        earlier_seconds = state.get("train_seconds")  # None: a checkpoint from before it was recorded
        if isinstance(sampler, data.StreamingBlocks):
            sampler = data.StreamingBlocks(
                train_texts, tokenizer, args.seq_len, args.micro_batch, grad_accum, world, start_step=start_step
            )

    # ---------------------------------------------------------------------------------------------- training loop
    log = None
    if accelerator.is_main_process:
        log_path = out / "log.jsonl"
        if resume_from is not None and log_path.exists():  # drop rows logged after the checkpoint we resume from
            rows = [line for line in log_path.read_text().splitlines() if logged_step(line) <= start_step]
            log_path.write_text("".join(row + "\n" for row in rows))
        log = open(log_path, "a")

    def write_log(row: dict) -> None:
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def save(step: int) -> None:
        state = {
            "step": step,
            "tokens": tokens_seen,
            "train_seconds": None if earlier_seconds is None else earlier_seconds + train_time,
            "timed_tokens": timed_tokens,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": [rng_state(accelerator.device)],
        }
        if world > 1:  # every rank's RNG state, gathered to the main process
            state["rng"] = [None] * world
            torch.distributed.all_gather_object(state["rng"], rng_state(accelerator.device))
        model_state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            checkpointing.save_checkpoint(
                out / "checkpoints" / f"{checkpointing.CHECKPOINT_PREFIX}{step:06d}", model_state, state
            )
            if args.keep_last:  # only now that a newer one is whole
                checkpointing.prune_checkpoints(out / "checkpoints", args.keep_last)
            record_micro_batch(out, args.micro_batch)
        accelerator.wait_for_everyone()

    # numba compiles its kernels on first use (or loads them from its disk cache): now, not in the first (timed) step
    kernel_compile_seconds = None
    sltrain_layers = [m for m in model.modules() if isinstance(m, peft_sltrain.SLTrainLayer)]
    if accelerator.device.type == "cpu" and any(
        c in ("auto", "factored") for m in sltrain_layers for c in m.compute.values()
    ):
        if accelerator.is_main_process and peft_sltrain.cpu_kernels.AVAILABLE:
            print("pretrain.py: getting numba's CPU kernels ready (about 25 s the first time, then loaded from "
                  "numba's disk cache)", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        if peft_sltrain.cpu_kernels.warm_up([torch.bfloat16 if args.dtype == "bf16" else torch.float32]):
            kernel_compile_seconds = time.perf_counter() - t0  # None where numba's kernels do not run

    tokens_per_step = args.global_batch * args.seq_len
    bar = tqdm(
        range(start_step, args.max_steps),
        initial=start_step,
        total=args.max_steps,
        disable=not accelerator.is_main_process,
        desc=f"{args.method}",
        dynamic_ncols=True,
    )
    train_time, val_ppl, compile_step_seconds, timed_at_start = 0.0, None, None, timed_tokens
    for step in bar:
        t0 = time.perf_counter()
        batches = sampler.micro_batches(step, rank)
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            batch = batch.to(accelerator.device)
            sync = i == len(batches) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss / len(batches))
            loss_sum += loss.detach()
        if scheduler is not None:
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step trains at
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        else:
            lr = optimizer.lr  # its parameters stepped during backward, at this rate
            optimizer.step_schedules()
        if method.after_step is not None:
            method.after_step(accelerator.unwrap_model(model), optimizer, step + 1, hyper)
        loss_value = accelerator.reduce(loss_sum / len(batches), reduction="mean").item()
        if args.compile and step == start_step:  # torch.compile compiles in this command's first step: not timed
            compile_step_seconds = time.perf_counter() - t0
        else:
            train_time += time.perf_counter() - t0
            timed_tokens += tokens_per_step
        tokens_seen += tokens_per_step
        done = step + 1
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"Loss became {loss_value} at step {done}; lower `--lr` or use `--grad-clip`.")
        memory, _ = peak_memory_bytes(accelerator.device)
        bar.set_postfix(
            loss=f"{loss_value:.3f}",
            tok_s=f"{(timed_tokens - timed_at_start) / train_time:.0f}" if train_time else "-",
            mem=f"{memory / 2**30:.2f}G",
        )
        write_log({"step": done, "tokens": tokens_seen, "loss": loss_value, "lr": lr})
        if done % args.eval_every == 0 or done == args.max_steps:
            val_ppl = evaluate(model, val_blocks, args.micro_batch, accelerator)
            write_log({"step": done, "tokens": tokens_seen, "val_ppl": val_ppl})
        if args.save_every and not fsdp and (done % args.save_every == 0 or done == args.max_steps):
            save(done)

    # ---------------------------------------------------------------------------------------- summary and export
    if val_ppl is None:  # resumed at the very end: evaluate what was loaded
        val_ppl = evaluate(model, val_blocks, args.micro_batch, accelerator)
    memory, memory_kind = peak_memory_bytes(accelerator.device)
    final_state = accelerator.get_state_dict(model) if fsdp else None  # gathered to the main process
    accelerator.wait_for_everyone()
    seconds = None if earlier_seconds is None else earlier_seconds + train_time  # all steps, over every command
    summary = {
        "method": args.method,
        "model": args.model,
        "val_ppl": val_ppl,
        "val_tokens": val_blocks.numel() - len(val_blocks),  # the predicted tokens it averages over
        "method_version": method.version,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "tokens_per_s": timed_tokens / seconds if seconds else None,
        "tokens": tokens_seen,
        "train_seconds": seconds,
        "kernel_compile_seconds": kernel_compile_seconds,  # this command's, not in train_seconds
        "compile_step_seconds": compile_step_seconds,  # this command's first step under --compile, not in them either
        **training_state_bytes(accelerator.unwrap_model(model), optimizer, accelerator if fsdp else None),
        "processes": world,
        "device": str(accelerator.device),
        "torch": torch.__version__,
    }
    if seconds is None:
        summary["timing_note"] = f"unknown: resumed from {resume_from}, saved before checkpoints recorded the time"
    elif seconds == 0:
        summary["timing_note"] = "no timed step: with --compile each command's first step compiles and is not timed"
    if accelerator.is_main_process:
        log.close()
        plot_losses(out / "log.jsonl", out / "loss.png", f"{args.method} on LLaMA-{args.model}")
        (out / "summary.json").unlink(missing_ok=True)  # written last, so that it marks a complete export
        final = accelerator.unwrap_model(model)
        if fsdp:  # each rank holds only its shards of the model
            final = whole_model(method, model_config, hyper, final_state)
        command = shlex.join(["python", "scripts/pretrain.py", *(sys.argv[1:] if argv is None else argv)])
        resumed = resume_from is not None
        repo_id = None if hub is None else hub.repo_id  # (the card's loading code names it)
        card = pretrain_card.build(
            summary, config, command, method.saves_adapter, model_config.vocab_size, resumed, repo_id
        )
        export(method, final, out, args.merge, tokenizer, card)
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")
        tokens_per_s = "unknown" if summary["tokens_per_s"] is None else f"{summary['tokens_per_s']:.0f}"
        print(
            f"final {args.method}: val_ppl={val_ppl:.2f} trainable={counts.trainable:,} total={counts.total:,} "
            f"params+grads+optimizer={summary['training_state_bytes'] / 2**20:.1f}MiB "
            f"peak_mem={memory / 2**20:.0f}MiB ({memory_kind}) tokens/s={tokens_per_s}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if hub is not None:  # after the last collective: the other processes may exit, none waits in a barrier that
        # an upload longer than the process group's timeout (NCCL: 10 min) would kill; a failure says that
        # everything is on disk, and the command that uploads it
        model = pretrain_card.model_name(args.model)
        message = f"Upload a scripts/pretrain.py run: {args.method} on LLaMA-{model}, tokenizer, model card"
        url = model_card.upload(out / "final", hub, private=args.hub_private or None, message=message)
        print(f"pretrain.py: uploaded {out / 'final'} to {url}")
    return summary


def cli(argv: list[str] | None = None) -> None:
    """`main` as a command: bad input or a diverged loss stops with one clear line on stderr, no traceback, and exit
    status 1 for bad input, `DIVERGED` for a diverged loss (so that a learning-rate sweep can tell them apart)."""
    try:
        main(argv)
    except FloatingPointError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        raise SystemExit(DIVERGED) from None
    except (ValueError, model_card.HubError) as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None
    except KeyboardInterrupt:  # Ctrl-C: saved checkpoints are whole (a save in flight is a temporary, dropped later)
        print(f"pretrain.py: interrupted; {interrupted_hint(argv)}", file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_hint(argv: list[str] | None) -> str:
    """Where an interrupted run can go on from."""
    try:
        out = Path(parse_args(argv).out_dir)
    except (SystemExit, ValueError):
        return "run the same command with `--resume` to continue from its newest checkpoint."
    checkpoint = checkpointing.latest_checkpoint(out)
    if checkpoint is None:
        return f"{out} has no checkpoint to resume from (`--save-every` saves them)."
    return f"run the same command with `--resume` to continue from {checkpoint}."


if __name__ == "__main__":
    cli()
