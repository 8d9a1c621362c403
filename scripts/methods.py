"""Pretraining methods: one small registry entry each, shared by `pretrain.py` and the benchmarks.

A method says how to build the model to train from a LLaMA config (`build`), which optimizer trains it
(`make_optimizer`, AdamW unless it says otherwise), what to do after each optimizer step (`after_step`, e.g. ReLoRA's
restarts), and how to turn the trained model into a plain dense Transformers model (`to_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

import peft_sltrain

# the paper's targets: every attention and MLP projection; embeddings, norms and lm_head stay dense
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Hyper:
    """What a method may read: the low-rank / sparse settings (from the size preset or the command line) and the
    optimizer settings."""

    rank: int = 128
    sparsity: float = 0.03
    alpha: float = 32.0
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_steps: int = 1000
    warmup_steps: int = 0  # of the whole run's schedule (ReLoRA's restarts warm up again only after it)
    seed: int = 0
    compute: str = "auto"  # SLTrain's `compute` (`--compute`)
    extra: dict = field(default_factory=dict)  # method-specific knobs, e.g. ReLoRA's restart interval


def adamw(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=hyper.lr, betas=hyper.betas, weight_decay=hyper.weight_decay)


@dataclass
class Method:
    name: str
    summary: str
    build: Callable[[LlamaConfig, Hyper], nn.Module]
    to_dense: Callable[[nn.Module], PreTrainedModel]
    make_optimizer: Callable[[nn.Module, Hyper], torch.optim.Optimizer] = adamw
    # called after each optimizer step with the unwrapped model, the optimizer (a torch optimizer, or under
    # `--per-layer-updates` an object holding one per parameter in `.optimizers`), the steps done and the settings
    after_step: Callable[[nn.Module, torch.optim.Optimizer, int, Hyper], None] | None = None
    lr_multiplier: Callable[[int, Hyper], float] | None = None  # multiplies the warmup-cosine schedule
    reads: tuple[str, ...] = ("rank",)  # which of `--rank`, `--sparsity`, `--alpha` (or the preset's) it uses
    checkpointable: bool = True  # False when the optimizer state holds objects that safetensors cannot store
    # `--method-arg` settings it reads from `Hyper.extra`: name -> type (int or float); every one must be positive
    options: dict[str, type] = field(default_factory=dict)
    # refuses settings that `build` would fail on or that would spoil training (ValueError), before data is read
    check: Callable[[LlamaConfig, Hyper], None] | None = None
    # whether the trained model is saved as a PEFT adapter (SLTrain: the adapter holds every trained tensor); else as
    # its dense Transformers model (`to_dense`), which plain `from_pretrained` loads
    saves_adapter: bool = False
    # a package its optimizer imports that is not a core dependency (checked before anything runs)
    requires: str | None = None
    # raised when what a run of it computes changes: a run saved by another version does not resume (runs recorded
    # none before, which reads as 1)
    version: int = 1


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown `--method` {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def parse_method_args(method: Method, entries: list[str]) -> dict:
    """`--method-arg KEY=VALUE` entries as {key: typed value}, checked against the method's `options`."""
    extra = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"`--method-arg` must be KEY=VALUE, got {entry!r}.")
        if key not in method.options:
            takes = f"one of {sorted(method.options)}" if method.options else "none"
            raise ValueError(
                f"`--method-arg {entry}`: `--method {method.name}` has no setting {key!r} (it takes {takes})."
            )
        kind = method.options[key]
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise ValueError(f"`--method-arg {entry}`: {key} must be a positive {kind.__name__}, got {text!r}.")
        extra[key] = value
    return extra


def check_rank_fits(config: LlamaConfig, rank: int) -> None:
    """`ValueError` unless `rank` fits every projection (the smallest side is the attention head block)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_dim = head_dim * (config.num_key_value_heads or config.num_attention_heads)
    smallest = min(config.hidden_size, config.intermediate_size, kv_dim)
    if not 0 < rank <= smallest:
        raise ValueError(
            f"`--rank` {rank} does not fit the model: it must be in [1, {smallest}] (the smallest projection side of "
            f"hidden {config.hidden_size}, intermediate {config.intermediate_size})."
        )


# ----------------------------------------------------------------------------------------------------------- full
def _build_full(config: LlamaConfig, hyper: Hyper) -> nn.Module:
    return AutoModelForCausalLM.from_config(config)


register(Method("full", "dense AdamW on every weight (full-rank baseline)", _build_full, lambda m: m, reads=()))


# -------------------------------------------------------------------------------------------------------- sltrain
def sltrain_config(hyper: Hyper) -> peft_sltrain.SLTrainConfig:
    return peft_sltrain.SLTrainConfig(
        r=hyper.rank,
        sparsity=hyper.sparsity,
        alpha=hyper.alpha,
        from_scratch=True,
        target_modules=LLAMA_PROJECTIONS,
        seed=hyper.seed,
        compute=hyper.compute,
    )


def _build_sltrain(config: LlamaConfig, hyper: Hyper) -> nn.Module:
    check_rank_fits(config, hyper.rank)
    with init_empty_weights():  # the targeted projections never get a dense weight
        base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, sltrain_config(hyper))


def _check_sltrain(config: LlamaConfig, hyper: Hyper) -> None:
    check_rank_fits(config, hyper.rank)
    sltrain_config(hyper)  # its __post_init__ checks the sparsity and alpha


register(
    Method(
        "sltrain",
        "W = (alpha/r) B A + S: low-rank plus fixed-support sparse, from scratch (the paper)",
        _build_sltrain,
        lambda model: model.merge_and_unload(),
        reads=("rank", "sparsity", "alpha"),
        saves_adapter=True,
        check=_check_sltrain,
    )
)


# -------------------------------------------------------------------------------------------------------- lowrank
class LowRankLinear(nn.Module):
    """`y = x @ ((alpha / r) B @ A).T + bias` with no dense weight: the pure low-rank baseline (the paper's "low-rank",
    whose rows come from GaLore's runs of ReLoRA's code: both factors Kaiming-uniform, as `nn.Linear`'s, and the
    product scaled by `lora_alpha / r`). The scale is SLTrain's, so that this is SLTrain without `S` (and with a
    random rather than zero `B`). The init follows ReLoRA's `ReLoRaLinear.reset_parameters` as of 0036cf3 ("init
    both A and B with kaiming"); later ReLoRA code starts `B` at zero, and which one GaLore ran is not recorded."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.scaling = in_features, out_features, scaling
        bound_a, bound_b = 1 / math.sqrt(in_features), 1 / math.sqrt(rank)
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound_a, bound_a))  # (r, d_in)
        self.B = nn.Parameter(torch.empty(out_features, rank).uniform_(-bound_b, bound_b))  # (d_out, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., r), scaled there (r numbers per token, not d_out), then (..., d_out): 2 N r (d_in + d_out) FLOPs
        y = ((x @ self.A.t()) * self.scaling) @ self.B.t()
        return y if self.bias is None else y + self.bias


def replace_projections(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


def _build_lowrank(config: LlamaConfig, hyper: Hyper) -> nn.Module:
    check_rank_fits(config, hyper.rank)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config)
    scaling = hyper.alpha / hyper.rank
    model = replace_projections(
        base, lambda lin: LowRankLinear(lin.in_features, lin.out_features, hyper.rank, scaling, lin.bias is not None)
    )
    peft_sltrain.materialize_meta_parameters(model)
    return model


def _lowrank_to_dense(model: nn.Module) -> PreTrainedModel:
    def dense(module: nn.Module) -> nn.Module:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.scaling * module.B @ module.A)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear

    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense(module))
    return model


def _check_rank(config: LlamaConfig, hyper: Hyper) -> None:
    check_rank_fits(config, hyper.rank)


def _check_rank_and_alpha(config: LlamaConfig, hyper: Hyper) -> None:
    check_rank_fits(config, hyper.rank)
    if not hyper.alpha > 0:
        raise ValueError(f"`--alpha` must be positive (B A is scaled by alpha / r), got {hyper.alpha}.")


register(
    Method(
        "lowrank",
        "W = (alpha/r) B A only, no sparse part (low-rank baseline)",
        _build_lowrank,
        _lowrank_to_dense,
        reads=("rank", "alpha"),
        check=_check_rank_and_alpha,
        version=2,  # 2: B A scaled by alpha / r (1 had it unscaled)
    )
)


# ----------------------------------------------------------------------------------------------------------- lora
def _build_lora(config: LlamaConfig, hyper: Hyper) -> nn.Module:
    """HF PEFT LoRA on a frozen random init (the fine-tuning method misused for pretraining, as the papers compare
    it); embeddings, norms and the head are trained fully, as in the ReLoRA and GaLore baselines."""
    from peft import LoraConfig

    check_rank_fits(config, hyper.rank)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=hyper.rank, lora_alpha=hyper.alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0),
    )
    for name, param in model.named_parameters():
        if ".base_layer." not in name:  # everything but the frozen projection weights W0
            param.requires_grad_(True)
    return model


register(
    Method(
        "lora",
        "W = W0 + (alpha/r) B A with W0 frozen at its random init (HF PEFT LoRA)",
        _build_lora,
        lambda model: model.merge_and_unload(),
        reads=("rank", "alpha"),
        check=_check_rank_and_alpha,
    )
)


# --------------------------------------------------------------------------------------------------------- relora
def _relora_every(hyper: Hyper) -> int:
    return int(hyper.extra.get("relora_every", max(1, hyper.max_steps // 4)))


def _relora_warmup(hyper: Hyper) -> int:
    return int(hyper.extra.get("relora_warmup", max(1, _relora_every(hyper) // 10)))


def _relora_check(config: LlamaConfig, hyper: Hyper) -> None:
    """The rank must fit, a restart must happen, and the warmup after each restart must end before the next (a warmup
    of 1 is none)."""
    _check_rank_and_alpha(config, hyper)
    every, warmup = _relora_every(hyper), _relora_warmup(hyper)
    source = "" if "relora_every" in hyper.extra else " (the default, --max-steps // 4)"
    if every >= hyper.max_steps:
        raise ValueError(
            f"`--method-arg relora_every={every}`{source} must be below --max-steps {hyper.max_steps}: no restart "
            "would happen, and the run would be plain LoRA (`--method lora`)."
        )
    if warmup > 1 and warmup >= every:
        raise ValueError(
            f"`--method-arg relora_warmup={warmup}` must be smaller than relora_every {every}{source}: the learning "
            "rate warms up again after each restart and would stay below its schedule for (nearly) every step."
        )


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind `optimizer`: itself, or one per parameter under `--per-layer-updates`."""
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def _relora_restart(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, hyper: Hyper) -> None:
    """Every `relora_every` steps: merge B A into W0, restart B = 0 and A at random, and drop the LoRA factors'
    optimizer state, step count included (ReLoRA prunes 99% of the moments by magnitude and its code zeroes them,
    keeping the count; a full reset is the simple limit, and with the count restarted Adam's bias correction makes
    the first update after a restart about lr rather than the reference's ~3 lr).

    The new `A`s are drawn from a generator seeded by the run's seed and the step, not from the global RNG: the same
    on every process and after a resume, whatever else drew random numbers, and the global stream is left alone."""
    from peft.tuners.lora import LoraLayer

    if step % _relora_every(hyper) or step >= hyper.max_steps:
        return
    optimizers = _optimizers(optimizer)
    generators = {}  # one per device, seeded alike
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
            module.merged_adapters.clear()  # the merge is permanent: W0 absorbs the update
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if lora_a.device not in generators:  # (PyTorch's CPU generator keeps only a seed's low 32 bits)
                seed = (hyper.seed * 1_000_003 + step) % 2**32
                generators[lora_a.device] = torch.Generator(lora_a.device).manual_seed(seed)
            # PEFT's `init_lora_weights=True` (its `reset_lora_parameters`), in place: the optimizers keep them
            with torch.no_grad():
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generators[lora_a.device])
                lora_b.zero_()
            for param in (lora_a, lora_b):
                for opt in optimizers:
                    opt.state.pop(param, None)


def _relora_lr(step: int, hyper: Hyper) -> float:
    """The jagged schedule: after each restart the learning rate warms up again over `relora_warmup` steps; during
    the run's own warmup only that one applies (as in ReLoRA's scheduler), so the two never multiply."""
    every = _relora_every(hyper)
    if step < every or step < hyper.warmup_steps:
        return 1.0
    return min(1.0, (step % every + 1) / _relora_warmup(hyper))


register(
    Method(
        "relora",
        "LoRA merged into W0 and restarted every K steps, optimizer reset, jagged warmup (ReLoRA)",
        _build_lora,
        lambda model: model.merge_and_unload(),
        after_step=_relora_restart,
        lr_multiplier=_relora_lr,
        reads=("rank", "alpha"),
        options={"relora_every": int, "relora_warmup": int},
        check=_relora_check,
        version=2,  # 2: a restart's new A drawn from a generator seeded by the run's seed and step (1: the global RNG)
    )
)


# --------------------------------------------------------------------------------------------------- galore, fira
def _projected_groups(model: nn.Module, hyper: Hyper, scale_key: str) -> list[dict]:
    """Two parameter groups: the projection weights (with the low-rank gradient settings) and everything else.
    Defaults: GaLore's pretraining scripts (scale 0.25; the projector renewed every 200 steps up to 1B, every 500 at
    7B, whose hidden size is 4096)."""
    projections = [m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS]
    ids = {id(p) for p in projections}
    gap = int(hyper.extra.get("update_proj_gap", 500 if model.config.hidden_size >= 4096 else 200))
    return [
        {"params": [p for p in model.parameters() if id(p) not in ids]},
        {"params": projections, "rank": hyper.rank, "update_proj_gap": gap,
         scale_key: float(hyper.extra.get("scale", 0.25)), "proj_type": "std"},
    ]  # fmt: skip


def _galore_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW  # the authors' package (galore-torch), not a rewrite

    groups = _projected_groups(model, hyper, "scale")
    return GaLoreAdamW(groups, lr=hyper.lr, betas=hyper.betas, weight_decay=hyper.weight_decay)


def _fira_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    from fira import FiraAdamW  # the authors' package (fira)

    groups = _projected_groups(model, hyper, "alpha")
    return FiraAdamW(groups, lr=hyper.lr, betas=hyper.betas, weight_decay=hyper.weight_decay)


register(
    Method(
        "galore",
        "full weights, gradients projected to rank r for Adam's states (galore-torch GaLoreAdamW)",
        _build_full,
        lambda m: m,
        make_optimizer=_galore_optimizer,
        checkpointable=False,
        requires="galore_torch",
        options={"update_proj_gap": int, "scale": float},
        check=_check_rank,
    )
)
register(
    Method(
        "fira",
        "GaLore plus a norm-based correction for the gradient outside the subspace (fira FiraAdamW)",
        _build_full,
        lambda m: m,
        make_optimizer=_fira_optimizer,
        checkpointable=False,
        requires="fira",
        options={"update_proj_gap": int, "scale": float},
        check=_check_rank,
    )
)
