"""Register SLTrain as a PEFT method: the one place where we reach into PEFT's (and Transformers') internals.

`peft.utils.register_peft_method` (peft 0.21) only accepts names that are already members of its `PeftType` enum, and
Python enums cannot be extended through their public API. So we add the member `PeftType.SLTRAIN` by hand, exactly as
`enum` itself stores members, then call PEFT's own registration. Everything else (`get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained`, saving, merging) is PEFT's unmodified code.

If a future PEFT adds an `SLTRAIN` member (or a public way to register new types), the existing member is reused.

Transformers' own `model.load_adapter(path)` loads a file through its loader, not PEFT's, so SLTrain's checks of the
file (missing or misshapen tensors, corrupt supports, the fingerprints of a file saved without supports) would not
run: `register` wraps it to run them after an SLTrain adapter is loaded (`_checked_load_adapter`).
"""

from __future__ import annotations

import functools

from peft.utils import PeftType

NAME = "SLTRAIN"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    # `type.__setattr__` bypasses EnumType's guard against assigning members; the three tables below are what
    # `PeftType[name]`, `PeftType(name)` and `list(PeftType)` read.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


PEFT_TYPE = _add_peft_type_member(NAME)


def register() -> None:
    """Make `SLTrainConfig` / `SLTrainModel` known to PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import SLTrainConfig
    from .model import SLTrainModel

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE) is not SLTrainConfig:
        register_peft_method(name=NAME.lower(), config_cls=SLTrainConfig, model_cls=SLTrainModel, prefix="sltrain_")
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # a Transformers without its PEFT integration
        return
    if not getattr(PeftAdapterMixin.load_adapter, "_sltrain_checked", False):
        PeftAdapterMixin.load_adapter = _checked_load_adapter(PeftAdapterMixin.load_adapter)


def _checked_load_adapter(load_adapter):
    """Transformers' `load_adapter`, followed, where it loaded an SLTrain adapter, by the checks PEFT's loading runs
    (`model.check_loaded_adapter_file`) on the file's tensors. They come after the load (Transformers puts the adapter
    in place and loads in one call), so a file that fails them leaves its tensors in the model, as the error says."""

    @functools.wraps(load_adapter)
    def checked(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None, *args, **kw):
        from peft.utils import load_peft_weights

        from .config import SLTrainConfig
        from .model import check_loaded_adapter_file

        info = load_adapter(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kw)
        name = adapter_name or "default"
        config = getattr(self, "peft_config", {}).get(name)
        if not isinstance(config, SLTrainConfig):
            return info
        if adapter_state_dict is None:
            hub = kw.get("adapter_kwargs") or {}
            hub = {k: v for k, v in hub.items() if k in ("revision", "token", "subfolder")}  # where the file is
            adapter_state_dict = load_peft_weights(peft_model_id, device="cpu", **hub)
        try:
            check_loaded_adapter_file(self, config, name, adapter_state_dict)
        except ValueError as error:
            raise ValueError(
                f"{error} (Transformers' `load_adapter` has already put the file's tensors into the model: build or "
                "load the base model again.)"
            ) from None
        return info

    checked._sltrain_checked = True
    return checked
