"""ModelConfig <-> the JSON-able dict a checkpoint saves as the model's identity, with a format version.

    {"version": 2, "gpt": {...GPTConfig...}, "moe": {...MoEConfig...} or null, "seed": 1234}

Version 1 (before this module) saved GPTConfig's fields plus "num_experts" beside the training
flags; training/checkpoint.py upgrades those from the saved flags. Fields a checkpoint predates take
their dataclass defaults; a field this code does not know is refused by name.
"""
from __future__ import annotations

import dataclasses

from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.config import ModelConfig
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.mla import MLAConfig
from megatron_ted.model.positions import RopeConfig
from megatron_ted.moe.config import MoEConfig
from megatron_ted.moe.router import RouterConfig

MODEL_CONFIG_VERSION = 2

# the dataclass of each nested field
_NESTED = {ModelConfig: {"gpt": GPTConfig, "moe": MoEConfig},
           GPTConfig: {"attention": AttentionConfig, "rope": RopeConfig, "mla": MLAConfig},
           MoEConfig: {"router": RouterConfig}}


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def model_config_to_dict(config: ModelConfig) -> dict:
    return {"version": MODEL_CONFIG_VERSION, **_plain(dataclasses.asdict(config))}


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config field {where}{unknown[0]} is unknown to this version of megatron_ted")
    kwargs = {}
    for key, value in values.items():
        nested = _NESTED.get(cls, {}).get(key)
        kwargs[key] = (_build(nested, value, f"{where}{key}.") if nested is not None and value is not None
                       else _tuples(value))
    try:
        return cls(**kwargs)
    except TypeError as err:   # a required field missing
        raise ValueError(f"model config {where.rstrip('.') or 'root'}: {err}") from None


def model_config_from_dict(data: dict) -> ModelConfig:
    """The ModelConfig of a saved dict (ValueError naming what is wrong)."""
    version = data.get("version")
    if version != MODEL_CONFIG_VERSION:
        raise ValueError(f"model config format version {version!r} is not {MODEL_CONFIG_VERSION}")
    return _build(ModelConfig, {k: v for k, v in data.items() if k != "version"}, "")
