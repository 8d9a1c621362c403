"""`SLTrainConfig` validation, serialisation and registration with PEFT."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

from peft_sltrain import SLTrainConfig, SLTrainModel
from peft_sltrain._registration import register


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"r": 0}, "`r`"),
        ({"r": -3}, "`r`"),
        ({"r": 2.5}, "`r`"),
        ({"sparsity": 0.0}, "`sparsity`"),
        ({"sparsity": 1.0}, "`sparsity`"),
        ({"sparsity": -0.1}, "`sparsity`"),
        ({"alpha": 0}, "`alpha`"),
        ({"alpha": -1.0}, "`alpha`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": True}, "`seed`"),  # a bool is an int to Python, not a seed
        ({"alpha": True}, "`alpha`"),
        ({"bias": "lora_only"}, "`bias`"),
        ({"from_scratch": "yes"}, "`from_scratch`"),
        ({"from_scratch": True, "modules_to_save": ["lm_head"]}, "`modules_to_save`"),
        ({"from_scratch": True, "modules_to_save": "lm_head"}, "`modules_to_save`"),
        ({"from_scratch": True, "task_type": "SEQ_CLS"}, "`task_type`"),
        ({"from_scratch": True, "task_type": "QUESTION_ANS"}, "`task_type`"),
        ({"alpha": float("inf")}, "`alpha`"),
        ({"alpha": float("nan")}, "`alpha`"),
        ({"target_modules": 5}, "`target_modules`"),
        ({"target_modules": ["q_proj", 3]}, "`target_modules`"),
        ({"exclude_modules": {"q_proj": 1}}, "`exclude_modules`"),
        ({"layers_to_transform": -1}, "`layers_to_transform`"),
        ({"layers_to_transform": [0, "1"]}, "`layers_to_transform`"),
        ({"target_modules": "all-linear", "layers_to_transform": [1]}, "`layers_to_transform`"),
        ({"layers_pattern": "layers"}, "`layers_pattern`"),
        ({"layers_to_transform": [1], "layers_pattern": 3}, "`layers_pattern`"),
        ({"modules_to_save": 5}, "`modules_to_save`"),
        ({"save_support": "no"}, "`save_support`"),
        ({"modules_to_save": ["classifier", 5]}, "`modules_to_save`"),
    ],
)
def test_bad_values_raise_naming_parameter_and_value(kwargs, param):
    with pytest.raises(ValueError) as error:
        SLTrainConfig(**kwargs)
    message = str(error.value)
    assert param in message
    assert repr(list(kwargs.values())[-1]) in message


@pytest.mark.parametrize(
    "field, value",
    [("alpha", float("nan")), ("r", True), ("sparsity", 1.5), ("seed", -2), ("target_modules", 5)],
)
def test_a_field_changed_after_construction_is_checked_when_the_adapter_is_added(field, value):
    config = SLTrainConfig(r=2, target_modules=["fc"])
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"`{field}` must be .*, got {value!r}"):
        get_peft_model(torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(16, 8))), config)


def test_a_modules_to_save_name_set_after_construction_is_one_name():
    """PEFT would take a string's letters for module names (`"l"` matches a whole LLaMA's `model`)."""
    config = SLTrainConfig(r=2, target_modules=["fc"])
    config.modules_to_save = "head"
    model = get_peft_model(
        torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(16, 8), head=torch.nn.Linear(8, 2))), config
    )
    assert config.modules_to_save == ["head"]
    assert [n for n, p in model.named_parameters() if p.requires_grad and "sltrain" not in n] == [
        "base_model.model.head.modules_to_save.default.weight", "base_model.model.head.modules_to_save.default.bias"
    ]  # fmt: skip


def test_numpy_numbers_are_taken_as_python_numbers(tmp_path):
    """A sweep's ranks often come from numpy; the config stays JSON-serialisable."""
    np = pytest.importorskip("numpy")
    config = SLTrainConfig(r=np.int64(4), sparsity=np.float32(0.25), alpha=np.int32(8), seed=np.uint8(3))
    assert (config.r, config.sparsity, config.alpha, config.seed) == (4, 0.25, 8, 3)
    assert [type(v) for v in (config.r, config.sparsity, config.alpha, config.seed)] == [int, float, int, int]
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).r == 4
    with pytest.raises(ValueError, match=r"`r` must be a positive integer, got np.True_"):
        SLTrainConfig(r=np.bool_(True))


def test_defaults_follow_the_paper():
    config = SLTrainConfig()
    assert (config.r, config.sparsity, config.alpha, config.from_scratch) == (128, 0.03, 32.0, False)
    assert config.scaling == 0.25
    assert config.peft_type == PeftType.SLTRAIN == "SLTRAIN"


def test_what_is_accepted_and_normalised():
    assert SLTrainConfig(modules_to_save="lm_head").modules_to_save == ["lm_head"]  # one name, not its letters
    assert SLTrainConfig(target_modules=["q_proj", "v_proj"]).target_modules == {"q_proj", "v_proj"}
    assert SLTrainConfig(target_modules="all-linear", exclude_modules="lm_head").target_modules == "all-linear"
    assert SLTrainConfig(from_scratch=True, task_type="CAUSAL_LM").from_scratch  # adds no head copy


def test_every_field_is_documented_in_docstring_and_help():
    own = {f.name for f in dataclasses.fields(SLTrainConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    for field in dataclasses.fields(SLTrainConfig):
        if field.name in own:
            assert field.metadata.get("help"), field.name
            assert f"{field.name} (`" in SLTrainConfig.__doc__, field.name


def test_save_and_load_config_round_trip(tmp_path):
    config = SLTrainConfig(r=8, sparsity=0.1, alpha=4, target_modules=["q_proj"], seed=7, from_scratch=True)
    config.save_pretrained(tmp_path)
    for loader in (PeftConfig, SLTrainConfig):
        # SLTrainConfig.from_pretrained also checks the weights file, which a bare config directory lacks
        if loader is SLTrainConfig:
            with pytest.raises(ValueError, match=r"No SLTrain adapter weights.*use `peft.PeftConfig.from_pretrained`"):
                loader.from_pretrained(tmp_path)
            continue
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, SLTrainConfig)
        assert loaded.to_dict() == config.to_dict()


def test_registered_with_peft_and_registration_is_idempotent():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SLTRAIN"] is SLTrainConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SLTRAIN"] is SLTrainModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SLTRAIN"] == "sltrain_"
    assert PeftType("SLTRAIN") is PeftType.SLTRAIN and PeftType.SLTRAIN in list(PeftType)
    register()  # a second import path must not fail
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SLTRAIN"] is SLTrainConfig


@pytest.mark.parametrize("layers", [True, [0, True], [False]])
def test_bools_are_not_layer_indices(layers):
    """A bool is an int to Python, but not a layer index (`layers_to_transform=True` would mean layer 1)."""
    with pytest.raises(ValueError, match="`layers_to_transform`"):
        SLTrainConfig(target_modules=["q_proj"], layers_to_transform=layers)
