"""torch_dist checkpoints (`model_weights/` with `.metadata`, `__*_*.distcp`, `common.pt`) via megatron-core.

megatron-core's `dist_checkpointing` does the reading and the resharding: each rank describes the slice it
holds as a ShardedTensor (layers stacked on a prepended axis 0, TP split on the rule's axis) and gets exactly
that slice, whatever TP/PP the checkpoint was written with.

Safety: torch's `.metadata` reader calls plain `pickle.load`, and `common.pt` is a pickle too. Before handing
the directory to megatron-core we unpickle both with an allowlist of classes (checkpoint metadata, tensors,
containers); anything else is refused, so loading never runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Dict, Tuple

import torch
import torch.distributed as dist

from nemotron.checkpoint.shards import CheckpointError, ShardSpec, copy_into, shard_specs

PREFIX = "model."  # NeMo's GPT model keeps the MCore module under `model`

_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                         "torch.distributed._shard.sharded_tensor.metadata", "torch.distributed._shard.metadata")
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "bytearray"), ("torch", "Size"), ("torch", "device"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or module.startswith(_SAFE_MODULE_PREFIXES):
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}")


def check_pickles(ckpt_dir: str) -> None:
    """Refuse a checkpoint whose `.metadata` or `common.pt` would unpickle anything beyond plain data."""
    meta = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(meta, "rb") as f:
            _AllowlistUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{meta}: missing (not a torch_dist checkpoint?)") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{meta}: {exc}; this file is not plain checkpoint metadata") from None
    except Exception as exc:
        raise CheckpointError(f"{meta}: unreadable ({type(exc).__name__}: {exc})") from None
    common = os.path.join(ckpt_dir, "common.pt")
    if os.path.exists(common):
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{common}: refused; it holds objects that need arbitrary unpickling "
                                  f"({str(exc).splitlines()[0][:200]})") from None


def _sharded_tensor(spec: ShardSpec, tensor: torch.Tensor, num_layers: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets, prepend = [], 0
    if spec.layer is not None:
        offsets.append((0, spec.layer, num_layers))
        prepend = 1
    if spec.tp_dim is not None:
        offsets.append((spec.tp_dim + prepend, spec.tp_rank, spec.tp_size))
    replica = (0, 0 if spec.tp_dim is not None else spec.tp_rank, 0)
    return ShardedTensor.from_rank_offsets(PREFIX + spec.stacked_name, tensor, *offsets,
                                           replica_id=replica, prepend_axis_num=prepend)


def sharded_state_dict(model, tensors: Dict[str, torch.Tensor] | None = None) -> Dict[str, object]:
    """local name -> ShardedTensor over `tensors` (default: the parameters themselves)."""
    tensors = tensors if tensors is not None else dict(model.named_parameters())
    n = model.cfg.num_layers
    return {name: _sharded_tensor(spec, tensors[name], n) for name, spec in shard_specs(model).items()}


def ensure_process_group() -> None:
    """megatron-core's loader runs collectives; a single process gets a private 1-rank gloo group."""
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def global_shapes(ckpt_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Stacked name (without prefix) -> global shape, read from the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    check_pickles(ckpt_dir)
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: tuple(v.global_shape) for k, v in meta.items()}


@torch.no_grad()
def load(model, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    check_pickles(ckpt_dir)
    ensure_process_group()
    params = dict(model.named_parameters())
    specs = shard_specs(model)
    shapes = global_shapes(ckpt_dir)
    for name, spec in specs.items():
        stored = shapes.get(spec.stacked_name)
        if stored is None:
            raise CheckpointError(f"{ckpt_dir}: tensor {PREFIX}{spec.stacked_name} is missing")
        want = ((model.cfg.num_layers,) if spec.layer is not None else ()) + spec.global_shape
        if tuple(stored) != want:
            raise CheckpointError(f"{ckpt_dir}: tensor {PREFIX}{spec.stacked_name} has global shape "
                                  f"{tuple(stored)}, the model config implies {want}")
    # Read in the checkpoint's dtype (fp32 buffers), then cast into the parameters.
    buffers = {name: torch.empty(p.shape, dtype=torch.float32) for name, p in params.items()}
    try:
        dist_checkpointing.load(sharded_state_dict(model, buffers), ckpt_dir,
                                sharded_strategy=TorchDistLoadShardedStrategy(),
                                validate_access_integrity=False)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt_dir}: megatron-core could not read the checkpoint: "
                              f"{type(exc).__name__}: {str(exc)[:500]}") from None
    for name, param in params.items():
        copy_into(param, buffers[name], specs[name], ckpt_dir)


def save(model, ckpt_dir: str) -> None:
    """Write this model (all ranks call it together) as a torch_dist checkpoint NeMo can read."""
    from megatron.core import dist_checkpointing

    ensure_process_group()
    os.makedirs(ckpt_dir, exist_ok=True)
    tensors = {name: p.detach().cpu() for name, p in model.named_parameters()}
    with _cpu_safe_writer():
        dist_checkpointing.save(sharded_state_dict(model, tensors), ckpt_dir)


class _cpu_safe_writer:
    """megatron-core's writer calls torch.cuda.synchronize/current_device unconditionally; make them no-ops on CPU."""

    def __enter__(self):
        self.saved = None
        if not torch.cuda.is_available():
            self.saved = (torch.cuda.synchronize, torch.cuda.current_device)
            torch.cuda.synchronize = lambda *a, **k: None
            torch.cuda.current_device = lambda: "cpu"  # used as a device= argument
        return self

    def __exit__(self, *exc):
        if self.saved:
            torch.cuda.synchronize, torch.cuda.current_device = self.saved
        return False


def is_torch_dist(ckpt_dir: str) -> bool:
    path = os.path.join(ckpt_dir, "metadata.json")
    if not os.path.isfile(path):
        return os.path.isfile(os.path.join(ckpt_dir, ".metadata"))
    with open(path) as f:
        return json.load(f).get("sharded_backend") == "torch_dist"

