"""`SLTrainConfig`: the PEFT config of the SLTrain method."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registration import PEFT_TYPE
from .cost import COMPUTE_CHOICES

# the heads that PEFT's task models add to `modules_to_save` (PeftModelForSequenceClassification and friends)
HEADS_PEFT_ADDS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                   "QUESTION_ANS": ["qa_outputs"]}  # fmt: skip


def add_task_heads(config) -> None:
    """Lists the heads of `config.task_type` (`HEADS_PEFT_ADDS`) in `config.modules_to_save`, where PEFT's task model
    puts them: its token-classification and question-answering models do so only after injecting the adapter, so that
    "all-linear" would target the head first (a 2-wide `qa_outputs`: refused halfway through the model)."""
    heads = [h for h in HEADS_PEFT_ADDS.get(config.task_type, []) if h not in (config.modules_to_save or [])]
    if heads:
        config.modules_to_save = [*(config.modules_to_save or []), *heads]


def is_all_linear(target_modules) -> bool:
    """Whether `target_modules` is PEFT's shorthand for every linear layer, which PEFT takes in any case."""
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


@dataclass
class SLTrainConfig(PeftConfig):
    """
    Configuration of an SLTrain adapter ([`SLTrainModel`]): every targeted linear layer computes
    `y = x @ (W0 + (alpha / r) * B @ A + S).T + bias` with a rank-`r` product `B @ A` and a sparse `S` whose support
    (a fraction `sparsity` of the entries, drawn uniformly at random once) is fixed; `B`, `A` and the nonzero values of
    `S` are trained.

    Args:
        r (`int`, defaults to `128`):
            Rank of the low-rank factors `B` (d_out x r) and `A` (r x d_in). Must be at most `min(d_in, d_out)` of
            every targeted layer. The paper uses 128 for LLaMA-60M, 256 for 130M/350M, 512 for 1B, 1024 for 7B.
        sparsity (`float`, defaults to `0.03`):
            Fraction `delta` of the entries of each targeted weight that the sparse factor `S` may change, in (0, 1).
            Each layer trains `round(sparsity * d_out * d_in)` values, at least 1. The paper uses 0.03 (0.05 at 7B).
        alpha (`float`, defaults to `32.0`):
            The low-rank product is scaled by `alpha / r`. The scale matters a great deal for pretraining: the
            paper's settings give 0.25 at 60M and 0.0625 at 130M/350M.
        target_modules (`Union[list[str], str]`, *optional*):
            Names of the modules to replace (exact names or suffixes, e.g. `["q_proj", "v_proj"]`), a regex matched
            against the full module name, or `"all-linear"`. Only `torch.nn.Linear` and Transformers `Conv1D` (GPT-2's
            linear layer) modules can be targeted. If not set, known architectures get the defaults in
            `TARGET_MODULES_MAPPING` (every attention and MLP projection for decoders such as LLaMA, GPT-2, OPT, Phi or
            Falcon; the query and value projections for encoders such as BERT/RoBERTa, DeBERTa-v2 or T5).
        exclude_modules (`Union[list[str], str]`, *optional*):
            Names or a regex of modules not to replace, even if `target_modules` matches them.
        layers_to_transform (`Union[list[int], int]`, *optional*):
            Only replace the targeted modules of these layer indices (e.g. `[10, 11]`: the last two blocks of a
            12-layer model), as in LoRA. Needs `target_modules` as a list of names, not a regex or `"all-linear"`.
        layers_pattern (`Union[list[str], str]`, *optional*):
            Name of the module list that holds the layers (e.g. `"layers"` or `"h"`), used with `layers_to_transform`
            when PEFT does not recognise it by itself.
        modules_to_save (`list[str]`, *optional*):
            Modules other than the SLTrain layers to train fully and save with the adapter, e.g. a classification
            head. With `task_type="SEQ_CLS"`, PEFT adds `classifier` and `score` automatically. Not allowed with
            `from_scratch=True`, which already trains and saves every parameter that is not replaced (nor is a
            `task_type` for which PEFT adds its head: `SEQ_CLS`, `TOKEN_CLS`, `QUESTION_ANS`).
        ensure_weight_tying (`bool`, defaults to `False`):
            Fine-tuning a model whose input embeddings share their weight with other layers (a tied LM head, as in
            GPT-2 or `tie_word_embeddings=True`) with one of them in `modules_to_save`: `True` trains one copy of the
            shared weight, which both use (the embeddings are the module saved; the tied layers follow them), as
            LoRA's option of that name does. `False` keeps PEFT's default, which unties them: the module named trains
            a copy while the others keep the original frozen weight (a warning says so). Tied modules are found by
            their weight, whatever their names (PEFT's own check knows `embed_tokens` and `lm_head` only).
        from_scratch (`bool`, defaults to `False`):
            `False` (fine-tuning): `W0` is the base layer's frozen pretrained weight and the adapter starts as a zero
            delta (`B = 0`, `S = 0`, `A` Kaiming-uniform), so the wrapped model starts equal to the base model.
            `True` (pretraining): the targeted layers keep no dense weight at all, `W = (alpha / r) * B @ A + S`,
            initialised as the paper's code (`B = 0`, `A` Kaiming-uniform, `S` values uniform(-1/sqrt(d_in),
            1/sqrt(d_in))); every other parameter (embeddings, norms, head, biases) stays trainable and is saved with
            the adapter. A base model built on the meta device (`accelerate.init_empty_weights()`) is never given
            dense targeted weights; its other parameters are materialised on the current default device and
            initialised with the model's own init, except the targeted layers' biases, which start at zero.
        seed (`int`, defaults to `0`):
            Seed of the random supports. The support of each layer is derived from this seed and the layer's module
            name, so it is reproducible and differs between layers. The supports are also saved with the adapter
            (unless `save_support=False`).
        bias (`str`, defaults to `"none"`):
            Which biases to train in fine-tuning mode: `"none"`, `"all"` or `"sltrain_only"` (the biases of the
            targeted layers). Ignored when `from_scratch=True`, where all biases are trained.
        save_support (`bool`, defaults to `True`):
            Save each layer's support (int32, 4 bytes per nonzero) in the adapter file. With `False` the file keeps
            only a 64-bit fingerprint per layer: loading regenerates the supports from `seed` and the layer names
            and refuses a mismatch (a PyTorch whose random generator draws differently), which makes the file
            smaller by 4 bytes per nonzero (two thirds of `S` in bf16).
        compute (`str`, defaults to `"auto"`):
            How each layer computes its exact result: `"dense"` rebuilds the dense weight (the paper's way),
            `"factored"` never forms a dense d_out x d_in matrix (low-rank products plus sparse kernels: numba's on CPU
            where it is installed, else PyTorch's), `"auto"` picks the cheaper per call from the token count, shapes,
            rank, sparsity, device and dtype (see `peft_sltrain.cost`). Both agree with a dense reference; results
            differ only by rounding. Outside `torch.func`, only the dense path has a second derivative (double
            backward); `model.set_compute(...)` switches a model in hand. `"batched"` (from scratch, for GPUs) rebuilds
            like-shaped layers' weights in groups of up to 32 MiB, one batched GEMM per group in forward and again in
            backward: fewer kernel launches, which bound 60M steps (and smaller micro-batches at 350M) on a GPU, and no
            weight kept from forward to backward; layers fall back to the dense path without grad and with a frozen
            `W0`, and build their own weight where the model's forward is not the caller (see `peft_sltrain.batched`);
            it is refused in a sharded model (FSDP, DTensors, ZeRO-3). `"auto"` takes it for from-scratch layers
            trained on a GPU (faster than the dense path on every 32k-token step measured, and peaking no higher in
            every step), except in a sharded model; for a second derivative for the factors there (gradient penalties
            on the parameters), set `"dense"`.
    """

    r: int = field(
        default=128,
        metadata={"help": "Rank of the low-rank factors B (d_out x r) and A (r x d_in); at most min(d_in, d_out)."},
    )
    sparsity: float = field(
        default=0.03,
        metadata={
            "help": "Fraction (delta) of each targeted weight's entries that the sparse factor S trains, in (0, 1)."
        },
    )
    alpha: float = field(
        default=32.0,
        metadata={"help": "The low-rank product B @ A is scaled by alpha / r."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (or suffixes) of the nn.Linear or Conv1D modules to replace, a regex matched against the full "
                "module name, or 'all-linear'. Defaults per architecture when not set."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names or a regex of modules not to replace, even if target_modules matches them."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only replace the targeted modules of these layer indices (target_modules must be a list)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the module list holding the layers (e.g. 'layers', 'h'), for layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules other than the SLTrain layers to train fully and save, e.g. a classifier head. Not allowed "
                "with from_scratch=True, which already trains and saves every parameter it does not replace."
            )
        },
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata={
            "help": (
                "Keep the input embeddings and the layers that share their weight (a tied LM head) tied when one of "
                "them is in modules_to_save: one trainable copy, used by both. False unties them, as PEFT does."
            )
        },
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": (
                "False: fine-tune a frozen W0 with a zero-initialised B @ A + S delta. True: pretraining, the "
                "targeted layers hold no dense weight (W = B @ A + S) and all other parameters are trained and saved."
            )
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random supports; each layer's support derives from it and the layer's name."},
    )
    bias: Literal["none", "all", "sltrain_only"] = field(
        default="none",
        metadata={"help": "Biases to train when fine-tuning: 'none', 'all' or 'sltrain_only'. Ignored from scratch."},
    )

    save_support: bool = field(
        default=True,
        metadata={
            "help": (
                "Save the int32 supports in the adapter file; False keeps a 64-bit fingerprint per layer and "
                "regenerates the supports from the seed on loading, refusing a mismatch."
            )
        },
    )
    compute: Literal["auto", "dense", "factored", "batched"] = field(
        default="auto",
        metadata={
            "help": (
                "'dense' rebuilds the dense weight, 'factored' never forms it (low-rank products plus sparse "
                "kernels), 'auto' picks the cheaper per call from tokens, shapes, rank, sparsity, device and dtype "
                "(and 'batched' for from-scratch training on a GPU, not under FSDP or ZeRO-3); 'batched' (from "
                "scratch, for GPUs) rebuilds like-shaped layers' weights in groups, one batched GEMM per group in "
                "forward and again in backward."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if is_all_linear(self.target_modules):
            self.target_modules = "all-linear"  # PEFT takes it in any case; saved as written here
        self.validate()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        """As PEFT's, with `modules_to_save` listed once: PEFT's token-classification and question-answering models
        append their head to it on every load, already listed or not."""
        out = super().to_dict()
        if out.get("modules_to_save") is not None:
            out["modules_to_save"] = list(dict.fromkeys(out["modules_to_save"]))
        return out

    def validate(self) -> None:
        """`ValueError` naming the first field with a bad value. Run at construction and again when an adapter is
        added, so that a field changed afterwards (`config.alpha = ...`) is checked too. Normalises what it accepts
        in another form: numpy numbers (a sweep's ranks) become Python's (PEFT saves the config as JSON), and a single
        `modules_to_save` name a list (PEFT would take its letters for module names)."""
        for name in ("r", "seed", "sparsity", "alpha"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                setattr(self, name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                setattr(self, name, float(value))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ValueError(f"`sparsity` must be a number in (0, 1), got {self.sparsity!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"`alpha` must be a positive finite number, got {self.alpha!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}.")
        if not isinstance(self.save_support, bool):
            raise ValueError(f"`save_support` must be True or False, got {self.save_support!r}.")
        if not isinstance(self.ensure_weight_tying, bool):
            raise ValueError(f"`ensure_weight_tying` must be True or False, got {self.ensure_weight_tying!r}.")
        if not isinstance(self.from_scratch, bool):
            raise ValueError(f"`from_scratch` must be True or False, got {self.from_scratch!r}.")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"`compute` must be one of {COMPUTE_CHOICES}, got {self.compute!r}.")
        if self.bias not in ("none", "all", "sltrain_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'sltrain_only', got {self.bias!r}.")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            names = [value] if isinstance(value, str) else value
            if value is not None and not (
                isinstance(names, (list, set, tuple)) and all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"`{name}` must be a string, a list of strings or None, got {value!r}.")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, (list, tuple)) and all(type(i) is int and i >= 0 for i in layers)  # no bools
        ):
            raise ValueError(
                f"`layers_to_transform` must be a layer index or a list of them (ints >= 0), got "
                f"{self.layers_to_transform!r}."
            )
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        if patterns is not None and not (
            isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)
        ):
            raise ValueError(f"`layers_pattern` must be a string or a list of strings, got {self.layers_pattern!r}.")
        if patterns is not None and layers is None:
            raise ValueError(f"`layers_pattern` ({self.layers_pattern!r}) needs `layers_to_transform` as well.")
        if layers is not None and isinstance(self.target_modules, str):
            raise ValueError(
                f"`layers_to_transform` ({self.layers_to_transform!r}) needs `target_modules` as a list of names, got "
                f"{self.target_modules!r}."
            )
        if self.from_scratch and self.task_type in HEADS_PEFT_ADDS:
            raise ValueError(
                f"`task_type` must not be {str(self.task_type)!r} with `from_scratch=True`: PEFT's model for it keeps "
                "a second, trainable copy of the head (`modules_to_save`), while from scratch already trains and "
                "saves every parameter. Leave `task_type` unset; the model's own forward (labels, loss) works as is."
            )
        if self.from_scratch and self.modules_to_save:
            raise ValueError(
                f"`modules_to_save` must be empty with `from_scratch=True` (every non-replaced parameter is already "
                f"trained and saved), got {self.modules_to_save!r}."
            )

    @property
    def scaling(self) -> float:
        """The factor `alpha / r` applied to `B @ A`."""
        return self.alpha / self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config, and check the adapter's weights file (in a local directory, or fetched from the Hub as
        PEFT would) before any model is touched (`PeftModel.from_pretrained` reads the config first; without this
        check a missing file would fail only after the model was wrapped, with a hub error). A directory with the
        config alone: `PeftConfig.from_pretrained`."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        from .checkpoint import check_adapter_file, check_hub_adapter_file

        if os.path.isdir(directory):
            check_adapter_file(directory)
        elif not os.path.isdir(pretrained_model_name_or_path):  # a Hub repository id: downloaded as PEFT does
            download = {k: v for k, v in cls._split_kwargs(kwargs)[0].items() if k != "subfolder"}
            check_hub_adapter_file(pretrained_model_name_or_path, subfolder, download)
        return config
