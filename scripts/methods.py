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
    seed: int = 0
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
    after_step: Callable[[nn.Module, torch.optim.Optimizer, int, Hyper], None] | None = None
    uses_rank: bool = True  # whether `--rank` / the size preset's rank applies


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown `--method` {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


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


register(Method("full", "dense AdamW on every weight (full-rank baseline)", _build_full, lambda m: m, uses_rank=False))


# -------------------------------------------------------------------------------------------------------- sltrain
def sltrain_config(hyper: Hyper) -> peft_sltrain.SLTrainConfig:
    return peft_sltrain.SLTrainConfig(
        r=hyper.rank,
        sparsity=hyper.sparsity,
        alpha=hyper.alpha,
        from_scratch=True,
        target_modules=LLAMA_PROJECTIONS,
        seed=hyper.seed,
    )


def _build_sltrain(config: LlamaConfig, hyper: Hyper) -> nn.Module:
    check_rank_fits(config, hyper.rank)
    with init_empty_weights():  # the targeted projections never get a dense weight
        base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, sltrain_config(hyper))


register(
    Method(
        "sltrain",
        "W = (alpha/r) B A + S: low-rank plus fixed-support sparse, from scratch (the paper)",
        _build_sltrain,
        lambda model: model.merge_and_unload(),
    )
)


# -------------------------------------------------------------------------------------------------------- lowrank
class LowRankLinear(nn.Module):
    """`y = x @ (B @ A).T + bias` with no dense weight: the pure low-rank baseline (the paper's "low-rank")."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound_a, bound_b = 1 / math.sqrt(in_features), 1 / math.sqrt(rank)
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound_a, bound_a))  # (r, d_in)
        self.B = nn.Parameter(torch.empty(out_features, rank).uniform_(-bound_b, bound_b))  # (d_out, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.A.t()) @ self.B.t()  # (..., r) then (..., d_out): 2 N r (d_in + d_out) FLOPs
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
    model = replace_projections(
        base, lambda lin: LowRankLinear(lin.in_features, lin.out_features, hyper.rank, lin.bias is not None)
    )
    peft_sltrain.materialize_meta_parameters(model)
    return model


def _lowrank_to_dense(model: nn.Module) -> PreTrainedModel:
    def dense(module: nn.Module) -> nn.Module:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.B @ module.A)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear

    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense(module))
    return model


register(Method("lowrank", "W = B A only, no sparse part (low-rank baseline)", _build_lowrank, _lowrank_to_dense))
