"""Configuration of one Nemotron-H tower (hybrid Mamba-2 / attention / MoE / MLP).

The field names follow transformers' ``NemotronHConfig`` so that a ``config.json`` written by
transformers, by NVIDIA's releases or by this library reads the same way. The layer pattern string
(one character a layer) is the single source of layer types:

    M  Mamba-2 mixer      *  attention      E  mixture of experts      -  dense MLP
"""

from __future__ import annotations

import dataclasses
import logging
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MOE, MLP)

# transformers spells layer types as words in `layers_block_type`; older configs used other words.
_BLOCK_TYPE_TO_SYMBOL = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}
_SYMBOL_TO_BLOCK_TYPE = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}

# Legacy key names found in early Nemotron-H configs, mapped to the current ones.
_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "mamba_d_head": "mamba_head_dim",
    "mamba_n_heads": "mamba_num_heads",
    "num_local_experts": "n_routed_experts",
}

# Token ids of the released tokenizer. No config field of the release stores the mask id.
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, MASK_TOKEN_ID = 0, 1, 2, 3


@dataclass
class NemotronHConfig:
    """Hyperparameters of one tower; both towers of a two-tower model share one config."""

    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False

    # Attention (grouped-query, no positional encoding).
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 262144

    # Mamba-2.
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    expand: int = 2

    # Mixture of experts.
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5

    # Dense MLP.
    intermediate_size: int = 1856
    mlp_bias: bool = False

    initializer_range: float = 0.02
    pad_token_id: int = PAD_TOKEN_ID
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    mask_token_id: int = MASK_TOKEN_ID

    # Keys of a loaded config.json that this library does not use, kept so that saving writes them back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.validate()

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> list[str]:
        return list(self.hybrid_override_pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    def layer_indices(self, symbol: str) -> list[int]:
        return [i for i, s in enumerate(self.hybrid_override_pattern) if s == symbol]

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and the rule it breaks."""

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"NemotronHConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        for name in ("tie_word_embeddings", "attention_bias", "use_conv_bias", "use_bias", "norm_topk_prob", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "expected true or false")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "Nemotron-H has an untied lm_head; tied embeddings are not supported")

        pattern = self.hybrid_override_pattern
        if not isinstance(pattern, str) or not pattern:
            fail("hybrid_override_pattern", "expected a non-empty string of the characters M * E -")
        bad = sorted({s for s in pattern if s not in LAYER_SYMBOLS})
        if bad:
            fail("hybrid_override_pattern", f"contains {bad}; allowed layer characters are M * E -")

        for name in (
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
            "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "intermediate_size", "n_group", "topk_group", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "expected a positive integer")

        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.mamba_num_heads % self.n_groups:
            fail("n_groups", f"must divide mamba_num_heads={self.mamba_num_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be at most n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be at most n_group={self.n_group}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            fail("n_group", "grouped routing scores each group by its top-2 experts, so groups need >= 2 experts")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            fail("num_experts_per_tok", "exceeds the experts available in topk_group groups")
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int) or self.moe_latent_size < 1):
            fail("moe_latent_size", "expected a positive integer or null")
        if self.moe_shared_expert_intermediate_size < 0:
            fail("moe_shared_expert_intermediate_size", "expected >= 0 (0 disables the shared expert)")
        for name in ("layer_norm_epsilon", "routed_scaling_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, "expected a positive number")
        if len(self.time_step_limit) != 2 or not 0.0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            fail("time_step_limit", "expected [low, high] with 0 <= low <= high (high may be Infinity)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                fail(name, f"expected a token id in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "NemotronHConfig":
        """Build a config from a ``config.json`` dictionary (transformers, NVIDIA or ours)."""
        if not isinstance(raw, dict):
            raise ValueError(f"a model config must be a JSON object (a dict), got {type(raw).__name__}")
        data = dict(raw)
        for old, new in _LEGACY_KEYS.items():
            if old in data:
                value = data.pop(old)
                data.setdefault(new, value)

        block_types = data.pop("layers_block_type", None)
        if block_types is not None and "hybrid_override_pattern" not in data:
            if not isinstance(block_types, list):
                raise ValueError(f"config field layers_block_type={block_types!r} is invalid: expected a list")
            unknown = sorted({b for b in block_types if b not in _BLOCK_TYPE_TO_SYMBOL})
            if unknown:
                raise ValueError(
                    f"config field layers_block_type contains {unknown}; "
                    f"allowed values are {sorted(_BLOCK_TYPE_TO_SYMBOL)}"
                )
            data["hybrid_override_pattern"] = "".join(_BLOCK_TYPE_TO_SYMBOL[b] for b in block_types)

        eos = data.get("eos_token_id")
        if isinstance(eos, list):
            data["eos_token_id"] = eos[0]
            data.setdefault("extra_eos_token_ids", eos[1:])
        limit = data.get("time_step_limit")
        if limit is not None:
            data["time_step_limit"] = tuple(_parse_float("time_step_limit", v) for v in limit)

        layers = data.get("num_hidden_layers")
        pattern = data.get("hybrid_override_pattern")
        if isinstance(layers, int) and isinstance(pattern, str) and layers != len(pattern):
            # transformers also derives the layer count from the pattern and only warns.
            logger.warning(
                "config field num_hidden_layers=%d does not match hybrid_override_pattern, which has %d layers; "
                "using the pattern", layers, len(pattern)
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        if "moe_latent_size" in data:
            kwargs["moe_latent_size"] = data["moe_latent_size"]
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "NemotronHConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            # Python's json reads `Infinity`, which NVIDIA's configs use in time_step_limit.
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from error
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "NemotronHConfig":
        return cls.from_json_file(Path(directory) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        """Return a ``config.json`` dictionary that transformers' ``nemotron_h`` also reads."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.pop("extra_eos_token_ids", None)
        out["time_step_limit"] = list(self.time_step_limit)
        out["num_hidden_layers"] = self.num_hidden_layers
        out["mamba_hidden_act"] = "silu"
        out["mlp_hidden_act"] = "relu2"
        out.setdefault("model_type", "nemotron_h")
        out.setdefault("architectures", ["NemotronHForCausalLM"])
        return out

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data.update(extra or {})
        path = directory / "config.json"
        # json writes float("inf") as `Infinity`, the spelling NVIDIA's configs use.
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    def replace(self, **changes: Any) -> "NemotronHConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets

    @classmethod
    def nemotron_30b_a3b(cls) -> "NemotronHConfig":
        """Return the released Nemotron-3-Nano-30B-A3B / TwoTower-30B-A3B layer sizes (52 layers)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "NemotronHConfig":
        """Return a config of a few hundred thousand parameters for tests: all four layer types, grouped routing."""
        values: dict[str, Any] = dict(
            vocab_size=256,
            hidden_size=64,
            hybrid_override_pattern="ME*-M*E",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=8,
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            n_group=2,
            topk_group=2,
            routed_scaling_factor=2.5,
            intermediate_size=96,
            max_position_embeddings=4096,
        )
        values.update(overrides)
        return cls(**values)


def _parse_float(name: str, value: Any) -> float:
    """Read a float written as a number, as ``"Infinity"``, or as transformers 5 writes it: ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name} contains {value!r}; expected a number or 'Infinity'") from None


def block_type_name(symbol: str) -> str:
    """Return the word for a layer symbol (``M`` -> ``mamba``)."""
    return _SYMBOL_TO_BLOCK_TYPE[symbol]
