"""Parameter counts of SLTrain models: the one formula that the docs, the scripts, the benchmark and the tests use."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from .config import SLTrainConfig, add_task_heads, is_all_linear
from .layer import (
    FROM_SCRATCH_READ,
    bnb_quantization,
    check_rank,
    exclude_exactly,
    exclude_unreplaceable_linears,
    layer_features,
    refuse_quantized_from_scratch,
    weight_read_by_parent,
    weight_read_directly,
)
from .model import default_target_modules, tie_weights, weight_tying_plan
from .support import num_nonzeros


def sltrain_layer_parameters(d_in: int, d_out: int, r: int, sparsity: float) -> int:
    """Trainable SLTrain parameters of one `d_out x d_in` layer (bias not included): `r * (d_in + d_out) + nnz`."""
    return r * (d_in + d_out) + num_nonzeros(d_out, d_in, sparsity)


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def module_parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and total parameters a module holds now (tied parameters counted once), for any method; a
    bitsandbytes 4-bit weight, which packs two numbers per byte, at the size of the matrix it stands for (as PEFT)."""
    params = list(model.parameters())  # deduplicated by identity
    return ParameterCounts(
        trainable=sum(_numbers(p) for p in params if p.requires_grad), total=sum(_numbers(p) for p in params)
    )


def _numbers(param: nn.Parameter) -> int:
    state = getattr(param, "quant_state", None) if type(param).__name__ == "Params4bit" else None
    return math.prod(state.shape) if state is not None else param.numel()


def targeted_linear_names(model: nn.Module, config: SLTrainConfig) -> list[str]:
    """Names of the modules of `model` that `config` would replace (resolving defaults and `"all-linear"`).
    `ValueError` if one of them cannot be: not a linear layer, or narrower than `config.r`."""
    config = _resolved_config(model, config)
    names, read_directly = [], weight_read_directly(model, config.from_scratch)
    adapted = []  # prefixes of layers that already carry an adapter: their insides are not candidates (as in PEFT)
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in adapted):
            continue
        if isinstance(module, BaseTunerLayer):
            adapted.append(name + ".")
        if _matches(config, name):
            try:
                d_in, d_out = layer_features(module)
            except ValueError as error:
                raise ValueError(f"`target_modules` matched `{name}`: {error}") from None
            if name in read_directly and read_directly[name][1] == FROM_SCRATCH_READ:
                reader, path = weight_read_by_parent(model)[name]
                note = _defaults_note(model, config, read_directly)
                raise ValueError(
                    f"`target_modules` matched `{name}`, whose weight's dtype `{reader}` reads (`self.{path}.weight"
                    ".dtype`, or its device, in its forward or a method it calls): from scratch the layer has no "
                    f"weight, so that read would fail (an AttributeError). Leave it out of `target_modules`{note} "
                    '(`"all-linear"` leaves it out), or fine-tune.'
                )
            if name in read_directly:
                model_type, setting = read_directly[name]
                setting = f" ({setting})" if setting else ""
                raise ValueError(
                    f"`target_modules` matched `{name}`, whose weight this {model_type} model{setting} "
                    "reads directly instead of calling the layer: a replacement would be ignored (or, from scratch, "
                    "leave it without weight). Leave it out of `target_modules`"
                    f'{_defaults_note(model, config, read_directly)} (`"all-linear"` leaves it out).'
                )
            check_rank(config.r, d_in, d_out, name)
            names.append(name)
    if config.from_scratch:
        for name, module in model.named_modules():  # targeted or not: from scratch trains every weight
            refuse_quantized_from_scratch(module, name)
        _refuse_shared_weights(model, names)
    return names


def _defaults_note(model: nn.Module, config: SLTrainConfig, read_directly: dict) -> str:
    """For a refusal: where the targets are the model type's defaults (`target_modules` left unset), which to pass:
    the defaults that match none of the layers the model reads directly (`read_directly`: name -> reader)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        defaults = default_target_modules(model_type)
    except ValueError:
        return ""
    if isinstance(config.target_modules, str) or set(config.target_modules or ()) != defaults:
        return ""
    keep = sorted(d for d in defaults if not any(n == d or n.endswith("." + d) for n in read_directly))
    return f" (they are {model_type}'s defaults, {sorted(defaults)}: pass `target_modules={keep}`)"


def _refuse_shared_weights(model: nn.Module, names: list[str]) -> None:
    """From scratch, replacing a layer drops its weight: refuse a targeted layer whose weight another module shares
    (a tied vocabulary head), or will share once a meta-built model ties its embeddings."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    untied = _not_yet_tied_output_weight(model)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is None:  # already replaced from scratch (a second adapter is refused elsewhere, with its reason)
            continue
        others = [n for n in holders.get(id(weight), []) if not n.startswith(f"{name}.")]  # (incl. base_layer.)
        if weight is untied:
            others.append("the input embeddings' weight (`tie_word_embeddings=True`)")
        if others:
            raise ValueError(
                f"`target_modules` matched `{name}`, whose weight the model shares with {others}: from scratch, "
                "SLTrain replaces the weight, which the other module still needs. Leave the layer out of "
                "`target_modules`, or untie it (e.g. `tie_word_embeddings=False`)."
            )


def count_parameters(model: nn.Module, config: SLTrainConfig) -> ParameterCounts:
    """Trainable and total parameters of `get_peft_model(model, config)`, computed from `model`'s shapes alone.

    Works on a model built on the meta device, so a 7B plan costs nothing. Per targeted layer the adapter adds
    `r * (d_in + d_out) + nnz`; fine-tuning keeps the frozen `W0` in the total, from scratch drops it and trains every
    other parameter. Modules in `modules_to_save` count twice in the total (PEFT keeps the original and a copy); a
    weight that `ensure_weight_tying` keeps tied has one copy for all the modules that share it.
    """
    config = _resolved_config(model, config)
    targeted = {name: model.get_submodule(name) for name in targeted_linear_names(model, config)}
    if not targeted:
        raise ValueError(f"`target_modules` {config.target_modules!r} matched no layer of the model.")
    model = _tied_if_meta(model)
    to_save = weight_tying_plan(model, config).modules_to_save or []  # with `ensure_weight_tying`, as PEFT wraps it
    saved_modules = [name for name, _ in model.named_modules() if name and any(name.endswith(m) for m in to_save)]

    trainable = total = 0
    for module in targeted.values():
        adapter = sltrain_layer_parameters(*layer_features(module), config.r, config.sparsity)
        trainable += adapter
        total += adapter
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied weight under each of its names
        owner, _, attr = name.rpartition(".")
        n = param.numel()
        if id(param) in seen:
            if any(owner == m or owner.startswith(m + ".") for m in saved_modules):
                trainable += n  # PEFT's trainable copy of a module in `modules_to_save`, untied from the original
                total += n
            continue
        seen.add(id(param))
        if attr == "weight" and bnb_quantization(model.get_submodule(owner)):
            n = math.prod(layer_features(model.get_submodule(owner)))  # its d_in x d_out, which bitsandbytes packs
        if owner in targeted and attr == "weight":
            total += 0 if config.from_scratch else n  # dropped from scratch, frozen W0 otherwise
        elif config.from_scratch:
            trainable += n if param.requires_grad else 0  # what is frozen before stays frozen (Whisper's positions)
            total += n
        elif any(owner == m or owner.startswith(m + ".") for m in saved_modules):
            trainable += n
            total += 2 * n
        elif attr == "bias" and (config.bias == "all" or (config.bias == "sltrain_only" and owner in targeted)):
            trainable += n
            total += n
        else:
            total += n
    return ParameterCounts(trainable=trainable, total=total)


def _tied_if_meta(model: nn.Module) -> nn.Module:
    """`model`, or where some of its parameters are on the meta device a copy with its weights tied, as the built
    model will have them (`materialize_meta_parameters` ties them): a meta-built model has not tied its embeddings
    yet (an encoder-decoder's encoder, decoder and shared ones are three tensors until then). Copying meta tensors
    costs nothing."""
    if not hasattr(model, "tie_weights") or all(p.device.type != "meta" for p in model.parameters()):
        return model
    tied = copy.deepcopy(model)
    tie_weights(tied)
    return tied


def _not_yet_tied_output_weight(model: nn.Module) -> nn.Parameter | None:
    """The output embedding's weight if the model's config ties it to the input embedding's but a meta-built model
    has not tied them yet (`materialize_meta_parameters` does): targeting it from scratch is refused."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if inputs is None or outputs is None or outputs.weight is inputs.weight or outputs.weight.device.type != "meta":
        return None
    return outputs.weight


def _matches(config: SLTrainConfig, name: str) -> bool:
    """Whether PEFT replaces module `name` under the resolved `config` (not the root; not inside `modules_to_save`)."""
    found = check_target_module_exists(config, name) if name else False
    return bool(found) and not isinstance(found, _ExcludedModule)


def exclude_narrow_linears(config: SLTrainConfig, model: nn.Module) -> list[str]:
    """For `target_modules="all-linear"`: the layers it would replace that are narrower than `config.r` (a 1-wide
    gate, a classifier's 2-label output), which a rank-r factorization cannot fit. They are added to
    `config.exclude_modules` (exact names) and returned, for `get_peft_model` to warn. Where every layer is that
    narrow none is left out, and the rank check names them."""
    if not is_all_linear(config.target_modules):
        return []
    resolved = _resolved_config(model, config, leave_out_narrow=False)
    found = [name for name, _ in model.named_modules() if _matches(resolved, name)]
    narrow = [name for name in found if min(_features(model.get_submodule(name)), default=config.r) < config.r]
    if len(narrow) == len(found):
        return []
    exclude_exactly(config, narrow)
    return narrow


def _features(module: nn.Module) -> tuple[int, ...]:
    """(d_in, d_out), or () for a layer that cannot be replaced (`targeted_linear_names` refuses it by name)."""
    try:
        return layer_features(module)
    except ValueError:
        return ()


def _resolved_config(model: nn.Module, config: SLTrainConfig, leave_out_narrow: bool = True) -> SLTrainConfig:
    """`config` as PEFT will apply it: default targets, `"all-linear"` resolved (`exclude_narrow_linears` too, unless
    `leave_out_narrow` is False), and the task's head in `modules_to_save` (PEFT's task models add it there, and PEFT
    never targets a layer inside one)."""
    config = copy.deepcopy(config)
    exclude_unreplaceable_linears(config, model)
    if leave_out_narrow:
        exclude_narrow_linears(config, model)
    add_task_heads(config)
    if config.target_modules is None:
        config.target_modules = default_target_modules(getattr(getattr(model, "config", None), "model_type", None))
    return _maybe_include_all_linear_layers(config, model)
