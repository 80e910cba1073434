"""Name and layout mapping between MCore (NeMo) and Hugging Face NemotronForCausalLM state dicts.

The only non-trivial part is linear_qkv: MCore stores, per query group, its query heads then one K head and
one V head; HF stores q_proj (all query heads in order), k_proj and v_proj separately.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from nemotron.config import ModelConfig

# MCore suffix (per layer) -> HF suffix; linear_qkv.weight is special-cased.
_LAYER_MAP = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.up_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig):
    """[ (nh + 2 ng) hn, h ] in MCore order -> q [nh hn, h], k [ng hn, h], v [ng hn, h]."""
    ng, hpg, hn = qkv.shape[0] // ((cfg.heads_per_group + 2) * cfg.kv_channels), cfg.heads_per_group, cfg.kv_channels
    grouped = qkv.view(ng, hpg + 2, hn, -1)
    q = grouped[:, :hpg].reshape(ng * hpg * hn, -1)
    return q, grouped[:, hpg].reshape(ng * hn, -1), grouped[:, hpg + 1].reshape(ng * hn, -1)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of split_qkv; also works on a slice of whole groups."""
    hpg, hn = cfg.heads_per_group, cfg.kv_channels
    ng = k.shape[0] // hn
    grouped = torch.cat([q.view(ng, hpg, hn, -1), k.view(ng, 1, hn, -1), v.view(ng, 1, hn, -1)], dim=1)
    return grouped.reshape(ng * (hpg + 2) * hn, -1)


def mcore_to_hf(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name in _GLOBAL_MAP:
            out[_GLOBAL_MAP[name]] = tensor
            continue
        m = _MCORE_LAYER.match(name)
        if not m:
            raise KeyError(f"unexpected MCore tensor {name}")
        layer, suffix = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{layer}."
        if suffix == "self_attention.linear_qkv.weight":
            q, k, v = split_qkv(tensor, cfg)
            out[prefix + "self_attn.q_proj.weight"] = q.contiguous()
            out[prefix + "self_attn.k_proj.weight"] = k.contiguous()
            out[prefix + "self_attn.v_proj.weight"] = v.contiguous()
        elif suffix in _LAYER_MAP:
            out[prefix + _LAYER_MAP[suffix]] = tensor
        else:
            raise KeyError(f"unexpected MCore tensor {name}")
    return out


def hf_name(mcore_name: str) -> str:
    """HF name of an MCore tensor (for linear_qkv: the q_proj name; k/v are beside it)."""
    if mcore_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[mcore_name]
    m = _MCORE_LAYER.match(mcore_name)
    if not m:
        raise KeyError(mcore_name)
    suffix = m.group(2)
    target = "self_attn.q_proj.weight" if suffix == "self_attention.linear_qkv.weight" else _LAYER_MAP[suffix]
    return f"model.layers.{m.group(1)}.{target}"


def hf_to_mcore(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for mcore, hf in _GLOBAL_MAP.items():
        out[mcore] = state[hf]
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        out[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"] = merge_qkv(
            state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"],
            state[p + "self_attn.v_proj.weight"], cfg)
        for suffix, hf in _LAYER_MAP.items():
            out[f"decoder.layers.{layer}.{suffix}"] = state[p + hf]
    return out
