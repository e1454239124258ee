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
            from .policy import POLICIES  # lazy: policy imports torch, config must not (qpass._NO_TORCH)

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


def _probability_closed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise QpassError(f"`{name}` must be a probability in [0, 1]; got {value!r}")


@register_config
@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA (SVD-form LoRA with adaptive rank), with `peft.AdaLoraConfig`'s fields and defaults.

    `init_r` is each site's starting rank; the rank allocator (`qpass.update_and_allocate`) prunes the total
    down to `target_r` per site on average between steps `tinit` and `total_step - tfinal`. `rank_pattern`
    is PEFT's: `{"<module path>.lora_E": [kept?, ...]}` as the allocator leaves it (None before).
    `r` is accepted for PEFT compatibility and ignored, as in PEFT.
    """

    peft_type: ClassVar[str] = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    r: int = 8
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    lora_bias: bool = False
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        _positive_int("init_r", self.init_r)
        _positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise QpassError(f"`target_r` ({self.target_r}) must not exceed `init_r` ({self.init_r}); AdaLoRA only prunes ranks")
        if self.total_step is None:
            raise QpassError("AdaLoRA needs `total_step` (the number of training steps) to schedule its rank budget; set total_step=<steps>")
        _positive_int("total_step", self.total_step)
        _positive_int("deltaT", self.deltaT)
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QpassError(f"`{name}` must be a non-negative integer; got {value!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise QpassError(
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no budgeting phase; "
                "decrease tinit/tfinal or increase total_step"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise QpassError(f"`{name}` must be in (0, 1); got {value!r}")
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise QpassError(f"`orth_reg_weight` must be >= 0; got {self.orth_reg_weight!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha < 0:
            raise QpassError(f"`lora_alpha` must be >= 0 (0 means scaling = r, as in PEFT); got {self.lora_alpha!r}")
        _probability("lora_dropout", self.lora_dropout)
        if self.init_lora_weights not in (True, False):
            raise QpassError(f"`init_lora_weights` must be True or False for AdaLoRA; got {self.init_lora_weights!r}")
        for field_name, neutral in (("use_dora", False), ("use_qalora", False), ("lora_bias", False), ("use_rslora", False),
                                    ("fan_in_fan_out", False), ("bias", "none")):
            if getattr(self, field_name) != neutral:
                raise QpassError(f"`{field_name}={getattr(self, field_name)!r}` does not apply to AdaLoRA; leave it {neutral!r}")
        if self.modules_to_save:
            raise QpassError("`modules_to_save` is not supported by qpass yet; train those modules outside the adapter")
        if self.rank_pattern == {}:
            self.rank_pattern = None
        for key, value in (self.rank_pattern or {}).items():
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (bool, int)) and v in (0, 1) for v in value):
                raise QpassError(f"rank_pattern[{key!r}] must be a list of booleans (PEFT's AdaLoRA mask); got {value!r}")

    def site_mask(self, path: str) -> Optional[list]:
        """This site's kept-rank mask from `rank_pattern` (keys `<path>.lora_E`, optionally `.<adapter>`), or None."""
        for key, value in (self.rank_pattern or {}).items():
            if re.sub(r"\.lora_E(\.[^.]+)?$", "", key) == path:
                return [bool(v) for v in value]
        return None

    def scaling(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)

    def to_peft_dict(self) -> dict:
        out = super().to_peft_dict()
        out["alpha_pattern"] = out.get("alpha_pattern") or {}
        return out


@register_config
@dataclass
class OFTConfig(AdapterConfig):
    """OFT (orthogonal fine-tuning), with `peft.OFTConfig`'s fields and defaults.

    Exactly one of `r` (blocks per layer) and `oft_block_size` is non-zero; r × oft_block_size = in_features
    at every targeted site (qpass raises naming the site instead of silently adjusting the value as PEFT does).
    """

    peft_type: ClassVar[str] = "OFT"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QpassError(f"`{name}` must be a non-negative integer; got {value!r}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise QpassError(
                f"set exactly one of `r` ({self.r}) and `oft_block_size` ({self.oft_block_size}) to a non-zero value "
                "(r × oft_block_size = in_features); e.g. OFTConfig(r=0, oft_block_size=32)"
            )
        _probability_closed("module_dropout", self.module_dropout)
        _positive_number("eps", self.eps)
        _positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.init_weights not in (True, False):
            raise QpassError(f"`init_weights` must be True or False; got {self.init_weights!r}")
        if self.bias != "none":
            raise QpassError(f"`bias={self.bias!r}` is not supported; leave it 'none'")
        if self.fan_in_fan_out:
            raise QpassError("`fan_in_fan_out=True` does not apply to quantized linear layers; leave it False")
        if self.modules_to_save:
            raise QpassError("`modules_to_save` is not supported by qpass yet; train those modules outside the adapter")

    def blocks(self, in_features: int) -> tuple:
        """(number of blocks, block size) at a site with `in_features` inputs, or raise naming what to change."""
        if self.r:
            if in_features % self.r:
                raise QpassError(f"r={self.r} does not divide in_features={in_features}")
            return self.r, in_features // self.r
        if in_features % self.oft_block_size:
            raise QpassError(f"oft_block_size={self.oft_block_size} does not divide in_features={in_features}")
        return in_features // self.oft_block_size, self.oft_block_size

    def to_peft_dict(self) -> dict:
        out = super().to_peft_dict()
        out.pop("rank_pattern", None)  # not OFT fields in PEFT
        out.pop("alpha_pattern", None)
        # PEFT warns on Cayley–Neumann adapters older than 0.18 (it changed the series then); qpass computes the
        # >= 0.18 series, so the file says so.
        out["peft_version"] = "0.18.0"
        return out
