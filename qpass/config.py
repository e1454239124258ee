"""Adapter configs: PEFT's field names and defaults, validated, plus conversion from PEFT's own objects.

Every adapter kind has one config dataclass here; its pattern spec (under `patterns/`) reads it.
`to_config()` turns whatever the user passed (a qpass config, a `peft` config, a dict read from
`adapter_config.json`) into one of these, and every invalid value raises a `QpassError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .errors import QpassError

# PEFT's defaults for `target_modules=None`, for the decoder families a quantized checkpoint usually is.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}

TargetModules = Optional[Union[list, str]]


def _check_targets(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value == "all-linear":
            return
        try:
            re.compile(value)
        except re.error as exc:
            raise QpassError(f"`{name}` is not a valid regular expression ({exc}); pass a list of module names or a regex") from exc
        return
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return
    raise QpassError(
        f"`{name}` must be a list of module names, a regex string or 'all-linear'; got {type(value).__name__}: {value!r}"
    )


@dataclass
class AdapterConfig:
    """Fields every adapter kind shares (PEFT's names)."""

    peft_type: ClassVar[str] = ""
    target_modules: TargetModules = None
    exclude_modules: TargetModules = None
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    # qpass's own: override the spec's dtype policy ("adapter", "adapter-unless-autocast", "float32").
    dtype_policy: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.dtype_policy is not None:
            from .policy import POLICIES

            if self.dtype_policy not in POLICIES:
                raise QpassError(f"`dtype_policy` must be one of {sorted(POLICIES)}; got {self.dtype_policy!r}")
        self.validate()

    def validate(self) -> None:  # overridden per kind
        pass

    def pattern_value(self, pattern: dict, path: str, default):
        """PEFT's per-module override: the first key of `pattern` that matches the end of `path`."""
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    def for_site(self, path: str) -> "AdapterConfig":
        """This config with per-module patterns (rank_pattern, alpha_pattern) resolved for `path`."""
        return self

    def to_peft_dict(self) -> dict:
        """The fields PEFT's `adapter_config.json` carries, plus `peft_type`."""
        out = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            if f.name == "dtype_policy":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QpassError(f"`{name}` must be a positive integer; got {value!r}")


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise QpassError(f"`{name}` must be a positive number; got {value!r}")


def _probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise QpassError(f"`{name}` must be a probability in [0, 1); got {value!r}")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (and its variants rsLoRA, lora_bias, QA-LoRA), with `peft.LoraConfig`'s fields and defaults."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        _positive_int("r", self.r)
        _positive_number("lora_alpha", self.lora_alpha)
        _probability("lora_dropout", self.lora_dropout)
        for key, value in self.rank_pattern.items():
            _positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _positive_number(f"alpha_pattern[{key!r}]", value)
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise QpassError(
                f"`init_lora_weights={self.init_lora_weights!r}` is not supported by qpass; use True, False or 'gaussian' "
                "(data-driven initialisations such as PiSSA, OLoRA, LoftQ or EVA need the dense weight)"
            )
        if self.bias != "none":
            raise QpassError(f"`bias={self.bias!r}` is not supported; leave it 'none' (use `lora_bias=True` for a trainable LoRA bias)")
        if self.fan_in_fan_out:
            raise QpassError("`fan_in_fan_out=True` does not apply to quantized linear layers; leave it False")
        if self.modules_to_save:
            raise QpassError("`modules_to_save` is not supported by qpass yet; train those modules outside the adapter")
        _positive_int("qalora_group_size", self.qalora_group_size)

    def for_site(self, path: str) -> "LoraConfig":
        r = self.pattern_value(self.rank_pattern, path, self.r)
        alpha = self.pattern_value(self.alpha_pattern, path, self.lora_alpha)
        if r == self.r and alpha == self.lora_alpha:
            return self
        return dataclasses.replace(self, r=r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})


CONFIG_TYPES: dict[str, type] = {"LORA": LoraConfig}


def register_config(cls: type) -> type:
    """Make a config class known by its `peft_type` (used when reading adapter_config.json)."""
    CONFIG_TYPES[cls.peft_type] = cls
    return cls


def from_dict(data: dict, *, source: str = "config") -> AdapterConfig:
    """A qpass config from PEFT's dict form; unknown PEFT fields are dropped if they hold their neutral value."""
    peft_type = str(data.get("peft_type", "")).upper().replace("PEFTTYPE.", "")
    cls = CONFIG_TYPES.get(peft_type)
    if cls is None:
        raise QpassError(
            f"{source}: peft_type {data.get('peft_type')!r} is not supported by qpass; supported: {sorted(CONFIG_TYPES)}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    ignored = {k: v for k, v in data.items() if k not in names and k != "peft_type"}
    for key, value in ignored.items():
        if _is_active_unsupported(key, value):
            raise QpassError(f"{source}: field `{key}={value!r}` asks for a feature qpass does not implement; unset it")
    return cls(**kwargs)


# PEFT fields qpass does not implement; they are harmless when they hold these neutral values.
_NEUTRAL = (None, False, "", [], {}, 0, "none")
_ALWAYS_IGNORED = {
    "revision", "auto_mapping", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "layer_replication", "runtime_config", "lora_ga_config", "peft_version",
    "trainable_token_indices", "target_parameters", "arrow_config", "ensure_weight_tying",
    "use_bdlora", "alora_invocation_tokens",
}


def _is_active_unsupported(key: str, value: Any) -> bool:
    if key in _ALWAYS_IGNORED:
        return False
    try:
        return value not in _NEUTRAL
    except Exception:
        return True


def to_config(adapter: Any) -> AdapterConfig:
    """Accept a qpass config, or a PEFT config object (duck-typed: it has `to_dict()` and `peft_type`)."""
    if isinstance(adapter, AdapterConfig):
        return adapter
    if hasattr(adapter, "peft_type") and hasattr(adapter, "to_dict"):
        data = adapter.to_dict()
        data["peft_type"] = getattr(adapter.peft_type, "value", adapter.peft_type)
        return from_dict(data, source=f"{type(adapter).__name__}")
    raise QpassError(
        f"adapter must be a qpass config (e.g. qpass.LoraConfig), a peft config, or the path of a PEFT adapter "
        f"directory; got {type(adapter).__name__}"
    )
