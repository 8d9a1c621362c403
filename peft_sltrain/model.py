"""`SLTrainModel`: finds the targeted linear layers of a model and replaces them with SLTrain layers."""

from __future__ import annotations

import math
import warnings
import weakref
from contextlib import contextmanager
from typing import NamedTuple

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _get_tuner_state_dict_key_prefixes,
    _is_key_under_prefixes,
)
from torch import nn
from transformers import PreTrainedModel

from .batched import BatchedRebuilds
from .config import SLTrainConfig, add_task_heads
from .cost import COMPUTE_CHOICES
from .layer import Linear, SLTrainLayer, exclude_unreplaceable_linears, keep_bnb_4bit_unpacked
from .support import check_support, num_nonzeros, support_fingerprint

# `nn.Module.register_parameter` as PyTorch defines it. `accelerate.init_empty_weights()` (in which PEFT injects with
# `low_cpu_mem_usage=True`) patches it to send each newly registered parameter to the meta device, which would turn a
# tied head into a new, untied meta parameter.
_REGISTER_PARAMETER = nn.Module.register_parameter

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Default `target_modules` per `model_type`: the paper's choice (every attention and MLP projection) for decoder LLMs,
# and LoRA's usual query and value projections for encoders (BERT-like, T5) being fine-tuned.
TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D layers: fused q/k/v, the attention and MLP outputs, MLP input
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    **{
        name: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
        for name in ("gpt_neox", "falcon", "bloom")
    },
    **{name: ["query", "value"] for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
}


def default_target_modules(model_type: str | None) -> set[str]:
    """The default `target_modules` for a Transformers `model_type`; `ValueError` if none is known."""
    if model_type not in TARGET_MODULES_MAPPING:
        raise ValueError(
            f"`target_modules` must be set for model type {model_type!r}: no default is known for it "
            f"(known: {sorted(TARGET_MODULES_MAPPING)}). `target_modules='all-linear'` replaces every linear layer "
            "but the output head, as the paper does for LLaMA."
        )
    return set(TARGET_MODULES_MAPPING[model_type])


class SLTrainModel(BaseTuner):
    """
    Replaces the targeted `torch.nn.Linear` (and Transformers `Conv1D`) layers of a model with SLTrain layers (see
    [`SLTrainConfig`]). Created by `peft.get_peft_model(model, SLTrainConfig(...))` once `peft_sltrain` is imported.

    Example:

        ```py
        >>> import peft_sltrain  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> from transformers import AutoModelForCausalLM

        >>> model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
        >>> model = get_peft_model(model, peft_sltrain.SLTrainConfig(r=64, sparsity=0.03, alpha=16))
        ```
    """

    prefix: str = "sltrain_"
    tuner_layer_cls = SLTrainLayer
    target_module_mapping = TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SLTrainConfig, model_config: dict) -> SLTrainConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_config.get("model_type"))
        add_task_heads(peft_config)  # before injection, so that no target reaches them
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Every targeted layer is checked before the first is replaced: from scratch, replacing a layer drops its
        # dense weight, so failing halfway would leave the caller's model without some of its weights.
        from .counting import exclude_narrow_linears, targeted_linear_names  # (counting imports this module)

        config = self.peft_config[adapter_name]
        config.validate()  # (again: a field changed since construction) before anything reads the config
        # "all-linear" adds the layers it leaves out to `exclude_modules` (saved, so that loading targets the same
        # layers); a config used again (a sweep lowering `r`) starts again from the caller's own exclusions
        added = config.__dict__.get("_sltrain_exclusions")  # (what the last injection made of it, the caller's)
        if added is not None and config.exclude_modules == added[0]:
            config.exclude_modules = added[1]
        caller_exclude = config.exclude_modules
        _warn_left_out_dtype_read(exclude_unreplaceable_linears(config, model))  # for "all-linear"
        _warn_left_out_narrow(exclude_narrow_linears(config, model), config)
        if config.exclude_modules != caller_exclude:  # (not a field: not saved)
            config.__dict__["_sltrain_exclusions"] = (config.exclude_modules, caller_exclude)
        targeted = targeted_linear_names(model, config)
        if "_frozen_before" not in self.__dict__:  # the first adapter: what the model (Whisper's fixed positions) or
            # the caller froze, which stays frozen from scratch (names as before injection, without `.base_layer`)
            self._frozen_before = {name for name, p in model.named_parameters() if not p.requires_grad}
        if config.from_scratch:
            # the file holds every tensor of the model, and PEFT strips `.<adapter_name>` from each saved key: a name
            # that is also a module's (`norm`, `lm_head`, or `base_layer`, under which injection puts a replaced
            # layer's bias) would rename that module's tensors, and the file not load
            keys = list(model.state_dict())
            keys += [f"{name}.base_layer.{key[len(name) + 1 :]}" for name in targeted for key in keys
                     if key.startswith(name + ".")]  # fmt: skip
            for key in ("base_model.model." + k for k in keys):  # saved keys carry PEFT's prefix
                if (saved := self._remove_adapter_name_from_key(key, adapter_name)) != key:
                    raise ValueError(
                        f"`adapter_name={adapter_name!r}` is also a module's name: a from-scratch adapter saves every "
                        f"tensor of the model, and PEFT would save {key!r} as {saved!r}, which would not load back. "
                        "Choose another adapter name."
                    )
        if "_sltrain_rebuilds" not in self.__dict__:  # `compute="batched"`: a pass is one call of the model, through
            # this tuner (PEFT's task models call it) or straight (a `PeftModel` without a task type calls `model`)
            self._sltrain_rebuilds = BatchedRebuilds(self)
            for module in (self, model):
                module.register_forward_pre_hook(self._sltrain_rebuilds.begin_pass)
                module.register_forward_hook(self._sltrain_rebuilds.end_pass, always_call=True)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        rebuilds = self.__dict__.get("_sltrain_rebuilds")
        if rebuilds is not None and (rebuilds._model is None or rebuilds._model() is None):
            rebuilds._model = weakref.ref(self)

    def _check_tied_modules(self, model: nn.Module, peft_config: SLTrainConfig) -> None:
        # PEFT's own check finds tied modules by name (`embed_tokens`, `lm_head`) and ties only through LoRA's
        # methods; here they are found by their weight, and `ensure_weight_tying` ties them for SLTrain too
        plan = weight_tying_plan(model, peft_config)
        if plan.modules_to_tie:
            # PEFT wraps the embeddings in `modules_to_save`, then each module in `modules_to_tie` around the
            # embeddings' trainable copy (`set_additional_trainable_modules`)
            peft_config.modules_to_save = plan.modules_to_save
            peft_config.modules_to_tie = plan.modules_to_tie
        elif plan.shared:
            others = [name for name in plan.tied if name not in plan.shared]
            what = (
                f"share their weight with {_listed(others)} (tied embeddings): PEFT trains a copy of the first, while "
                "the others keep the original frozen weight"
                if others
                else "share one weight (tied embeddings): PEFT trains a separate copy for each"
            )
            warnings.warn(
                f"{_listed(plan.shared)} in `modules_to_save` {what}, which unties them. Set "
                "`ensure_weight_tying=True` to train one copy that all of them use.",
                stacklevel=2,
            )

    def _check_new_adapter_config(self, config: SLTrainConfig) -> None:
        super()._check_new_adapter_config(config)  # (`inject_adapter` validated the config before reading it)
        if len(self.peft_config) > 1 and any(c.from_scratch for c in self.peft_config.values()):
            names = sorted(name for name, c in self.peft_config.items() if c.from_scratch)
            raise ValueError(
                f"A from-scratch SLTrain adapter *is* the model's weights and cannot share the model with another "
                f"adapter; the adapters would be {sorted(self.peft_config)}, of which {names} from scratch."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, SLTrainLayer):
            target.update_layer_from_config(adapter_name, config, current_key)
            target._sltrain_rebuilds = self._sltrain_rebuilds
            return
        # what cannot be replaced was refused by `inject_adapter`'s check (and `Linear` refuses it again)
        new_module = Linear(target, adapter_name, config, layer_name=current_key)
        new_module._sltrain_rebuilds = self._sltrain_rebuilds  # its group's rebuilt weights, for `compute="batched"`
        self._sltrain_rebuilds.forget_layers()
        new_module.train(target.training)  # a layer of an eval-mode model stays in eval mode (`Linear._path` asks)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter starts frozen
        setattr(parent, target_name, new_module)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Our layers are created on the right device and dtype, so a plain swap suffices. PEFT's generic version also
        # copies `child.weight` across, which trips over modules without one: a from-scratch layer, or the
        # `ModulesToSaveWrapper` around RoBERTa's classification head during `merge_and_unload`.
        setattr(parent, child_name, new_module)

    def _from_scratch(self) -> bool:
        return any(config.from_scratch for config in self.peft_config.values())

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # From scratch the adapter *is* the model: keep it in the model's dtype instead of PEFT's fp32 upcast.
        if not self.peft_config[adapter_name].from_scratch:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if self._from_scratch():
            # pretraining: embeddings, norms, head and biases are trained along with the SLTrain factors
            inference = self.peft_config[self.active_adapters[0]].inference_mode
            self._set_rest_requires_grad(not inference)
            names = {name.replace(".base_layer.", "."): name for name, _ in model.named_parameters()}
            frozen = sorted(names[n] for n in self._frozen_before if n in names)  # (not a dropped targeted weight)
            if frozen and not inference and not getattr(self, "_warned_frozen", False):
                self._warned_frozen = True
                warnings.warn(
                    f"From scratch, {len(frozen)} parameter(s) frozen before `get_peft_model` stay frozen, e.g. "
                    f"{frozen[:3]}; call `requires_grad_(True)` on them to train them.",
                    stacklevel=2,
                )

    def _set_rest_requires_grad(self, requires_grad: bool) -> None:
        """From scratch, the adapter is the whole model: sets `requires_grad` on its parameters besides the SLTrain
        factors (embeddings, norms, head, biases) as on the factors, but for those frozen before injection."""
        adapter_ids = {id(p) for p in _adapter_parameters(self.model)}
        for name, parameter in self.model.named_parameters():
            if id(parameter) not in adapter_ids and name.replace(".base_layer.", ".") not in self._frozen_before:
                parameter.requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if self._from_scratch():
            self._set_rest_requires_grad(not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if any(self.peft_config[name].from_scratch for name in names if name in self.peft_config):
            self._set_rest_requires_grad(requires_grad)

    def set_compute(self, compute: str, adapter_name: str | None = None) -> None:
        """Switch how the layers of `adapter_name` (default: every adapter) compute: `"auto"`, `"dense"`,
        `"factored"` or `"batched"`, as `SLTrainConfig.compute` (which follows, so a saved adapter records it). The
        layers read the setting per call; e.g. `"dense"` for a double backward (gradient penalties), which the
        factored path has not."""
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"`compute` must be one of {COMPUTE_CHOICES}, got {compute!r}.")
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; the model has {sorted(self.peft_config)}.")
        names = list(self.peft_config) if adapter_name is None else [adapter_name]
        for module in self.model.modules():
            if isinstance(module, SLTrainLayer):
                for name in names:
                    if name in module.compute:
                        module.compute[name] = compute
        for name in names:
            self.peft_config[name].compute = compute

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PEFT hands a call's special arguments to this method and then drops them: `adapter_names` (LoRA runs each
        # row of a batch through its own adapter) and LoRA's `alora_offsets` would otherwise be ignored silently
        for key, what in (("adapter_names", "per-row adapters"), ("alora_offsets", "activated-LoRA offsets")):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"SLTrain has no `{key}` (LoRA's {what}), got `{key}={kwargs[key]!r}`; activate one adapter with "
                    "`set_adapter(name)` and run each adapter's rows in a call of their own."
                )
        yield

    def _post_injection_hook(self, model: nn.Module, config: SLTrainConfig, adapter_name: str) -> None:
        if config.from_scratch:
            materialize_meta_parameters(model)
            warn_dense_experts(model)
            return
        keep_bnb_4bit_unpacked(model)  # also 4-bit layers not replaced: bitsandbytes' CPU repacking breaks training

    def disable_adapter_layers(self) -> None:
        if self._from_scratch():
            raise ValueError(
                "Cannot disable a from-scratch SLTrain adapter: the targeted layers have no base weight without it."
            )
        super().disable_adapter_layers()

    def unload(self) -> nn.Module:
        """Remove the SLTrain layers and return the base model (fine-tuning mode only; from scratch, use
        `merge_and_unload`, since the base model has no weights of its own in the targeted layers)."""
        if self._from_scratch():
            raise ValueError(
                "`unload()` would return layers without weights for a from-scratch SLTrain adapter; use "
                "`merge_and_unload()` to get a dense model."
            )
        return super().unload()

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        if self._from_scratch():
            refuse_unset_parameters(self.model, "merging it into a plain model")
        return super().merge_and_unload(*args, **kwargs)

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_pass_hooks(model)  # the plain model returned keeps no hook of ours
        self._sltrain_rebuilds.forget_layers()  # nor does the tuner keep the replaced layers listed
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        config = self.peft_config.get(adapter_name)
        if config is not None and config.from_scratch:
            raise ValueError(
                f"Cannot delete the from-scratch SLTrain adapter {adapter_name!r}: the targeted layers have no "
                "weights without it; use `merge_and_unload()` to get a dense model."
            )
        super().delete_adapter(adapter_name)

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "SLTrain adapters cannot be combined with `add_weighted_adapter`: each has its own random sparse support, "
            "so no weighted sum of adapters is itself an SLTrain adapter."
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.from_scratch:
            refuse_unset_parameters(model, "saving it")
            # every parameter that is not replaced (embeddings, norms, head, biases) belongs to the adapter; a merged
            # layer's dense weight does not (it is the adapter's own product, and loading rebuilds it)
            merged = {f"{name}.base_layer.weight" for name, module in model.named_modules()
                      if isinstance(module, SLTrainLayer) and module.merged}  # fmt: skip
            if merged:
                warnings.warn(
                    "Saving a merged from-scratch SLTrain model writes its factors, not the merged dense weights: "
                    "whatever was trained on the merged weights is not saved. `unmerge_adapter()` first, or save "
                    "`merge_and_unload()` as a plain model.",
                    stacklevel=2,
                )
            to_return.update({key: value for key, value in state_dict.items() if key not in merged})
        if not config.save_support:  # a fingerprint instead of each support
            for key in [k for k in to_return if k.endswith(f".sltrain_indices.{adapter_name}")]:
                fingerprint_key = key.replace(".sltrain_indices.", ".sltrain_fingerprint.")
                to_return[fingerprint_key] = support_fingerprint(to_return.pop(key))
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_file(model, config, adapter_name, state_dict)
        if config.from_scratch:
            # the file holds every tensor of the model: copy each into the model's own, so that the model keeps its
            # dtype, device and tying also when PEFT loads with `assign=True` (`low_cpu_mem_usage`), which would
            # otherwise put the file's tensors in place one by one, untied and in the file's dtype
            live = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for key in [k for k in state_dict if k in live and live[k].device.type != "meta"]:
                    live[key].data.copy_(state_dict[key])
                    state_dict[key] = live[key]  # loading then sets or copies the same object: a no-op
        return state_dict


def check_adapter_file(model: nn.Module, config: SLTrainConfig, adapter_name: str, state_dict: dict) -> None:
    """Raise `ValueError` unless an adapter file's tensors (keys as PEFT loads them: adapter name inserted) fit the
    model with the adapter in place; for a file saved without supports, put the regenerated ones, checked against its
    fingerprints, into `state_dict`."""
    if not config.save_support:  # a file for another model must fail on its shapes, not on a fingerprint
        _check_loaded_state_dict(model, config, adapter_name, state_dict, supports=False)
        _restore_supports(model, adapter_name, state_dict)
    _check_loaded_state_dict(model, config, adapter_name, state_dict)


def check_loaded_adapter_file(model: nn.Module, config: SLTrainConfig, adapter_name: str, saved: dict) -> None:
    """`check_adapter_file` for a file as saved (PEFT's keys, no adapter names) whose adapter code other than PEFT's
    loading put in place (Transformers' `load_adapter`): its keys mapped as PEFT maps them."""
    state_dict = super(SLTrainModel, SLTrainModel)._remap_adapter_state_dict_for_load(
        model, config, adapter_name, dict(saved)
    )
    check_adapter_file(model, config, adapter_name, state_dict)


def _check_loaded_state_dict(
    model: nn.Module, config: SLTrainConfig, adapter_name: str, state_dict: dict, supports: bool = True
) -> None:
    """Raise `ValueError` before loading if the adapter does not fit the model: a missing or misshapen tensor, or a
    corrupt support. From scratch, every base parameter must come from the file too (no silent random init).
    `supports=False`: a file saved without supports, before they are regenerated; each layer's fingerprint stands
    in for its support, which is not checked yet."""
    model_state = model.state_dict()
    prefix = "base_model.model."
    if not any(key.startswith(prefix) for key in model_state):
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    support_suffix = f".sltrain_indices.{adapter_name}"
    if not supports:
        fingerprint = ".sltrain_fingerprint"
        state_dict = {key.replace(fingerprint, support_suffix) if key.endswith(fingerprint) else key: value
                      for key, value in state_dict.items()}  # fmt: skip
    adapter_prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    adapter_keys = {key for key in model_state if _is_key_under_prefixes(key, adapter_prefixes)}
    expected = set(model_state) if config.from_scratch else adapter_keys
    missing = sorted(expected - set(state_dict))
    if not supports:  # named as the file would hold them
        missing = [
            key.replace(support_suffix, fingerprint) if key.endswith(support_suffix) else key for key in missing
        ]
    if missing:
        raise ValueError(
            f"The adapter file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; it is truncated, "
            "or was saved from a different model or config."
        )
    # from scratch the file is the whole model: a tensor it holds that the model lacks (a bias, a module) would be lost
    unexpected = sorted(
        key for key in state_dict if key not in model_state and (config.from_scratch or "sltrain_" in key)
    )
    if unexpected:
        raise ValueError(
            f"The adapter file has {len(unexpected)} tensor(s) for parameters this model does not have, e.g. "
            f"{unexpected[:3]}; it was saved from a different model or config."
        )
    if not config.from_scratch:  # a fine-tuning file holds the adapter's tensors, the trained biases (`bias`) and the
        # copies of `modules_to_save`: a base weight in it would overwrite the frozen `W0` without a word
        overwrites = sorted(
            key for key in state_dict if key in model_state and "sltrain_" not in key
            and ".modules_to_save." not in key and ".original_module." not in key
            and not (key.endswith(".bias") and config.bias != "none")
        )  # fmt: skip
        if overwrites:
            raise ValueError(
                f"The adapter file holds {len(overwrites)} tensor(s) of the base model's frozen weights, e.g. "
                f"{overwrites[:3]}, which loading would overwrite; a fine-tuning adapter saved by PEFT holds only "
                f"its own tensors (and, with `bias` other than 'none', biases; config: bias={config.bias!r})."
            )
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
        for key, value in state_dict.items()
        if key in model_state
        and tuple(value.shape) != tuple(model_state[key].shape)
        and (supports or not key.endswith(support_suffix))
    ]
    if mismatched:
        raise ValueError(
            f"The adapter's shapes do not fit the base model ({len(mismatched)} tensor(s)), e.g. {mismatched[:3]}."
        )
    _check_tied_parameters(model, state_dict)
    for name, module in model.named_modules():
        if supports and isinstance(module, SLTrainLayer) and adapter_name in module.sltrain_indices:
            key = f"{name}{support_suffix}"
            nnz = num_nonzeros(module.out_features, module.in_features, module.sparsity[adapter_name])
            check_support(state_dict[key], module.out_features, module.in_features, nnz, name=key)


class WeightTyingPlan(NamedTuple):
    tied: list[str]  # the input embeddings and the modules that share their weight (empty: none share it)
    shared: list[str]  # those of them that `modules_to_save` names
    modules_to_save: list[str] | None  # `modules_to_save` as PEFT is to wrap it
    modules_to_tie: set[str]  # the modules PEFT ties to the embeddings' trainable copy (`ensure_weight_tying`)


def weight_tying_plan(model: nn.Module, config: SLTrainConfig) -> WeightTyingPlan:
    """What `modules_to_save` does to a model whose input embeddings share their weight with other modules (a tied
    head), found by identity. With `ensure_weight_tying`, where `modules_to_save` names one of them, PEFT is to train
    the embeddings' copy and tie the others to it: they leave `modules_to_save` (names matched by suffix, as PEFT
    matches them) and the embeddings join it. Without, it keeps PEFT's wrapping, which unties them."""
    to_save = config.modules_to_save
    try:
        embeddings = model.get_input_embeddings() if to_save and not config.from_scratch else None
    except (AttributeError, NotImplementedError):  # no `get_input_embeddings`, or none (speech models)
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return WeightTyingPlan([], [], to_save, set())
    modules = list(model.named_modules(remove_duplicate=False))
    embedding_name = next((name for name, m in modules if m is embeddings), None)
    # (not inside an earlier adapter's wrappers: their `weight` is their active copy's, which they tie themselves)
    wrapped = {"modules_to_save", "original_module"}
    others = [name for name, m in modules if m is not embeddings and getattr(m, "weight", None) is weight
              and not wrapped & set(name.split("."))]  # fmt: skip
    if embedding_name is None or not others:
        return WeightTyingPlan([], [], to_save, set())
    tied = [embedding_name, *others]
    shared = [name for name in tied if any(name.endswith(m) for m in to_save)]
    if not shared or not config.ensure_weight_tying:
        return WeightTyingPlan(tied, shared, to_save, set())
    keep = [m for m in to_save if not any(name.endswith(m) for name in others)]
    if not any(embedding_name.endswith(m) for m in keep):
        keep.append(embedding_name)
    return WeightTyingPlan(tied, shared, keep, set(others))


def _check_tied_parameters(model: nn.Module, state_dict: dict) -> None:
    """Raise `ValueError` if the file holds different tensors for names that this model ties into one parameter (an
    adapter saved from a model with untied embeddings and head, loaded into a tied one): loading would keep one of
    them and silently drop the other."""
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in state_dict:
            tied.setdefault(id(parameter), []).append(name)
    for names in tied.values():
        first, *others = names
        for other in others:
            a, b = state_dict[first], state_dict[other]
            if a.shape != b.shape or not torch.allclose(a, b.to(a.device), rtol=0, atol=0, equal_nan=True):
                raise ValueError(
                    f"The adapter file holds different tensors for {first!r} and {other!r}, which this model ties "
                    "into one parameter (e.g. `tie_word_embeddings=True`); it was saved from a model that does not "
                    "tie them. Build the model with the same tying as the one that was saved."
                )


def _restore_supports(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    """For an adapter saved without supports: check that the supports regenerated from the seed hash to the saved
    fingerprints, and put them in the state dict in place of the fingerprints, so that it is complete again."""
    for name, module in model.named_modules():
        if not (isinstance(module, SLTrainLayer) and adapter_name in module.sltrain_indices):
            continue
        key = f"{name}.sltrain_fingerprint"
        if key not in state_dict and f"base_model.model.{key}" in state_dict:  # a PeftModel file, injected model
            key = f"base_model.model.{key}"
        if key not in state_dict:
            raise ValueError(
                f"The adapter file lacks the support fingerprint of `{name}`; it is truncated or corrupt."
            )
        regenerated = module.sltrain_indices[adapter_name]
        if not torch.equal(state_dict.pop(key).cpu(), support_fingerprint(regenerated)):
            raise ValueError(
                f"The support regenerated for `{name}` differs from the one the adapter was trained with (this "
                "PyTorch's random generator draws differently, or the seed or layer names changed). Load it where "
                "it was saved and re-save it with `save_support=True`."
            )
        state_dict[key.replace(".sltrain_fingerprint", f".sltrain_indices.{adapter_name}")] = regenerated


def remove_pass_hooks(model: nn.Module) -> None:
    """Remove the forward hooks by which `SLTrainModel` marks the passes of `compute="batched"` from `model`."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), BatchedRebuilds)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def warn_dense_experts(model: nn.Module) -> None:
    """From scratch, warns that fused MoE experts (Transformers 5 keeps each MoE layer's experts as 3-D parameters of
    one `...Experts` module, no linear layers) train dense: often most of such a model's weights."""
    experts = {
        name: sum(p.numel() for p in module.parameters() if p.dim() >= 3)
        for name, module in model.named_modules()
        if type(module).__name__.endswith("Experts")
    }
    experts = {name: n for name, n in experts.items() if n}
    dense = sum(experts.values())
    if dense:
        total = sum(p.numel() for p in model.parameters())
        warnings.warn(
            f"From scratch, the fused MoE experts ({len(experts)} modules, e.g. `{next(iter(experts))}`: {dense:,} of "
            f"the model's {total:,} parameters) are no linear layers SLTrain can replace, and train dense.",
            stacklevel=3,
        )


@torch.no_grad()
def materialize_meta_parameters(model: nn.Module) -> None:
    """Give the parameters left on the meta device (a model built under `accelerate.init_empty_weights()`) real
    storage on the default device, initialised by the model's own init: for Transformers models its
    `initialize_weights()` (whose walk lets a parent module set its children's weights, as T5's attention and CLIP's
    embeddings do) restricted to those parameters, otherwise each module's `reset_parameters()`. No dense targeted
    weight is made, and the SLTrain layers' base layers' biases start at zero. Adapters that PEFT created on the meta
    device (`low_cpu_mem_usage=True`) get the SLTrain init (`reset_sltrain_parameters`)."""
    device = torch.get_default_device()
    sltrain_layers = [m for m in model.modules() if isinstance(m, SLTrainLayer)]
    for layer in sltrain_layers:
        _materialize_adapters(layer)
    replaced = {id(m.get_base_layer()) for m in sltrain_layers}
    inside = {id(d) for m in sltrain_layers for d in (m.sltrain_A, m.sltrain_B, m.sltrain_values)}
    fresh, by_module = [], []  # the parameters given storage here, for the init; (name, module) owning them
    for name, module in model.named_modules():
        if isinstance(module, SLTrainLayer) or id(module) in inside:
            continue
        if id(module) in replaced:
            if getattr(module, "bias", None) is not None and module.bias.device.type == "meta":
                module.to_empty(device=device, recurse=False)
                nn.init.zeros_(module.bias)
            continue
        meta = [key for key, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
        if not meta:
            continue
        buffers = dict(module._buffers)  # real already (the model was built under `init_empty_weights()`)
        module.to_empty(device=device, recurse=False)  # (which also swaps the buffers for uninitialised memory)
        module._buffers.update(buffers)
        fresh += [module.get_parameter(key) for key in meta]
        by_module.append((name, module))
    for parameter in fresh:  # a sentinel until an init sets it: what none sets is found below, not used as garbage
        parameter.fill_(_unset_value(parameter))
    fresh_ids = {id(p) for p in fresh}
    if fresh and isinstance(model, PreTrainedModel):
        _initialize_only(model, fresh_ids, sltrain_layers)
    else:
        for name, module in by_module:
            if not hasattr(module, "reset_parameters"):
                raise ValueError(
                    f"Module `{name}` ({type(module).__name__}) was built on the meta device and has no known init; "
                    "build the model on a real device, or give it `reset_parameters()`."
                )
            module.reset_parameters()
    unset = [name for name, p in model.named_parameters() if id(p) in fresh_ids and _is_unset(p)]
    if unset:  # checked at the first forward: loading an adapter (which holds every tensor) sets them before it
        handles = []
        # by name, for saving and merging too (which must not write the placeholders either); looked up when checked,
        # so that a parameter replaced since (a new nn.Parameter assigned, `load_state_dict(assign=True)`) counts
        model.__dict__[_UNSET] = unset

        def refuse_unset(*_):
            refuse_unset_parameters(model, "running it")
            for handle in handles:
                handle.remove()

        # on its children too: PEFT calls the model's `forward` itself, which runs no hooks
        handles += [m.register_forward_pre_hook(refuse_unset) for m in (model, *model.children())]
    meta_buffers = [name for name, b in model.named_buffers() if b.device.type == "meta"]
    if meta_buffers:
        raise ValueError(
            f"Buffers {meta_buffers[:3]} are on the meta device and cannot be rebuilt; build the model under "
            "`accelerate.init_empty_weights()` (which keeps buffers real) instead of `torch.device('meta')`."
        )
    tie_weights(model)  # the real tensors


def tie_weights(model: nn.Module) -> None:
    """`model.tie_weights()` where it has one, with PyTorch's own `register_parameter`, so that it ties also inside
    `accelerate.init_empty_weights()` (see `_REGISTER_PARAMETER`)."""
    if hasattr(model, "tie_weights"):
        patched, nn.Module.register_parameter = nn.Module.register_parameter, _REGISTER_PARAMETER
        try:
            model.tie_weights()
        finally:
            nn.Module.register_parameter = patched


_UNSET = "_sltrain_unset_parameters"  # on a model built from scratch: the parameters no init set, by name


def refuse_unset_parameters(model: nn.Module, doing: str) -> None:
    """`ValueError` if a parameter of `model` (or of a module in it) that no init set is still unset: its placeholder
    (NaN) would be computed with, saved or merged (`doing` says which)."""
    for module in model.modules():
        still = [name for name in module.__dict__.get(_UNSET, ()) if _is_unset(_parameter_or_none(module, name))]
        if still:
            raise ValueError(
                f"The model's own init leaves {len(still)} parameter(s) unset, e.g. {still[:3]}: their values come "
                f"from the constructor, which ran on the meta device, and {doing} would use a placeholder (NaN). "
                f"Build the {type(module).__name__} on a real device instead (from scratch, its targeted dense "
                "weights are then dropped when the layers are replaced), or load an adapter that holds them."
            )


def _parameter_or_none(module: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return module.get_parameter(name)
    except AttributeError:  # gone since (its module replaced, or the parameter deleted): nothing unset is left there
        return None


def _unset_value(parameter: torch.Tensor):
    """What a parameter holds until an init sets it: NaN, or the dtype's lowest value for integers."""
    if parameter.is_floating_point() or parameter.is_complex():
        return math.nan
    return False if parameter.dtype == torch.bool else torch.iinfo(parameter.dtype).min


def _is_unset(parameter: torch.Tensor | None) -> bool:
    if parameter is None or parameter.dtype == torch.bool:
        return False  # no value left to mark it with
    if parameter.is_floating_point() or parameter.is_complex():
        return bool(parameter.isnan().any())
    return bool((parameter == torch.iinfo(parameter.dtype).min).any())


_FLAG = "_is_hf_initialized"  # what Transformers' init functions and `initialize_weights` skip, on tensors and modules


def _initialize_only(model: nn.Module, fresh_ids: set[int], sltrain_layers: list[SLTrainLayer]) -> None:
    """Transformers' `model.initialize_weights()` on the fresh parameters alone (their ids: `fresh_ids`): every other
    tensor (trained, loaded or already initialised, the adapters included) is flagged as initialised meanwhile, and
    each replaced layer from scratch shows a meta weight of its shape, so that an init reaching it (a parent's) does
    nothing. Meanwhile each replaced layer also answers its base layer's `reset_parameters()`, which some models' inits
    call on their children (Wav2Vec2ForPreTraining's `project_hid`): Transformers guards `torch.nn.init` during
    `initialize_weights`, so that it, too, sets only fresh tensors, and there are none (the weight is the meta
    placeholder, and the bias, zero as for every replaced layer, is flagged): it does nothing, where it would raise."""
    saved = [
        (obj, obj.__dict__.get(_FLAG, _FLAG)) for obj in [*model.parameters(), *model.buffers(), *model.modules()]
    ]
    placeholders = []
    for layer in sltrain_layers:
        base = layer.get_base_layer()
        if "weight" in base._parameters and base._parameters["weight"] is None:
            shape = (layer.out_features, layer.in_features)
            shape = shape if isinstance(base, nn.Linear) else shape[::-1]  # Conv1D stores its weight transposed
            dtype = next(iter(layer.sltrain_A.values())).dtype
            base._parameters["weight"] = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype), False)
            placeholders.append(base)
    resettable = [layer for layer in sltrain_layers if hasattr(layer.get_base_layer(), "reset_parameters")]
    for layer in resettable:
        layer.__dict__["reset_parameters"] = layer.get_base_layer().reset_parameters
    try:
        for obj, _ in saved:
            if isinstance(obj, nn.Module):
                obj.__dict__.pop(_FLAG, None)  # `initialize_weights` skips a module flagged by the model's own init
            elif id(obj) not in fresh_ids:
                setattr(obj, _FLAG, True)
        model.initialize_weights()
    finally:
        for layer in resettable:
            layer.__dict__.pop("reset_parameters", None)
        for base in placeholders:
            base._parameters["weight"] = None
        for obj, flag in saved:
            if flag is _FLAG:
                obj.__dict__.pop(_FLAG, None)
            else:
                setattr(obj, _FLAG, flag)


@torch.no_grad()
def _materialize_adapters(layer: SLTrainLayer) -> None:
    """Real storage and the SLTrain init for adapters created on the meta device (`get_peft_model(...,
    low_cpu_mem_usage=True)`), on the device of their support; a file loaded afterwards overwrites them."""
    for adapter, A in layer.sltrain_A.items():
        if A.device.type != "meta":
            continue
        device = layer.sltrain_indices[adapter].device
        for params in (layer.sltrain_A, layer.sltrain_B, layer.sltrain_values):
            # swapped in place: PEFT runs this in `init_empty_weights()`, which sends a newly registered one to meta
            old = params[adapter]
            torch.utils.swap_tensors(old, nn.Parameter(torch.empty_like(old, device=device), old.requires_grad))
        layer.reset_sltrain_parameters(adapter)


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The SLTrain factors (`A`, `B` and the sparse values) of every adapter in `model`."""
    return [p for m in model.modules() if isinstance(m, SLTrainLayer)
            for d in (m.sltrain_A, m.sltrain_B, m.sltrain_values) for p in d.values()]  # fmt: skip


def _listed(names: list[str]) -> str:
    """The first three names, quoted, and how many more."""
    return ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _warn_left_out_dtype_read(names: list[str]) -> None:
    """Says which layers `"all-linear"` left out from scratch because the model reads their weight's dtype or device
    (`weight_read_by_parent`, found from the model's source), if any."""
    if names:
        warnings.warn(
            f'`target_modules="all-linear"` leaves out {len(names)} layer(s) whose weight\'s dtype or device the '
            f"model reads before calling them, which from scratch they would not have: {_listed(names)}. They keep "
            "their dense weight and train dense.",
            stacklevel=3,
        )


def _warn_left_out_narrow(names: list[str], config: SLTrainConfig) -> None:
    """Says which layers `"all-linear"` left out for being narrower than `r` (`exclude_narrow_linears`), if any."""
    if not names:
        return
    if config.from_scratch:
        kept = "train dense"
    else:
        kept = "stay frozen: for a task head, set `task_type` or list it in `modules_to_save`"
    warnings.warn(
        f'`target_modules="all-linear"` leaves out {len(names)} linear layer(s) narrower than r={config.r}, which a '
        f"rank-{config.r} factorization cannot fit: {_listed(names)}. They keep their dense weight and {kept}.",
        stacklevel=3,
    )
