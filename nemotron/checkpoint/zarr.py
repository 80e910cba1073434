"""Reader for zarr distributed checkpoints (what megatron-core <= 0.10 wrote; the released Nemotron-4-340B ships these).

megatron-core 0.16.1 can no longer read them, so this is a small reader of our own on numpy; no zarr/tensorstore.

Layout of `model_weights/` (nemo-reference.md §4):

    metadata.json                                   {"sharded_backend": "zarr", ...}
    common.pt                                       not needed for the weights, never read here
    model.decoder.layers.mlp.linear_fc1.weight/     one zarr v2 array per tensor, per-layer tensors stacked on axis 0
        .zarray                                     {"shape", "chunks", "dtype", "compressor": null, ...}
        0.0.0  0.1.0  ...                           one uncompressed chunk per writer shard, named by chunk index
    model.decoder.layers.mlp.linear_fc1._extra_state/shard_0_96.pt   TE fp8 metadata pickles: ignored, never unpickled

A chunk is a C- (or Fortran-) ordered block of `prod(chunks)` items; edge chunks are stored full size. Only the
chunks overlapping this rank's slice are opened, through np.memmap, so a rank reads only its share of the bytes.
bf16 (".zarray" dtype "bfloat16") is read as raw uint16 and reinterpreted as torch.bfloat16.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from nemotron.checkpoint.shards import CheckpointError, ShardSpec, copy_into, read_json_object, shard_specs

PREFIX = "model."
EXTRA_STATE = "._extra_state"

_ALLOWED_KINDS = "fiub"  # float, signed/unsigned int, bool


class ZarrArray:
    """One zarr v2 array on disk (uncompressed). `read(region)` returns a torch tensor of that region."""

    def __init__(self, path: str, tensor: Optional[str] = None):
        self.path = path
        self.tensor = tensor or os.path.basename(path)
        meta_path = os.path.join(path, ".zarray")
        meta = read_json_object(meta_path, f"the zarr array of tensor {self.tensor}")
        self.meta_path = meta_path
        self._parse(meta)

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.meta_path}: tensor {self.tensor}: {what}")

    def _parse(self, meta: dict) -> None:
        if meta.get("zarr_format") != 2:
            raise self._bad(f"unsupported zarr_format {meta.get('zarr_format')!r} (only zarr v2 is supported)")
        if meta.get("compressor") is not None:
            raise self._bad(f"compressed chunks are not supported (compressor {meta['compressor']!r}); "
                            f"megatron-core writes uncompressed zarr")
        if meta.get("filters"):
            raise self._bad(f"zarr filters are not supported ({meta['filters']!r})")
        shape, chunks = meta.get("shape"), meta.get("chunks")
        if (not isinstance(shape, list) or not isinstance(chunks, list) or len(shape) != len(chunks)
                or not all(isinstance(n, int) and n >= 0 for n in shape)
                or not all(isinstance(n, int) and n > 0 for n in chunks)):
            raise self._bad(f"invalid shape {shape!r} / chunks {chunks!r}")
        self.shape, self.chunks = tuple(shape), tuple(chunks)
        order = meta.get("order", "C")
        if order not in ("C", "F"):
            raise self._bad(f"invalid order {order!r}")
        self.order = order
        sep = meta.get("dimension_separator", ".")
        if sep not in (".", "/"):
            raise self._bad(f"invalid dimension_separator {sep!r}")
        self.separator = sep
        dtype = meta.get("dtype")
        self.bfloat16 = dtype == "bfloat16"
        if self.bfloat16:
            self.np_dtype = np.dtype("<u2")  # raw bits, reinterpreted as bf16 after reading
        else:
            try:
                self.np_dtype = np.dtype(dtype)
            except TypeError:
                raise self._bad(f"unsupported dtype {dtype!r}") from None
            if self.np_dtype.kind not in _ALLOWED_KINDS or self.np_dtype.fields is not None:
                raise self._bad(f"unsupported dtype {dtype!r}")
        self.fill_value = meta.get("fill_value")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.bfloat16:
            return torch.bfloat16
        return torch.from_numpy(np.zeros(0, dtype=self.np_dtype.newbyteorder("="))).dtype

    def chunk_file(self, index: Sequence[int]) -> str:
        key = self.separator.join(str(i) for i in index) if index else "0"
        return os.path.join(self.path, *key.split("/"))

    def _read_chunk(self, index: Tuple[int, ...]) -> np.ndarray:
        path = self.chunk_file(index)
        want = int(np.prod(self.chunks, dtype=np.int64)) * self.np_dtype.itemsize
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            # Zarr would fill a missing chunk with fill_value; in a checkpoint it means lost weights.
            raise CheckpointError(f"{path}: chunk file missing for tensor {self.tensor} "
                                  f"(chunk {'.'.join(map(str, index))} of shape {list(self.chunks)})") from None
        if size != want:
            kind = "truncated" if size < want else "too large"
            raise CheckpointError(f"{path}: chunk file of tensor {self.tensor} is {kind}: {size} bytes, "
                                  f"expected {want} ({list(self.chunks)} x {self.np_dtype.itemsize} bytes)")
        if want == 0:
            return np.zeros(self.chunks, dtype=self.np_dtype)
        return np.memmap(path, dtype=self.np_dtype, mode="r", shape=self.chunks, order=self.order)

    def read(self, region: Optional[Sequence[slice]] = None) -> torch.Tensor:
        """The given region (one slice per dimension, step 1) as a torch tensor; reads only overlapping chunks."""
        if region is None:
            region = tuple(slice(0, n) for n in self.shape)
        if len(region) != len(self.shape):
            raise CheckpointError(f"{self.path}: tensor {self.tensor} has {len(self.shape)} dimensions, "
                                  f"asked for a {len(region)}-dimensional slice")
        bounds = []
        for dim, (s, n) in enumerate(zip(region, self.shape)):
            start, stop = s.start or 0, n if s.stop is None else s.stop
            if s.step not in (None, 1) or not 0 <= start <= stop <= n:
                raise CheckpointError(f"{self.path}: tensor {self.tensor} of shape {list(self.shape)}: slice "
                                      f"{start}:{stop} of dimension {dim} is out of range")
            bounds.append((start, stop))
        out = np.empty([b - a for a, b in bounds], dtype=self.np_dtype)
        ranges = [range(a // c, (b + c - 1) // c) if b > a else range(0)
                  for (a, b), c in zip(bounds, self.chunks)]
        for index in itertools.product(*ranges):
            chunk = self._read_chunk(index)
            src, dst = [], []
            for (a, b), c, i in zip(bounds, self.chunks, index):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
            del chunk
        if self.bfloat16:
            return torch.from_numpy(out).view(torch.bfloat16)
        if not self.np_dtype.isnative:
            out = out.astype(self.np_dtype.newbyteorder("="))
        return torch.from_numpy(out)


def is_zarr(ckpt_dir: str) -> bool:
    path = os.path.join(ckpt_dir, "metadata.json")
    try:
        with open(path) as f:
            return json.load(f).get("sharded_backend") == "zarr"
    except (OSError, ValueError, AttributeError):
        return False


def _arrays(ckpt_dir: str) -> Dict[str, str]:
    """Stacked tensor name (without `model.`) -> array directory; `_extra_state` entries are skipped."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    out = {}
    for entry in sorted(os.listdir(ckpt_dir)):
        full = os.path.join(ckpt_dir, entry)
        if entry.endswith(EXTRA_STATE) or not os.path.isdir(full):
            continue
        if not os.path.isfile(os.path.join(full, ".zarray")):
            continue
        name = entry[len(PREFIX):] if entry.startswith(PREFIX) else entry
        out[name] = full
    return out


def global_shapes(ckpt_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Stacked name (without prefix) -> global shape, from each array's .zarray."""
    return {name: ZarrArray(path, PREFIX + name).shape for name, path in _arrays(ckpt_dir).items()}


def global_dtypes(ckpt_dir: str) -> Dict[str, torch.dtype]:
    return {name: ZarrArray(path, PREFIX + name).torch_dtype for name, path in _arrays(ckpt_dir).items()}


def read_tensor(ckpt_dir: str, spec: ShardSpec, num_layers: int, arrays: Optional[Dict[str, str]] = None
                ) -> torch.Tensor:
    """This rank's slice of the tensor `spec` describes (layer axis removed for per-layer tensors)."""
    arrays = arrays if arrays is not None else _arrays(ckpt_dir)
    path = arrays.get(spec.stacked_name)
    label = PREFIX + spec.stacked_name
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: tensor {label} is missing (no {label}/.zarray)")
    array = ZarrArray(path, label)
    want = ((num_layers,) if spec.layer is not None else ()) + tuple(spec.global_shape)
    if array.shape != want:
        raise CheckpointError(f"{array.meta_path}: tensor {label} has global shape {array.shape}, "
                              f"the model config implies {want}")
    region = spec.slices()
    if spec.layer is not None:
        region = (slice(spec.layer, spec.layer + 1),) + tuple(region)
    value = array.read(region)
    return value[0] if spec.layer is not None else value


@torch.no_grad()
def load(model, ckpt_dir: str, progress: Optional[Callable[[int], None]] = None) -> None:
    """Fill this rank's parameters from a zarr checkpoint; `progress(1)` is called after each tensor."""
    arrays = _arrays(ckpt_dir)
    if not arrays:
        raise CheckpointError(f"{ckpt_dir}: no zarr arrays found (no */.zarray)")
    specs = shard_specs(model)
    for name, param in model.named_parameters():
        spec = specs[name]
        value = read_tensor(ckpt_dir, spec, model.cfg.num_layers, arrays)
        copy_into(param, value, spec, arrays[spec.stacked_name])
        if progress is not None:
            progress(1)

