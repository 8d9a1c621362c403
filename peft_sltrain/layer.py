"""The SLTrain layer: a linear layer whose weight is `W0 + (alpha / r) * B @ A + S` (no `W0` from scratch).

It replaces a `torch.nn.Linear` (weight (d_out, d_in)) or a Transformers `Conv1D` (GPT-2's linear layer, whose weight
is stored transposed, (d_in, d_out)). `A`, `B` and the support of `S` always follow the (d_out, d_in) convention.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
import weakref

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from .batched import batched_linear, takes_batched
from .config import SLTrainConfig, is_all_linear
from .cost import COMPUTE_CHOICES, choose_path
from .functional import (
    _sltrain_linear_unchecked,
    autocast_off,
    autocast_on,
    check_input,
    compute_dtype,
    dense_weight,
)
from .support import layer_seed, num_nonzeros, random_support

# the layers SLTrain can replace
REPLACEABLE = (nn.Linear, Conv1D)
# `nn.Linear` subclasses with a forward of their own that computes exactly `x W^T + b` (SLTrain replaces a layer by one
# that computes that from the weights; any other forward of its own would be silently dropped)
SAME_AS_LINEAR = {"transformers.models.falcon.modeling_falcon.FalconLinear"}
# layers whose weight the model reads directly instead of calling them (a replacement would be ignored, or from
# scratch leave nothing to read), by the model's `model_type`, as found in Transformers 5.24 (each entry the end of a
# module name: a layer's own name, or a longer dotted suffix where that name alone would catch other layers): the
# Mamba family's fused kernels and `dt_proj` products (PEFT refuses LoRA on Mamba's `out_proj` for the same reason),
# WavLM's attention, MobileBERT's MLM head (multiplies by [decoder W^T; dense W]), the DETR mask head's key (a 1 x 1
# convolution with its weight), LongCat-Flash's router (an fp32 `F.linear`). `settings_read_directly` adds those
# that depend on a model's settings.
WEIGHT_READ_DIRECTLY = {
    **dict.fromkeys(("mamba", "falcon_mamba"), ("x_proj", "dt_proj", "out_proj")),
    **dict.fromkeys(("mamba2", "nemotron_h", "falcon_h1", "bamba", "granitemoehybrid", "zamba2"), ("out_proj",)),
    "jamba": ("dt_proj",),
    "wavlm": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mobilebert": ("cls.predictions.dense",),
    **dict.fromkeys(("detr", "conditional_detr"), ("bbox_attention.k_proj",)),
    "longcat_flash": ("router.classifier",),
    # LayoutLMv2/v3's relative-position biases index their weight (`bias.weight[:, buckets]`)
    **dict.fromkeys(("layoutlmv2", "layoutlmv3"), ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias")),
}
# The same where a class reads some of its layers under some mode: {class name: (layer names, when)}
WEIGHT_READ_DIRECTLY_BY_CLASS = {
    "LSHSelfAttention": (("query_key", "value"), "in cached generation"),  # Reformer: einsum with the weights
    "Gemma3nTextAltUp": (("correction_coefs", "prediction_coefs"), "in training mode"),  # clamps them, F.linear
}
# bitsandbytes' quantized weights (their layers, `Linear4bit` / `Linear8bitLt`, subclass `nn.Linear`), by class name
BNB_WEIGHTS = {"Params4bit": "4-bit", "Int8Params": "8-bit"}


def bnb_quantization(layer: nn.Module) -> str | None:
    """`"4-bit"` or `"8-bit"` for a bitsandbytes `Linear4bit` / `Linear8bitLt`, else None (without importing it)."""
    return BNB_WEIGHTS.get(type(getattr(layer, "weight", None)).__name__)


def refuse_quantized_from_scratch(layer: nn.Module, layer_name: str) -> None:
    """From scratch every weight is trained (a targeted one as `B @ A + S`): a quantized layer has no place there."""
    if quantization := bnb_quantization(layer):
        raise ValueError(
            f"Layer `{layer_name}` is a bitsandbytes {quantization} {type(layer).__name__}: from scratch "
            "(`from_scratch=True`) every weight of the model is trained (a targeted one replaced by `B @ A + S`), "
            "and a quantized weight can be neither trained nor kept. Build the model without quantization, or "
            "fine-tune it (`from_scratch=False`)."
        )


def unpack_cpu_4bit(layer: nn.Module) -> None:
    """Undoes bitsandbytes' CPU repacking of a `Linear4bit`'s weight, in place; nothing for a weight not packed.

    bitsandbytes' own inverse (used before it saves) leaves the block maxima of a weight without double quantization
    transposed, as (d_in / blocksize, d_out) in bf16: they are put back in order here. The packing's bf16 rounding
    of the block maxima (relative 2^-8) stays."""
    weight = layer.weight
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes as bnb

    nested = state.original_nested
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        weight.quant_state.absmax = weight.quant_state.absmax.T.reshape(-1).float().contiguous()


def keep_bnb_4bit_unpacked(model: nn.Module) -> None:
    """Turns bitsandbytes' CPU repacking off on every `Linear4bit` of `model` (unpacking one already packed).

    At an eval-mode call whose input needs no grad, on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for
    a faster bf16 kernel (2-3x on a no-grad call, ad hoc), and keeps using that kernel in training too, although it has
    no backward to its input: after an evaluation, every gradient through `x W0^T` was lost (or, with a bias, failed in
    place), and its own save unpacks in place with an inverse that leaves `W0` scrambled (see `unpack_cpu_4bit`). The
    packing also rounds the block maxima to bf16, so a run that evaluated would not train on the `W0` a resumed run or
    a loaded adapter sees. Off stays off, also after `unload()`."""
    for module in model.modules():
        # (a tuner layer shows its base layer's `.weight`; the base layer itself is visited)
        if bnb_quantization(module) == "4-bit" and not isinstance(module, BaseTunerLayer):
            unpack_cpu_4bit(module)
            module.support_avx512bf16_for_cpu = False  # the instance flag bitsandbytes checks before packing


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a replaceable layer (or of one already replaced), bitsandbytes' 4- and 8-bit layers included;
    `ValueError` for any other module, including another quantized linear layer (float8)."""
    if isinstance(layer, SLTrainLayer):
        return layer.in_features, layer.out_features
    if isinstance(layer, NonDynamicallyQuantizableLinear):
        raise ValueError(
            "this is the `out_proj` of a `torch.nn.MultiheadAttention`, which reads the layer's weight directly: a "
            "replacement would be ignored (or, from scratch, leave it without weight). Leave it out of "
            '`target_modules` (`"all-linear"` leaves it out).'
        )
    if isinstance(layer, REPLACEABLE):
        weight = layer.weight
        quantized = bnb_quantization(layer) is None and (
            (weight is not None and weight.device.type != "meta" and not weight.is_floating_point())
            or (weight is not None and weight.dtype.itemsize == 1)  # float8: its scale lives beside it
            or hasattr(layer, "weight_scale_inv")  # Transformers' `FP8Linear`
        )
        if quantized:
            raise ValueError(
                f"SLTrain needs a floating-point base weight (or a bitsandbytes 4- or 8-bit layer), and this "
                f"{type(layer).__name__} holds a quantized one ({type(weight).__name__}, {weight.dtype}); load the "
                "model without this quantization."
            )
        if has_own_forward(layer):
            raise ValueError(
                f"this {type(layer).__name__} subclasses `torch.nn.Linear` with a forward of its own, which an "
                "SLTrain layer would not call (it computes `x W^T + b` from the weights): the model would silently "
                'change. Leave it out of `target_modules` (`"all-linear"` leaves it out).'
            )
        return (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else (layer.nx, layer.nf)
    raise ValueError(
        "SLTrain can only replace `torch.nn.Linear` and Transformers `Conv1D` layers (and bitsandbytes' 4- and 8-bit "
        f"ones), got {type(layer).__module__}.{type(layer).__qualname__}; "
        "check `target_modules`."
    )


def has_own_forward(layer: nn.Module) -> bool:
    """Whether `layer` subclasses `nn.Linear` with a forward that is not `x W^T + b` (bitsandbytes' layers aside: a
    quantized base's forward is what an SLTrain layer calls for `x W0^T`)."""
    cls = type(layer)
    return (
        isinstance(layer, nn.Linear)
        and cls.forward is not nn.Linear.forward
        and bnb_quantization(layer) is None
        and f"{cls.__module__}.{cls.__qualname__}" not in SAME_AS_LINEAR
    )


def weight_read_directly(model: nn.Module, from_scratch: bool = False) -> dict[str, tuple[str, str]]:
    """The linear layers of `model` whose weight the model reads directly (`WEIGHT_READ_DIRECTLY` by each (sub-)model's
    type, `WEIGHT_READ_DIRECTLY_BY_CLASS`, `settings_read_directly`; from scratch also `weight_read_by_parent`), by
    name, each with the model type that reads it and the setting that makes it do so ("" where it always does)."""
    top = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    found = dict.fromkeys(weight_read_by_parent(model) if from_scratch else (), (top, FROM_SCRATCH_READ))
    for prefix, sub in model.named_modules():  # each (sub-)model by its own type: a WavLM encoder in a composite too
        model_type = getattr(getattr(sub, "config", None), "model_type", None)
        ends = WEIGHT_READ_DIRECTLY.get(model_type, ())
        for name, m in sub.named_modules() if ends else ():
            if isinstance(m, nn.Linear) and any(name == end or name.endswith("." + end) for end in ends):
                found[f"{prefix}.{name}" if prefix else name] = (model_type, "")
        children, when = WEIGHT_READ_DIRECTLY_BY_CLASS.get(type(sub).__name__, ((), ""))
        for child in children:
            if isinstance(getattr(sub, child, None), nn.Linear):
                found[f"{prefix}.{child}" if prefix else child] = (model_type or top, when)
    return {**found, **{name: (top, setting) for name, setting in settings_read_directly(model).items()}}


FROM_SCRATCH_READ = "from scratch"  # the setting `weight_read_directly` gives `weight_read_by_parent`'s layers


def weight_read_by_parent(model: nn.Module) -> dict[str, tuple[str, str]]:
    """The replaceable layers of `model` whose weight's dtype or device a module above them reads
    (`self.<path>.weight.dtype`, `.device`) in its `forward` or in a method that `forward` calls, as
    Wav2Vec2ForPreTraining does for `project_q` (`x.to(self.project_q.weight.dtype)`), DeepSeek-V3.2's indexer for
    `weights_proj`, BLIP-2 for its projections, Mamba for `lm_head`, PocketTTS (in `embed_audio_latents`) for
    `audio_latent_proj` and Inkling2's vision model for `embeddings.patch_embedding`. Fine-tuned such a layer keeps
    `W0`; from scratch it has no weight, so the read fails (an AttributeError). Found from the source, which covers
    models that no table lists. Not counted: a read behind `isinstance(self.<path>.weight, ...)`, as T5's feed-forward
    guards `wo`; `DTYPE_READ_EXEMPT`; reads deeper than one method call from `forward`, or in a forward patched on an
    instance; other reads of the weight (a matmul with it, BLOOM's slices under `slow_but_exact`), which are
    conditional more often and are listed by model (`WEIGHT_READ_DIRECTLY`, `settings_read_directly`). Returns
    {name: (the reading module's class name, the path it reads the layer by)}, each layer by its name in the model
    (a path may go through a property, an alias of a module registered elsewhere)."""
    names = {id(module): name for name, module in model.named_modules()}
    found = {}
    for module in model.modules():
        for path in _dtype_read_paths(type(module)):
            try:
                layer = module.get_submodule(path)
            except AttributeError:  # (a path of another configuration of the class, or not a module)
                continue
            exempt = (type(module).__name__, path) in DTYPE_READ_EXEMPT
            if isinstance(layer, REPLACEABLE) and not exempt and id(layer) in names:
                found.setdefault(names[id(layer)], (type(module).__name__, path))
    return found


# (class, path) pairs whose read `weight_read_by_parent` would find, but which a from-scratch run does not reach:
# the flash-attention-2 classes' cast of an fp32 input outside autocast, a case FA2's kernels refuse anyway
DTYPE_READ_EXEMPT = {("GPTNeoFlashAttention2", "q_proj"), ("FalconFlashAttention2", "query_key_value")}

# class -> (a weak reference to the forward it was read from, the paths it reads): read again when `forward` is
# replaced (not when only a method it calls is); weak keys and a weak forward (which may hold its class in a closure,
# through `super()`), so that classes made at run time are not kept alive
_DTYPE_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_READ = re.compile(r"self\.((?:\w+\.)*\w+)\.weight\.(?:dtype|device)\b")


def _dtype_read_paths(cls: type) -> tuple[str, ...]:
    """Dotted module paths whose weight's dtype or device `cls.forward`, or a method of `cls` it calls, reads, unless
    each such read of that path is behind an `isinstance` of its weight (none where no source can be read)."""
    forward = getattr(cls, "forward", None)
    cached = _DTYPE_READS.get(cls)
    if cached is not None and cached[0]() is forward:
        return cached[1]
    sources = [_source(forward)]
    for name in dict.fromkeys(re.findall(r"self\.(\w+)\(", sources[0])):  # the methods it calls, one level down
        method = inspect.getattr_static(cls, name, None)
        if inspect.isfunction(method):
            sources.append(_source(method))
    source = "\n".join(sources)
    paths = tuple(
        path
        for path in dict.fromkeys(_READ.findall(source))
        if not re.search(rf"isinstance\(\s*self\.{re.escape(path)}\.weight\b", source)
    )
    try:
        _DTYPE_READS[cls] = (weakref.ref(forward), paths)
    except TypeError:  # (no forward, or one that takes no weak reference: read every time)
        pass
    return paths


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source (built-in, compiled, or defined interactively)
        return ""


def settings_read_directly(model: nn.Module) -> dict[str, str]:
    """Layers read directly only under some settings: BLOOM's `dense` and `dense_4h_to_h` where its attention and MLP
    run `pretraining_tp > 1` with `slow_but_exact` (they slice those weights; PEFT resets the config's
    `pretraining_tp`, which the modules copied when built), and DeBERTa's last `in_proj` where the `DebertaModel`'s
    `z_steps` is above 1 (its last layer is run again on query states, with the weight read in chunks)."""
    found = {}
    for name, module in model.named_modules():
        if getattr(module, "slow_but_exact", False) is True and getattr(module, "pretraining_tp", 1) > 1:
            for child in ("dense", "dense_4h_to_h"):
                if isinstance(getattr(module, child, None), nn.Linear):
                    found[f"{name}.{child}" if name else child] = "with `pretraining_tp > 1` and `slow_but_exact`"
        # DeBERTa: the module's own `z_steps` (its config has none; DebertaModel sets 0, which a user may change)
        layers = getattr(getattr(module, "encoder", None), "layer", None)
        z_steps = getattr(module, "z_steps", None)
        if isinstance(z_steps, int) and z_steps > 1 and isinstance(layers, nn.ModuleList) and len(layers):
            attention = getattr(getattr(layers[-1], "attention", None), "self", None)
            if isinstance(getattr(attention, "in_proj", None), nn.Linear):
                last = f"encoder.layer.{len(layers) - 1}.attention.self.in_proj"
                found[f"{name}.{last}" if name else last] = "with `z_steps > 1`"
    return found


def unreplaceable_linears(model: nn.Module, from_scratch: bool = False) -> list[str]:
    """Names of the linear layers of `model` that SLTrain cannot replace: the `out_proj` of a
    `torch.nn.MultiheadAttention` (which reads its weight directly), `nn.Linear` subclasses with a forward of their
    own (`has_own_forward`) and `weight_read_directly`. `"all-linear"` leaves them out; a name that matches one is
    refused."""
    read_directly, names = set(weight_read_directly(model, from_scratch)), []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, NonDynamicallyQuantizableLinear):
            names.append(f"{name}.out_proj" if name else "out_proj")
        elif name in read_directly or has_own_forward(module):
            names.append(name)
    return list(dict.fromkeys(names))  # (a MultiheadAttention's `out_proj` in a model that reads its own ones)


def exclude_unreplaceable_linears(config: SLTrainConfig, model: nn.Module) -> list[str]:
    """For `target_modules="all-linear"`, adds the model's `unreplaceable_linears` to `config.exclude_modules` (as
    exact names), so that the shorthand means every linear layer SLTrain can replace. Returns those left out from
    scratch only, because the model reads their weight's dtype (`weight_read_by_parent`; found from the source, so
    said in a warning), but for the output layer, which "all-linear" never targets, and those the caller excluded."""
    if not is_all_linear(config.target_modules):
        return []
    read = weight_read_by_parent(model) if config.from_scratch else {}
    excluded_before = [name for name in read if _excluded(config, name)]
    exclude_exactly(config, unreplaceable_linears(model, config.from_scratch))
    try:
        output = model.get_output_embeddings() if read else None
    except (AttributeError, NotImplementedError):  # not a Transformers model, or one without such a layer
        output = None
    return [name for name in read if name not in excluded_before and model.get_submodule(name) is not output]


def _excluded(config: SLTrainConfig, name: str) -> bool:
    """Whether `config.exclude_modules` leaves the module `name` out, as PEFT matches it (a string as a regex, in
    full; a list's entries as the name or any path ending in "." + the entry)."""
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in exclude or ())


def exclude_exactly(config: SLTrainConfig, names: list[str]) -> None:
    """Adds `names` to `config.exclude_modules`, each matching that module alone. PEFT matches a list's entries as
    suffixes (`2` would also exclude `0.2`), so the result is a regex, which PEFT matches in full: the list's entries
    become alternatives with their suffix meaning, each name an exact one."""
    if not names:
        return
    if isinstance(config.exclude_modules, str):  # leading global flags (`(?i)`) scoped to it: allowed only first
        user = config.exclude_modules
        found = re.match(r"\(\?([aiLmsux]+)\)", user)
        flags, rest = (found.group(1), user[found.end() :]) if found else ("", user)
        kept = [f"(?{flags}:{rest}{chr(10) if 'x' in flags else ''})"]  # (a newline ends a trailing `(?x)` comment)
    else:  # PEFT: an entry matches that name, or any path ending in "." + it
        kept = [rf"(?:.*\.)?{re.escape(m)}" for m in sorted(config.exclude_modules or [])]
    config.exclude_modules = "|".join([*kept, *(re.escape(n) for n in names)])


def check_rank(r: int, d_in: int, d_out: int, layer_name: str) -> None:
    """`ValueError` unless `0 < r <= min(d_in, d_out)` for the `d_out x d_in` layer `layer_name`."""
    if not 0 < r <= min(d_in, d_out):
        raise ValueError(
            f"`r` must be in [1, min(d_in, d_out)] = [1, {min(d_in, d_out)}] for layer `{layer_name}` "
            f"({d_out} x {d_in}), got {r}."
        )


_NO_BASE_LAYER = object()
# weak reference to a class -> whether `_base_layer_of` may read its instances' dicts. Classes are taken not to change
# their attribute lookup, nor gain a class attribute `base_layer`, once instances are in use; an entry goes with its
# class (`nn.utils.parametrize` makes one per module)
_PLAIN_LOOKUP: dict[weakref.ref, bool] = {}


def _base_layer_of(module):
    """`module.base_layer` where `hasattr(module, "base_layer")` holds, else `_NO_BASE_LAYER`; for a module with
    `nn.Module`'s own attribute lookup and no class attribute of that name, read from its dicts in the order that
    lookup takes (no AttributeError raised and caught)."""
    cls = type(module)
    key = weakref.ref(cls)  # (the class's one plain weak reference, made once: equal to any other while it lives)
    plain = _PLAIN_LOOKUP.get(key)
    if plain is None:
        plain = (
            issubclass(cls, nn.Module)
            and cls.__getattribute__ is nn.Module.__getattribute__
            and cls.__getattr__ is nn.Module.__getattr__
            and not any("base_layer" in vars(c) for c in cls.__mro__)  # (a descriptor may hide itself on the class)
        )
        _PLAIN_LOOKUP[weakref.ref(cls, _forget_class)] = plain
    if plain:
        found = module.__dict__
        for where in (found, found.get("_parameters", {}), found.get("_buffers", {}), found.get("_modules", {})):
            if "base_layer" in where:
                return where["base_layer"]
        return _NO_BASE_LAYER
    return getattr(module, "base_layer", _NO_BASE_LAYER)  # (a property, a wrapper's own `__getattr__`, not a module)


def _forget_class(key: weakref.ref) -> None:
    _PLAIN_LOOKUP.pop(key, None)


class SLTrainLayer(BaseTunerLayer):
    # trainable tensors, each an entry per adapter name
    adapter_layer_names = ("sltrain_A", "sltrain_B", "sltrain_values")
    # everything else that is per adapter (`sltrain_indices` is a persistent buffer, saved with the adapter)
    other_param_names = ("sltrain_indices", "r", "alpha", "scaling", "sparsity", "from_scratch", "compute")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        d_in, d_out = layer_features(base_layer)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.sparsity: dict[str, float] = {}
        self.from_scratch: dict[str, bool] = {}
        self.compute: dict[str, str] = {}
        self.sltrain_A = nn.ParameterDict({})  # (r, d_in)
        self.sltrain_B = nn.ParameterDict({})  # (d_out, r)
        self.sltrain_values = nn.ParameterDict({})  # (nnz,)
        self.sltrain_indices = BufferDict({}, persistent=True)  # (nnz,) int32 flat indices into (d_out, d_in)
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = d_in, d_out
        # "4-bit" / "8-bit": a bitsandbytes base (fine-tuning only), which computes `x W0^T` itself; else None
        self.quantization = bnb_quantization(base_layer)
        keep_bnb_4bit_unpacked(base_layer)  # its own base (the model's other 4-bit layers: `SLTrainModel`)
        # the base weight is stored (d_in, d_out) (Conv1D), as LoRA's `fan_in_fan_out`: transposed on every use
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.kwargs = kwargs

    def get_base_layer(self) -> nn.Module:
        """The innermost base layer, as PEFT's `get_base_layer` finds it (its walk follows `base_layer` while
        `hasattr` finds one), faster: at the innermost layer `hasattr` goes through `nn.Module.__getattr__`, which
        raises and catches an AttributeError (about 2 us, and the layers call this in every forward: on a GPU a cost
        per layer call)."""
        base = self
        while (inner := _base_layer_of(base)) is not _NO_BASE_LAYER:
            base = inner
        return base

    def update_layer_from_config(self, adapter_name: str, config: SLTrainConfig, layer_name: str) -> None:
        """`update_layer` with the settings of `config`."""
        self.update_layer(
            adapter_name,
            r=config.r,
            sparsity=config.sparsity,
            alpha=config.alpha,
            from_scratch=config.from_scratch,
            seed=config.seed,
            layer_name=layer_name,
            compute=config.compute,
            inference_mode=config.inference_mode,
        )

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        sparsity: float,
        alpha: float,
        from_scratch: bool,
        seed: int,
        layer_name: str,
        compute: str = "auto",
        inference_mode: bool = False,
    ) -> None:
        d_in, d_out = self.in_features, self.out_features
        check_rank(r, d_in, d_out, layer_name)
        if not 0 < sparsity < 1:
            raise ValueError(f"`sparsity` must be in (0, 1), got {sparsity}.")
        if not 0 < alpha < math.inf:  # also refuses NaN
            raise ValueError(f"`alpha` must be a positive finite number, got {alpha}.")
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"`compute` must be one of {COMPUTE_CHOICES}, got {compute!r}.")

        base = self.get_base_layer()
        weight = base.weight
        if from_scratch:
            refuse_quantized_from_scratch(base, layer_name)
        if weight is None and not from_scratch:
            raise ValueError(
                f"Layer `{layer_name}` has no dense weight (a from-scratch adapter replaced it), so there is no `W0` "
                "to fine-tune; start from a model with its weights."
            )
        if weight is not None and weight.device.type == "meta" and not from_scratch:
            if hasattr(base, "_hf_hook"):  # accelerate's offloading (`device_map` with "cpu"/"disk", `cpu_offload`)
                raise ValueError(
                    f"Layer `{layer_name}` has its weight offloaded by accelerate (on the meta device until its hook "
                    "loads it for a call of the layer); SLTrain computes the layer from its weights and never calls "
                    "it, so fine-tuning needs the weights in place. Load the model without offloading."
                )
            raise ValueError(
                f"Layer `{layer_name}` has its weight on the meta device; fine-tuning (`from_scratch=False`) needs "
                "the real pretrained weight. Load the model with its weights, or use `from_scratch=True`."
            )
        if weight is not None and weight.device.type != "meta":
            device = weight.device
        else:
            device = torch.get_default_device()  # from scratch on a meta-built model: create on the default device
        if self.quantization or weight is None:  # a quantized base's adapter is fp32, as PEFT's LoRA's
            dtype = torch.get_default_dtype()
        else:
            dtype = weight.dtype
        nnz = num_nonzeros(d_out, d_in, sparsity)
        factory = {"device": device, "dtype": dtype}

        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.sparsity[adapter_name] = sparsity
        self.from_scratch[adapter_name] = from_scratch
        self.compute[adapter_name] = compute
        self.sltrain_A[adapter_name] = nn.Parameter(torch.empty(r, d_in, **factory))
        self.sltrain_B[adapter_name] = nn.Parameter(torch.zeros(d_out, r, **factory))
        self.sltrain_values[adapter_name] = nn.Parameter(torch.zeros(nnz, **factory))
        support = random_support(d_out, d_in, nnz, seed=layer_seed(seed, layer_name))
        self.sltrain_indices[adapter_name] = support.to(device if device.type != "meta" else "cpu")
        self.reset_sltrain_parameters(adapter_name)

        if from_scratch:
            # pretraining: W = B @ A + S, no dense weight is kept (nor ever allocated for a meta-built model)
            base.weight = None
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_sltrain_parameters(self, adapter_name: str) -> None:
        """Init as the paper's code: `A` Kaiming-uniform, `B = 0`; `S = 0` (fine-tuning) or uniform (from scratch)."""
        A = self.sltrain_A[adapter_name]
        if A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.sltrain_B[adapter_name])
        values = self.sltrain_values[adapter_name]
        if self.from_scratch[adapter_name]:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(values, -bound, bound)
        else:
            nn.init.zeros_(values)

    def _sltrain(self, name: str, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """Adapter `name`'s map on `x` (in the compute dtype, autocast off), plus `weight` and `bias` if given, on the
        path the cost model picks for this call (`peft_sltrain.cost`). Its tensors go in their own dtype (the map
        casts them), and are valid by construction: no checks per call.

        The path counts forward-only costs where no backward can follow, under `torch.no_grad()` (and inference mode)
        in eval mode. In training mode the backward counts also without grad: reentrant activation checkpointing runs
        its first forward there and recomputes it with grad, and both must take one path for the checkpointed model to
        give the same bits. What requires a gradient does not count, so that a model gives the same bits whether its
        parameters are frozen (loaded for inference) or not."""
        if weight is None and takes_batched(self, name, x):  # from scratch: W from its group's batched rebuild
            y = batched_linear(self, name, x)
            if y is not None:
                return y if bias is None else y + bias.to(x.dtype)
        A, B, values = self.sltrain_A[name], self.sltrain_B[name], self.sltrain_values[name]
        path = choose_path(
            self.compute[name],
            n=x.numel() // self.in_features,
            d_in=self.in_features,
            d_out=self.out_features,
            r=self.r[name],
            nnz=values.numel(),
            device=x.device,
            dtype=x.dtype,
            has_weight=weight is not None,
            backward=torch.is_grad_enabled() or self.training,
        )
        indices = self.sltrain_indices[name]
        return _sltrain_linear_unchecked(x, A, B, values, indices, self.scaling[name], weight, bias, path)


class Linear(nn.Module, SLTrainLayer):
    """SLTrain replacement of one `torch.nn.Linear` or Transformers `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SLTrainConfig, layer_name: str, **kwargs):
        super().__init__()
        SLTrainLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self._warned_about_hooks = False
        self.update_layer_from_config(adapter_name, config, layer_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense `(alpha / r) * B @ A + S` of one adapter in the adapter's dtype, laid out as the base layer's
        weight: (d_out, d_in) for `nn.Linear`, (d_in, d_out) for `Conv1D` (contiguous either way)."""
        tensors = (self.sltrain_A, self.sltrain_B, self.sltrain_values, self.sltrain_indices)
        delta = dense_weight(*(t[adapter_name] for t in tensors), self.scaling[adapter_name])
        return delta.t().contiguous() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters into the base weight. From scratch, the merged adapter *becomes* the
        weight. A bitsandbytes base is dequantized, summed and quantized again (which rounds: a warning says so).
        With `safe_merge`, the result is checked for NaN/inf before anything is written."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.sltrain_A:
                continue
            delta = self.get_delta_weight(name)
            if self.quantization:
                merged = self._dequantized_base_weight(plus=delta)
            elif base.weight is None:
                merged = delta
            else:
                # summed in the wider dtype and rounded once (a bf16 W0 and its fp32 adapter: in fp32), as LoRA does
                merged = (base.weight.data + delta).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaN or inf in the merged weight; adapter `{name}` seems broken. This layer was left unmerged; "
                    "layers merged before it stay merged (`unmerge_adapter()` undoes them)."
                )
            if self.quantization:
                self._requantize_base_weight(merged)
            elif base.weight is None:  # from scratch: the weight is as trainable as the adapter was (and the rest)
                base.weight = nn.Parameter(merged, requires_grad=self.sltrain_A[name].requires_grad)
            else:
                base.weight.data = merged
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.sltrain_A:
                continue
            if self.from_scratch[name]:
                base.weight = None
            elif self.quantization:
                self._requantize_base_weight(self._dequantized_base_weight(plus=-self.get_delta_weight(name)))
            else:
                base.weight.data -= self.get_delta_weight(name)  # in the wider dtype, rounded once

    def _dequantized_base_weight(self, plus: torch.Tensor | None = None) -> torch.Tensor:
        """A bitsandbytes base's `W0` (d_out, d_in), dequantized as PEFT's LoRA does (4-bit: in the weight's
        original dtype); with `plus`, `W0 + plus` summed in fp32 and rounded once to that dtype."""
        from peft.utils.integrations import dequantize_bnb_weight

        base = self.get_base_layer()
        if self.quantization == "4-bit":
            W0 = dequantize_bnb_weight(base.weight, state=base.weight.quant_state)
        elif base.weight.has_fp16_weights:  # bitsandbytes' mixed mode keeps W0 in floats (the row scales belong to
            W0 = base.weight.data.clone()  # its int8 copy for the forward): dequantizing would scale it twice
        else:
            if base.state.SCB is None:
                base.state.SCB = base.weight.SCB
            W0 = dequantize_bnb_weight(base.weight, state=base.state)
        return W0 if plus is None else (W0.float() + plus.float()).to(W0.dtype)

    def _requantize_base_weight(self, W: torch.Tensor) -> None:
        """Quantizes `W` (d_out, d_in) into a new weight of the bitsandbytes base, with the old one's settings, as
        PEFT's LoRA merges. Quantizing rounds, so a merged (or unmerged) layer is close to, not equal to, the
        unmerged one."""
        import bitsandbytes as bnb

        warnings.warn(
            f"Merging SLTrain into (or unmerging it from) a bitsandbytes {self.quantization} layer quantizes the sum "
            "again: the outputs differ from the unmerged layer's (or the original W0's) by that rounding.",
            stacklevel=3,
        )
        base = self.get_base_layer()
        weight = base.weight
        if self.quantization == "4-bit":
            settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
            settings.update(bnb_quantized=False, requires_grad=False)  # quantized (again) by the move to the device
            base.weight = bnb.nn.Params4bit(W.to("cpu"), **settings).to(weight.device)
        else:
            base.weight = bnb.nn.Int8Params(
                W.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
            ).to(weight.device)
            base.state.reset_grads()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if any(self.from_scratch.values()):
                raise ValueError("A from-scratch SLTrain layer has no base weight to fall back to when disabled.")
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.sltrain_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)

        check_input(x, self.in_features)
        device_type = x.device.type
        autocast = autocast_on(device_type)
        dtype = compute_dtype(x)  # under autocast, as F.linear would; grads flow back to the fp32 params
        if self.quantization:  # bitsandbytes computes x W0^T (+ bias) from its quantized weight; a branch per delta
            result = self.base_layer(x, *args, **kwargs)
            with autocast_off(device_type):
                x = x.to(dtype)
                for name in active:
                    delta = self._sltrain(name, x)
                    result = result + delta.to(result.dtype)
            return result
        # On a GPU a layer call at the 60M-350M shapes is bound by this Python and the ops it dispatches
        # (docs/compute_paths.md, "On a GPU"): the base layer is looked up once per call
        # (`benchmarks/layer_call_overhead.py` measures the work per call).
        base = self.get_base_layer()
        weight = base.weight  # W0 (d_out, d_in), or (d_in, d_out) for Conv1D; None from scratch
        if not autocast or x.dtype == torch.float64:  # no autocast cast applies
            if weight is None:  # from scratch: the wider of the input's and the factors' dtypes. Models that keep a
                # layer in fp32 (T5's `wo` loaded in fp16) cast its input to its `.weight`'s, None from scratch
                factors = self.sltrain_A[active[0]].dtype
                dtype = dtype if factors == dtype else torch.promote_types(dtype, factors)  # (a dispatched op)
            else:  # nn.Linear refuses an input of another dtype than its weight's
                self._check_input_dtype(x, weight, autocast)
        if not self._warned_about_hooks and (  # four dict lookups per call; the message only when there are hooks
            base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
        ):
            self._warn_about_hooks_on(base)
        if weight is not None and self.fan_in_fan_out:
            weight = weight.t()
        try:  # (free where nothing raises)
            with autocast_off(device_type):
                x = x.to(dtype)
                if len(active) == 1:  # one fused map: W0 + delta is rebuilt inside, so W0 is multiplied only once
                    return self._sltrain(active[0], x, weight, base.bias)
                bias = None if base.bias is None else base.bias.to(dtype)
                result = F.linear(x, weight.to(dtype), bias)  # autocast is off here: W0 cast to x's dtype
                for name in active:
                    result = result + self._sltrain(name, x)
                return result
        except RuntimeError:
            self._refuse_unloaded(active)  # torch's error names the meta device, not the cause
            raise

    def _refuse_unloaded(self, active: list[str]) -> None:
        """`ValueError` if an active adapter has no weights yet: on the meta device, as `get_peft_model(...,
        low_cpu_mem_usage=True)` leaves a fine-tuning adapter until its weights are loaded."""
        for name in active:
            if any(tensors[name].is_meta for tensors in (self.sltrain_A, self.sltrain_B, self.sltrain_values)):
                raise ValueError(
                    f"Adapter {name!r} of this SLTrain layer ({self.in_features} -> {self.out_features}) has no "
                    "weights yet: it is on the meta device, as `get_peft_model(..., low_cpu_mem_usage=True)` leaves "
                    "it for a load. Load its weights (`set_peft_model_state_dict`, `PeftModel.from_pretrained`) "
                    "before calling the model, or build it without `low_cpu_mem_usage`."
                ) from None

    def _check_input_dtype(self, x: torch.Tensor, weight: torch.Tensor, autocast: bool) -> None:
        """Outside autocast (and for fp64, which autocast leaves alone), `nn.Linear` refuses an input whose dtype is
        not its weight's; so does a fine-tuned SLTrain layer, rather than silently round `W0` to a bf16 input."""
        if x.dtype != weight.dtype:
            way = "(autocast leaves float64 alone)" if autocast else "or run under `torch.autocast`"
            raise ValueError(
                f"The input of an SLTrain layer ({self.in_features} -> {self.out_features}) has dtype {x.dtype} but "
                f"the layer's weights are {weight.dtype} (nn.Linear refuses this too): cast the input to "
                f"{weight.dtype} or the model to {x.dtype} {way}."
            )

    def _warn_about_hooks_on(self, base: nn.Module) -> None:
        """The adapter computes the layer itself and never calls the base layer, so hooks on it would not run: say so
        once per layer (as PEFT's SHiRA does), rather than skip them silently."""
        kinds = {"forward": base._forward_hooks, "forward pre": base._forward_pre_hooks,
                 "backward": base._backward_hooks, "backward pre": base._backward_pre_hooks}  # fmt: skip
        hooked = [kind for kind, hooks in kinds.items() if hooks]
        self._warned_about_hooks = True
        warnings.warn(
            f"The {type(base).__name__}({self.in_features}, {self.out_features}) under this SLTrain layer has "
            f"{' and '.join(hooked)} hooks, which SLTrain's forward does not run (it computes the layer from the "
            "weights, without calling the base layer). Register them on the SLTrain layer instead (the same module "
            "path, after `get_peft_model`).",
            stacklevel=2,
        )

    def __repr__(self) -> str:
        return "sltrain." + super().__repr__()
