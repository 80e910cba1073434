"""Hugging Face `NemotronForCausalLM` directories: config.json, safetensors weights, tokenizer.model.

Weights are `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> file). Reading goes through
`safetensors.safe_open(...).get_slice`, so a tensor-parallel rank reads only its rows or columns; its slice of
MCore's fused `linear_qkv` is assembled from the q/k/v_proj rows of the query groups it holds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from nemotron.checkpoint import hf_names
from nemotron.checkpoint.shards import CheckpointError, ShardSpec, copy_into, read_json_object, shard_specs
from nemotron.config import ModelConfig, from_hf_config, to_hf_config

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def read_config(path: str) -> ModelConfig:
    """ModelConfig from `config.json` (padded vocab = its vocab_size; the loader checks the embedding agrees)."""
    return from_hf_config(read_json_object(os.path.join(path, CONFIG)))


def tokenizer_path(path: str) -> str:
    tok = os.path.join(path, TOKENIZER)
    if not os.path.isfile(tok):
        raise CheckpointError(f"{path}: no {TOKENIZER} (a SentencePiece model is required; Hugging Face "
                              f"tokenizer.json-only directories are not supported)")
    return tok


class HFWeights:
    """Tensor name -> file for a HF directory, with sliced reads. Use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        self._handles: Dict[str, object] = {}
        index = os.path.join(path, INDEX)
        single = os.path.join(path, SINGLE)
        if os.path.isfile(index):
            data = read_json_object(index)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            for name, file in weight_map.items():
                if not isinstance(file, str) or os.path.basename(file) != file or file in (".", ".."):
                    raise CheckpointError(f"{index}: tensor {name} maps to an invalid file name {file!r}")
            self.weight_map: Dict[str, str] = dict(weight_map)
            self.label = index
        elif os.path.isfile(single):
            self.weight_map = {name: SINGLE for name in self._open(SINGLE).keys()}
            self.label = single
        else:
            shards = sorted(e for e in os.listdir(path) if _SHARD.match(e))
            if not shards:
                raise CheckpointError(f"{path}: no {SINGLE}, {INDEX} or model-*-of-*.safetensors files")
            self.weight_map = {}
            for file in shards:
                for name in self._open(file).keys():
                    self.weight_map[name] = file
            self.label = path

    def _open(self, file: str):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise CheckpointError(f"{full}: missing safetensors file")
            try:
                handle = safe_open(full, framework="pt", device="cpu")
            except Exception as exc:  # SafetensorError: truncated header/data, bad JSON, ...
                raise CheckpointError(f"{full}: corrupt or truncated safetensors file ({exc})") from None
            self._handles[file] = handle
        return handle

    def file_of(self, name: str) -> str:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.label}: tensor {name} is missing")
        return os.path.join(self.path, file)

    def _slice(self, name: str):
        file = self.file_of(name)
        handle = self._open(os.path.basename(file))
        try:
            return handle.get_slice(name)
        except Exception as exc:
            raise CheckpointError(f"{file}: tensor {name} is missing or unreadable ({exc})") from None

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F64": torch.float64}.get(self._slice(name).get_dtype(), torch.float32)

    def read(self, name: str, region: Optional[Tuple[slice, ...]] = None,
             expect_shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """`region` of tensor `name` (whole tensor if None); `expect_shape` checks the stored global shape."""
        sl = self._slice(name)
        shape = tuple(sl.get_shape())
        if expect_shape is not None and shape != tuple(expect_shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape {shape}, the model config "
                                  f"implies {tuple(expect_shape)}")
        try:
            return sl[region] if region is not None else sl[:]
        except Exception as exc:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} is unreadable ({exc})") from None

    def names(self) -> List[str]:
        return list(self.weight_map)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _qkv_names(layer: int) -> Tuple[str, str, str]:
    p = f"model.layers.{layer}.self_attn."
    return p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"


def read_shard(weights: HFWeights, spec: ShardSpec, cfg: ModelConfig) -> torch.Tensor:
    """This rank's slice of MCore tensor `spec.name`, read from the HF tensors."""
    if spec.suffix == "self_attention.linear_qkv.weight":
        hn, hpg, h = cfg.kv_channels, cfg.heads_per_group, cfg.hidden_size
        rows = spec.slices()[0]
        per_group = (hpg + 2) * hn
        g0, g1 = rows.start // per_group, rows.stop // per_group
        if rows.start % per_group or rows.stop % per_group:
            raise CheckpointError(f"linear_qkv rows {rows.start}:{rows.stop} do not hold whole query groups")
        q_name, k_name, v_name = _qkv_names(spec.layer)
        ng = cfg.num_query_groups
        q = weights.read(q_name, (slice(g0 * hpg * hn, g1 * hpg * hn), slice(0, h)), (ng * hpg * hn, h))
        k = weights.read(k_name, (slice(g0 * hn, g1 * hn), slice(0, h)), (ng * hn, h))
        v = weights.read(v_name, (slice(g0 * hn, g1 * hn), slice(0, h)), (ng * hn, h))
        return hf_names.merge_qkv(q, k, v, cfg)
    name = hf_names.hf_name(spec.name)
    return weights.read(name, spec.slices(), spec.global_shape)


def source_of(weights: HFWeights, spec: ShardSpec) -> str:
    return weights.file_of(hf_names.hf_name(spec.name))


@torch.no_grad()
def load(model, path: str, progress: Optional[Callable[[int], None]] = None) -> None:
    """Fill this rank's parameters from a HF directory; `progress(1)` after each tensor."""
    specs = shard_specs(model)
    with HFWeights(path) as weights:
        for name, param in model.named_parameters():
            spec = specs[name]
            value = read_shard(weights, spec, model.cfg)
            copy_into(param, value, spec, source_of(weights, spec))
            if progress is not None:
                progress(1)


def embedding_rows(path: str) -> int:
    with HFWeights(path) as weights:
        return weights.shape("model.embed_tokens.weight")[0]


def stored_dtype(path: str) -> torch.dtype:
    with HFWeights(path) as weights:
        return weights.dtype("model.embed_tokens.weight")


def load_full_state(path: str, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """All tensors as full MCore-named tensors (single process; for the converter)."""
    from nemotron.model import NemotronModel

    model = NemotronModel(cfg, device="meta")
    specs = shard_specs(model)
    out = {}
    with HFWeights(path) as weights:
        for spec in specs.values():
            value = read_shard(weights, spec, cfg)
            if not torch.isfinite(value.float()).all():
                raise CheckpointError(f"{source_of(weights, spec)}: tensor {spec.name} holds NaN or infinite values")
            out[spec.name] = value
    return out


# --- Writing -------------------------------------------------------------------------------------------------

def _shards(names: Iterable[str], tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    groups: List[List[str]] = [[]]
    size = 0
    for name in names:
        n = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _hf_order(name: str):
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if name.startswith("model.embed") else 2, 0, name)


def save_hf_dir(dst: str, full_mcore_state: Dict[str, torch.Tensor], cfg: ModelConfig, tokenizer_path: str,
                max_shard_bytes: int = 5 * 10**9) -> None:
    """Write a HF NemotronForCausalLM directory: safetensors (sharded with an index above max_shard_bytes),
    config.json and tokenizer.model. Tensors are written in the dtype they have."""
    from safetensors.torch import save_file

    from nemotron.tokenizer import Tokenizer

    tensors = {k: v.detach().cpu().contiguous() for k, v in hf_names.mcore_to_hf(full_mcore_state, cfg).items()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"cannot write a Hugging Face checkpoint with mixed dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"cannot write dtype {dtype} to a Hugging Face checkpoint")
    tok = Tokenizer(tokenizer_path)
    hf_cfg = to_hf_config(cfg, bos_id=tok.bos_id if tok.bos_id >= 0 else None,
                          eos_id=tok.eos_id, dtype=_DTYPE_NAMES[dtype])  # refuses what HF cannot express
    os.makedirs(dst, exist_ok=True)
    groups = _shards(sorted(tensors, key=_hf_order), tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file({k: tensors[k] for k in groups[0]}, os.path.join(dst, SINGLE), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: tensors[k] for k in group}, os.path.join(dst, file), metadata=meta)
            for k in group:
                weight_map[k] = file
                total += tensors[k].numel() * tensors[k].element_size()
        with open(os.path.join(dst, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(dst, CONFIG), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    shutil.copyfile(tokenizer_path, os.path.join(dst, TOKENIZER))
