"""`ensure_weight_tying`: input embeddings and a head that share one weight, with either in `modules_to_save`, train
one copy of it (as a model without adapters trains its tied weight); without it, PEFT unties them, and a warning says
so."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_gpt2 import tiny_gpt2

from peft_sltrain import SLTrainConfig, count_parameters

from conftest import perturb_trainable, tiny_llama

# architecture -> (a tied model, its embeddings' name, its head's name): GPT-2's `wte` is a name PEFT's own tying
# check does not know
TIED = {
    "llama": (lambda: tiny_llama(tie_word_embeddings=True), "model.embed_tokens", "lm_head"),
    "gpt2": (tiny_gpt2, "transformer.wte", "lm_head"),
}


def copy_and_head(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings' trainable copy, and the weight the head computes with."""
    base = model.base_model.model
    head = base.lm_head
    head_weight = head.modules_to_save["default"].weight if hasattr(head, "modules_to_save") else head.weight
    return base.get_input_embeddings().modules_to_save["default"].weight, head_weight


@pytest.mark.parametrize("named", ["embeddings", "head", "both"])
@pytest.mark.parametrize("arch", TIED)
def test_tied_embeddings_and_head_train_one_weight(arch, named, input_ids):
    build, embeddings, head = TIED[arch]
    reference = build()  # the model without adapters: its one tied weight gets both uses' gradients
    loss_ref = reference(input_ids=input_ids, labels=input_ids).loss
    loss_ref.backward()

    def config():
        saved = {"embeddings": [embeddings.rpartition(".")[2]], "head": [head]}.get(named, [head, embeddings])
        return SLTrainConfig(r=4, sparsity=0.05, modules_to_save=saved, ensure_weight_tying=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(build(), config())
    assert not [w for w in caught if "tied" in str(w.message) or "tying" in str(w.message)]
    shared, head_weight = copy_and_head(model)
    assert head_weight is shared and shared.requires_grad
    assert [m for m in model.peft_config["default"].modules_to_save if head.endswith(m)] == []

    loss = model(input_ids=input_ids, labels=input_ids).loss  # the adapters start as a zero delta
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(shared.grad, reference.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-7)
    expected = count_parameters(build(), config())
    assert (expected.trainable, expected.total) == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", TIED)
def test_tied_weight_saves_loads_and_merges_tied(arch, tmp_path, input_ids):
    build, _, head = TIED[arch]
    config = SLTrainConfig(r=4, sparsity=0.05, modules_to_save=[head], ensure_weight_tying=True)
    model = get_peft_model(build(), config)
    perturb_trainable(model)  # in place: the head still computes with the embeddings' copy
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    shared, head_weight = copy_and_head(loaded)
    assert head_weight is shared and shared.requires_grad
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
        merged = loaded.merge_and_unload()
        assert merged.lm_head.weight is merged.get_input_embeddings().weight
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_second_adapter_ties_its_own_copy():
    config = SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["wte"], ensure_weight_tying=True)
    model = get_peft_model(tiny_gpt2(), config)
    model.add_adapter("second", SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["wte"], ensure_weight_tying=True))
    assert model.peft_config["second"].modules_to_tie == {"lm_head"}
    base = model.base_model.model
    for name in ("default", "second"):
        shared = base.transformer.wte.modules_to_save[name].weight
        assert base.lm_head.modules_to_save[name].weight is shared
    copies = base.transformer.wte.modules_to_save
    assert copies["second"].weight is not copies["default"].weight


def test_without_ensure_weight_tying_a_warning_says_the_copy_unties_them():
    with pytest.warns(UserWarning, match=r"`lm_head` in `modules_to_save` share their weight with `transformer\.wte`.*"
                      r"unties them\. Set `ensure_weight_tying=True`"):  # fmt: skip
        model = get_peft_model(tiny_gpt2(), SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["lm_head"]))
    base = model.base_model.model
    assert base.lm_head.modules_to_save["default"].weight is not base.transformer.wte.weight  # PEFT's default
    with pytest.warns(UserWarning, match=r"`transformer\.wte`, `lm_head` in `modules_to_save` share one weight.*"
                      r"a separate copy for each, which unties them"):  # fmt: skip
        get_peft_model(tiny_gpt2(), SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["lm_head", "wte"]))


def test_untied_model_is_left_as_it_is():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(tied|tying).*")
        model = get_peft_model(
            tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, modules_to_save=["lm_head"], ensure_weight_tying=True)
        )
    assert model.peft_config["default"].modules_to_save == ["lm_head"]
    assert not hasattr(model.base_model.model.get_input_embeddings(), "modules_to_save")


def test_ensure_weight_tying_must_be_a_bool():
    with pytest.raises(ValueError, match=r"`ensure_weight_tying` must be True or False, got 'yes'"):
        SLTrainConfig(ensure_weight_tying="yes")
