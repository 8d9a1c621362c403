"""save_pretrained / PeftModel.from_pretrained: safetensors only, bit-exact in a fresh process, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peft_sltrain import SLTrainConfig
from peft_sltrain.support import random_support

from conftest import perturb_trainable, tiny_llama, tiny_llama_config, tiny_roberta

FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, {tests!r})
import peft_sltrain
from conftest import tiny_llama, tiny_roberta, tiny_llama_config
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
kind, adapter, out = sys.argv[1:]
if kind == "scratch":
    torch.manual_seed(99)
    base = AutoModelForCausalLM.from_config(tiny_llama_config())
else:
    base = {{"llama": tiny_llama, "roberta": tiny_roberta}}[kind](seed=0)
model = PeftModel.from_pretrained(base, adapter).eval()
ids = load_file(adapter + "/../ids.safetensors")["ids"]
save_file({{"logits": model(ids).logits.contiguous()}}, out)
"""


@pytest.mark.parametrize("kind", ["llama", "roberta", "scratch"])
def test_fresh_process_reload_is_bit_identical(tmp_path, input_ids, kind):
    if kind == "roberta":  # with its biases (RoBERTa has them, the tiny LLaMA none): trained, perturbed and saved
        config = SLTrainConfig(r=4, sparsity=0.05, task_type="SEQ_CLS", bias="all")
        model = get_peft_model(tiny_roberta(seed=0), config)
    elif kind == "llama":
        model = get_peft_model(tiny_llama(seed=0), SLTrainConfig(r=4, sparsity=0.05))
    else:  # dense: the factored path's reload is checked in-process (test_from_scratch), without a numba compile here
        config = SLTrainConfig(r=4, sparsity=0.05, from_scratch=True, compute="dense")
        model = get_peft_model(tiny_llama(seed=5), config)
    model.eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    save_file({"ids": input_ids}, tmp_path / "ids.safetensors")
    assert not list((tmp_path / "adapter").glob("*.bin")) and not list((tmp_path / "adapter").glob("*.pt"))
    if kind == "roberta":  # every bias, the 17 of the encoder and the head's 2, is in the file
        biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
        assert len(biases) == 19 and biases <= load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()

    script = FRESH_PROCESS.format(tests=str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", script, kind, str(tmp_path / "adapter"), str(out)], check=True)
    assert torch.equal(load_file(out)["logits"], expected)


def test_roberta_merge_and_unload_with_classifier_in_modules_to_save(tmp_path, input_ids):
    model = get_peft_model(tiny_roberta(), SLTrainConfig(r=4, sparsity=0.05, task_type="SEQ_CLS")).eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    merged = model.merge_and_unload()
    assert type(merged.classifier).__name__ == "RobertaClassificationHead"
    assert type(merged.roberta.encoder.layer[0].attention.self.query) is torch.nn.Linear
    merged.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_safe_merge_refuses_nan_and_unload_restores_base(input_ids):
    base = tiny_llama()
    base_logits = base(input_ids).logits
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05)).eval()
    perturb_trainable(model)
    model.unload()  # fine-tuning: gives the untouched base back
    torch.testing.assert_close(base(input_ids).logits, base_logits)

    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.sltrain_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf .* This layer was left unmerged"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def save_adapter(path, **config):
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, **config))
    perturb_trainable(model)
    model.save_pretrained(path)
    return path / "adapter_model.safetensors"


# with or without the supports in the file, a file for another model fails on what does not fit
@pytest.mark.parametrize("save_support", [True, False])
def test_shapes_that_do_not_fit_the_base_model(tmp_path, save_support):
    save_adapter(tmp_path, save_support=save_support)
    with pytest.raises(ValueError, match=r"shapes do not fit the base model.*file \(4, 64\) vs model \(4, 32\)"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=32), tmp_path)


@pytest.mark.parametrize("save_support", [True, False])
def test_adapter_for_layers_the_model_lacks(tmp_path, save_support):
    save_adapter(tmp_path, save_support=save_support)
    with pytest.raises(ValueError, match="parameters this model does not have"):
        PeftModel.from_pretrained(tiny_llama(num_hidden_layers=1), tmp_path)


@pytest.mark.parametrize("save_support", [True, False])
def test_adapter_for_fewer_layers_than_the_model_has(tmp_path, save_support):
    save_adapter(tmp_path, save_support=save_support)
    with pytest.raises(ValueError, match=r"lacks 28 tensor.*layers.2.*saved from a different model or config"):
        PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path)


@pytest.mark.parametrize("save_support", [True, False])
def test_a_peft_model_file_loads_into_an_injected_model(tmp_path, input_ids, save_support):
    """PEFT's low-level API (`inject_adapter_in_model` + `set_peft_model_state_dict`, as Diffusers-style integrations
    use it) takes a `PeftModel`'s file with its `base_model.model.` prefix; without supports in the file too."""
    config = SLTrainConfig(r=4, sparsity=0.05, save_support=save_support)
    model = get_peft_model(tiny_llama(), config)
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    injected = inject_adapter_in_model(SLTrainConfig(r=4, sparsity=0.05, save_support=save_support), tiny_llama())
    set_peft_model_state_dict(injected, load_file(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(injected(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("from_scratch", [False, True])
def test_transformers_load_adapter_loads_a_saved_adapter_bit_exactly(tmp_path, input_ids, from_scratch):
    """Transformers' own `model.load_adapter(path)` (its PEFT integration, no PeftModel) gives the saved model's
    logits to the bit; from scratch into a base with other random weights, which the file's tensors replace."""
    model = get_peft_model(tiny_llama(seed=1), SLTrainConfig(r=4, sparsity=0.05, from_scratch=from_scratch))
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    base = tiny_llama(seed=1 if not from_scratch else 2)
    base.load_adapter(str(tmp_path))
    torch.testing.assert_close(base(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("from_scratch", [False, True])
def test_auto_peft_model_loads_base_and_adapter_by_the_configs_path(tmp_path, input_ids, from_scratch):
    """`AutoPeftModelForCausalLM.from_pretrained(adapter)` loads the base that the adapter config names, then the
    adapter: the saved model's logits to the bit."""
    tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # (PEFT records its path in the config)
    model = get_peft_model(base, SLTrainConfig(r=4, sparsity=0.05, from_scratch=from_scratch))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForCausalLM) and loaded.peft_config["default"].inference_mode
    assert loaded.base_model.model.name_or_path == str(tmp_path / "base")  # (from scratch the file holds every tensor)
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_the_files_supports_are_the_ones_loaded(tmp_path, input_ids):
    """`save_support=True` keeps each layer's support in the file, so that an adapter stays right where the seed, the
    layer names or the random generator would give another one: loading takes the file's, not the regenerated ones."""
    weights = save_adapter(tmp_path)
    tensors = load_file(weights)
    reference = tiny_llama()  # the base's W0 plus each layer's delta, built here from the file's tensors
    layers = {k.removeprefix("base_model.model.").removesuffix(".sltrain_indices"): k.removesuffix("indices")
              for k in tensors if k.endswith(".sltrain_indices")}  # fmt: skip
    assert len(layers) == 14
    for name, key in layers.items():
        d_out, d_in = reference.get_submodule(name).weight.shape
        support = random_support(d_out, d_in, tensors[key + "indices"].numel(), seed=12345)
        assert not torch.equal(support, tensors[key + "indices"])
        tensors[key + "indices"] = support
        S = torch.zeros(d_out * d_in).index_put((support.long(),), tensors[key + "values"]).view(d_out, d_in)
        with torch.no_grad():
            reference.get_submodule(name).weight += (32 / 4) * tensors[key + "B"] @ tensors[key + "A"] + S
    save_file(tensors, weights)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    for name, key in layers.items():
        assert torch.equal(
            loaded.base_model.model.get_submodule(name).sltrain_indices["default"], tensors[key + "indices"]
        )
    torch.testing.assert_close(loaded(input_ids).logits, reference(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_truncated_file(tmp_path):
    weights = save_adapter(tmp_path)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_file_without_tensors(tmp_path):
    weights = save_adapter(tmp_path)
    save_file({}, weights)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' holds no tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_an_adapter_in_a_subfolder(tmp_path, input_ids):
    """`from_pretrained(directory, subfolder=...)`, as PEFT takes it: the file in the subfolder is the one checked
    (and refused when truncated) and loaded, bit-exact."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "sub")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="sub").eval()
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    weights = tmp_path / "sub" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"sub.adapter_model\.safetensors' is truncated or corrupt"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="sub")


def test_pickled_adapter_is_refused_with_the_reason(tmp_path):
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match=r"a pickle written by `save_pretrained\(..., safe_serialization=False\)`"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("hub_holds", ["safetensors", "pickle", "truncated", "offline", "cached pickle"])
def test_an_adapter_from_the_hub_is_checked_as_a_local_one(tmp_path, monkeypatch, hub_holds):
    """A Hub repository id: its `adapter_model.safetensors` is fetched as PEFT would and checked (a repository with a
    pickle only, or a damaged file, is refused before any model is touched); offline and not cached, PEFT reports."""
    import huggingface_hub
    import peft.config
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    model.save_pretrained(tmp_path, safe_serialization="pickle" not in hub_holds)
    weights = tmp_path / "adapter_model.safetensors"
    if hub_holds == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])

    # the Hub, as a local directory (PEFT tells download options from its parameters: they are named here)
    def fetch(repo_id, filename, subfolder=None, revision=None, cache_dir=None, token=None, user_agent=None):
        assert repo_id == "alice/tiny-adapter" and subfolder is None and revision == "v1"
        offline = hub_holds in ("offline", "cached pickle") and filename != "adapter_config.json"  # (config cached)
        if offline and not (hub_holds == "cached pickle" and (tmp_path / filename).is_file()):
            raise LocalEntryNotFoundError("offline, not in the cache")
        if not (tmp_path / filename).is_file():
            raise EntryNotFoundError(f"404: {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(peft.config, "hf_hub_download", fetch)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    messages = {"pickle": r"'alice/tiny-adapter' holds no 'adapter_model.safetensors'; .* 'adapter_model.bin' is",
                "cached pickle": r"no 'adapter_model.safetensors' in the cache but a pickled 'adapter_model.bin'",
                "truncated": "truncated or corrupt"}  # fmt: skip
    if hub_holds in messages:
        with pytest.raises(ValueError, match=messages[hub_holds]):
            SLTrainConfig.from_pretrained("alice/tiny-adapter", revision="v1")
    else:
        assert SLTrainConfig.from_pretrained("alice/tiny-adapter", revision="v1").r == 4


@pytest.mark.parametrize("from_scratch", [False, True])
def test_push_to_hub_uploads_what_from_pretrained_loads_bit_exactly(tmp_path, monkeypatch, input_ids, from_scratch):
    """PEFT's `push_to_hub` (Transformers' mixin: `save_pretrained` into a temporary folder, then one commit) with the
    Hub replaced at `HfApi`'s level: the commit holds safetensors and the config, no pickle, and those files, as a
    folder, load bit-exactly."""
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub.errors import EntryNotFoundError

    commits = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}))

    def no_card(*args, **kwargs):  # a new repository: the mixin then writes its own card
        raise EntryNotFoundError("404: README.md")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(transformers.utils.hub.ModelCard, "load", no_card)
    torch.manual_seed(3)
    model = get_peft_model(tiny_llama(seed=1), SLTrainConfig(r=4, sparsity=0.05, from_scratch=from_scratch)).eval()
    perturb_trainable(model)
    expected = model(input_ids).logits
    model.push_to_hub("alice/tiny-sltrain")

    [(repo_id, files)] = commits
    assert repo_id == "alice/tiny-sltrain"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files.keys()
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    base = tiny_llama(seed=7)  # other weights: from scratch, nothing of the base may survive
    loaded = PeftModel.from_pretrained(base if from_scratch else tiny_llama(seed=1), tmp_path).eval()
    assert torch.equal(loaded(input_ids).logits, expected)


def load(loader: str, base, path):
    """`PeftModel.from_pretrained`, or Transformers' own `load_adapter` (its loader, not PEFT's: `_registration`
    runs SLTrain's checks of the file after it)."""
    if loader == "peft":
        return PeftModel.from_pretrained(base, path)
    base.load_adapter(str(path))
    return base


def refused(loader: str, match: str):
    after = r".*Transformers' `load_adapter` has already put the file's tensors into the model" * (loader != "peft")
    return pytest.raises(ValueError, match=match + after)


LOADERS = ["peft", "transformers"]


@pytest.mark.parametrize("loader", LOADERS)
def test_file_missing_tensors(tmp_path, loader):
    weights = save_adapter(tmp_path)
    tensors = load_file(weights)
    del tensors[next(k for k in tensors if k.endswith("sltrain_B"))]
    save_file(tensors, weights)
    with refused(loader, "lacks 1 tensor"):
        load(loader, tiny_llama(), tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("corruption", ["reversed", "duplicates", "out of range"])
def test_corrupt_support(tmp_path, loader, corruption):
    weights = save_adapter(tmp_path)
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("sltrain_indices"))
    tensors[key] = {"reversed": tensors[key].flip(0).contiguous(), "duplicates": torch.zeros_like(tensors[key]),
                    "out of range": tensors[key] + 10**5}[corruption]  # fmt: skip
    save_file(tensors, weights)
    with refused(loader, "strictly increasing" if corruption != "out of range" else r"outside \[0, "):
        load(loader, tiny_llama(), tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_base_weight_in_a_fine_tuning_file_is_refused(tmp_path, loader):
    """A fine-tuning file holds the adapter (biases with `bias`, `modules_to_save` copies): a base weight added to
    it would overwrite the frozen one without a word (PEFT loads every key the model has)."""
    weights = save_adapter(tmp_path)
    tensors = load_file(weights)
    tensors["base_model.model.model.norm.weight"] = torch.zeros(64)
    save_file(tensors, weights)
    with refused(loader, r"holds 1 tensor\(s\) of the base model's frozen weights, e\.g\. \[.*model\.norm\.weight'\]"):
        load(loader, tiny_llama(), tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_from_scratch_file_missing_base_tensors(tmp_path, loader):
    weights = save_adapter(tmp_path, from_scratch=True)
    tensors = load_file(weights)
    del tensors["base_model.model.model.embed_tokens.weight"]
    save_file(tensors, weights)
    with refused(loader, "embed_tokens"):
        load(loader, tiny_llama(), tmp_path)


def test_an_adapter_built_for_a_load_and_called_before_it_says_so(tmp_path, input_ids):
    """`get_peft_model(..., low_cpu_mem_usage=True)` leaves a fine-tuning adapter on the meta device for a load:
    called before it, the model names the cause (torch's own error names only the meta device)."""
    saved = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    perturb_trainable(saved)
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"Adapter 'default' of this SLTrain layer \(64 -> 64\) has no weights yet"):
        model(input_ids)
    set_peft_model_state_dict(model, get_peft_model_state_dict(saved), low_cpu_mem_usage=True)
    assert torch.equal(model(input_ids).logits, saved(input_ids).logits)


def test_config_on_disk_is_plain_json(tmp_path):
    save_adapter(tmp_path, seed=11)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SLTRAIN" and saved["seed"] == 11 and saved["r"] == 4
    assert isinstance(PeftConfig.from_pretrained(tmp_path), SLTrainConfig)


def test_loading_before_import_names_the_missing_method(tmp_path):
    """PEFT itself reads `peft_type` before any of our code can run: the error is PEFT's KeyError naming SLTRAIN.
    Importing peft_sltrain first (as the README and the model card say) makes the same call work."""
    save_adapter(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(tmp_path)!r})
        except KeyError as error:
            print("KeyError", error)
        import peft_sltrain
        print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["KeyError", "'SLTRAIN'", "SLTrainConfig"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("from_scratch", [False, True])
def test_adapter_without_supports_regenerates_them(tmp_path, input_ids, from_scratch, loader):
    """`save_support=False`: 8 bytes per layer instead of 4 per nonzero; loading regenerates and checks them."""
    config = dict(from_scratch=from_scratch, seed=5)
    with_support = save_adapter(tmp_path / "with", **config)
    without = save_adapter(tmp_path / "without", save_support=False, **config)
    keys = load_file(without).keys()
    assert not any("sltrain_indices" in k for k in keys) and sum("sltrain_fingerprint" in k for k in keys) == 14
    nnz = sum(t.numel() for k, t in load_file(with_support).items() if "sltrain_indices" in k)
    assert with_support.stat().st_size - without.stat().st_size > 4 * nnz - 8 * 14 - 2000  # minus header changes

    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "with").eval()(input_ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(loader, tiny_llama(), tmp_path / "without").eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # the supports are not missing
    assert torch.equal(loaded(input_ids).logits, expected)

    tensors = load_file(without)
    key = next(k for k in tensors if "sltrain_fingerprint" in k)
    tensors[key] = tensors[key] + 1  # as if this PyTorch drew a different support
    save_file(tensors, without)
    with refused(loader, "differs from the one the adapter was trained with"):
        load(loader, tiny_llama(), tmp_path / "without")


def _save_truncated(path):
    """An adapter saved under `path` whose file lacks one tensor; returns the weights file."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05))
    perturb_trainable(model)
    model.save_pretrained(path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[next(k for k in tensors if k.endswith("sltrain_B"))]
    save_file(tensors, weights)
    return weights


def test_transformers_load_adapter_checks_an_adapter_loaded_under_another_name(tmp_path):
    """`model.load_adapter(path, adapter_name="other")`: the wrapper must check the adapter it loaded, not look up
    "default" (which does not exist, and then return without a check)."""
    _save_truncated(tmp_path)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*sltrain_B\.other.*already put the file's tensors"):
        tiny_llama().load_adapter(str(tmp_path), adapter_name="other")


def test_transformers_load_adapter_from_a_subfolder_loads_and_checks_that_file(tmp_path, input_ids):
    """`load_adapter(directory, adapter_kwargs={"subfolder": ...})`: the wrapper re-reads the file for its checks and
    must read it from the same subfolder (without it, a local directory is taken for a Hub id and the load fails)."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05)).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "sub")
    base = tiny_llama()
    base.load_adapter(str(tmp_path), adapter_kwargs={"subfolder": "sub"})
    assert torch.equal(base(input_ids).logits, model(input_ids).logits)
    _save_truncated(tmp_path / "sub")
    with pytest.raises(ValueError, match=r"lacks 1 tensor"):
        tiny_llama().load_adapter(str(tmp_path), adapter_kwargs={"subfolder": "sub"})


@pytest.mark.parametrize("bias", ["sltrain_only", "all"])
def test_an_adapter_with_trained_biases_saves_and_loads_back(tmp_path, bias):
    """A fine-tuning adapter that trains biases holds them in its file; loading must accept them (they are not the
    frozen base weights that `_check_loaded_state_dict` refuses to overwrite) and give the saved model's outputs."""
    model = get_peft_model(tiny_roberta(), SLTrainConfig(r=2, sparsity=0.05, task_type="SEQ_CLS", bias=bias)).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_tensors_that_differ_by_little_are_refused_too(tmp_path):
    """The file's embeddings and head differ by 1e-5 only (an untied model trained briefly): a tied model would still
    keep one and drop the other, so it is refused as for any difference (the check compares exactly)."""
    model = get_peft_model(
        AutoModelForCausalLM.from_config(tiny_llama_config()),
        SLTrainConfig(r=8, sparsity=0.05, alpha=2, from_scratch=True),
    )
    with torch.no_grad():
        head = model.base_model.model.lm_head.weight
        head.copy_(model.base_model.model.model.embed_tokens.weight)
        head[0, 0] += 1e-5
    model.save_pretrained(tmp_path)
    tied = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"different tensors for .*embed_tokens.weight.* ties into one parameter"):
        PeftModel.from_pretrained(tied, tmp_path)


def test_merging_adapters_that_sit_on_different_layers():
    """Two adapters on disjoint layers (`add_adapter` with other `target_modules`): every SLTrain layer then lists the
    active adapter, including those that do not hold it. `merge_adapter()` and `merge_and_unload()` must merge each
    layer's own adapter and skip the one it lacks (the suite merges only adapters that share their layers)."""
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
        SLTrainConfig(r=2, sparsity=0.2, target_modules=["0"]),
    )
    model.add_adapter("other", SLTrainConfig(r=2, sparsity=0.2, target_modules=["1"]))
    perturb_trainable(model, scale=0.1)
    x = torch.randn(3, 8)
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-6)


def test_a_file_saved_without_supports_that_lacks_a_fingerprint_names_it(tmp_path):
    """Such a file holds a fingerprint where a support would be: a missing one is named as the file would hold it,
    not as the support key it stands in for."""
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, save_support=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.mlp.down_proj.sltrain_fingerprint"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        ValueError, match=r"lacks 1 tensor\(s\).*\['base_model.model.model.layers.0.mlp.down_proj.sltrain_fi"
    ):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
