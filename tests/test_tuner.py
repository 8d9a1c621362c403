"""SLTrain as a PEFT tuner in fine-tuning mode (frozen W0 + trainable B A + S) on tiny LLaMA and RoBERTa models."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import types
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn
from torch.utils.checkpoint import checkpoint

from peft_sltrain import (
    TARGET_MODULES_MAPPING,
    SLTrainConfig,
    SLTrainLayer,
    count_parameters,
    cpu_kernels,
    sltrain_layer_parameters,
)
from peft_sltrain.config import HEADS_PEFT_ADDS
from peft_sltrain.cost import choose_path
from peft_sltrain.layer import weight_read_directly
from peft_sltrain.support import layer_seed, num_nonzeros, random_support

from conftest import needs_cxx, perturb_trainable, tiny_llama, tiny_roberta, tiny_roberta_config, train_losses

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_roberta_tokens():
    torch.manual_seed(0)
    return transformers.RobertaForTokenClassification(tiny_roberta_config())


def tiny_roberta_qa():
    torch.manual_seed(0)
    return transformers.RobertaForQuestionAnswering(tiny_roberta_config())


def sltrain_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SLTrainLayer)}


def test_wrapped_model_starts_equal_to_base(input_ids):
    base = tiny_llama()
    expected = base(input_ids).logits
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05, alpha=8)).eval()
    assert torch.equal(model(input_ids).logits, expected)


def test_default_targets_and_shapes():
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    layers = sltrain_layers(model)
    assert len(layers) == 2 * 7 and {name.rsplit(".", 1)[1] for name in layers} == LLAMA_TARGETS
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.sltrain_A["default"].shape == (4, 64) and q.sltrain_B["default"].shape == (64, 4)
    nnz = num_nonzeros(64, 64, 0.05)
    assert q.sltrain_values["default"].shape == (nnz,)
    assert q.sltrain_indices["default"].dtype == torch.int32
    roberta = get_peft_model(tiny_roberta(), SLTrainConfig(r=4, task_type="SEQ_CLS"))
    assert {name.rsplit(".", 1)[1] for name in sltrain_layers(roberta)} == {"query", "value"}


def test_fine_tuning_init_and_trainable_parameters():
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sltrain_" in n for n in trainable)
    for layer in sltrain_layers(model).values():
        assert not layer.sltrain_B["default"].any() and not layer.sltrain_values["default"].any()
        bound = (6 / ((1 + 5) * layer.in_features)) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound = 1 / sqrt(d_in)
        assert layer.sltrain_A["default"].abs().max() <= bound and layer.sltrain_A["default"].std() > bound / 3


def test_layer_output_and_gradients_match_dense_reference():
    """Forward and backward through a wrapped layer equal F.linear with the explicitly assembled dense weight."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.1, alpha=6))
    perturb_trainable(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    A, B, values = layer.sltrain_A["default"], layer.sltrain_B["default"], layer.sltrain_values["default"]
    S = (
        torch.zeros(layer.out_features * layer.in_features)
        .index_put((layer.sltrain_indices["default"].long(),), values)
        .view(layer.out_features, layer.in_features)
    )
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    dense = layer.base_layer.weight + (6 / 4) * B @ A + S
    y_ref = nn.functional.linear(x, dense)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, A, B, values))
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(torch.autograd.grad(y.square().sum(), (x, A, B, values)), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize(
    "build,config",
    [
        (tiny_llama, SLTrainConfig(r=4, sparsity=0.05)),
        (tiny_llama, SLTrainConfig(r=8, sparsity=0.2, target_modules=["q_proj", "down_proj"])),
        (tiny_llama, SLTrainConfig(r=4, sparsity=0.05, from_scratch=True)),
        (tiny_llama, SLTrainConfig(r=4, sparsity=0.05, target_modules="all-linear")),
        (tiny_llama, SLTrainConfig(r=4, sparsity=0.05, target_modules=["q_proj"], layers_to_transform=1)),
        (tiny_roberta, SLTrainConfig(r=4, sparsity=0.05, task_type="SEQ_CLS")),
        (tiny_roberta, SLTrainConfig(r=2, sparsity=0.03, task_type="SEQ_CLS", bias="all")),
        (tiny_roberta, SLTrainConfig(r=2, sparsity=0.03, task_type="SEQ_CLS", bias="sltrain_only")),
        (tiny_roberta_tokens, SLTrainConfig(r=2, sparsity=0.03, task_type="TOKEN_CLS")),
        (tiny_roberta_qa, SLTrainConfig(r=2, sparsity=0.03, task_type="QUESTION_ANS")),
        # the head's layers match, but PEFT trains the head whole (`modules_to_save`) and never targets inside it
        (tiny_roberta, SLTrainConfig(r=4, sparsity=0.05, task_type="SEQ_CLS", target_modules=["query", "dense"])),
        (tiny_roberta, SLTrainConfig(r=4, sparsity=0.05, task_type="SEQ_CLS", target_modules="all-linear")),
        # a tied head in `modules_to_save`: PEFT's trainable copy is untied from the embeddings it shared a weight with
        (lambda: tiny_llama(tie_word_embeddings=True), SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["lm_head"])),
        (lambda: tiny_llama(tie_word_embeddings=True), SLTrainConfig(r=4, modules_to_save=["embed_tokens"])),
    ],
)
def test_count_parameters_matches_the_built_model(build, config):
    base = build()
    expected = count_parameters(base, config)
    model = get_peft_model(base, config)
    assert (expected.trainable, expected.total) == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("pattern", [None, "layers"])
def test_layers_to_transform(pattern):
    config = SLTrainConfig(
        r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern=pattern
    )
    names = set(sltrain_layers(get_peft_model(tiny_llama(), config)))
    assert names == {f"base_model.model.model.layers.1.{m}" for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_layer_formula():
    assert sltrain_layer_parameters(4096, 11008, 1024, 0.05) == 1024 * (4096 + 11008) + 2254438


def test_training_reduces_loss(input_ids):
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, alpha=8))
    losses = train_losses(model, input_ids, steps=15)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("compute", ["dense", "factored"])
def test_fine_tuning_under_activation_checkpointing_gives_the_same_gradients(compute):
    """Transformers' gradient checkpointing on a fine-tuned model (frozen embeddings: reentrant checkpointing gets
    its input gradients through PEFT) recomputes each layer, the random support included, and changes no gradient."""
    grads = {}
    for checkpointing in (None, "reentrant", "non-reentrant"):
        base = tiny_llama()
        if checkpointing:
            base.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.1, compute=compute))
        perturb_trainable(model)
        model.train()
        ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads[checkpointing].values()), checkpointing
    for checkpointing in ("reentrant", "non-reentrant"):
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[checkpointing][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="the paths below are numba's cost model's")
def test_auto_takes_one_path_in_a_checkpointed_forward_and_its_recompute():
    """Reentrant checkpointing runs a layer's first forward without grad and recomputes it with grad: in training mode
    both price the backward, so `compute="auto"` takes one path (the factored one here, where a forward-only price
    picks the dense one) and the gradients are those of the run without checkpointing, to the bit."""
    layer = (100, 768, 768, 8, round(0.03 * 768 * 768), torch.device("cpu"), torch.float32, True)
    assert [choose_path("auto", *layer, backward=b) for b in (False, True)] == ["dense", "factored"]
    model = get_peft_model(nn.Sequential(nn.Linear(768, 768)), SLTrainConfig(r=8, target_modules=["0"])).train()
    perturb_trainable(model)
    x = torch.randn(100, 768, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        run = (lambda t: checkpoint(model, t, use_reentrant=True)) if checkpointed else model
        model.zero_grad()
        run(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("compute", ["dense", "auto", "factored"])
def test_a_layer_on_the_meta_device_gives_shapes(compute):
    """Shape inference through a wrapped model on the meta device, as `nn.Linear` allows (autocast cannot be asked
    about, or turned off, there; every setting goes dense: only shapes are computed, and the sparse kernels have no
    meta version)."""
    config = SLTrainConfig(r=2, target_modules=["0"], compute=compute)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 20)), config).to("meta")
    assert model(torch.randn(3, 24, device="meta")).shape == (3, 20)


def test_seq_cls_trains_classifier_fully():
    model = get_peft_model(tiny_roberta(), SLTrainConfig(r=4, task_type="SEQ_CLS"))
    assert isinstance(model.base_model.model.classifier, ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default.out_proj.weight" in n for n in trainable)
    assert all(".sltrain_" in n or ".classifier." in n for n in trainable)


def test_multiple_adapters_set_disable_delete(input_ids):
    base = tiny_llama()
    base_logits = base(input_ids).logits
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05)).eval()
    model.add_adapter("other", SLTrainConfig(r=2, sparsity=0.1, seed=3))
    perturb_trainable(model)  # only "default" is trainable
    for layer in sltrain_layers(model).values():
        with torch.no_grad():
            layer.sltrain_B["other"].normal_(0, 0.05)
    default_logits = model(input_ids).logits
    assert not torch.allclose(default_logits, base_logits)

    model.set_adapter("other")
    other_logits = model(input_ids).logits
    assert not torch.allclose(other_logits, default_logits)
    assert all(p.requires_grad == (".other" in n) for n, p in model.named_parameters() if ".sltrain_" in n)

    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids).logits, base_logits)

    model.base_model.set_adapter(["default", "other"])  # both at once: W0 + delta_default + delta_other
    both = model(input_ids).logits
    assert not torch.allclose(both, other_logits) and not torch.allclose(both, default_logits)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    dense = layer.base_layer.weight + layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the base product too runs in bf16
        both_bf16 = model(input_ids).logits
    assert both_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(both_bf16.float(), both, rtol=0.05, atol=0.05)

    model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids).logits, default_logits)


def dense_delta(layer, name):
    """`(alpha / r) B A + S` of adapter `name`, assembled here from its tensors, as (d_out, d_in)."""
    A, B, values = layer.sltrain_A[name], layer.sltrain_B[name], layer.sltrain_values[name]
    S = torch.zeros(layer.out_features * layer.in_features, dtype=values.dtype)
    S = S.index_put((layer.sltrain_indices[name].long(),), values).view(layer.out_features, layer.in_features)
    return layer.scaling[name] * B @ A + S


def test_two_active_adapters_on_a_layer_with_a_bias():
    """With several adapters active, the layer computes `x W0^T + b` and adds each adapter's branch: the bias is kept
    (GPT-2, OPT and RoBERTa layers have one), and gradients reach x, both adapters and the bias; under CPU bf16
    autocast too (bf16 output, fp32 gradients)."""
    torch.manual_seed(0)
    config = dict(target_modules=["0"], compute="dense")
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)), SLTrainConfig(r=2, sparsity=0.2, **config))
    model.add_adapter("other", SLTrainConfig(r=3, sparsity=0.1, seed=1, **config))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model[0]
    layer.base_layer.bias.requires_grad_(True)
    with torch.no_grad():
        layer.base_layer.bias.add_(1.0)  # a bias as large as the output: dropping it cannot hide in the tolerance
    perturb_trainable(model, scale=0.2)
    factors = [getattr(layer, kind)[name] for name in ("default", "other") for kind in layer.adapter_layer_names]
    params = [*factors, layer.base_layer.bias]
    assert all(p.requires_grad for p in params)
    x = torch.randn(3, 5, 16, requires_grad=True)
    W = layer.base_layer.weight + dense_delta(layer, "default") + dense_delta(layer, "other")
    y_ref = nn.functional.linear(x, W, layer.base_layer.bias)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *params])
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(torch.autograd.grad(y.square().sum(), [x, *params]), grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 0.02
    for g, g_ref in zip(torch.autograd.grad(y.float().square().sum(), [x, *params]), grads_ref, strict=True):
        assert g.dtype == torch.float32 and ((g - g_ref).norm() / g_ref.norm()).item() < 0.05


@pytest.mark.parametrize("target,exclude", [(r".*proj.*", None), (r".*_proj.*", r".*\.0\..*")])
def test_second_adapter_with_a_regex_target(target, exclude):
    """A regex also matches the insides of layers that already carry an adapter (`q_proj.sltrain_A`); those are not
    candidates, as in PEFT's own matching."""
    model = get_peft_model(
        tiny_llama(), SLTrainConfig(r=2, sparsity=0.1, target_modules=target, exclude_modules=exclude)
    )
    model.add_adapter("second", SLTrainConfig(r=2, sparsity=0.1, target_modules=target, exclude_modules=exclude))
    layers = sltrain_layers(model)
    assert layers and all(set(m.sltrain_A) == {"default", "second"} for m in layers.values())
    assert (exclude is None) == any(".layers.0." in name for name in layers)


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
DECODERS = {  # a tiny config of each decoder architecture with a default: every linear layer but the head is replaced
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, word_embed_proj_dim=32
    ),
    "phi": lambda: transformers.PhiConfig(**TINY),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**TINY),
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    ),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100),
}
ENCODERS = {  # and of each encoder: its query and value projections are
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100),
    "deberta-v2": lambda: transformers.DebertaV2Config(**TINY),
    "t5": lambda: transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100),
}


@pytest.mark.parametrize("model_type", sorted(DECODERS) + sorted(ENCODERS))
def test_default_targets_per_architecture(model_type):
    config = (DECODERS.get(model_type) or ENCODERS[model_type])()
    assert config.model_type == model_type
    torch.manual_seed(0)
    if model_type in DECODERS:
        base = transformers.AutoModelForCausalLM.from_config(config)
        head = base.get_output_embeddings()
        expected = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and m is not head}
    else:
        base = transformers.AutoModel.from_config(config)
        names = set(TARGET_MODULES_MAPPING[model_type])
        expected = {n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in names}
    model = get_peft_model(base, SLTrainConfig(r=2, sparsity=0.1))
    assert {n.removeprefix("base_model.model.") for n in sltrain_layers(model)} == expected and expected


def test_supports_differ_between_layers_and_follow_seed():
    def supports(seed):
        model = get_peft_model(tiny_llama(), SLTrainConfig(r=2, sparsity=0.05, seed=seed))
        return {n: m.sltrain_indices["default"] for n, m in sltrain_layers(model).items()}

    a, b, c = supports(0), supports(0), supports(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    q0, q1 = (a[f"base_model.model.model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    assert not torch.equal(q0, q1)


def test_bf16_model_and_cpu_autocast(input_ids):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), SLTrainConfig(r=4, sparsity=0.05))
    perturb_trainable(model)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.sltrain_A["default"].dtype == torch.float32  # PEFT keeps fine-tuning adapters in fp32
    assert layer.sltrain_A["default"].grad is not None and torch.isfinite(loss)
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)  # no autocast: W0 + delta, within bf16 rounding
    y_ref = nn.functional.linear(x.float(), layer.base_layer.weight.float() + dense_delta(layer, "default"))
    y = layer(x)
    assert y.dtype == torch.bfloat16 and ((y.float() - y_ref).norm() / y_ref.norm()).item() < 0.02
    assert ((layer.base_layer(x).float() - y_ref).norm() / y_ref.norm()).item() > 0.2  # (the delta is no rounding)

    model32 = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    perturb_trainable(model32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model32(input_ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model32(input_ids).logits, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merging_into_a_half_precision_base_rounds_once(dtype):
    """On a bf16 / fp16 base the adapter is fp32: merging gives `W0 + delta` summed in fp32 and rounded once (as
    LoRA's merge), and unmerging subtracts the same way."""
    model = get_peft_model(tiny_llama().to(dtype), SLTrainConfig(r=4, sparsity=0.1, alpha=8))
    perturb_trainable(model, scale=0.01)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    W0, delta = layer.base_layer.weight.detach().clone(), layer.get_delta_weight("default")
    assert delta.dtype == torch.float32
    model.merge_adapter()
    merged = layer.base_layer.weight.detach().clone()
    assert merged.dtype == dtype and torch.equal(merged, (W0.float() + delta).to(dtype))
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, (merged.float() - delta).to(dtype))


def test_adapter_names_per_row_are_refused(input_ids):
    """LoRA runs each row of a batch through the adapter `adapter_names` names; SLTrain has no such routing and says
    so, rather than silently run every row through the active adapter."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    model.add_adapter("other", SLTrainConfig(r=2, sparsity=0.05, seed=5))
    rows = ["default", "other"]
    with pytest.raises(ValueError, match=r"SLTrain has no `adapter_names`.*`adapter_names=\['default', 'other'\]`"):
        model(input_ids[:2], adapter_names=rows)
    with pytest.raises(ValueError, match="SLTrain has no `adapter_names`"):
        model.generate(input_ids[:2], adapter_names=rows, max_new_tokens=2)
    assert model(input_ids[:2]).logits.shape[0] == 2  # without it, as before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_fine_tuned_layer_refuses_an_input_of_another_dtype_as_nn_linear_does(dtype):
    """An fp32 layer given a bf16 or fp64 input: nn.Linear raises, and so does a fine-tuned SLTrain layer (it used to
    round W0 to the input's dtype silently); also an fp64 input under autocast, which autocast leaves alone. A bf16
    input under autocast runs."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    x = torch.randn(3, 16, dtype=dtype)
    with pytest.raises(RuntimeError, match="dtype"):
        base(x)
    model = get_peft_model(base, SLTrainConfig(r=2, sparsity=0.2, target_modules=["0"]))
    with pytest.raises(ValueError, match=f"has dtype {dtype} but the layer's weights are torch.float32"):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if dtype == torch.float64:
            with pytest.raises(ValueError, match=r"has dtype torch.float64.*\(autocast leaves float64 alone\)"):
                model(x)
        else:
            assert model(x).dtype == torch.bfloat16
    assert model(x.float()).dtype == torch.float32


@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_from_scratch_a_layer_computes_in_the_wider_of_its_inputs_and_factors_dtypes(model_dtype, input_dtype):
    """From scratch there is no W0 to refuse a mismatch against: an input wider than the factors is not rounded to
    them (the factors are cast up, as before), and the output comes in the wider dtype."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)).to(model_dtype),
                           SLTrainConfig(r=2, sparsity=0.2, target_modules=["0"], from_scratch=True))  # fmt: skip
    layer = model.base_model.model[0]
    x = torch.randn(3, 16, dtype=input_dtype)
    W = layer.get_delta_weight("default").to(input_dtype)
    y = model(x)
    assert y.dtype == input_dtype
    torch.testing.assert_close(y, x @ W.t() + layer.base_layer.bias.to(input_dtype))


def test_from_scratch_a_layer_computes_in_its_factors_dtype_as_t5_keeps_wo_in_fp32():
    """T5 loaded in fp16 keeps `wo` in fp32 and casts its input to `wo.weight`'s dtype, which from scratch is None:
    the SLTrain layer casts it to its factors' dtype itself, so the model runs as the plain one does (`wo` in fp32)."""
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, d_kv=8,
                                   vocab_size=100, decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    plain = transformers.T5ForConditionalGeneration(config).to(torch.float16)
    plain.encoder.block[0].layer[1].DenseReluDense.wo.float()  # as `_keep_in_fp32_modules` keeps it
    model = get_peft_model(plain, SLTrainConfig(r=2, sparsity=0.1, target_modules=["wo"], from_scratch=True))
    wo = model.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.sltrain_A["default"].dtype == torch.float32
    seen = []
    wo.register_forward_hook(lambda module, args, output: seen.append((args[0].dtype, output.dtype)))
    ids = torch.randint(0, 100, (1, 6))
    assert torch.isfinite(model(input_ids=ids, decoder_input_ids=ids).logits).all()
    assert seen == [(torch.float16, torch.float32)]  # an fp16 input, computed in fp32 as HF's fp32 `wo` would


def test_autocast_leaves_float64_alone_and_merging_under_it_works():
    """Autocast leaves fp64 layers in fp64 (the wrapped layer must too), and merging reads the weights as they are."""
    base = nn.Sequential(nn.Linear(16, 12)).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    model = get_peft_model(base, SLTrainConfig(r=2, sparsity=0.2, target_modules=["0"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.float64 and torch.equal(y, model.base_model.model[0].base_layer(x))  # adapter starts at 0
    perturb_trainable(model)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.merge_adapter()
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "config,message",
    [
        (SLTrainConfig(r=65), r"`r` must be in \[1, min\(d_in, d_out\)\] = \[1, 64\].*got 65"),
        (
            SLTrainConfig(r=2, target_modules=["embed_tokens"]),
            r"matched `model.embed_tokens`: .*got torch.nn.modules.sparse.Embedding",
        ),
        (SLTrainConfig(r=2, target_modules=["nope"]), r"Target modules \{'nope'\} not found"),
    ],
)
def test_bad_layer_arguments(config, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), config)


def test_full_rank_is_allowed():
    """`r` may be as large as `min(d_in, d_out)`, as documented (r = 64 on a 64-wide model), and no larger."""
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), SLTrainConfig(r=6, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert layer.sltrain_A["default"].shape == (6, 8) and layer.sltrain_B["default"].shape == (6, 6)
    assert model(torch.randn(3, 8)).shape == (3, 6)
    with pytest.raises(ValueError, match=r"= \[1, 6\] for layer `0` \(6 x 8\), got 7"):
        get_peft_model(nn.Sequential(nn.Linear(8, 6)), SLTrainConfig(r=7, target_modules=["0"]))


def test_quantized_base_layers_are_refused():
    """An nn.Linear holding integer weights (as quantized layers do) has no W0 to add a delta to."""
    model = tiny_llama()
    down = model.model.layers[1].mlp.down_proj  # the last targeted layer: all others come before it
    down.weight = nn.Parameter(torch.zeros(down.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"needs a floating-point base weight.*Parameter, torch.int8"):
        get_peft_model(model, SLTrainConfig(r=2))
    assert not any(isinstance(m, SLTrainLayer) for m in model.modules())


@pytest.mark.parametrize("fp8_linear", [False, True])
def test_float8_base_layers_are_refused(fp8_linear):
    """Float8 weights are floating point, but need their scale: SLTrain, which reads the weight itself, refuses them
    up front instead of failing in its init (or, worse, ignoring the scale)."""
    if fp8_linear:
        fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
        layer, name = fp8.FP8Linear(64, 64, block_size=None), "FP8Linear"
    else:
        layer, name = nn.Linear(64, 64, bias=False), "Linear"
        layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=rf"this {name} holds a quantized one \(.*float8_e4m3fn\)"):
        get_peft_model(nn.Sequential(layer), SLTrainConfig(r=2, target_modules=["0"]))


def test_hooks_on_a_replaced_layer_are_warned_about_once():
    """SLTrain computes a targeted layer itself, so hooks on the original layer do not run: one warning per layer."""
    model = tiny_llama()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    peft_model = get_peft_model(model, SLTrainConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=r"The Linear\(64, 64\) under this SLTrain layer has forward hooks") as caught:
        peft_model(input_ids=ids)
    assert len([w for w in caught if "hooks" in str(w.message)]) == 1 and calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again, and no other layer warns
        peft_model(input_ids=ids)


def test_get_base_layer_finds_what_peft_s_walk_finds():
    """SLTrain's faster `get_base_layer` (it runs in every layer call) against PEFT's `hasattr` walk, on base layers
    that wrap another as a registered `base_layer`, as an instance attribute, through a property (also one that
    raises AttributeError) or through their own `__getattr__` or `__getattribute__`, and on one whose `base_layer` is
    None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    class Wrapper(nn.Linear):  # a base layer that wraps another, as a tuner layer would
        def __init__(self, inner):
            super().__init__(4, 4)
            self.base_layer = inner

    class Proxy(nn.Linear):  # `base_layer` a property, not a registered module
        inner = nn.Linear(4, 4)
        base_layer = property(lambda self: Proxy.inner)

    class Raises(nn.Linear):  # a property that raises AttributeError: `hasattr` says no
        @property
        def base_layer(self):
            raise AttributeError("no base layer")

    class Forwarding(nn.Linear):  # a wrapper whose own `__getattr__` forwards to what it wraps
        def __init__(self, inner):
            super().__init__(4, 4)
            self.wrapped = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                wrapped = self.__dict__["_modules"].get("wrapped")
                if wrapped is None:
                    raise
                return getattr(wrapped, name)

    class Redirects(nn.Linear):  # its own `__getattribute__`, which answers another module than the registered one
        other = nn.Linear(4, 4)

        def __getattribute__(self, name):
            return Redirects.other if name == "base_layer" else super().__getattribute__(name)

    redirects = Redirects(4, 4)
    redirects.base_layer = nn.Linear(4, 4)  # (registered, and not what the lookup answers)

    class Hidden(nn.Linear):  # a descriptor that raises AttributeError on the class, and answers on instances
        inner = nn.Linear(4, 4)
        base_layer = types.DynamicClassAttribute(lambda self: Hidden.inner)

    class SubProxy(Proxy):  # the property inherited
        pass

    in_dict = nn.Linear(4, 4)
    object.__setattr__(in_dict, "base_layer", nn.Linear(4, 4))  # (in the instance dict, not registered)
    both = Wrapper(nn.Linear(4, 4))
    object.__setattr__(both, "base_layer", nn.Linear(4, 4))  # (the instance dict's is found before the registered one)
    bases = [nn.Linear(4, 4), Wrapper(nn.Linear(4, 4)), Wrapper(Wrapper(nn.Linear(4, 4))), Proxy(4, 4), Raises(4, 4),
             Forwarding(Wrapper(nn.Linear(4, 4))), redirects, Hidden(4, 4), SubProxy(4, 4), both,
             in_dict]  # fmt: skip
    for base in bases:
        layer = get_peft_model(nn.Sequential(base), SLTrainConfig(r=2, target_modules=["0"])).base_model.model[0]
        assert isinstance(layer, SLTrainLayer)
        expected = BaseTunerLayer.get_base_layer(layer)
        assert layer.get_base_layer() is expected and expected is not layer
        assert (expected is base) == (base is bases[0] or type(base) is Raises)  # (the others were walked through)
        assert (expected is Redirects.other) == (base is redirects)
    layer.base_layer.base_layer = None  # (an attribute that is None: PEFT's walk returns it)
    assert BaseTunerLayer.get_base_layer(layer) is None and layer.get_base_layer() is None
    # what the walk keeps per class does not keep the class alive (`nn.utils.parametrize` makes one per module)
    parametrized = nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    model = nn.ModuleDict({"proj": parametrized})  # ("0" would match the parametrization's ModuleList too)
    layer = get_peft_model(model, SLTrainConfig(r=2, target_modules=["proj"])).base_model.model["proj"]
    assert layer.get_base_layer() is parametrized
    made = weakref.ref(type(parametrized))
    del layer, model, parametrized
    gc.collect()
    assert made() is None


def test_count_parameters_refuses_what_cannot_be_replaced():
    with pytest.raises(
        ValueError, match=r"embed_tokens`: SLTrain can only replace .*got torch.nn.modules.sparse.Embedding"
    ):
        count_parameters(tiny_llama(), SLTrainConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"`target_modules` \{'nope'\} matched no layer of the model"):
        count_parameters(tiny_llama(), SLTrainConfig(r=2, target_modules=["nope"]))


@pytest.mark.parametrize("from_scratch", [False, True])
def test_multihead_attention_out_proj_is_refused(from_scratch):
    """`nn.MultiheadAttention` reads `out_proj.weight` itself: a replaced `out_proj` would be ignored (fine-tuning)
    or leave it without weight (from scratch)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16)

    with pytest.raises(ValueError, match=r"matched `attn.out_proj`: this is the `out_proj` of a .*MultiheadAtt"):
        get_peft_model(Block(), SLTrainConfig(r=2, target_modules=["out_proj", "fc"], from_scratch=from_scratch))
    for exclude in (None, ["nothing"], "nothing"):  # "all-linear" leaves it out, whatever else is excluded
        config = SLTrainConfig(r=2, target_modules="all-linear", exclude_modules=exclude, from_scratch=from_scratch)
        planned = count_parameters(Block(), config)
        model = get_peft_model(Block(), config)
        layers = [name for name, m in model.named_modules() if isinstance(m, SLTrainLayer)]
        assert layers == ["base_model.model.fc"]
        assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("from_scratch", [False, True])
def test_all_linear_leaves_out_layers_narrower_than_r_with_a_warning(from_scratch):
    """A 1-wide gate (Qwen2-MoE's `shared_expert_gate`) or a 2-label classifier cannot hold a rank-r factorization:
    "all-linear" leaves them out and says so; named explicitly, they are refused; where every layer is that narrow,
    the refusal names one (leaving out all of them would leave nothing to train)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1))

    config = SLTrainConfig(r=4, target_modules="all-linear", from_scratch=from_scratch)
    planned = count_parameters(build(), config)
    with pytest.warns(UserWarning, match=r'"all-linear"` leaves out 1 linear layer\(s\) narrower than r=4.*`2`'):
        model = get_peft_model(build(), config)
    layers = {name: type(m).__name__ for name, m in model.named_modules() if name.count(".") == 2}
    assert layers == {"base_model.model.0": "Linear", "base_model.model.1": "ReLU", "base_model.model.2": "Linear"}
    assert isinstance(model.base_model.model[0], SLTrainLayer) and not isinstance(
        model.base_model.model[2], SLTrainLayer
    )
    assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()
    assert model.base_model.model[2].weight.requires_grad == from_scratch  # dense: trained from scratch, else frozen
    with pytest.raises(ValueError, match=r"`r` must be in \[1, min\(d_in, d_out\)\] = \[1, 1\] for layer `2`"):
        get_peft_model(build(), SLTrainConfig(r=4, target_modules=["0", "2"], from_scratch=from_scratch))
    with pytest.raises(ValueError, match=r"= \[1, 12\] for layer `0` \(12 x 16\), got 13"):
        get_peft_model(build(), SLTrainConfig(r=13, target_modules="all-linear", from_scratch=from_scratch))


def test_all_linear_leaves_out_exactly_the_narrow_layers():
    """PEFT matches a list of `exclude_modules` as name suffixes: leaving out a narrow `2` must not also leave out a
    wide `0.2`, nor a narrow root `proj` a wide `block.proj`; a user's own list keeps its suffix meaning. The shorthand
    is taken in any case, as PEFT takes it."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.proj, self.block.fc, self.block.skip = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.proj = nn.Linear(16, 2)  # a 2-label head at the root

    def nested():
        return nn.Sequential(
            nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 1)
        )

    for build, exclude, expected in (
        (Model, ["skip"], ["block.fc", "block.proj"]),
        (Model, "(?i).*SKIP", ["block.fc", "block.proj"]),  # a user's regex, with its global flags
        (Model, "(?x) .*skip  # a comment", ["block.fc", "block.proj"]),
        (nested, None, ["0.0", "0.2"]),
    ):
        for shorthand in ("all-linear", "ALL-Linear"):
            config = SLTrainConfig(r=4, target_modules=shorthand, exclude_modules=exclude)
            planned = count_parameters(build(), config)
            with pytest.warns(UserWarning, match="leaves out 1 linear layer"):
                model = get_peft_model(build(), config)
            replaced = sorted(
                n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, SLTrainLayer)
            )
            assert replaced == expected
            assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()


def test_all_linear_config_used_again_starts_from_the_callers_exclusions():
    """A sweep that lowers `r` on one config: layers the last model's rank left out (k/v, 64 -> 32 here) are
    targeted again where the new rank fits them, as a fresh config targets them; the caller's own exclusions stay."""

    def kinds(model):
        return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, SLTrainLayer)})

    config = SLTrainConfig(r=48, target_modules="all-linear", exclude_modules=["o_proj"])
    with pytest.warns(UserWarning, match="narrower than r=48"):
        assert kinds(get_peft_model(tiny_llama(), config)) == ["down_proj", "gate_proj", "q_proj", "up_proj"]
    config.r = 4
    fresh = SLTrainConfig(r=4, target_modules="all-linear", exclude_modules=["o_proj"])
    expected = ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert kinds(get_peft_model(tiny_llama(), config)) == kinds(get_peft_model(tiny_llama(), fresh)) == expected


@pytest.mark.parametrize(
    "model_class, task_type, head",
    [
        ("BertForTokenClassification", "TOKEN_CLS", "classifier"),
        ("BertForQuestionAnswering", "QUESTION_ANS", "qa_outputs"),
    ],
)
def test_all_linear_leaves_the_task_head_to_modules_to_save(model_class, task_type, head, tmp_path):
    """PEFT's token-classification and question-answering models wrap their head only after injection: listed up front,
    "all-linear" does not reach it (a 2-wide `qa_outputs` was refused after the other layers had been replaced)."""
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    base = getattr(transformers, model_class)(config)
    sl_config = SLTrainConfig(r=4, target_modules="all-linear", task_type=task_type)
    planned = count_parameters(base, sl_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the head is not "left out": it is the task's
        model = get_peft_model(base, sl_config)
    assert isinstance(model.base_model.model.get_submodule(head), ModulesToSaveWrapper)
    assert sum(isinstance(m, SLTrainLayer) for m in model.modules()) == 12
    assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()
    for cycle in range(2):  # PEFT's task model adds its head to the list again on each load: saved once
        model.save_pretrained(tmp_path / str(cycle))
        saved = json.loads((tmp_path / str(cycle) / "adapter_config.json").read_text())["modules_to_save"]
        assert sorted(saved) == sorted(HEADS_PEFT_ADDS[task_type])
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(getattr(transformers, model_class)(config), tmp_path / str(cycle))


def test_all_linear_set_after_construction_in_any_case():
    config = SLTrainConfig(r=4)
    config.target_modules = "ALL-LINEAR"  # PEFT takes it so; what it leaves out must follow
    with pytest.warns(UserWarning, match="leaves out 1 linear layer"):
        model = get_peft_model(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)), config)
    assert isinstance(model.base_model.model[0], SLTrainLayer)


def test_all_linear_names_an_unreplaceable_layer_it_matches():
    layer = nn.Linear(16, 16)
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"`target_modules` matched `2`: .*float8_e4m3fn"):
        get_peft_model(
            nn.Sequential(nn.Linear(16, 16), nn.ReLU(), layer), SLTrainConfig(r=4, target_modules="all-linear")
        )


@pytest.mark.parametrize("from_scratch", [False, True])
def test_a_linear_subclass_with_its_own_forward_is_refused(from_scratch):
    """An SLTrain layer computes `x W^T + b` from the weights and never calls the replaced layer: a subclass whose
    forward does something else (a router returning a tuple, a scaled output) would silently change the model.
    Refused by name, left out of "all-linear"; Falcon's `FalconLinear`, the same product written out, is replaced."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled, self.falcon, self.fc = Scaled(16, 16), FalconLinear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.falcon(self.scaled(x)))

    with pytest.raises(ValueError, match=r"matched `scaled`: this Scaled subclasses `torch.nn.Linear` with a forward"):
        get_peft_model(Block(), SLTrainConfig(r=2, target_modules=["scaled"], from_scratch=from_scratch))
    config = SLTrainConfig(r=2, target_modules="all-linear", from_scratch=from_scratch)
    planned = count_parameters(Block(), config)
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(3, 16)
    expected = base(x)
    model = get_peft_model(base, config)
    assert [n for n, m in model.named_modules() if isinstance(m, SLTrainLayer)] == [
        "base_model.model.falcon",
        "base_model.model.fc",
    ]
    assert (planned.trainable, planned.total) == model.get_nb_trainable_parameters()
    if not from_scratch:
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # starts equal to the base model


@pytest.mark.parametrize("from_scratch", [False, True])
def test_layers_whose_weight_mamba_reads_directly_are_left_out(from_scratch):
    """Mamba reads `x_proj`, `dt_proj` and `out_proj`'s weights itself (its fused kernels, its `dt_proj` product): a
    named one is refused, "all-linear" replaces only `in_proj`."""
    from accelerate import init_empty_weights

    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4, expand=2)

    def build():
        if not from_scratch:
            torch.manual_seed(0)
            return transformers.MambaForCausalLM(config)
        with init_empty_weights():
            return transformers.MambaForCausalLM(config)

    with pytest.raises(ValueError, match=r"matched `backbone.layers.0.mixer.dt_proj`, whose weight this mamba model"):
        get_peft_model(build(), SLTrainConfig(r=2, target_modules=["in_proj", "dt_proj"], from_scratch=from_scratch))
    model = get_peft_model(build(), SLTrainConfig(r=2, target_modules="all-linear", from_scratch=from_scratch))
    assert [n for n, m in model.named_modules() if isinstance(m, SLTrainLayer)] == [
        "base_model.model.backbone.layers.0.mixer.in_proj"
    ]


def test_unknown_architecture_needs_target_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="`target_modules` must be set.*all-linear.* replaces every linear layer"):
        get_peft_model(Tiny(), SLTrainConfig(r=2))
    model = get_peft_model(Tiny(), SLTrainConfig(r=2, sparsity=0.25, target_modules=["lin"]))
    assert isinstance(model.base_model.model.lin, SLTrainLayer)


@pytest.mark.parametrize("from_scratch", [False, True])
def test_a_layer_refuses_inputs_it_cannot_compute(from_scratch):
    """Integers would be multiplied by truncated weights (silently wrong), a wrong width fails deep inside torch: the
    layer names the problem, as `sltrain_linear` does."""
    model = get_peft_model(
        nn.Sequential(nn.Linear(8, 6)), SLTrainConfig(r=2, target_modules=["0"], from_scratch=from_scratch)
    )
    with pytest.raises(ValueError, match=r"`x` must be a real floating-point tensor, got torch.int64"):
        model(torch.randint(0, 3, (3, 8)))
    for x in (torch.randn(3, 7), torch.tensor(1.0)):
        shape = re.escape(str(tuple(x.shape)))
        with pytest.raises(ValueError, match=rf"`x` must have d_in = 8 features .* got shape {shape}"):
            model(x)


def test_add_weighted_adapter_is_refused_with_the_reason():
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    model.add_adapter("second", SLTrainConfig(r=4, sparsity=0.05, seed=1))
    with pytest.raises(NotImplementedError, match="own random sparse support"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "combined")


COMPILE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import perturb_trainable, tiny_llama
from peft import get_peft_model
from peft_sltrain import SLTrainConfig

ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
for compute in ("factored", "dense"):  # factored first: numba's kernels compile inside the first compiled call
    results = []
    for compiled in (True, False):
        model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, compute=compute))
        perturb_trainable(model)
        loss = (torch.compile(model) if compiled else model)(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    print(compute, "matches eager over", len(results[0]) - 1, "gradients")

# under bf16 autocast the dense path casts the fp32 factors inside its autograd function (torch 2.13's Dynamo refused
# reading their versions there); the same losses, and gradients as close as bf16 allows
results = []
for compiled in (True, False):
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, compute="dense"))
    perturb_trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (torch.compile(model) if compiled else model)(input_ids=ids, labels=ids).loss
    loss.backward()
    results.append([loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
for got, expected in zip(*results):
    assert ((got - expected).norm() / expected.norm()).item() < 0.05
print("bf16 autocast matches eager over", len(results[0]) - 1, "gradients")

# fullgraph=True: the dense path compiles as one graph (the functorch and forward-mode checks trace without a break)
model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, compute="dense"))
perturb_trainable(model)
torch.testing.assert_close(torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids).loss,
                           model(input_ids=ids, labels=ids).loss, rtol=1e-4, atol=1e-6)
print("dense compiles with fullgraph=True")

# a compiled torch.func transform: the layers take their plain ops there too, on either setting
for compute in ("dense", "factored"):
    torch.manual_seed(0)
    config = SLTrainConfig(r=4, sparsity=0.1, target_modules=["0", "2"], compute=compute)
    mlp = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Tanh(), torch.nn.Linear(20, 8)), config)
    perturb_trainable(mlp)
    params = {n: p.detach() for n, p in mlp.named_parameters() if p.requires_grad}
    x = torch.randn(5, 24)
    def loss(params, x):
        return torch.func.functional_call(mlp, params, (x,)).square().sum()
    eager = torch.func.grad(loss)(params, x)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)(params, x)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
    print(compute, "compiled torch.func.grad matches eager")
"""


@needs_cxx
def test_torch_compile_matches_eager(tmp_path):
    """A compiled wrapped model gives eager's loss and gradients on both paths, in a fresh process: numba's kernels
    are a graph break, also while they compile on the first compiled call."""
    script = tmp_path / "compile_check.py"
    script.write_text(COMPILE_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, str(script), tests], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "factored matches eager" in done.stdout and "dense matches eager" in done.stdout
    assert "bf16 autocast matches eager" in done.stdout and "dense compiles with fullgraph=True" in done.stdout
    assert all(f"{compute} compiled torch.func.grad matches" in done.stdout for compute in ("dense", "factored"))


def test_disabling_a_merged_adapter_gives_the_base_model(input_ids):
    base_logits = tiny_llama()(input_ids).logits
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    perturb_trainable(model)
    adapted = model(input_ids).logits
    model.merge_adapter()
    with model.disable_adapter():  # PEFT does not unmerge: the layers must, or the base would carry the delta
        torch.testing.assert_close(model(input_ids).logits, base_logits)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"sparsity": 1.0}, {"sparsity": 0.0}, {"alpha": float("nan")}, {"r": 0}, {"compute": "fast"}]
)
def test_update_layer_checks_its_arguments(kwargs):
    """`update_layer` is public (PEFT and callers add adapters through it): it checks what the config would."""
    layer = get_peft_model(tiny_llama(), SLTrainConfig(r=2)).base_model.model.model.layers[0].self_attn.q_proj
    args = dict(r=2, sparsity=0.05, alpha=8.0, from_scratch=False, seed=0, layer_name="q_proj") | kwargs
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}` must"):
        layer.update_layer("second", **args)


def test_a_layer_under_autocast_computes_as_its_base_layer_would():
    """CPU bf16 autocast: an fp32 input gives a bf16 output, as `nn.Linear` would, and gradients reach the fp32 A
    (the logits alone cannot show it: the untargeted head makes them bf16 anyway)."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    perturb_trainable(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_base = layer(x), layer.base_layer(x)
    assert y.dtype == y_base.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.sltrain_A["default"].grad.dtype == torch.float32


def test_wavlms_attention_projections_are_left_out():
    """WavLM hands its attention projections' weights to `F.multi_head_attention_forward`: "all-linear" leaves them
    out, and every adapter it places gets a gradient."""
    config = transformers.WavLMConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_buckets=16, max_bucket_distance=64,
    )  # fmt: skip
    model = get_peft_model(transformers.WavLMModel(config), SLTrainConfig(r=2, target_modules="all-linear"))
    replaced = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SLTrainLayer)}
    assert replaced.isdisjoint({"q_proj", "k_proj", "v_proj", "out_proj"}) and "intermediate_dense" in replaced
    model(torch.randn(1, 400)).last_hidden_state.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "sltrain_B" in n)


def assert_refused_and_left_out(build, model_type: str = r"\w+") -> nn.Module:
    """For `build()` = (model, the name of a layer whose weight the model reads directly, the setting that makes it do
    so): the name is refused saying which model (and setting) reads it, and "all-linear" leaves the layer out. Returns
    the all-linear model."""
    torch.manual_seed(0)
    model, name, setting = build()
    message = rf"matched `{re.escape(name)}`, whose weight this {model_type} model{re.escape(setting)}"
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, SLTrainConfig(r=2, target_modules=[name]))
    peft_model = get_peft_model(build()[0], SLTrainConfig(r=2, target_modules="all-linear"))
    replaced = [n for n, m in peft_model.named_modules() if isinstance(m, SLTrainLayer)]
    assert replaced and not any(n.endswith(name) for n in replaced)
    return peft_model


def _mobilebert():
    config = transformers.MobileBertConfig(
        vocab_size=64, hidden_size=32, embedding_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=1,
    )  # fmt: skip
    return transformers.MobileBertForMaskedLM(config), "cls.predictions.dense", ""


def _bloom_slow_but_exact():
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4, pretraining_tp=2,
                                      slow_but_exact=True)  # fmt: skip
    return transformers.BloomForCausalLM(config), "transformer.h.0.mlp.dense_4h_to_h", " (with `pretraining_tp > 1`"


def _deberta_z_steps():
    config = transformers.DebertaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, z_steps=2)  # a config key DeBERTa ignores  # fmt: skip
    model = transformers.DebertaForMaskedLM(config)
    model.deberta.z_steps = 2  # what switches the path: DebertaModel sets 0 whatever the config says
    return model, "deberta.encoder.layer.1.attention.self.in_proj", " (with `z_steps"


def test_debertas_last_in_proj_is_left_out_only_where_its_model_sets_z_steps():
    """DeBERTa reads its last `in_proj` in chunks where `DebertaModel.z_steps > 1`, a module attribute (0 whatever the
    config holds): a config that carries `z_steps` leaves every layer a target."""
    config = transformers.DebertaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, z_steps=2)  # fmt: skip
    name = "deberta.encoder.layer.1.attention.self.in_proj"
    model = get_peft_model(transformers.DebertaForMaskedLM(config), SLTrainConfig(r=2, target_modules=[name]))
    assert isinstance(model.get_submodule("base_model.model." + name), SLTrainLayer)
    assert_refused_and_left_out(_deberta_z_steps, "deberta")  # (Transformers 5.24's z_steps path crashes)


@pytest.mark.parametrize("build", [_mobilebert, _bloom_slow_but_exact])
def test_layers_read_directly_by_a_head_or_a_setting_are_left_out(build):
    """MobileBERT's MLM head multiplies by its `dense` weight; BLOOM with `pretraining_tp > 1` and `slow_but_exact`
    slices its output projections' weights (DeBERTa's case has a test of its own). An adapter
    there would be ignored: "all-linear" leaves the layer out (and every adapter it places is used), a name is refused
    saying which setting does it."""
    peft_model = assert_refused_and_left_out(build)
    ids = torch.randint(0, 64, (1, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "sltrain_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_refusal_under_the_default_targets_says_which_to_pass():
    """BLOOM's default targets include `dense`, which `pretraining_tp > 1` with `slow_but_exact` makes it read
    directly: the user named no target, so the refusal lists the defaults to pass without it."""
    model, _, _ = _bloom_slow_but_exact()
    defaults = r"\['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'query_key_value'\]"
    keep = ["dense_h_to_4h", "query_key_value"]  # both read layers left out, in one step
    pass_keep = re.escape(f"pass `target_modules={keep}`)")
    with pytest.raises(ValueError, match=rf"\(they are bloom's defaults, {defaults}: {pass_keep}"):
        get_peft_model(model, SLTrainConfig(r=2))
    get_peft_model(_bloom_slow_but_exact()[0], SLTrainConfig(r=2, target_modules=keep))  # which is accepted
    with pytest.raises(ValueError, match=r"Leave it out of `target_modules` \(`\"all-linear\"` leaves it out\)"):
        get_peft_model(_bloom_slow_but_exact()[0], SLTrainConfig(r=2, target_modules=["dense"]))  # named: no list


def _layoutlmv3():
    config = transformers.LayoutLMv3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=64, input_size=32, patch_size=16, rel_pos_bins=16, max_rel_pos=32,
        rel_2d_pos_bins=16, max_rel_2d_pos=64, coordinate_size=6, shape_size=4,
    )  # fmt: skip
    return transformers.LayoutLMv3Model(config), "encoder.rel_pos_x_bias", ""


def _reformer_lsh():
    config = transformers.ReformerConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16, attn_layers=["lsh", "local"],
        feed_forward_size=32, axial_pos_shape=[4, 8], axial_pos_embds_dim=[16, 16], max_position_embeddings=32,
        lsh_attn_chunk_length=4, local_attn_chunk_length=4, num_buckets=2, num_hashes=1, is_decoder=True,
    )  # fmt: skip
    return (
        transformers.ReformerModelWithLMHead(config),
        "reformer.encoder.layers.0.attention.self_attention.value",
        (" (in cached generation)"),
    )


def _gemma3n_altup():
    config = transformers.Gemma3nTextConfig(
        vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        laurel_rank=4, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["full_attention", "full_attention"],
    )  # fmt: skip
    return transformers.Gemma3nForCausalLM(config), "model.layers.1.altup.correction_coefs", " (in training mode)"


def _wavlm_in_a_composite():
    encoder = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        num_buckets=16, max_bucket_distance=32,
    )  # fmt: skip
    decoder = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True, add_cross_attention=True)  # fmt: skip
    config = transformers.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    return transformers.SpeechEncoderDecoderModel(config), "encoder.encoder.layers.0.attention.k_proj", ""


@pytest.mark.parametrize(
    "build, model_type",
    [
        (_layoutlmv3, "layoutlmv3"),
        (_reformer_lsh, "reformer"),
        (_gemma3n_altup, "gemma3n_text"),
        (_wavlm_in_a_composite, "wavlm"),
    ],
)
def test_layers_read_directly_by_a_class_or_a_sub_model_are_refused_and_left_out(build, model_type):
    """LayoutLMv3 indexes its relative-position biases' weights; Reformer's LSH attention multiplies by its `value`
    and `query_key` weights in cached generation; Gemma3n's AltUp clamps its coefficient layers' weights in training;
    a WavLM encoder inside a speech encoder-decoder hands its attention weights to `multi_head_attention_forward` (the
    message names the sub-model's type). An adapter there would be ignored (from scratch, the model would crash): a
    name is refused, "all-linear" leaves the layer out (with r = 2, also the narrow ones)."""
    assert_refused_and_left_out(build, model_type)


def test_jambas_dt_proj_is_left_out():
    """Jamba's Mamba layers read `dt_proj.weight` themselves (the rest of the layer is called as usual)."""
    config = transformers.JambaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4, num_experts=1, attn_layer_period=2,
        attn_layer_offset=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"matched `model.layers.0.mamba.dt_proj`, whose weight this jamba model"):
        get_peft_model(transformers.JambaForCausalLM(config), SLTrainConfig(r=2, target_modules=["dt_proj"]))
    model = get_peft_model(transformers.JambaForCausalLM(config), SLTrainConfig(r=2, target_modules="all-linear"))
    mamba = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SLTrainLayer) and ".mamba." in n}
    assert mamba == {"in_proj", "x_proj", "out_proj"}
    ids = torch.randint(0, 64, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "sltrain_B" in n)  # every adapter is used


def test_set_compute_switches_the_layers_and_the_config():
    """The double-backward refusal's advice can be followed on a model in hand: `set_compute` switches every layer
    of the adapter (the layers read it per call) and the config, so a saved adapter records it."""
    torch.manual_seed(0)
    config = SLTrainConfig(r=4, sparsity=0.1, target_modules=["0", "2"], compute="factored")
    model = get_peft_model(nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 8)), config)
    perturb_trainable(model)
    x = torch.randn(5, 24, requires_grad=True)

    def gradient_penalty():
        (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        return grad.square().sum()

    with pytest.raises(RuntimeError, match=r"no second derivative.*model.set_compute\('dense'\)"):
        gradient_penalty()
    model.set_compute("dense")  # PeftModel hands it to SLTrainModel
    assert {layer.compute["default"] for layer in sltrain_layers(model).values()} == {"dense"}
    assert model.peft_config["default"].compute == "dense"
    gradient_penalty().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="`compute` must be one of .* got 'fast'"):
        model.set_compute("fast")
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        model.set_compute("auto", adapter_name="other")


def test_set_compute_of_one_adapter_leaves_the_others():
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, compute="dense"))
    model.add_adapter("second", SLTrainConfig(r=4, compute="dense"))
    model.set_compute("factored", adapter_name="second")
    for layer in sltrain_layers(model).values():
        assert layer.compute == {"default": "dense", "second": "factored"}
    assert (model.peft_config["default"].compute, model.peft_config["second"].compute) == ("dense", "factored")


@pytest.mark.parametrize("from_scratch", [False, True])
@pytest.mark.parametrize("compute", ["auto", "factored"])
def test_torch_export_gives_a_program_that_runs_and_trains_as_eager(from_scratch, compute):
    """`torch.export` traces through the layers, which run in plain ops there (the sparse kernels are opaque to it,
    and the autograd functions' `out=` products would not differentiate in the program): a 344 -> 128 layer that
    goes factored on 4 tokens in eager mode exports, in eval and in train mode, and the program gives eager's outputs
    and gradients with grad on."""
    torch.manual_seed(0)
    config = SLTrainConfig(r=32, sparsity=0.03, target_modules=["0"], from_scratch=from_scratch, compute=compute)
    model = get_peft_model(nn.Sequential(nn.Linear(344, 128)), config)
    perturb_trainable(model)
    x = torch.randn(1, 4, 344)
    assert choose_path("auto", 4, 344, 128, 32, num_nonzeros(128, 344, 0.03), torch.device("cpu"), torch.float32,
                       not from_scratch, backward=False) == "factored"  # fmt: skip
    for mode in (model.eval, model.train):
        mode()
        program = torch.export.export(model, (x,)).module()
        trainable = [p for p in model.parameters() if p.requires_grad]
        expected = model(x)
        want = torch.autograd.grad(expected.square().sum(), trainable)
        got = program(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        program_params = [p for name, p in program.named_parameters() if name in names]
        assert len(program_params) == len(trainable)
        for g, w in zip(torch.autograd.grad(got.square().sum(), program_params), want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)  # (eager's path may be the factored one)


@pytest.mark.parametrize("from_scratch", [False, True])
@pytest.mark.parametrize("compute", ["dense", "factored"])
def test_per_sample_gradients_with_torch_func(from_scratch, compute):
    """`torch.func` transforms run through the layers (in plain differentiable ops there): per-sample gradients by
    `vmap(grad(...))` over `functional_call` are those of one backward per sample."""
    torch.manual_seed(0)
    config = SLTrainConfig(r=4, sparsity=0.1, target_modules=["0", "2"], from_scratch=from_scratch, compute=compute)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 8)), config)
    perturb_trainable(model)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(6, 24)

    def loss(params, sample):
        return torch.func.functional_call(model, params, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1]).square().sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, msg=name)


@pytest.mark.parametrize("from_scratch, kept", [(True, "train dense"), (False, "stay frozen: for a task head")])
def test_the_narrow_layer_warning_says_what_becomes_of_the_layers(from_scratch, kept):
    """ "all-linear" leaves out a layer narrower than r: from scratch it trains dense, fine-tuned it stays frozen
    (unless listed as a task head); the warning must say the right one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1))
    config = SLTrainConfig(r=4, target_modules="all-linear", from_scratch=from_scratch)
    with pytest.warns(UserWarning, match=rf"narrower than r=4.*They keep their dense weight and {re.escape(kept)}"):
        get_peft_model(model, config)


@pytest.mark.parametrize("training", [False, True])
def test_replaced_layers_keep_the_train_or_eval_mode_of_the_model(training):
    """A layer replaced in an eval-mode model is in eval mode too (a new module starts in training mode): the
    compute-path choice reads `self.training` (in training mode a no-grad call counts the backward), so a model
    wrapped for inference must not have training-mode layers."""
    model = get_peft_model(tiny_llama().train(training), SLTrainConfig(r=4, sparsity=0.05))
    layers = sltrain_layers(model)
    assert layers and all(layer.training == training for layer in layers.values())
    assert all(module.training == training for module in model.base_model.model.modules())  # (PEFT's wrappers
    # themselves are new modules, in training mode whatever the model's)


def test_a_second_adapter_on_replaced_layers_draws_its_supports_from_its_own_seed():
    """`add_adapter` on layers that already carry an SLTrain adapter goes through `update_layer`: the new
    adapter's supports follow its own config's `seed` and the layer names, as the first adapter's do (and as
    `save_support=False` regenerates them)."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, seed=0))
    model.add_adapter("other", SLTrainConfig(r=4, sparsity=0.05, seed=7))
    layers = sltrain_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.")
        for adapter, seed in (("default", 0), ("other", 7)):
            nnz = layer.sltrain_values[adapter].numel()
            expected = random_support(layer.out_features, layer.in_features, nnz, seed=layer_seed(seed, key))
            assert torch.equal(layer.sltrain_indices[adapter], expected), (name, adapter)
        assert not torch.equal(layer.sltrain_indices["default"], layer.sltrain_indices["other"])


def test_alora_offsets_are_refused(input_ids):
    """PEFT hands LoRA's `alora_offsets` to the tuner and then drops it: SLTrain refuses it rather than silently
    ignore it (as it refuses `adapter_names`)."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    with pytest.raises(ValueError, match=r"SLTrain has no `alora_offsets`.*`alora_offsets=\[1, 1\]`"):
        model(input_ids[:2], alora_offsets=[1, 1])
    assert model(input_ids[:2]).logits.shape[0] == 2


@pytest.mark.parametrize("register, kind", [
    (nn.Module.register_full_backward_hook, "backward"),
    (nn.Module.register_full_backward_pre_hook, "backward pre"),
])  # fmt: skip
def test_backward_hooks_on_a_replaced_layer_are_warned_about(register, kind):
    """Backward hooks on the original layer do not run either (SLTrain never calls it): warned about as
    forward hooks are."""
    model = tiny_llama()
    register(model.model.layers[0].self_attn.q_proj, lambda *args: None)
    peft_model = get_peft_model(model, SLTrainConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=rf"under this SLTrain layer has {kind} hooks"):
        peft_model(input_ids=torch.tensor([[1, 2, 3]]))


def test_read_directly_names_match_whole_module_names():
    """`WEIGHT_READ_DIRECTLY`'s entries are module names, or dotted suffixes of them: Mamba's `out_proj` is
    left out, a layer that merely ends in those letters (`gate_out_proj`) is not."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="mamba")
            self.out_proj = nn.Linear(8, 8)
            self.gate_out_proj = nn.Linear(8, 8)

    assert set(weight_read_directly(Mixer())) == {"out_proj"}


def test_blooms_dense_layers_stay_targets_with_slow_but_exact_at_pretraining_tp_1():
    """BLOOM slices `dense` / `dense_4h_to_h` only where `pretraining_tp > 1` (and `slow_but_exact`): at 1 it
    calls them, and they are replaced as usual."""
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4, pretraining_tp=1,
                                      slow_but_exact=True)  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.BloomForCausalLM(config), SLTrainConfig(r=2, target_modules=["dense", "dense_4h_to_h"])
    )
    replaced = {n.removeprefix("base_model.model.") for n in sltrain_layers(model)}
    assert replaced == {"transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"}


def test_debertas_last_in_proj_stays_a_target_at_z_steps_1():
    """DeBERTa re-runs its last layer (reading `in_proj`'s weight) only where `z_steps > 1`."""
    config = transformers.DebertaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DebertaForMaskedLM(config)
    model.deberta.z_steps = 1
    name = "deberta.encoder.layer.1.attention.self.in_proj"
    peft_model = get_peft_model(model, SLTrainConfig(r=2, target_modules=[name]))
    assert isinstance(peft_model.get_submodule("base_model.model." + name), SLTrainLayer)


def test_a_layer_built_directly_in_inference_mode_freezes_its_adapter():
    """`peft_sltrain.layer.Linear` on its own (no `get_peft_model`, which sets the adapters' trainability again after
    injecting) takes the config's `inference_mode`: its factors are frozen."""
    from peft_sltrain.layer import Linear

    for inference_mode in (True, False):
        config = SLTrainConfig(r=2, inference_mode=inference_mode)
        layer = Linear(nn.Linear(16, 12), "default", config, layer_name="0")
        adapter = [p for n, p in layer.named_parameters() if n.startswith("sltrain_")]
        assert len(adapter) == 3 and all(p.requires_grad != inference_mode for p in adapter)
