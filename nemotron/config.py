"""Model configuration: one dataclass, read from NeMo's model_config.yaml or a Hugging Face config.json.

Only the Nemotron-4 recipe is served (squared-ReLU MLP without gate, LayerNorm1p, partial RoPE, no linear biases,
untied output layer). Anything else is refused with a message naming the offending key, so a wrong checkpoint
fails at load time instead of producing fluent garbage.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


class ConfigError(ValueError):
    """A model configuration we cannot serve; the message names the key."""


def env_switch(name: str, choices: Sequence[str], default: str) -> str:
    """The environment switch `name` (`default` when unset); any value outside `choices` is a ConfigError naming
    the variable, the value and the choices."""
    value = os.environ.get(name, default)
    if value not in choices:
        expected = f"{', '.join(choices[:-1])} or {choices[-1]}"
        raise ConfigError(f"{name}={value!r}: expected {expected}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dim; may differ from hidden/heads (Minitron-8B: 48 x 128 != 4096)
    padded_vocab_size: int  # rows of the embedding and output layer
    max_position_embeddings: int
    rotary_percentage: float = 0.5
    rotary_base: float = 10000.0
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = True  # "layernorm1p": y = norm(x) * (1 + w) + b
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "kv_channels", "padded_vocab_size", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_query_groups ({self.num_query_groups})")
        if not 0.0 < self.rotary_percentage <= 1.0:
            raise ConfigError(f"rotary_percentage must be in (0, 1], got {self.rotary_percentage}")
        if self.rotary_dim % 2:
            raise ConfigError(f"kv_channels * rotary_percentage must be even, got {self.rotary_dim}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_percentage)

    @property
    def qkv_rows(self) -> int:
        """Rows of linear_qkv: per query group, its query heads then one K and one V head."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def num_parameters(self) -> int:
        h, layers = self.hidden_size, self.num_layers
        per_layer = (self.qkv_rows * h + self.num_attention_heads * self.kv_channels * h
                     + 2 * h * self.ffn_hidden_size + 4 * h)
        return layers * per_layer + 2 * self.padded_vocab_size * h + 2 * h

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """NeMo's padding: round up to a multiple of make_vocab_size_divisible_by * TP."""
    multiple = max(1, divisible_by) * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# --- NeMo model_config.yaml ---------------------------------------------------------------------------------

def _refuse_unless(cfg: Mapping[str, Any], key: str, allowed: tuple, default: Any) -> Any:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(f"unsupported {key}: {value!r} (Nemotron-4 serving supports {list(allowed)})")
    return value


def from_nemo_config(cfg: Mapping[str, Any], padded_vocab_size: int) -> ModelConfig:
    """Read NeMo's model_config.yaml keys. `padded_vocab_size` comes from the checkpoint's embedding shape."""
    if cfg.get("mcore_gpt") is False:
        raise ConfigError("unsupported mcore_gpt: False (legacy Megatron checkpoints are not supported; "
                          "convert to megatron-core first)")
    _refuse_unless(cfg, "activation", ("squared-relu",), "gelu")
    normalization = _refuse_unless(cfg, "normalization", ("layernorm1p", "layernorm", "LayerNorm"), "layernorm")
    _refuse_unless(cfg, "position_embedding_type", ("rope",), "learned_absolute")
    _refuse_unless(cfg, "bias", (False,), True)
    _refuse_unless(cfg, "share_embeddings_and_output_weights", (False,), True)
    _refuse_unless(cfg, "gated_linear_unit", (False, None), False)
    _refuse_unless(cfg, "num_moe_experts", (None, 0, 1), None)
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int):
        raise ConfigError("model_config.yaml needs integer hidden_size and num_attention_heads")
    kv_channels = cfg.get("kv_channels") or hidden // heads
    zero_centered = normalization == "layernorm1p" or bool(cfg.get("layernorm_zero_centered_gamma", False))
    return ModelConfig(
        num_layers=cfg.get("num_layers"),
        hidden_size=hidden,
        ffn_hidden_size=cfg.get("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_query_groups") or heads,
        kv_channels=kv_channels,
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length"),
        rotary_percentage=float(cfg.get("rotary_percentage", 1.0)),  # NeMo's GPT default is 1.0
        rotary_base=float(cfg.get("rotary_base", 10000)),
        layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
        layernorm_zero_centered_gamma=zero_centered,
        make_vocab_size_divisible_by=int(cfg.get("make_vocab_size_divisible_by", 128)),
    )


def to_nemo_config(cfg: ModelConfig) -> dict:
    """The model_config.yaml keys NeMo's Nemotron-4 checkpoints carry (tokenizer block added by the writer)."""
    return {
        "mcore_gpt": True,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.kv_channels,
        "encoder_seq_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_percentage": cfg.rotary_percentage,
        "rotary_base": cfg.rotary_base,
        "activation": "squared-relu",
        "normalization": "layernorm1p" if cfg.layernorm_zero_centered_gamma else "layernorm",
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "bias": False,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "precision": "bf16",
        "transformer_engine": True,
        "dist_ckpt_format": "torch_dist",
    }


# --- Hugging Face config.json (NemotronConfig) ----------------------------------------------------------------

def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    if hf.get("model_type") != "nemotron":
        raise ConfigError(f"unsupported model_type: {hf.get('model_type')!r} (expected 'nemotron')")
    _refuse_unless(hf, "hidden_act", ("relu2",), "relu2")
    _refuse_unless(hf, "attention_bias", (False,), False)
    _refuse_unless(hf, "mlp_bias", (False,), False)
    _refuse_unless(hf, "tie_word_embeddings", (False,), False)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default",):
        raise ConfigError(f"unsupported rope_parameters.rope_type: {rope.get('rope_type')!r}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        padded_vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_percentage=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        layernorm_epsilon=float(hf.get("norm_eps", 1e-5)),
    )


def to_hf_config(cfg: ModelConfig, bos_id: int = 2, eos_id: int = 3, dtype: str = "bfloat16") -> dict:
    if not cfg.layernorm_zero_centered_gamma:
        raise ConfigError("Hugging Face NemotronForCausalLM only has LayerNorm1p; normalization 'layernorm' "
                          "cannot be exported")
    return {
        "architectures": ["NemotronForCausalLM"],
        "model_type": "nemotron",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": "relu2",
        "max_position_embeddings": cfg.max_position_embeddings,
        "norm_eps": cfg.layernorm_epsilon,
        "vocab_size": cfg.padded_vocab_size,
        "rope_theta": cfg.rotary_base,
        "partial_rotary_factor": cfg.rotary_percentage,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_percentage},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# --- Presets: the real shapes, for benchmarks and docs ------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {
    "nemotron-4-340b": ModelConfig(num_layers=96, hidden_size=18432, ffn_hidden_size=73728, num_attention_heads=96,
                                   num_query_groups=8, kv_channels=192, padded_vocab_size=256000,
                                   max_position_embeddings=4096),
    "nemotron-4-15b": ModelConfig(num_layers=32, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
                                  num_query_groups=8, kv_channels=128, padded_vocab_size=256000,
                                  max_position_embeddings=4096),
    "minitron-8b": ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=48,
                               num_query_groups=8, kv_channels=128, padded_vocab_size=256000,
                               max_position_embeddings=4096),
    "minitron-4b": ModelConfig(num_layers=32, hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=24,
                               num_query_groups=8, kv_channels=128, padded_vocab_size=256000,
                               max_position_embeddings=4096),
    # The shape our H100 peer baseline was measured on (platform-notes.md): Minitron-8B width with 32 heads.
    "bench-8b": ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=32,
                            num_query_groups=8, kv_channels=128, padded_vocab_size=256000,
                            max_position_embeddings=4096),
}


# --- Precision: NeMo's trainer.precision values ---------------------------------------------------------------

_PRECISIONS = {
    "32": torch.float32, "32-true": torch.float32, "fp32": torch.float32,
    "16": torch.float16, "16-mixed": torch.float16, "16-true": torch.float16, "fp16": torch.float16,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
}


def dtype_from_precision(precision: Any) -> torch.dtype:
    key = str(precision)
    if key not in _PRECISIONS:
        raise ConfigError(f"unsupported trainer.precision: {precision!r} (use one of {sorted(_PRECISIONS)})")
    return _PRECISIONS[key]
