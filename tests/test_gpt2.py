"""SLTrain on GPT-2, whose linear layers are Transformers `Conv1D`s: weight stored transposed, (d_in, d_out)."""

from __future__ import annotations

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sltrain import SLTrainConfig, SLTrainLayer, count_parameters

from conftest import assert_factors_trained, perturb_trainable, sltrain_factors, train_losses

GPT2_TARGETS = {"c_attn", "c_proj", "c_fc"}


def tiny_gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32, bos_token_id=0, eos_token_id=0
    )


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()


def sltrain_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SLTrainLayer)}


def dense_sparse(layer, adapter="default"):
    """S of one layer as a dense (d_out, d_in) matrix."""
    d_out, d_in = layer.out_features, layer.in_features
    flat = torch.zeros(d_out * d_in, dtype=layer.sltrain_values[adapter].dtype)
    return flat.index_put((layer.sltrain_indices[adapter].long(),), layer.sltrain_values[adapter]).view(d_out, d_in)


def test_default_targets_shapes_and_start_equal_to_base(input_ids):
    base = tiny_gpt2()
    expected = base(input_ids).logits
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05)).eval()
    layers = sltrain_layers(model)
    assert len(layers) == 2 * 4 and {name.rsplit(".", 1)[1] for name in layers} == GPT2_TARGETS
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn  # Conv1D(nf=96, nx=32): 32 in, 96 out
    assert isinstance(c_attn.base_layer, Conv1D) and (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.sltrain_A["default"].shape == (4, 32) and c_attn.sltrain_B["default"].shape == (96, 4)
    assert torch.equal(model(input_ids).logits, expected)


@pytest.mark.parametrize("compute", ["dense", "factored"])
@pytest.mark.parametrize("which", ["mlp.c_fc", "attn.c_proj"])  # 32 in, 128 out; square 32 x 32
def test_conv1d_layer_matches_dense_reference(compute, which):
    """The wrapped Conv1D computes x @ (W0 + s B A + S)^T + b with W0 = conv.weight^T; gradients too (float64)."""
    model = get_peft_model(tiny_gpt2().double(), SLTrainConfig(r=4, sparsity=0.1, alpha=6, compute=compute))
    perturb_trainable(model)
    layer = model.base_model.model.transformer.h[1].get_submodule(which)
    A, B, values = layer.sltrain_A["default"], layer.sltrain_B["default"], layer.sltrain_values["default"]
    conv = layer.base_layer
    with torch.no_grad():  # a base weight far from symmetric, so that a missing transpose shows
        conv.weight.add_(torch.randn(conv.weight.shape, dtype=torch.float64))
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    y_ref = x @ conv.weight + conv.bias + nn.functional.linear(x, (6 / 4) * B @ A + dense_sparse(layer))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, A, B, values))
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(y.square().sum(), (x, A, B, values)), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert conv.weight.grad is None and not conv.weight.requires_grad


def test_fine_tuning_merge_unmerge_and_unload(tmp_path, input_ids):
    base = tiny_gpt2()
    original = base.transformer.h[0].attn.c_attn.weight.detach().clone()
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05)).eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    delta = layer.get_delta_weight("default")
    assert delta.shape == original.shape == (32, 96)  # in the base layer's (d_in, d_out) layout

    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, original + delta)
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)

    merged = model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    merged.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_from_scratch_trains_merges_and_reloads_bit_identical(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), SLTrainConfig(r=4, sparsity=0.05, from_scratch=True))
    assert all(m.get_base_layer().weight is None for m in sltrain_layers(model).values())
    before = sltrain_factors(model)
    losses = train_losses(model, input_ids, steps=10)
    assert losses[-1] < 0.8 * losses[0]
    assert len(before) == 3 * 8
    assert_factors_trained(model, before, input_ids)

    model.eval()
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=7), tmp_path / "adapter").eval()
    assert torch.equal(reloaded(input_ids).logits, expected)

    merged = model.merge_and_unload()
    c_fc = merged.transformer.h[1].mlp.c_fc
    assert type(c_fc) is Conv1D and c_fc.weight.shape == (32, 128) and c_fc.weight.is_contiguous()
    merged.save_pretrained(tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_from_scratch_on_a_meta_built_model(input_ids):
    """GPT-2's own init writes every Conv1D weight, which the replaced layers no longer have: their biases start at
    zero instead, and everything else gets the model's init."""
    with init_empty_weights():
        base = transformers.GPT2LMHeadModel(tiny_gpt2_config())
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05, from_scratch=True))
    assert not any(p.device.type == "meta" for p in model.parameters())
    for layer in sltrain_layers(model).values():
        assert layer.get_base_layer().weight is None and not layer.get_base_layer().bias.any()
    assert model.base_model.model.transformer.wte.weight.std() > 0.01  # GPT-2's init: normal(0, 0.02)
    assert torch.isfinite(model(input_ids=input_ids, labels=input_ids).loss)


@pytest.mark.parametrize(
    "config",
    [
        SLTrainConfig(r=4, sparsity=0.05),
        SLTrainConfig(r=4, sparsity=0.05, from_scratch=True),
        SLTrainConfig(r=2, sparsity=0.1, target_modules="all-linear", bias="sltrain_only"),
    ],
)
def test_count_parameters_matches_the_built_model(config):
    base = tiny_gpt2()
    expected = count_parameters(base, config)
    model = get_peft_model(base, config)
    assert (expected.trainable, expected.total) == model.get_nb_trainable_parameters()
