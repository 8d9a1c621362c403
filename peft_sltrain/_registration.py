"""Register SLTrain as a PEFT method: the one place where we reach into PEFT's internals.

`peft.utils.register_peft_method` (peft 0.21) only accepts names that are already members of its `PeftType` enum, and
Python enums cannot be extended through their public API. So we add the member `PeftType.SLTRAIN` by hand, exactly as
`enum` itself stores members, then call PEFT's own registration. Everything else (`get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained`, saving, merging) is PEFT's unmodified code.

If a future PEFT adds an `SLTRAIN` member (or a public way to register new types), the existing member is reused.
"""

from __future__ import annotations

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

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE) is SLTrainConfig:
        return
    register_peft_method(name=NAME.lower(), config_cls=SLTrainConfig, model_cls=SLTrainModel, prefix="sltrain_")
