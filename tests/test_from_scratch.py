"""Pretraining mode: no dense weight in the targeted layers, everything else trained and saved."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_sltrain import SLTrainConfig, SLTrainLayer, count_parameters

from conftest import (
    assert_factors_trained,
    perturb_trainable,
    sltrain_factors,
    tiny_llama,
    tiny_llama_config,
    train_losses,
)

CONFIG = SLTrainConfig(r=8, sparsity=0.05, alpha=2, from_scratch=True)


def scratch_model(meta: bool = True, config: SLTrainConfig = CONFIG):
    if meta:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(tiny_llama_config())
    else:
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    return get_peft_model(base, config)


@pytest.mark.parametrize("meta", [True, False])
def test_no_dense_targeted_weights_and_everything_trainable(meta):
    model = scratch_model(meta)
    layers = [m for m in model.modules() if isinstance(m, SLTrainLayer)]
    assert len(layers) == 14
    assert all(layer.get_base_layer().weight is None for layer in layers)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert all(p.requires_grad for p in model.parameters())
    counts = count_parameters(AutoModelForCausalLM.from_config(tiny_llama_config()), CONFIG)
    assert (counts.trainable, counts.total) == model.get_nb_trainable_parameters()
    assert counts.trainable == counts.total


def test_paper_init():
    model = scratch_model()
    for layer in (m for m in model.modules() if isinstance(m, SLTrainLayer)):
        bound = 1 / math.sqrt(layer.in_features)
        values = layer.sltrain_values["default"]
        assert not layer.sltrain_B["default"].any()
        assert values.abs().max() <= bound and values.std() > bound / 3  # uniform(-b, b) has std b / sqrt(3)
        assert layer.sltrain_A["default"].abs().max() <= bound
    embed = model.base_model.model.model.embed_tokens.weight
    assert 0.01 < embed.std() < 0.03  # materialised from meta with the model's own init (std 0.02)


def test_trains(input_ids):
    model = scratch_model()
    assert all(p.requires_grad for p in model.parameters())  # so the helper's optimizer takes every parameter
    before = sltrain_factors(model)
    losses = train_losses(model, input_ids, steps=15)
    assert losses[-1] < 0.7 * losses[0]
    assert model.base_model.model.model.embed_tokens.weight.grad is None  # zero_grad(set_to_none)
    assert len(before) == 3 * 14
    assert_factors_trained(model, before, input_ids)


@pytest.mark.parametrize("base_on_meta", [False, True])
def test_reload_is_bit_identical_on_any_base(tmp_path, input_ids, base_on_meta):
    model = scratch_model().eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    torch.manual_seed(1234)  # a different random init of the base: nothing of it may leak into the result
    if base_on_meta:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(tiny_llama_config())
    else:
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(loaded(input_ids).logits, expected)


def test_merge_and_unload_gives_plain_model(tmp_path, input_ids):
    model = scratch_model().eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SLTrainLayer) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in merged.parameters())  # ready to train on as a plain model
    merged.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_merge_unmerge_round_trip(input_ids):
    model = scratch_model().eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert all(m.get_base_layer().weight is None for m in model.modules() if isinstance(m, SLTrainLayer))
    assert torch.equal(model(input_ids).logits, expected)


def test_what_from_scratch_cannot_do():
    model = scratch_model()
    with pytest.raises(
        ValueError, match=r"the adapters would be \['default', 'second'\], of which \['default', 'second'\]"
    ):
        model.add_adapter("second", SLTrainConfig(r=2, from_scratch=True))
    with pytest.raises(ValueError, match="use `merge_and_unload"):
        model.unload()
    with pytest.raises(ValueError, match="Cannot disable a from-scratch"):
        with model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="Cannot delete the from-scratch SLTrain adapter 'default'"):
        model.delete_adapter("default")
    layers = [m for m in model.modules() if isinstance(m, SLTrainLayer)]
    assert all("default" in m.sltrain_A and m.get_base_layer().weight is None for m in layers)  # nothing was removed
    layers[0].enable_adapters(False)  # a layer disabled by itself (not through the model) refuses too
    with pytest.raises(ValueError, match="A from-scratch SLTrain layer has no base weight to fall back to"):
        layers[0](torch.randn(2, layers[0].in_features))
    fine_tuned = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config()), SLTrainConfig(r=2))
    with pytest.raises(ValueError, match="cannot share the model with another adapter"):
        fine_tuned.add_adapter("scratch", SLTrainConfig(r=2, from_scratch=True))


def test_saved_while_merged_the_file_is_the_unmerged_one(tmp_path, input_ids):
    """A merged layer's dense weight is the adapter's own product: it is not written to the adapter file."""
    model = scratch_model().eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "unmerged")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="whatever was trained on the merged weights is not saved"):
        model.save_pretrained(tmp_path / "merged")
    unmerged, merged = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unmerged", "merged"))
    assert merged.keys() == unmerged.keys() and all(torch.equal(merged[k], unmerged[k]) for k in merged)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(tiny_llama_config()), tmp_path / "merged")
    assert torch.equal(loaded.eval()(input_ids).logits, expected)


def test_tied_file_with_a_nan_loads(tmp_path):
    """The tied check compares the two names' tensors bit for bit, NaN included (a diverged run is still loadable)."""
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True)), CONFIG)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    tied = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    loaded = PeftModel.from_pretrained(tied, tmp_path)
    assert loaded.base_model.model.lm_head.weight[0, 0].isnan()


def test_untied_adapter_into_a_tied_model_is_refused(tmp_path):
    """The file's embedding and head differ; a tied model could keep only one of them: refused, not half-loaded."""
    model = scratch_model()
    model.save_pretrained(tmp_path)
    tied = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"different tensors for .*embed_tokens.weight.* ties into one parameter"):
        PeftModel.from_pretrained(tied, tmp_path)


def test_a_rank_too_large_for_one_layer_replaces_nothing(input_ids):
    """Checked before the first layer is replaced: from scratch, a failure halfway would have dropped some W0."""
    base = tiny_llama()  # q_proj 64 x 64, k_proj 32 x 64 (2 key-value heads of 16)
    expected = base(input_ids).logits
    with pytest.raises(
        ValueError,
        match=r"`r` must be in \[1, min\(d_in, d_out\)\] = \[1, 32\] for layer `model.layers.0.self_attn.k_proj`",
    ):
        get_peft_model(base, SLTrainConfig(r=40, target_modules=["q_proj", "k_proj"], from_scratch=True))
    assert not any(isinstance(m, SLTrainLayer) for m in base.modules())
    assert torch.equal(base(input_ids).logits, expected)
    with pytest.raises(ValueError, match=r"\[1, 32\] .*got 40"):
        count_parameters(base, SLTrainConfig(r=40, target_modules=["k_proj"]))


@pytest.mark.parametrize("meta", [True, False])
def test_a_tied_head_is_not_replaced(meta, input_ids):
    """From scratch, replacing the vocabulary head drops its weight, which the tied input embeddings still need:
    refused before any layer is replaced."""
    config = SLTrainConfig(r=4, sparsity=0.1, from_scratch=True, target_modules=["q_proj", "lm_head"])
    if meta:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    else:
        base = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    shares = "the input embeddings' weight" if meta else "model.embed_tokens.weight"
    for call in (get_peft_model, count_parameters):
        with pytest.raises(ValueError, match=rf"matched `lm_head`, whose weight the model shares with .*{shares}"):
            call(base, config)
    assert not any(isinstance(m, SLTrainLayer) for m in base.modules())
    assert all(m.weight is not None for m in base.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("meta", [True, False])
def test_low_cpu_mem_usage_gets_the_paper_init(meta, input_ids):
    """PEFT creates the adapters on the meta device; from scratch they are the model's weights, so they get real
    storage and the same init as without the flag (the same draws, in the same order)."""
    torch.manual_seed(0)
    expected = scratch_model(meta)
    torch.manual_seed(0)
    if meta:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(tiny_llama_config())
    else:
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    model = get_peft_model(base, CONFIG, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.isfinite(model(input_ids=input_ids, labels=input_ids).loss)


@pytest.mark.parametrize("meta", [True, False])
def test_low_cpu_mem_usage_keeps_a_tied_head_tied(meta, input_ids):
    """PEFT injects inside `init_empty_weights()`, which sends each newly registered parameter to meta: tying there
    made the head a new, untied meta parameter, and the logits garbage."""

    def build(**kwargs):
        torch.manual_seed(0)
        with init_empty_weights() if meta else contextlib.nullcontext():
            base = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
        return get_peft_model(base, CONFIG, **kwargs)

    expected, model = build(), build(low_cpu_mem_usage=True)
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight and inner.lm_head.weight.device.type == "cpu"
    assert model.get_nb_trainable_parameters() == expected.get_nb_trainable_parameters()
    torch.testing.assert_close(model(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_keeps_the_base_models_dtype_and_tying(tmp_path, low_cpu_mem_usage):
    """From scratch the file holds every tensor; loaded with `assign=True` (`low_cpu_mem_usage`) they used to land
    one by one: untied, and in the file's dtype instead of the model's."""
    config = tiny_llama_config(tie_word_embeddings=True)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), CONFIG)
    perturb_trainable(model)
    model.save_pretrained(tmp_path)  # float32
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage)
    inner = loaded.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in model.state_dict().items())


def test_a_file_with_tensors_the_model_lacks_is_refused(tmp_path):
    """From scratch the file is the whole model: biases the model has no place for would be dropped silently."""
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(attention_bias=True)), CONFIG)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"8 tensor\(s\) for parameters this model does not have, e.g. \[.*bias"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_config(tiny_llama_config()), tmp_path)


@pytest.mark.parametrize("tie", [False, True])
def test_count_parameters_of_a_meta_built_model(tie):
    """A meta-built model ties its embeddings only once materialised; planned from it, the counts are the built
    model's either way."""
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=tie))
    planned = count_parameters(base, CONFIG)
    built = get_peft_model(base, CONFIG)
    assert (planned.trainable, planned.total) == built.get_nb_trainable_parameters()
    embed = built.base_model.model.model.embed_tokens.weight
    assert (built.base_model.model.lm_head.weight is embed) == tie


@pytest.mark.parametrize("from_scratch", [True, False])
@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_count_parameters_of_a_meta_built_encoder_decoder(model_type, from_scratch):
    """An encoder-decoder built on meta has three embedding tensors (encoder, decoder, shared) until it ties them:
    planned from it, the counts are still the built model's."""
    import transformers

    config = {
        "t5": transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100,
                                    decoder_start_token_id=0),
        "bart": transformers.BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1,
                                        decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                        vocab_size=100, max_position_embeddings=64),
    }[model_type]  # fmt: skip
    sltrain = SLTrainConfig(r=4, sparsity=0.1, from_scratch=from_scratch, target_modules="all-linear")
    meta = meta_built(transformers.AutoModelForSeq2SeqLM.from_config, config)
    planned = count_parameters(meta, sltrain)
    base = meta if from_scratch else transformers.AutoModelForSeq2SeqLM.from_config(config)  # fine-tuned: real W0
    assert (planned.trainable, planned.total) == get_peft_model(base, sltrain).get_nb_trainable_parameters()


def test_fine_tuning_a_layer_without_weight_is_refused():
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=2, from_scratch=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # its W0 was dropped
    with pytest.raises(ValueError, match="has no dense weight .* no `W0` to fine-tune"):
        layer.update_layer("tune", r=2, sparsity=0.1, alpha=1.0, from_scratch=False, seed=0, layer_name="q")


def test_fine_tuning_a_meta_model_is_refused():
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    with pytest.raises(ValueError, match="meta device; fine-tuning"):
        get_peft_model(base, SLTrainConfig(r=2))


def test_fine_tuning_a_model_offloaded_by_accelerate_is_refused_as_such():
    """accelerate's offloading leaves the weights on meta until a hook loads them for a call of the layer, which
    SLTrain never makes: refused, naming the offloading (not suggesting `from_scratch=True`)."""
    from accelerate import cpu_offload

    base = AutoModelForCausalLM.from_config(tiny_llama_config())
    cpu_offload(base, execution_device="cpu")
    with pytest.raises(ValueError, match=r"q_proj` has its weight offloaded by accelerate.*without offloading"):
        get_peft_model(base, SLTrainConfig(r=2))


def test_a_model_built_on_the_meta_device_is_refused():
    """`torch.device("meta")` also puts the buffers (rotary frequencies) on meta, where nothing can rebuild them;
    `init_empty_weights()` keeps them real."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    with pytest.raises(ValueError, match=r"Buffers \['model.rotary_emb.inv_freq', .* are on the meta device"):
        get_peft_model(base, SLTrainConfig(r=2, from_scratch=True))


BUILD_1B = """
import json, resource, sys, torch
from accelerate import init_empty_weights
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
import peft_sltrain
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32,
                  vocab_size=1000, tie_word_embeddings=False)
with init_empty_weights():
    base = AutoModelForCausalLM.from_config(cfg)
dense_targeted = sum(m.weight.numel() for n, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.rsplit('.', 1)[-1].endswith('proj'))
model = get_peft_model(base, peft_sltrain.SLTrainConfig(r=8, sparsity=0.001, from_scratch=True))
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
try:  # this process's own peak: Linux's ru_maxrss also counts the parent's resident set at the spawn (pytest's)
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"dense_targeted_bytes": 4 * dense_targeted, "held_bytes": held, "peak_rss_bytes": peak}))
"""


def test_meta_build_of_a_1b_shaped_model_never_allocates_dense_weights():
    """LLaMA-1B's 24 x 7 projections hold 1.2B weights (4.8 GB in fp32); built on meta and wrapped from scratch, the
    whole process peaks far below that."""
    out = subprocess.run([sys.executable, "-c", BUILD_1B], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["dense_targeted_bytes"] > 4.5e9
    assert report["held_bytes"] < 0.02 * report["dense_targeted_bytes"]
    assert report["peak_rss_bytes"] < 0.25 * report["dense_targeted_bytes"]


def test_loaded_for_inference_nothing_trains_merged_or_not(tmp_path):
    """A from-scratch adapter loaded for inference (`is_trainable=False`) is frozen, its merged weights too."""
    scratch_model().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(tiny_llama_config()), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.merge_adapter()
    layers = [m for m in loaded.modules() if isinstance(m, SLTrainLayer)]
    assert not any(m.get_base_layer().weight.requires_grad for m in layers)


def test_set_adapter_and_set_requires_grad_switch_the_whole_model(tmp_path):
    """From scratch the adapter is the whole model: freezing or unfreezing it (`set_adapter(inference_mode=...)`,
    `set_requires_grad`, loading with `is_trainable=False` and then `set_adapter`) switches embeddings, norms and head
    with the factors, as LoRA switches its `modules_to_save`."""
    model = scratch_model(meta=False)
    total = model.get_nb_trainable_parameters()[1]
    model.set_adapter("default", inference_mode=True)
    assert model.get_nb_trainable_parameters() == (0, total)
    model.set_adapter("default")
    assert model.get_nb_trainable_parameters() == (total, total)
    model.base_model.set_requires_grad("default", requires_grad=False)
    assert model.get_nb_trainable_parameters() == (0, total)
    model.base_model.set_requires_grad("default")
    assert model.get_nb_trainable_parameters() == (total, total)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(tiny_llama_config()), tmp_path)
    assert loaded.get_nb_trainable_parameters() == (0, total)
    loaded.set_adapter("default")
    assert loaded.get_nb_trainable_parameters() == (total, total)


def test_the_frozen_warning_names_what_stays_frozen_and_only_when_training(tmp_path):
    """A frozen targeted weight is dropped, not kept frozen: the warning names only the rest; loading for inference
    freezes everything anyway, so it says nothing there."""
    base = AutoModelForCausalLM.from_config(tiny_llama_config())
    base.model.norm.weight.requires_grad_(False)
    base.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) frozen .* \['model.norm.weight'\]"):
        model = get_peft_model(base, CONFIG)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = AutoModelForCausalLM.from_config(tiny_llama_config())
        frozen.model.norm.weight.requires_grad_(False)
        PeftModel.from_pretrained(frozen, tmp_path)
    assert not [w for w in caught if "frozen before" in str(w.message)]


def test_set_adapter_keeps_what_the_model_froze_frozen():
    """What was frozen before `get_peft_model` stays frozen when the adapter is switched on again."""
    base = AutoModelForCausalLM.from_config(tiny_llama_config())
    base.model.norm.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen before `get_peft_model` stay frozen"):
        model = get_peft_model(base, CONFIG)
    model.set_adapter("default", inference_mode=True)
    model.set_adapter("default")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["base_model.model.model.norm.weight"]


@pytest.mark.parametrize("name", ["norm", "lm_head", "weight", "base_layer"])
def test_an_adapter_named_like_a_module_is_refused(name):
    """PEFT strips `.<adapter_name>` from every saved key; from scratch every tensor of the model is saved, so a name
    like `norm` would save `model.norm.weight` as `model.weight`, a file that does not load back (`base_layer`: the
    module injection puts a replaced layer's bias under)."""
    with pytest.raises(ValueError, match=rf"`adapter_name='{name}'` is also a module's name.*would not load back"):
        get_peft_model(tiny_llama(attention_bias=True), CONFIG, adapter_name=name)


# -------------------------------------------------------------- the model's own init, on other architectures
def meta_built(build, config):
    with init_empty_weights():
        return build(config)


def test_parent_module_inits_apply_from_scratch():
    """Transformers lets a parent module's init set its children's weights (T5's attention sets `k`, `o` and its
    relative position bias; its feed-forward sets `wi`, `wo`); from scratch they get that init, not a generic one."""
    import transformers

    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    normal = dict(transformers.AutoModelForSeq2SeqLM.from_config(config).named_parameters())
    model = get_peft_model(
        meta_built(transformers.AutoModelForSeq2SeqLM.from_config, config), SLTrainConfig(r=4, from_scratch=True)
    )
    scratch = dict(model.base_model.model.named_parameters())
    block = "encoder.block.0.layer"
    for name in (
        "0.SelfAttention.k",
        "0.SelfAttention.o",
        "0.SelfAttention.relative_attention_bias",
        "1.DenseReluDense.wo",
    ):
        a, b = scratch[f"{block}.{name}.weight"], normal[f"{block}.{name}.weight"]
        assert 0.8 < a.std() / b.std() < 1.25, name  # was 8-11x too large: a generic std-1 init


def test_fixed_parameters_keep_their_values_and_stay_frozen_from_scratch():
    """Whisper's encoder positions are sinusoids that the model freezes: from scratch they are the sinusoids (set by
    the encoder's init) and stay frozen, while everything else trains."""
    import transformers

    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    auto = transformers.AutoModelForSpeechSeq2Seq
    normal = auto.from_config(config).model.encoder.embed_positions.weight
    scratch = SLTrainConfig(r=4, from_scratch=True, target_modules="all-linear")
    planned = count_parameters(meta_built(auto.from_config, config), scratch)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) frozen before `get_peft_model` stay frozen"):
        model = get_peft_model(meta_built(auto.from_config, config), scratch)
    assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()
    positions = model.base_model.model.model.encoder.embed_positions.weight
    assert torch.equal(positions, normal) and not positions.requires_grad
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "base_model.model.model.encoder.embed_positions.weight"
    ]


def test_a_parameter_no_init_sets_is_refused_from_scratch(tmp_path):
    """CLIP's `logit_scale` gets its value in the constructor only, which ran on the meta device: the first forward
    refuses it by name, rather than compute with uninitialised memory, and so do saving and merging, which would write
    its placeholder (NaN) into a file that then loads as NaN; an adapter file that holds it sets it first."""
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    inputs = {"input_ids": torch.randint(0, 64, (2, 5)), "pixel_values": torch.randn(2, 3, 16, 16)}
    scratch = SLTrainConfig(r=4, from_scratch=True, target_modules="all-linear")
    model = get_peft_model(meta_built(transformers.CLIPModel, config), scratch)
    with pytest.raises(
        ValueError, match=r"leaves 1 parameter\(s\) unset, e.g. \['logit_scale'\].*CLIPModel on a real"
    ):
        model(**inputs)
    with pytest.raises(ValueError, match=r"\['logit_scale'\].*and saving it would use a placeholder \(NaN\)"):
        model.save_pretrained(tmp_path / "unset")
    assert not (tmp_path / "unset" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match=r"\['logit_scale'\].*and merging it into a plain model would use"):
        model.merge_and_unload()
    # set by hand, here by assigning a new parameter (the NaN one is gone): saved, merged and run as any other
    model.base_model.model.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    model(**inputs)
    model.save_pretrained(tmp_path / "set")
    assert model.merge_and_unload().logit_scale == 2.0

    torch.manual_seed(0)
    trained = get_peft_model(transformers.CLIPModel(config), scratch)  # built on a real device: constructor values
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(meta_built(transformers.CLIPModel, config), tmp_path)
    assert loaded.base_model.model.logit_scale == trained.base_model.model.logit_scale
    torch.testing.assert_close(loaded(**inputs).logits_per_text, trained(**inputs).logits_per_text, rtol=0, atol=0)


def test_real_buffers_of_a_materialized_module_are_kept():
    """A module that owns both a meta parameter and a real buffer (CLIP's vision embeddings: `class_embedding` and
    `position_ids`) gets storage for the parameter and keeps the buffer's values."""

    class Embeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.register_buffer("positions", torch.arange(4), persistent=False)

        def reset_parameters(self):
            torch.nn.init.ones_(self.scale)

        def forward(self, x):
            return self.scale * x[..., self.positions]

    with init_empty_weights():
        base = torch.nn.Sequential(Embeddings(), torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    model = get_peft_model(base, SLTrainConfig(r=2, from_scratch=True, target_modules=["1"]))
    embeddings = model.base_model.model[0]
    assert torch.equal(embeddings.positions, torch.arange(4)) and torch.equal(embeddings.scale, torch.ones(4))


def test_a_models_own_initialize_weights_is_not_taken_for_transformers():
    """Only a Transformers model's `initialize_weights` knows to skip what is already initialised: another model's
    method of that name is not called, so it cannot re-initialise the adapters (`B` starts at zero)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def initialize_weights(self):
            for parameter in self.parameters():
                torch.nn.init.normal_(parameter)

    with init_empty_weights():
        base = Net()
    model = get_peft_model(base, SLTrainConfig(r=2, from_scratch=True, target_modules=["fc"]))
    layer = model.base_model.model.fc
    assert (
        torch.equal(layer.sltrain_B["default"], torch.zeros(8, 2)) and layer.sltrain_values["default"].abs().sum() > 0
    )


def test_an_integer_parameter_no_init_sets_is_refused_at_the_first_forward():
    """An integer parameter that only the constructor sets (here a permutation) cannot be NaN: it holds the dtype's
    lowest value until an init sets it, and the first forward refuses it by name."""
    import transformers

    class Config(transformers.PretrainedConfig):
        model_type = "sltrain-test-permuted"

    class Permuted(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.fc = torch.nn.Linear(8, 8)
            self.perm = torch.nn.Parameter(torch.arange(7, -1, -1), requires_grad=False)
            self.post_init()

        def forward(self, x):
            return self.fc(x)[..., self.perm]

    with init_empty_weights():
        base = Permuted(Config())
    with pytest.warns(UserWarning, match="stay frozen"):  # `perm` was built frozen
        model = get_peft_model(base, SLTrainConfig(r=2, from_scratch=True, target_modules=["fc"]))
    with pytest.raises(ValueError, match=r"leaves 1 parameter\(s\) unset, e.g. \['perm'\]"):
        model(torch.randn(2, 8))


def test_fused_moe_experts_are_said_to_train_dense():
    """Transformers 5 keeps a MoE layer's experts as 3-D parameters, which no target reaches: from scratch a warning
    says how much of the model they are, since they train dense."""
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"fused MoE experts \(1 modules, e.g. `model.layers.0.mlp.experts`: 24,576 of"
    ):
        model = get_peft_model(
            meta_built(transformers.MixtralForCausalLM, config),
            SLTrainConfig(r=4, from_scratch=True, target_modules="all-linear"),
        )
    assert model.base_model.model.model.layers[0].mlp.experts.gate_up_proj.requires_grad


def _tiny_wav2vec2_for_pretraining(meta: bool = False):
    import transformers

    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        codevector_dim=16, proj_codevector_dim=16, num_codevectors_per_group=8, num_codevector_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return (
        meta_built(transformers.Wav2Vec2ForPreTraining, config)
        if meta
        else transformers.Wav2Vec2ForPreTraining(config)
    )


def test_a_layer_whose_weight_dtype_the_model_reads_is_refused_from_scratch_only():
    """Wav2Vec2ForPreTraining calls `project_q`, but after casting to `project_q.weight.dtype`: from scratch the layer
    has no weight, so naming it is refused (it used to fail at the forward) and "all-linear" leaves it out, while
    fine-tuning, which keeps `W0`, adapts it."""
    audio = torch.randn(1, 400)
    refused = (
        r"matched `project_q`, whose weight's dtype `Wav2Vec2ForPreTraining` reads \(`self.project_q.weight.dtype`"
    )
    with pytest.raises(ValueError, match=refused):
        get_peft_model(
            _tiny_wav2vec2_for_pretraining(), SLTrainConfig(r=2, target_modules=["project_q"], from_scratch=True)
        )
    with pytest.warns(UserWarning, match=r"leaves out 1 layer\(s\) whose weight's dtype or device .*: `project_q`"):
        model = get_peft_model(
            _tiny_wav2vec2_for_pretraining(), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True)
        )
    assert not isinstance(model.base_model.model.project_q, SLTrainLayer)
    assert isinstance(model.base_model.model.project_hid, SLTrainLayer)
    assert model(audio).projected_quantized_states.isfinite().all()
    fine_tuned = get_peft_model(_tiny_wav2vec2_for_pretraining(), SLTrainConfig(r=2, target_modules=["project_q"]))
    assert isinstance(fine_tuned.base_model.model.project_q, SLTrainLayer) and fine_tuned(audio) is not None


def test_dtype_reads_are_found_in_the_parents_source_in_any_model():
    """DeepSeek-V3.2's attention indexer calls `weights_proj` after casting to its weight's dtype, as
    Wav2Vec2ForPreTraining does `project_q` (no table lists it: the parent's forward is read): from scratch
    "all-linear" leaves it out and the model runs. T5's feed-forward guards its read of `wo.weight` with `isinstance`,
    so `wo` is replaced."""
    import transformers

    config = transformers.DeepseekV32Config(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        first_k_dense_replace=1, index_n_heads=2, index_head_dim=16, index_topk=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.DeepseekV32ForCausalLM(config), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True)
    )
    layers = dict(model.named_modules())
    indexer = "base_model.model.model.layers.0.self_attn.indexer"
    assert not isinstance(layers[f"{indexer}.weights_proj"], SLTrainLayer)
    assert isinstance(layers[f"{indexer}.wk"], SLTrainLayer)  # its other projections are replaced
    assert model(torch.randint(0, 64, (1, 8))).logits.isfinite().all()
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=64)
    )
    t5 = get_peft_model(t5, SLTrainConfig(r=2, target_modules=["wo"], from_scratch=True))
    assert any(isinstance(m, SLTrainLayer) for name, m in t5.named_modules() if name.endswith("DenseReluDense.wo"))


class _Reads(torch.nn.Module):
    """A model whose forward reads a device (`kept.weight.device`), a grandchild's dtype (`inner.proj`) and, in a
    method it calls, another dtype (`helper`); `plain` is only called."""

    def __init__(self):
        super().__init__()
        self.kept, self.helper, self.plain = (torch.nn.Linear(8, 8) for _ in range(3))
        self.inner = torch.nn.Sequential()
        self.inner.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = self.kept(x.to(self.kept.weight.device))
        x = self.inner.proj(x.to(self.inner.proj.weight.dtype))
        return self.plain(self.cast_for_helper(x))

    def cast_for_helper(self, x):
        return self.helper(x.to(self.helper.weight.dtype))


def test_reads_of_a_device_through_a_path_or_in_a_called_method_are_found():
    from peft_sltrain.layer import weight_read_by_parent

    assert weight_read_by_parent(_Reads()) == {
        "kept": ("_Reads", "kept"), "inner.proj": ("_Reads", "inner.proj"), "helper": ("_Reads", "helper"),
    }  # fmt: skip
    with pytest.warns(UserWarning, match=r"leaves out 3 layer\(s\) .*: `kept`, `inner.proj`, `helper`"):
        model = get_peft_model(_Reads(), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True))
    assert [n for n, m in model.named_modules() if isinstance(m, SLTrainLayer)] == ["base_model.model.plain"]
    assert model(torch.randn(2, 8)).isfinite().all()


def test_what_the_dtype_read_scan_names_and_warns_about():
    """The layer by its registered name where the read goes through a property alias; Conv1D layers too; an exempt
    class (flash-attention-2's fp32 fallback cast) not; the warning leaves out layers the caller excluded, the output
    layer (Mamba's `lm_head`) and fine-tuning, where nothing is left out."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    from peft_sltrain.layer import weight_read_by_parent

    class Aliased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Module()
            self.inner.proj, self.c_proj, self.plain = torch.nn.Linear(4, 4), Conv1D(4, 4), torch.nn.Linear(4, 4)

        @property
        def projector(self):
            return self.inner.proj

        def forward(self, x):
            x = self.c_proj(self.projector(x.to(self.projector.weight.dtype)).to(self.c_proj.weight.dtype))
            return self.plain(x)

    class GPTNeoFlashAttention2(torch.nn.Module):  # (the exempt class's name and read)
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.q_proj(x.to(self.q_proj.weight.dtype))

    assert weight_read_by_parent(Aliased()) == {
        "inner.proj": ("Aliased", "projector"),
        "c_proj": ("Aliased", "c_proj"),
    }
    assert weight_read_by_parent(GPTNeoFlashAttention2()) == {}
    scratch = SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True, exclude_modules=["c_proj"])
    with pytest.warns(UserWarning, match=r"leaves out 1 layer\(s\) .*: `inner.proj`\."):  # (c_proj: the caller's)
        get_peft_model(Aliased(), scratch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*whose weight's dtype or device")
        mamba = transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=64)
        get_peft_model(
            transformers.MambaForCausalLM(mamba), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True)
        )
        fine_tuned = get_peft_model(_tiny_wav2vec2_for_pretraining(), SLTrainConfig(r=2, target_modules="all-linear"))
    assert isinstance(fine_tuned.base_model.model.project_q, SLTrainLayer)


def test_the_scan_keeps_no_class_alive():
    """A class made at run time whose forward holds it in a closure (`super()`) is freed after its last use."""
    import gc
    import weakref

    from peft_sltrain.layer import weight_read_by_parent

    class Made(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    holder = torch.nn.Sequential(Made(2, 2))
    weight_read_by_parent(holder)
    made = weakref.ref(Made)
    del Made, holder
    gc.collect()
    assert made() is None


def test_a_patched_forward_is_read_again():
    """The scan is kept per class and the forward it read: a forward replaced since (a kernel library's) is read
    again, in both directions."""
    from peft_sltrain.layer import weight_read_by_parent

    class Patched(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    assert weight_read_by_parent(Patched()) == {}
    Patched.forward = lambda self, x: self.proj(x.to(self.proj.weight.dtype))  # (its source: this line)
    assert weight_read_by_parent(Patched()) == {"proj": ("Patched", "proj")}
    Patched.forward = lambda self, x: self.proj(x)  # and back
    assert weight_read_by_parent(Patched()) == {}


def test_an_init_that_resets_a_replaced_child_sets_only_its_fresh_tensors():
    """Built on the meta device, Wav2Vec2ForPreTraining's init calls `project_hid.reset_parameters()`, which a
    replaced layer answers with its base layer's (it used to raise an AttributeError inside Transformers), leaving the
    layer as it is: the bias at zero, as every replaced layer's, the factors at SLTrain's init. Its weight-norm
    convolution's values come from the constructor alone, so the forward is then refused by name, as for any such
    parameter."""
    model = get_peft_model(
        _tiny_wav2vec2_for_pretraining(meta=True), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=True)
    )
    project_hid = model.base_model.model.project_hid
    assert "reset_parameters" not in project_hid.__dict__  # answered only during the init
    assert (project_hid.get_base_layer().bias == 0).all() and project_hid.get_base_layer().weight is None
    assert not project_hid.sltrain_B["default"].any()  # B = 0: SLTrain's init, not nn.Linear's
    with pytest.raises(ValueError, match=r"leaves 2 parameter\(s\) unset, e.g. \['wav2vec2.encoder.pos_conv_embed"):
        model(torch.randn(1, 400))


def test_an_init_reaching_a_replaced_conv1d_sees_its_stored_layout():
    """From scratch on a meta-built Transformers model, a replaced layer shows its parent's init a meta weight
    of its shape while `initialize_weights` runs: a `Conv1D`'s weight is stored (d_in, d_out)."""
    import transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    seen = []

    class ProbeConfig(transformers.PretrainedConfig):
        model_type = "sltrain_conv1d_probe"

    class Probe(transformers.PreTrainedModel):
        config_class = ProbeConfig

        def __init__(self, config):
            super().__init__(config)
            self.norm = nn.LayerNorm(16)  # a parameter to materialize, so that the model's init runs
            self.proj = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs: weight (16, 12)
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, Conv1D):
                seen.append((tuple(module.weight.shape), module.weight.device.type))
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        def forward(self, x):
            return self.proj(self.norm(x))

    with init_empty_weights():
        model = Probe(ProbeConfig())
    seen.clear()
    peft_model = get_peft_model(model, SLTrainConfig(r=2, sparsity=0.1, target_modules=["proj"], from_scratch=True))
    assert seen == [((16, 12), "meta")]
    assert peft_model(torch.randn(3, 16)).shape == (3, 12)
