"""Helpers to build Hugging Face NemotronForCausalLM from our config and MCore-named weights (the numerical
reference)."""
from __future__ import annotations

import torch

from nemotron.checkpoint.hf_names import mcore_to_hf
from nemotron.config import ModelConfig, to_hf_config


def hf_model(cfg: ModelConfig, mcore_state: dict, dtype=torch.float32):
    from transformers import NemotronConfig, NemotronForCausalLM

    hf_cfg = NemotronConfig(**{k: v for k, v in to_hf_config(cfg).items()
                               if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    model = NemotronForCausalLM(hf_cfg).to(dtype).eval()
    missing, unexpected = model.load_state_dict(mcore_to_hf(mcore_state, cfg), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def random_mcore_state(cfg: ModelConfig, seed: int = 0, std: float = 0.08) -> dict:
    """Seeded random weights with MCore names (single rank, full tensors); LayerNorm1p weights near 0."""
    from nemotron.model import NemotronModel

    g = torch.Generator().manual_seed(seed)
    model = NemotronModel(cfg)
    state = {}
    for name, p in model.named_parameters():
        if "layer_norm_weight" in name or "final_layernorm.weight" in name:
            value = torch.randn(p.shape, generator=g) * 0.1
        elif "layer_norm_bias" in name or "final_layernorm.bias" in name:
            value = torch.randn(p.shape, generator=g) * 0.05
        else:
            value = torch.randn(p.shape, generator=g) * std
        state[name] = value
    return state
