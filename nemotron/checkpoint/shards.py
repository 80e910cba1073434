"""What each local parameter is in the global checkpoint: its global name, global shape and TP split.

Every checkpoint reader answers the same question — "give me this rank's slice of global tensor X" — so the
model never knows which format it was loaded from. Names are MCore's, without NeMo's `model.` prefix, with the
*global* layer index.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Which dimension tensor parallelism splits, by the parameter's name suffix (None: replicated on every rank).
_TP_DIM = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.layer_norm_weight": None,
    "self_attention.linear_qkv.layer_norm_bias": None,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.layer_norm_weight": None,
    "mlp.linear_fc1.layer_norm_bias": None,
    "mlp.linear_fc2.weight": 1,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.final_layernorm.weight": None,
    "decoder.final_layernorm.bias": None,
}


@dataclass(frozen=True)
class ShardSpec:
    name: str                      # global MCore name, e.g. decoder.layers.7.mlp.linear_fc1.weight
    global_shape: Tuple[int, ...]
    tp_dim: Optional[int]
    tp_rank: int
    tp_size: int

    @property
    def layer(self) -> Optional[int]:
        m = _LAYER.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def stacked_name(self) -> str:
        """The name with the layer index dropped, as torch_dist and zarr store layers stacked on axis 0."""
        m = _LAYER.match(self.name)
        return f"decoder.layers.{m.group(2)}" if m else self.name

    @property
    def suffix(self) -> str:
        m = _LAYER.match(self.name)
        return m.group(2) if m else self.name

    def slices(self) -> Tuple[slice, ...]:
        """This rank's region of the global tensor."""
        out = [slice(0, n) for n in self.global_shape]
        if self.tp_dim is not None:
            size = self.global_shape[self.tp_dim] // self.tp_size
            out[self.tp_dim] = slice(self.tp_rank * size, (self.tp_rank + 1) * size)
        return tuple(out)

    @property
    def local_shape(self) -> Tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices())


def global_name(model, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if m:
        return f"decoder.layers.{int(m.group(1)) + model.layer_offset}.{m.group(2)}"
    return local_name


def shard_specs(model) -> Dict[str, ShardSpec]:
    """local parameter name -> ShardSpec, for every parameter of this stage/rank."""
    ps = model.ps
    specs = {}
    for local_name, param in model.named_parameters():
        name = global_name(model, local_name)
        suffix = _LAYER.match(name).group(2) if _LAYER.match(name) else name
        if suffix not in _TP_DIM:
            raise KeyError(f"no shard rule for parameter {name}")
        tp_dim = _TP_DIM[suffix]
        shape = list(param.shape)
        if tp_dim is not None:
            shape[tp_dim] *= ps.tp_size
        specs[local_name] = ShardSpec(name, tuple(shape), tp_dim, ps.tp_rank, ps.tp_size)
    return specs


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and, where known, the tensor."""


def read_json_object(path: str, what: str = "") -> dict:
    """The JSON object stored at `path`, or a CheckpointError naming the file (and `what`, e.g. the tensor it
    describes) when it is missing, unreadable or not an object."""
    about = f" ({what})" if what else ""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing{about}") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON{about}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object{about}")
    return data


@torch.no_grad()
def copy_into(param: torch.Tensor, value: torch.Tensor, spec: ShardSpec, source: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise CheckpointError(f"{source}: tensor {spec.name} has shape {tuple(value.shape)} for this rank, "
                              f"expected {tuple(param.shape)} (global {spec.global_shape})")
    if not torch.isfinite(value.float()).all():
        raise CheckpointError(f"{source}: tensor {spec.name} holds NaN or infinite values")
    param.copy_(value)


@torch.no_grad()
def fill_from_full_state(model, state: Dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Fill this rank's shard from full (unsharded) MCore-named tensors, e.g. a reference or seeded weights."""
    params = dict(model.named_parameters())
    for local, spec in shard_specs(model).items():
        if spec.name not in state:
            raise CheckpointError(f"{source}: tensor {spec.name} is missing")
        full = state[spec.name]
        if tuple(full.shape) != spec.global_shape:
            raise CheckpointError(f"{source}: tensor {spec.name} has shape {tuple(full.shape)}, "
                                  f"expected {spec.global_shape}")
        copy_into(params[local], full[spec.slices()], spec, source)
