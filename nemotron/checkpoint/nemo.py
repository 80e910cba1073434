"""NeMo model checkpoints: a `.nemo` tar (plain or gzip) or the unpacked directory.

What a NeMo Megatron-GPT checkpoint holds (nemo-reference.md §4):

    model_config.yaml                  the model's hyper-parameters and a `tokenizer:` block
    <uuid hex>_<name>.model            tokenizer artifacts, referenced from the config as `nemo:<file name>`
    model_weights/                     a distributed checkpoint: metadata.json names the backend,
                                       `torch_dist` (read through megatron-core) or `zarr` (our own reader)

Older layouts (`model_weights.ckpt`, `mp_rank_XX/`, `tp_rank_XX_pp_rank_XXX/`) are refused with a clear message.

A `.nemo` tar is extracted first, after checking that no member escapes the directory (absolute paths, `..`, links
pointing outside, device files are refused). The extraction is shared: every process of this user on this machine
that opens the same archive at the same time (the 8 ranks of a node under TP8) uses one copy, made by the first
under a file lock, and the last to close it removes it (`$TMPDIR/nemotron-<uid>/`, private to the user).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

import yaml

from nemotron.checkpoint.shards import CheckpointError

CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
NEMO_PREFIX = "nemo:"
BACKENDS = ("torch_dist", "zarr")


# --- Safe extraction of a .nemo tar --------------------------------------------------------------------------

def _open_tar(path: str) -> tarfile.TarFile:
    """NeMo writes plain tars ("w:"); older releases wrote gzip. Try both, in NeMo's order."""
    errors = []
    for mode in ("r:", "r:gz"):
        try:
            return tarfile.open(path, mode)
        except (tarfile.TarError, OSError, EOFError) as exc:
            errors.append(f"{mode} {exc}")
    raise CheckpointError(f"{path}: not a readable .nemo archive (tried plain and gzip tar: {'; '.join(errors)})")


def _inside(root: str, target: str) -> bool:
    root = os.path.realpath(root)
    target = os.path.realpath(target)
    return target == root or target.startswith(root + os.sep)


def _check_member(archive: str, member: tarfile.TarInfo, dest: str) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(f"{archive}: refusing archive member with an absolute path: {name!r}")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise CheckpointError(f"{archive}: refusing archive member that climbs out with '..': {name!r}")
    if not _inside(dest, os.path.join(dest, name)):
        raise CheckpointError(f"{archive}: refusing archive member outside the extraction directory: {name!r}")
    if member.issym() or member.islnk():
        link = member.linkname
        base = os.path.dirname(os.path.join(dest, name)) if member.issym() else dest
        if os.path.isabs(link) or not _inside(dest, os.path.join(base, link)):
            raise CheckpointError(f"{archive}: refusing link {name!r} -> {link!r} pointing outside the archive")
    elif not (member.isfile() or member.isdir()):
        raise CheckpointError(f"{archive}: refusing special archive member {name!r} (device, fifo or unknown type)")


def extract_nemo(archive: str, dest: str) -> None:
    """Extract a .nemo tar into `dest`, refusing any member that would land outside it."""
    with _open_tar(archive) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CheckpointError(f"{archive}: corrupt .nemo archive ({exc})") from None
        for member in members:
            _check_member(archive, member, dest)
        try:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
        except tarfile.FilterError as exc:
            raise CheckpointError(f"{archive}: refusing unsafe archive member ({exc})") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CheckpointError(f"{archive}: corrupt or truncated .nemo archive ({exc})") from None


# --- One extraction per machine, shared by the processes that open the same archive ----------------------------

def _extraction_home() -> str:
    home = os.path.join(tempfile.gettempdir(), f"nemotron-{os.getuid()}")
    os.makedirs(home, mode=0o700, exist_ok=True)
    st = os.lstat(home)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CheckpointError(f"{home}: not a directory private to this user; refusing to extract .nemo archives "
                              f"there (set TMPDIR elsewhere)")
    return home


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on the file `path`. The last user of an extraction unlinks the lock file while holding it,
    so a lock taken on a file that is no longer the one at `path` is dropped and taken again."""
    while True:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(f.fileno()).st_ino:
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
            fcntl.flock(f, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: trust kill


def _drop_dead_users(users: str) -> None:
    """Forget users of this host whose process is gone (a crashed rank must not pin the extraction forever).
    Other hosts' entries (a TMPDIR on a shared file system) are left alone: their pids mean nothing here."""
    host = socket.gethostname()
    for entry in os.listdir(users):
        entry_host, _, rest = entry.rpartition("@")
        pid = rest.split(".")[0]
        if entry_host == host and pid.isdigit() and not pid_alive(int(pid)):
            os.remove(os.path.join(users, entry))


def _shared_extraction(archive: str) -> tuple[str, Callable[[], None]]:
    """(directory holding `archive` extracted, release function). Processes that open the same file (same real
    path, size and modification time) share one extraction: under the lock the first extracts into a `.partial`
    directory and renames it when complete, and each registers itself; `release` unregisters, and the last user
    removes the directory."""
    st = os.stat(archive)
    ident = f"{os.path.realpath(archive)}|{st.st_size}|{st.st_mtime_ns}"
    base = os.path.join(_extraction_home(), hashlib.sha256(ident.encode()).hexdigest()[:20])
    users = base + ".users"
    me = f"{socket.gethostname()}@{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with _locked(base + ".lock"):
        if not os.path.isdir(base):
            partial = base + ".partial"
            shutil.rmtree(partial, ignore_errors=True)  # a process killed mid-extraction
            os.makedirs(partial)
            try:
                extract_nemo(archive, partial)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                if not os.path.isdir(users):  # nobody else uses this archive's lock
                    os.remove(base + ".lock")
                raise
            os.rename(partial, base)
        os.makedirs(users, exist_ok=True)
        open(os.path.join(users, me), "w").close()

    def release() -> None:
        with _locked(base + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(users, me))
            _drop_dead_users(users)
            if not os.listdir(users):
                shutil.rmtree(base, ignore_errors=True)
                shutil.rmtree(users, ignore_errors=True)
                os.remove(base + ".lock")
    return base, release


def _find_root(top: str, label: str) -> str:
    """The directory holding model_config.yaml: `top` itself or its single subdirectory (some tars nest one)."""
    if os.path.isfile(os.path.join(top, CONFIG_FILE)):
        return top
    entries = [e for e in os.listdir(top) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isfile(os.path.join(top, entries[0], CONFIG_FILE)):
        return os.path.join(top, entries[0])
    raise CheckpointError(f"{label}: no {CONFIG_FILE} found (not a NeMo model checkpoint)")


# --- The checkpoint ------------------------------------------------------------------------------------------

@dataclass
class NemoCheckpoint:
    """An opened NeMo checkpoint. For a `.nemo` tar, `root` is in the shared extraction, released by `close()`."""
    path: str                 # what the caller gave (archive or directory)
    root: str                 # directory holding model_config.yaml
    config: Dict[str, Any]    # model_config.yaml
    tokenizer_path: str
    weights_dir: str
    backend: str              # "torch_dist" or "zarr"
    is_archive: bool = False
    _release: Optional[Callable[[], None]] = field(default=None, repr=False)

    def close(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> "NemoCheckpoint":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def is_nemo_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a mapping of model settings, got {type(cfg).__name__}")
    # Some NeMo exports nest the model block under `model:`.
    if "num_layers" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    return cfg


def resolve_tokenizer(cfg: Dict[str, Any], root: str, config_path: str) -> str:
    """The SentencePiece model file named by the `tokenizer:` block; `nemo:<name>` resolves inside the checkpoint."""
    block = cfg.get("tokenizer")
    if not isinstance(block, dict):
        raise CheckpointError(f"{config_path}: no `tokenizer:` block")
    library = block.get("library")
    if library != "sentencepiece":
        raise CheckpointError(f"{config_path}: unsupported tokenizer.library {library!r} "
                              f"(only 'sentencepiece' tokenizers are supported)")
    key, ref = None, None
    for candidate in ("model", "tokenizer_model"):
        if block.get(candidate):
            key, ref = candidate, block[candidate]
            break
    if ref is None:
        raise CheckpointError(f"{config_path}: tokenizer.model is not set (no SentencePiece model to load)")
    if not isinstance(ref, str):
        raise CheckpointError(f"{config_path}: tokenizer.{key} must be a string, got {ref!r}")
    if ref.startswith(NEMO_PREFIX):
        name = ref[len(NEMO_PREFIX):]
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{config_path}: tokenizer.{key} {ref!r} must name a file inside the checkpoint")
        path = os.path.join(root, name)
    else:
        # A path from the training machine: use it if it exists, else look for the file beside the config.
        path = ref if os.path.isfile(ref) else os.path.join(root, os.path.basename(ref))
    if not os.path.isfile(path):
        raise CheckpointError(f"{config_path}: tokenizer.{key} {ref!r} refers to a missing file ({path})")
    return path


def find_weights(root: str) -> tuple[str, str]:
    """(model_weights directory, backend). Legacy single-file and per-rank layouts are refused."""
    weights = os.path.join(root, WEIGHTS_DIR)
    if os.path.isdir(weights):
        meta = os.path.join(weights, "metadata.json")
        if os.path.isfile(meta):
            try:
                with open(meta) as f:
                    backend = json.load(f).get("sharded_backend")
            except (ValueError, OSError, AttributeError) as exc:
                raise CheckpointError(f"{meta}: unreadable ({exc})") from None
            if backend not in BACKENDS:
                raise CheckpointError(f"{meta}: sharded_backend {backend!r} is not supported "
                                      f"(supported: {', '.join(BACKENDS)})")
            return weights, backend
        if os.path.isfile(os.path.join(weights, ".metadata")):
            return weights, "torch_dist"
        raise CheckpointError(f"{weights}: no metadata.json (not a distributed checkpoint)")
    legacy = [e for e in sorted(os.listdir(root))
              if e == "model_weights.ckpt" or e.startswith(("mp_rank_", "tp_rank_"))]
    if legacy:
        raise CheckpointError(f"{root}: legacy NeMo weights layout ({', '.join(legacy[:3])}) is not supported; "
                              f"only distributed checkpoints (model_weights/ in torch_dist or zarr format) are. "
                              f"Re-save the model with NeMo's dist_ckpt_format: torch_dist")
    raise CheckpointError(f"{root}: no {WEIGHTS_DIR}/ directory (no model weights in this checkpoint)")


def open_nemo(path: str) -> NemoCheckpoint:
    """Open a .nemo tar or an unpacked NeMo directory. Use as a context manager (a tar's extraction is released
    on close)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    release = None
    try:
        if os.path.isdir(path):
            root = _find_root(path, path)
        else:
            top, release = _shared_extraction(path)
            root = _find_root(top, path)
        config_path = os.path.join(root, CONFIG_FILE)
        cfg = read_config(config_path)
        tokenizer_path = resolve_tokenizer(cfg, root, config_path)
        weights, backend = find_weights(root)
        return NemoCheckpoint(path, root, cfg, tokenizer_path, weights, backend, release is not None, release)
    except BaseException:
        if release is not None:
            release()
        raise


# --- Writing -------------------------------------------------------------------------------------------------

_PRECISION = {"torch.float32": 32, "torch.float16": 16, "torch.bfloat16": "bf16"}


def tokenizer_block(name: str) -> Dict[str, Any]:
    return {"library": "sentencepiece", "type": None, "model": NEMO_PREFIX + name, "vocab_file": None,
            "merge_file": None, "sentencepiece_legacy": False}


def write_nemo_dir(dst: str, model, tokenizer_path: str, nemo_config: Optional[Dict[str, Any]] = None) -> None:
    """Write `model` as an unpacked NeMo directory: model_config.yaml, the tokenizer, model_weights/ (torch_dist).

    `nemo_config`, when given, is the base config (extra keys kept); the model's shape keys, the tokenizer block
    and the checkpoint format always come from `model` and this writer. All ranks of `model` call this together.
    """
    from nemotron.checkpoint import torch_dist
    from nemotron.config import to_nemo_config

    os.makedirs(dst, exist_ok=True)
    rank0 = getattr(model.ps, "rank", 0) == 0
    cfg = dict(nemo_config or {})
    cfg.update(to_nemo_config(model.cfg))
    precision = _PRECISION.get(str(model.dtype))
    if precision is not None:
        cfg["precision"] = precision
    name = f"{uuid.uuid4().hex}_tokenizer.model"
    cfg["tokenizer"] = tokenizer_block(name)
    if rank0:
        shutil.copyfile(tokenizer_path, os.path.join(dst, name))
        with open(os.path.join(dst, CONFIG_FILE), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    torch_dist.save(model, os.path.join(dst, WEIGHTS_DIR))


def pack_nemo(src_dir: str, archive: str, gzip: bool = False) -> None:
    """Pack an unpacked NeMo directory into a .nemo tar (members relative to the directory, as NeMo writes)."""
    with tarfile.open(archive, "w:gz" if gzip else "w:") as tar:
        for entry in sorted(os.listdir(src_dir)):
            tar.add(os.path.join(src_dir, entry), arcname=f"./{entry}")
