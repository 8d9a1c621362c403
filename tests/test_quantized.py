"""Fine-tuning on a bitsandbytes 4- or 8-bit base (QLoRA-style): the frozen `W0` stays quantized, and the layer is
`base(x) + x (s B A + S)^T`. bitsandbytes runs both on CPU; these tests use its CPU kernels."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from peft_sltrain import SLTrainConfig, SLTrainLayer, count_parameters
from peft_sltrain.counting import module_parameter_counts
from peft_sltrain.functional import dense_weight

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
QUANTIZATIONS = ["4-bit", "8-bit"]


def quantized_linear(
    quantization: str, d_in: int = 64, d_out: int = 96, seed: int = 0, double_quant: bool = True
) -> nn.Module:
    """A bitsandbytes layer holding the quantized weights of a seeded `nn.Linear(d_in, d_out)`, with bias; 4-bit:
    nf4, with the block maxima quantized again (`double_quant`) or not (Transformers' default)."""
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    if quantization == "4-bit":
        layer = bnb.nn.Linear4bit(
            d_in, d_out, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant
        )
    else:
        layer = bnb.nn.Linear8bitLt(d_in, d_out, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def adapted(quantization: str, compute: str = "auto", d_in: int = 64, **base) -> tuple[nn.Module, SLTrainLayer]:
    """A one-layer model on a quantized base with a trained-looking (nonzero) adapter, and its SLTrain layer."""
    model = get_peft_model(
        nn.Sequential(quantized_linear(quantization, d_in=d_in, **base)),
        SLTrainConfig(r=4, sparsity=0.1, alpha=8, target_modules=["0"], compute=compute),
    )
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.sltrain_B["default"].normal_(0, 0.1)
        layer.sltrain_values["default"].normal_(0, 0.1)
    return model, layer


def delta_tensors(layer: SLTrainLayer) -> dict:
    return {
        "A": layer.sltrain_A["default"],
        "B": layer.sltrain_B["default"],
        "values": layer.sltrain_values["default"],
        "indices": layer.sltrain_indices["default"],
        "scaling": layer.scaling["default"],
    }


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("compute", ["dense", "factored", "batched"])
def test_output_and_gradients_match_base_plus_a_dense_delta(quantization, compute):
    """(`"batched"` is for from-scratch layers: a quantized base's delta takes the dense path.)"""
    model, layer = adapted(quantization, compute=compute)
    assert layer.quantization == quantization and layer.sltrain_A["default"].dtype == torch.float32
    assert type(layer.get_base_layer().weight).__name__ in ("Params4bit", "Int8Params")  # W0 stays quantized
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *(p for p in model.parameters() if p.requires_grad)])
    assert "_sltrain_took" not in layer.__dict__  # (set by the batched rebuild's calls)

    x_ref = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    A, B, values = params
    tensors = delta_tensors(layer) | {"A": A, "B": B, "values": values}
    y_ref = layer.get_base_layer()(x_ref) + F.linear(x_ref, dense_weight(**tensors))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *params])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_a_fresh_adapter_leaves_the_quantized_layer_unchanged(quantization):
    base = quantized_linear(quantization)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = base(x)
        model = get_peft_model(nn.Sequential(base), SLTrainConfig(r=4, target_modules=["0"]))
        assert torch.equal(model(x), before)


def half_step(W: torch.Tensor, quantization: str) -> float:
    """The most an entry of `W` moves when quantized: half the widest gap between quantization levels, which are
    relative to the block's (4-bit) or row's (8-bit) largest entry: nf4's widest gap, between its two lowest levels,
    is 0.304 of it (0.32 leaves room for the 8-bit quantized block maxima), int8's 1/127 (plus the fp16 rounding
    bitsandbytes applies first, relative 2^-11)."""
    return float(W.abs().max()) * (0.32 / 2 if quantization == "4-bit" else 1 / 127 / 2 + 2**-11)


def requantized(layer: SLTrainLayer, W: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes stores for `W` in a fresh layer of the same kind (4-bit: nf4, as `quantized_linear`)."""
    fresh = quantized_linear(layer.quantization)
    with torch.no_grad():
        if layer.quantization == "4-bit":
            fresh.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4").to("cpu")
        else:
            fresh.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False).to("cpu")
    return fresh.weight.data


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_merge_quantizes_w0_plus_delta_and_unload_keeps_the_quantized_layer(quantization):
    model, layer = adapted(quantization)
    with torch.no_grad():
        W0 = layer._dequantized_base_weight()
        W = W0 + layer.get_delta_weight("default").to(W0.dtype)
        with pytest.warns(UserWarning, match=f"bitsandbytes {quantization} layer quantizes the sum again"):
            merged = model.merge_and_unload()[0]
        assert type(merged) is type(layer.get_base_layer())
        assert torch.equal(merged.weight.data, requantized(layer, W))
        dequantized = dequantize_bnb_weight(merged.weight, getattr(merged, "state", None))
        torch.testing.assert_close(dequantized, W, rtol=0, atol=half_step(W, quantization))


def repacked(layer: nn.Module) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_layer_packed_before_adaptation_is_unpacked_and_merges_right(double_quant):
    """In eval mode without grad, bitsandbytes' 4-bit layer repacks its weight for its CPU kernel (on CPUs with
    AVX512-BF16), a format `dequantize_4bit` does not read, and whose inverse leaves the block maxima of a weight
    without double quantization out of order. An adapter on a base evaluated before: unpacked, reordered, and a
    zero delta merges back to W0 itself, up to the packing's bf16 rounding of the block maxima (d_in 256: several
    blocks per row)."""
    base = quantized_linear("4-bit", d_in=256, double_quant=double_quant)
    W0 = dequantize_bnb_weight(base.weight, state=base.weight.quant_state)
    with torch.no_grad():
        base.eval()(torch.randn(4, 256))
    if not repacked(base):
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    model = get_peft_model(nn.Sequential(base), SLTrainConfig(r=4, target_modules=["0"]))
    assert not repacked(base) and base.support_avx512bf16_for_cpu is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.base_model.model[0].merge()
    # out of order, the block maxima moved entries by 5-11% of the largest
    merged = dequantize_bnb_weight(base.weight, state=base.weight.quant_state)
    torch.testing.assert_close(merged, W0, rtol=0, atol=float(W0.abs().max()) * 2**-7)


def quantized_mlp() -> nn.Module:
    """Two 4-bit layers (no double quantization, as Transformers' default) around a tanh."""
    return nn.Sequential(
        quantized_linear("4-bit", d_in=128, d_out=128, double_quant=False),
        nn.Tanh(),
        quantized_linear("4-bit", d_in=128, d_out=64, seed=1, double_quant=False),
    )


@pytest.mark.parametrize("plan", ["both replaced", "last not replaced", "re-adapted after unload"])
def test_training_after_an_eval_pass_keeps_every_gradient(plan):
    """bitsandbytes' CPU inference kernel, which it packs the weight for at an eval call without grad and keeps using
    in training, passes no gradient to its input: adapted models never pack, so an evaluation between steps changes
    no bit of the next gradients, whichever 4-bit layers SLTrain replaced (and after `unload()`)."""
    targets = ["0"] if plan == "last not replaced" else ["0", "2"]
    model = get_peft_model(quantized_mlp(), SLTrainConfig(r=4, sparsity=0.1, target_modules=targets))
    if plan == "re-adapted after unload":  # layer 2 had an adapter, which unload() dropped
        model = get_peft_model(model.unload(), SLTrainConfig(r=4, sparsity=0.1, target_modules=["0"]))
    x = torch.randn(8, 128)

    def gradient_of_first_B():
        model.train()
        model(x).square().sum().backward()
        grad = model.base_model.model[0].sltrain_B["default"].grad.clone()
        model.zero_grad()
        return grad

    before = gradient_of_first_B()
    model.eval()
    with torch.no_grad():
        model(x)  # an evaluation, as the HF Trainer's between training steps
    assert not any(repacked(m) for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert torch.equal(gradient_of_first_B(), before)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_unmerge_restores_w0_up_to_requantization(quantization):
    model, layer = adapted(quantization)
    with torch.no_grad():
        W0 = layer._dequantized_base_weight().clone()
        W = W0 + layer.get_delta_weight("default").to(W0.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer.merge()
        assert layer.merged
        layer.unmerge()
    # two roundings: of the merged W, then of W0 again
    torch.testing.assert_close(layer._dequantized_base_weight(), W0, rtol=0, atol=2 * half_step(W, quantization))
    assert type(layer.get_base_layer().weight).__name__ in ("Params4bit", "Int8Params")


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("targets", [["0", "1"], ["0"]])
def test_from_scratch_with_a_quantized_layer_is_refused_before_any_layer_is_replaced(quantization, targets):
    """Targeted or not: from scratch every weight is trained, and a quantized one cannot be."""
    model = nn.Sequential(nn.Linear(64, 64), quantized_linear(quantization))
    with pytest.raises(ValueError, match=rf"`1` is a bitsandbytes {quantization} .*from scratch.*fine-tune it"):
        get_peft_model(model, SLTrainConfig(r=2, target_modules=targets, from_scratch=True))
    assert not any(isinstance(m, SLTrainLayer) for m in model.modules())
    assert model[0].weight is not None


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_count_parameters_counts_quantized_weights_at_their_dense_size_targeted_or_not(quantization):
    def model(quantized: bool) -> nn.Module:
        if quantized:
            return nn.Sequential(*(quantized_linear(quantization, d_out=64, seed=seed) for seed in (0, 1)))
        return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))

    config = SLTrainConfig(r=2, sparsity=0.1, target_modules=["0"])  # layer 1 is not targeted
    counts = count_parameters(model(True), config)
    assert counts == count_parameters(model(False), config)
    assert module_parameter_counts(model(True)).total == module_parameter_counts(model(False)).total  # (the scripts)
    assert counts.total == get_peft_model(model(True), config).get_nb_trainable_parameters()[1]  # PEFT's count


def quantized_llama(path, quantization: str):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if quantization == "4-bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes on casting inputs
        return LlamaForCausalLM.from_pretrained(path, quantization_config=config).eval()


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_transformers_quantized_model_trains_saves_and_loads_back_bit_exact(tmp_path, quantization):
    tiny_llama(intermediate_size=128).save_pretrained(tmp_path / "base")  # widths that bitsandbytes' packing takes
    config = SLTrainConfig(r=4, sparsity=0.05, alpha=8)
    assert count_parameters(quantized_llama(tmp_path / "base", quantization), config) == count_parameters(
        tiny_llama(intermediate_size=128), config
    )  # a quantized W0 counts as the dense one it stands for

    model = get_peft_model(quantized_llama(tmp_path / "base", quantization), config)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(quantized_llama(tmp_path / "base", quantization), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)


def test_two_active_adapters_add_two_branches_to_the_quantized_output():
    model, layer = adapted("4-bit")
    model.add_adapter("second", SLTrainConfig(r=2, sparsity=0.05, alpha=4, target_modules=["0"], seed=1))
    with torch.no_grad():
        layer.sltrain_B["second"].normal_(0, 0.1)
    model.base_model.set_adapter(["default", "second"])
    x = torch.randn(3, 64)
    with torch.no_grad():
        delta = sum(layer.get_delta_weight(name) for name in ("default", "second"))
        torch.testing.assert_close(model(x), layer.get_base_layer()(x) + F.linear(x, delta), rtol=1e-5, atol=1e-5)


def test_saving_after_an_evaluation_leaves_every_w0_as_it_was(tmp_path):
    """The HF Trainer evaluates, then saves: had the evaluation packed a 4-bit weight, bitsandbytes' own save would
    unpack it in place with an inverse that leaves the block maxima out of order (without double quantization), and
    training would go on with that W0. Adapted models never pack."""
    model = get_peft_model(quantized_mlp(), SLTrainConfig(r=4, sparsity=0.1, target_modules=["0"]))
    bases = [model.base_model.model[0].get_base_layer(), model.base_model.model[2]]  # replaced, not replaced
    before = [dequantize_bnb_weight(base.weight, state=base.weight.quant_state) for base in bases]
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 128))
    model.save_pretrained(tmp_path)  # PEFT reads the whole state_dict, base layers included
    for base, W0 in zip(bases, before, strict=True):
        assert torch.equal(dequantize_bnb_weight(base.weight, state=base.weight.quant_state), W0)


def test_a_layer_built_directly_keeps_its_4bit_base_unpacked():
    """`peft_sltrain.layer.Linear` on its own (no `get_peft_model`) turns its base's repacking off too."""
    from peft_sltrain.layer import Linear

    base = quantized_linear("4-bit", d_in=256, double_quant=False)
    with torch.no_grad():
        base.eval()(torch.randn(4, 256))  # packs, where the CPU has AVX512-BF16
    layer = Linear(base, "default", SLTrainConfig(r=4, target_modules=["0"]), layer_name="0")
    assert base.support_avx512bf16_for_cpu is False and not repacked(base)
    with torch.no_grad():
        layer.eval()(torch.randn(4, 256))
    assert not repacked(base)


def test_merging_into_an_8bit_base_with_fp16_weights_keeps_w0():
    """bitsandbytes' mixed mode (`has_fp16_weights=True`) keeps W0 in floats: merging an adapter that is still zero
    leaves every output as it was (dequantizing those floats as int8 scaled W0 twice), and unmerging restores it."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 96)
    layer = bnb.nn.Linear8bitLt(64, 96, has_fp16_weights=True)
    layer.load_state_dict(dense.state_dict())
    model = get_peft_model(nn.Sequential(layer.to("cpu")), SLTrainConfig(r=4, sparsity=0.1, target_modules=["0"]))
    x = torch.randn(5, 64)
    before = model(x)
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        model.merge_adapter()
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        model.unmerge_adapter()
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_merging_into_a_bf16_8bit_base_with_fp16_weights_sums_in_fp32():
    """A bitsandbytes base's `W0 + delta` is summed in fp32 and rounded once to W0's dtype (as an unquantized
    half-precision base is): bitsandbytes' mixed 8-bit mode keeps W0 in its floats, so the merged weight is exactly
    that sum, not `W0 + round(delta)` rounded again."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 96)
    layer = bnb.nn.Linear8bitLt(64, 96, has_fp16_weights=True)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(torch.bfloat16).to("cpu")
    model = get_peft_model(nn.Sequential(layer), SLTrainConfig(r=4, sparsity=0.1, target_modules=["0"]))
    sl = model.base_model.model[0]
    with torch.no_grad():
        sl.sltrain_B["default"].normal_(0, 0.1)
        sl.sltrain_values["default"].normal_(0, 0.1)
        W0 = sl.get_base_layer().weight.data.clone()
        assert W0.dtype == torch.bfloat16
        expected = (W0.float() + sl.get_delta_weight("default").float()).to(torch.bfloat16)
        with pytest.warns(UserWarning, match="quantizes the sum again"):
            sl.merge()
    assert torch.equal(sl.get_base_layer().weight.data, expected)
