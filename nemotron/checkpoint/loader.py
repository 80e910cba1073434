"""One entry point for every checkpoint format: `load_model(path, ps)` builds this rank's shard and fills it.

Formats, detected from `path`:
    .nemo file                  a NeMo tar (plain or gzip), extracted to a temporary directory while loading
    directory + model_config.yaml   an unpacked NeMo checkpoint; model_weights/ in torch_dist or zarr format
    directory + config.json     a Hugging Face NemotronForCausalLM directory (safetensors)

The padded vocabulary size is not in NeMo's config (NeMo recomputes it from the tokenizer and the TP size at
training time), so it is read from the stored embedding's global shape before the model is built.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from nemotron.checkpoint import hf, nemo
from nemotron.checkpoint.shards import CheckpointError, shard_specs
from nemotron.config import ConfigError, ModelConfig, from_nemo_config
from nemotron.model import NemotronModel
from nemotron.parallel.state import ParallelState
from nemotron.tokenizer import Tokenizer, TokenizerError

FORMAT_NEMO_ARCHIVE = "nemo-archive"
FORMAT_NEMO_DIR = "nemo-dir"
FORMAT_HF = "hf"


@dataclass
class LoadedModel:
    model: NemotronModel
    tokenizer: Tokenizer
    cfg: ModelConfig
    path: str
    format: str                 # "nemo-torch_dist", "nemo-zarr" or "hf"
    nemo_config: Optional[Dict[str, Any]] = field(default=None, repr=False)  # model_config.yaml (NeMo sources)


def detect_format(path: str) -> str:
    """FORMAT_NEMO_ARCHIVE, FORMAT_NEMO_DIR or FORMAT_HF; CheckpointError naming the path otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return FORMAT_NEMO_ARCHIVE
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a file or directory")
    if nemo.is_nemo_dir(path):
        return FORMAT_NEMO_DIR
    if hf.is_hf_dir(path):
        return FORMAT_HF
    try:
        nemo._find_root(path, path)  # a directory holding one unpacked NeMo checkpoint
        return FORMAT_NEMO_DIR
    except CheckpointError:
        pass
    raise CheckpointError(f"{path}: not a model checkpoint (expected a .nemo file, a NeMo directory with "
                          f"{nemo.CONFIG_FILE}, or a Hugging Face directory with {hf.CONFIG})")


# --- Pieces shared by load_model and load_full_state ---------------------------------------------------------

_KEEP_DIRS: list = []


def _keep_tokenizer(tokenizer_path: str) -> str:
    """Copy a tokenizer out of a temporary .nemo extraction, so its path stays valid after the extraction goes."""
    if not _KEEP_DIRS:
        _KEEP_DIRS.append(tempfile.mkdtemp(prefix="nemotron-tokenizer-"))
        atexit.register(shutil.rmtree, _KEEP_DIRS[0], True)
    dst = tempfile.mkdtemp(dir=_KEEP_DIRS[0])
    return shutil.copy(tokenizer_path, os.path.join(dst, os.path.basename(tokenizer_path)))


def _backend(name: str):
    if name == "torch_dist":
        from nemotron.checkpoint import torch_dist
        return torch_dist
    from nemotron.checkpoint import zarr
    return zarr


def _nemo_config(ck: nemo.NemoCheckpoint) -> ModelConfig:
    backend = _backend(ck.backend)
    shapes = backend.global_shapes(ck.weights_dir)
    config_path = os.path.join(ck.root, nemo.CONFIG_FILE)
    embedding = shapes.get("embedding.word_embeddings.weight") or shapes.get("output_layer.weight")
    if embedding is None:
        raise CheckpointError(f"{ck.weights_dir}: tensor model.embedding.word_embeddings.weight "
                              f"is missing (cannot determine the padded vocabulary size)")
    try:
        return from_nemo_config(ck.config, padded_vocab_size=int(embedding[0]))
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config_path}: invalid model settings ({exc})") from None


def _hf_config(path: str) -> ModelConfig:
    try:
        cfg = hf.read_config(path)
    except ConfigError as exc:
        raise ConfigError(f"{os.path.join(path, hf.CONFIG)}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{os.path.join(path, hf.CONFIG)}: missing or invalid key {exc}") from None
    rows = hf.embedding_rows(path)
    if rows != cfg.padded_vocab_size:
        raise CheckpointError(f"{path}: tensor model.embed_tokens.weight has {rows} rows but config.json "
                              f"vocab_size is {cfg.padded_vocab_size}")
    return cfg


def _tokenizer(path: str, cfg: ModelConfig) -> Tokenizer:
    try:
        tok = Tokenizer(path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if tok.vocab_size > cfg.padded_vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} pieces but the checkpoint's embedding has "
                              f"only {cfg.padded_vocab_size} rows (tokenizer and weights do not belong together)")
    return tok


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


# --- Public API ----------------------------------------------------------------------------------------------

def load_model(path: str, ps: Optional[ParallelState] = None, dtype: torch.dtype = torch.float32,
               device=None, progress: bool = True) -> LoadedModel:
    """Build this rank's model shard (TP/PP from `ps`; single process if None) and fill it from `path`."""
    path = os.fspath(path)
    if ps is None:
        ps = ParallelState(device=torch.device(device) if device is not None else torch.device("cpu"))
    device = device if device is not None else ps.device
    kind = detect_format(path)
    show = progress and ps.rank == 0
    desc = f"loading {os.path.basename(os.path.normpath(path))}"

    if kind == FORMAT_HF:
        cfg = _hf_config(path)
        tokenizer = _tokenizer(hf.tokenizer_path(path), cfg)
        model = NemotronModel(cfg, ps, dtype, device)
        with _progress_bar(len(list(model.parameters())), desc, show) as bar:
            hf.load(model, path, progress=bar.update)
        return LoadedModel(model.eval(), tokenizer, cfg, path, "hf")

    with nemo.open_nemo(path) as ck:
        cfg = _nemo_config(ck)
        tok_path = _keep_tokenizer(ck.tokenizer_path) if ck.is_archive else ck.tokenizer_path
        tokenizer = _tokenizer(tok_path, cfg)
        model = NemotronModel(cfg, ps, dtype, device)
        with _progress_bar(len(list(model.parameters())), desc, show) as bar:
            _backend(ck.backend).load(model, ck.weights_dir, progress=bar.update)
        return LoadedModel(model.eval(), tokenizer, cfg, path, f"nemo-{ck.backend}", dict(ck.config))


def _uniform_dtype(dtypes) -> torch.dtype:
    dtypes = set(dtypes)
    return dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed: widen, lossless


def load_full_state(path: str) -> Tuple[ModelConfig, Dict[str, torch.Tensor], str]:
    """(config, full MCore-named tensors in the stored dtype, tokenizer path): one process, no sharding.

    For the converter. For a .nemo tar the tokenizer is copied out of the temporary extraction first.
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == FORMAT_HF:
        cfg = _hf_config(path)
        tok_path = hf.tokenizer_path(path)
        _tokenizer(tok_path, cfg)
        return cfg, hf.load_full_state(path, cfg), tok_path

    with nemo.open_nemo(path) as ck:
        cfg = _nemo_config(ck)
        tok_path = _keep_tokenizer(ck.tokenizer_path) if ck.is_archive else ck.tokenizer_path
        _tokenizer(tok_path, cfg)
        backend = _backend(ck.backend)
        dtype = _uniform_dtype(backend.global_dtypes(ck.weights_dir).values())
        model = NemotronModel(cfg, ParallelState(), dtype=dtype)
        backend.load(model, ck.weights_dir)
        specs = shard_specs(model)
        state = {specs[name].name: p.detach() for name, p in model.named_parameters()}
        return cfg, state, tok_path
