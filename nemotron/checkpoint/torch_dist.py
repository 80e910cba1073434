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
import re
from typing import Callable, Dict, Optional, Tuple

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


def check_pickles(ckpt_dir: str):
    """Refuse a checkpoint whose `.metadata` or `common.pt` would unpickle anything beyond plain data.

    Returns the unpickled `.metadata` (torch.distributed.checkpoint Metadata)."""
    meta = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(meta, "rb") as f:
            metadata = _AllowlistUnpickler(f).load()
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
                                  f"({_unpickling_reason(exc)})") from None
    return metadata


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights_only error (it names the refused global), without ANSI codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line[:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def check_files(ckpt_dir: str, metadata, wanted=None) -> None:
    """Every byte range `.metadata` points at (for the stacked names in `wanted`, default all) must exist.

    torch's reader would fail deep inside with a message naming neither file nor tensor."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{os.path.join(ckpt_dir, '.metadata')}: no storage index (not torch_dist metadata)")
    sizes: Dict[str, int] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", str(index))
        name = fqn[len(PREFIX):] if fqn.startswith(PREFIX) else fqn
        if wanted is not None and name not in wanted:
            continue
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise CheckpointError(f"{os.path.join(ckpt_dir, '.metadata')}: tensor {fqn} points at an invalid "
                                  f"file name {rel!r}")
        path = os.path.join(ckpt_dir, rel)
        if rel not in sizes:
            sizes[rel] = os.path.getsize(path) if os.path.isfile(path) else -1
        if sizes[rel] < 0:
            raise CheckpointError(f"{path}: missing data file (holds tensor {fqn})")
        end = int(info.offset) + int(info.length)
        if sizes[rel] < end:
            raise CheckpointError(f"{path}: truncated: tensor {fqn} needs bytes {info.offset}..{end} but the "
                                  f"file has {sizes[rel]} bytes")


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


def global_dtypes(ckpt_dir: str) -> Dict[str, torch.dtype]:
    """Stacked name (without prefix) -> stored dtype."""
    from megatron.core import dist_checkpointing

    check_pickles(ckpt_dir)
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v.dtype for k, v in meta.items()}


@torch.no_grad()
def load(model, ckpt_dir: str, progress: Optional[Callable[[int], None]] = None) -> None:
    """Fill this rank's parameters; `progress(n)` is called after each group of n tensors is read.

    One read per stacked tensor (at most 12): a progress bar can move, and the staging buffers (in the stored
    dtype, on the CPU) never hold more than one stacked tensor's shard at a time.
    """
    from megatron.core import dist_checkpointing

    metadata = check_pickles(ckpt_dir)
    ensure_process_group()
    params = dict(model.named_parameters())
    specs = shard_specs(model)
    check_files(ckpt_dir, metadata, {spec.stacked_name for spec in specs.values()})
    meta = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
            for k, v in dist_checkpointing.load_tensors_metadata(ckpt_dir).items()}
    groups: Dict[str, list] = {}  # stacked name -> local parameter names; ranks may differ (PP): no collectives
    for name, spec in specs.items():
        stored = meta.get(spec.stacked_name)
        if stored is None:
            raise CheckpointError(f"{ckpt_dir}: tensor {PREFIX}{spec.stacked_name} is missing")
        want = ((model.cfg.num_layers,) if spec.layer is not None else ()) + spec.global_shape
        if tuple(stored.global_shape) != want:
            raise CheckpointError(f"{ckpt_dir}: tensor {PREFIX}{spec.stacked_name} has global shape "
                                  f"{tuple(stored.global_shape)}, the model config implies {want}")
        groups.setdefault(spec.stacked_name, []).append(name)
    for stacked, names in groups.items():
        # Read in the checkpoint's dtype on the CPU, then cast into the parameters.
        buffers = {name: torch.empty(params[name].shape, dtype=meta[specs[name].stacked_name].dtype)
                   for name in names}
        try:
            sharded = {name: _sharded_tensor(specs[name], buffers[name], model.cfg.num_layers) for name in names}
            _read_shards(sharded, ckpt_dir)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{ckpt_dir}: megatron-core could not read tensor {PREFIX}{stacked}: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from None
        for name in names:
            copy_into(params[name], buffers[name], specs[name], ckpt_dir)
        del buffers
        if progress is not None:
            progress(len(names))


def _read_shards(sharded: Dict[str, object], ckpt_dir: str) -> None:
    """Fill the ShardedTensors' local tensors in place. megatron-core translates them and plans the resharding
    reads; each rank then reads its own slices with no collectives (`no_dist`): ranks of different pipeline
    stages hold different tensors, so any collective inside a per-tensor load would pair up wrongly and hang."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed import checkpoint as dcp

    state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded)
    pyt_state = mcore_torch.mcore_to_pyt_state_dict(state, True)
    planner = mcore_torch.MCoreLoadPlanner(shapes_validation_sharded_tensors=list(sharded.values()),
                                           allow_shape_mismatch_sharded_tensors={})
    dcp.load(pyt_state, storage_reader=mcore_torch._get_filesystem_reader(ckpt_dir), planner=planner,
             no_dist=True)


def save(model, ckpt_dir: str) -> None:
    """Write this model (all ranks call it together) as a torch_dist checkpoint NeMo can read."""
    from megatron.core import dist_checkpointing

    ensure_process_group()
    os.makedirs(ckpt_dir, exist_ok=True)
    tensors = {name: p.detach().cpu() for name, p in model.named_parameters()}
    _fork_results_queue()
    with _cpu_safe_writer():
        dist_checkpointing.save(sharded_state_dict(model, tensors), ckpt_dir)


def _fork_results_queue() -> None:
    """megatron-core's writer collects results through a Manager queue started with the *spawn* method: the
    server re-imports the caller's __main__ (seconds; a crash for stdin/interactive callers, a hang without an
    `if __name__ == "__main__"` guard). A fork-started Manager serves the same queue without re-importing."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None and "fork" in mp.get_all_start_methods():
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


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

