"""Convert between NeMo and Hugging Face checkpoints.

    python -m nemotron.convert SRC DST [--dtype bf16|fp32|fp16] [--max-shard-size 5GB]

SRC is detected: a NeMo checkpoint (`.nemo` tar or unpacked directory, torch_dist or zarr weights) becomes a
Hugging Face NemotronForCausalLM directory; a Hugging Face directory becomes an unpacked NeMo directory with
torch_dist weights. Tensors keep their stored dtype unless --dtype is given, so round trips are bit-exact.
Runs in one process and holds the whole model in host memory.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Optional

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ConvertError(RuntimeError):
    pass


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (as Hugging Face counts), '2GiB' -> 2**31, '1000' -> 1000 bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConvertError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise ConvertError(f"invalid size {text!r}: must be at least one byte")
    return int(value)


def _check_dst(dst: str) -> bool:
    """True when DST must be created. Refuses an existing file or a non-empty directory."""
    if os.path.isdir(dst):
        if os.listdir(dst):
            raise ConvertError(f"{dst}: destination exists and is not empty (refusing to overwrite)")
        return False
    if os.path.exists(dst):
        raise ConvertError(f"{dst}: destination exists and is not a directory")
    return True


def convert(src: str, dst: str, dtype: Optional[str] = None, max_shard_bytes: int = 5 * 10**9) -> str:
    """Convert SRC to DST; returns the format written ("hf" or "nemo"). `dtype`: 'bf16', 'fp32', 'fp16' or None."""
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unsupported --dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file or directory")
    _check_dst(dst)  # cheap refusals first, before importing torch

    import torch

    from nemotron.checkpoint import hf, nemo
    from nemotron.checkpoint.loader import FORMAT_HF, detect_format, load_full_state
    from nemotron.model import NemotronModel

    kind = detect_format(src)
    created = _check_dst(dst)
    try:
        cfg, state, tokenizer_path = load_full_state(src)
        if dtype is not None:
            target = getattr(torch, DTYPES[dtype])
            state = {k: v.to(target) for k, v in state.items()}
        if kind == FORMAT_HF:
            dtypes = {v.dtype for v in state.values()}
            model = NemotronModel(cfg, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
            model.load_state_dict(state, strict=True)
            del state
            nemo.write_nemo_dir(dst, model, tokenizer_path)
            return "nemo"
        hf.save_hf_dir(dst, state, cfg, tokenizer_path, max_shard_bytes=max_shard_bytes)
        return "hf"
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        elif os.path.isdir(dst):
            for entry in os.listdir(dst):
                full = os.path.join(dst, entry)
                shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
        raise


def _quiet() -> None:
    """Keep stderr to our own line: megatron-core warns about missing TE/Apex on import, torch about DCP."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemotron.convert",
        description="Convert a NeMo checkpoint (.nemo or directory) to a Hugging Face directory, or back.")
    parser.add_argument("src", help="NeMo .nemo file / directory, or Hugging Face directory")
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file when writing Hugging Face (default 5GB)")
    args = parser.parse_args(argv)
    _quiet()
    try:
        written = convert(args.src, args.dst, args.dtype, parse_size(args.max_shard_size))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, no traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    print(f"wrote {'Hugging Face' if written == 'hf' else 'NeMo'} checkpoint to {args.dst}")
    return 0


def _close_process_group() -> None:
    if "torch.distributed" not in sys.modules:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
