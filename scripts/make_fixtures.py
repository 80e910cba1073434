#!/usr/bin/env python
"""Build the small test fixtures under tests/fixtures/ with megatron-core itself.

How to run (from the repository root, on a CPU machine; takes about a minute):

    # once: an extra, git-ignored venv with an older megatron-core that can still WRITE zarr checkpoints
    .venv/bin/python scripts/make_fixtures.py --make-fixture-venv
    # then (re-runnable; every output is deleted and rebuilt):
    .venv/bin/python scripts/make_fixtures.py

`.venv` must hold torch, megatron-core 0.16.1, psutil, sentencepiece, safetensors, numpy and pyyaml.
`.fixture-venv` holds torch 2.13.0, megatron-core 0.10.0 (--no-deps), zarr<3, tensorstore 0.1.86, numpy, psutil,
packaging, safetensors, sentencepiece, pyyaml; `--make-fixture-venv` creates it with exactly those pip commands.

What it writes (all under tests/fixtures/):

    tiny_tokenizer.model        SentencePiece BPE, 500 pieces (pad 0, unk 1, <s> 2, </s> 3, byte fallback,
                                user-defined <extra_id_0>, <extra_id_1>, <|endoftext|> and "\\n"), trained on the
                                first ~400 KB of the Python standard library's top-level .py files (sorted by name).
    tiny_reference.safetensors  fp32, full (unsharded) seeded weights of a tiny Nemotron-4, MCore TE-spec names
                                without prefix (e.g. decoder.layers.0.self_attention.linear_qkv.weight).
    tiny_tp1_torch_dist/        unpacked NeMo model directories: model_config.yaml, <hex>_tokenizer.model and
    tiny_tp2_torch_dist/        model_weights/ written by megatron-core 0.16.1 dist_checkpointing.save (torch_dist,
                                fp32) from a GPTModel at TP=1 / TP=2 (2 processes, gloo).
    tiny_tp2_zarr/              the same, written as bf16 at TP=2 by megatron-core 0.10.0 in the zarr format
                                (as the released Nemotron-4-340B checkpoints are).
    README.md                   what each fixture is, how it was made, sizes.

At the end the script re-reads everything (MCore dist_checkpointing.load for torch_dist, including TP=1<->TP=2
resharding; megatron-core 0.10.0 load for zarr; raw chunk bytes with numpy for zarr) and compares with the reference.

Model shape: 4 layers, hidden 64, ffn 256, 4 heads, 2 query groups, kv_channels 32 (!= hidden/heads, as in
Minitron-8B), padded vocab 512, squared-relu, LayerNorm1p, no linear biases, RoPE on half of each head, untied
output layer. MCore's local (non-TE) layer spec refuses `layernorm_zero_centered_gamma=True`; the stored numbers do
not depend on it (the checkpoint stores the zero-centred weight w; only the forward pass applies 1 + w), so the
GPTModel is built without it.

The MCore parts run in worker subprocesses (this same file with --worker), one per rank, so that torch.distributed
and megatron's parallel state stay out of the parent and the zarr writer can run under the other venv.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FIXTURE_VENV = REPO / ".fixture-venv"

# ---- the tiny model -------------------------------------------------------------------------------------------
NUM_LAYERS = 4
HIDDEN = 64
FFN = 256
HEADS = 4
GROUPS = 2
KV_CHANNELS = 32
VOCAB_PADDED = 512
SEQ_LEN = 256
ROTARY_PERCENT = 0.5
ROTARY_BASE = 10000
EPS = 1e-5
SEED = 1234
STD_MATRIX = 0.08   # so that logits are not flat
STD_LN_WEIGHT = 0.1  # zero-centred ("1p") weights: effective gamma = 1 + w
STD_LN_BIAS = 0.05

# ---- the tiny tokenizer ---------------------------------------------------------------------------------------
TOKENIZER_VOCAB = 500
CORPUS_BYTES = 400_000
USER_SYMBOLS = ["<extra_id_0>", "<extra_id_1>", "<|endoftext|>", "\n"]
# NeMo names tokenizer artifacts "<uuid4().hex>_<basename>"; a fixed hex keeps reruns byte-stable.
TOKENIZER_HEX = "6e656d6f74726f6e5f74696e795f746b"
TOKENIZER_ARTIFACT = f"{TOKENIZER_HEX}_tokenizer.model"

COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "self_attention.linear_qkv.weight",
                   "mlp.linear_fc1.weight", "output_layer.weight")
ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")

CHECKPOINTS = [
    # directory name, TP size, format, stored dtype
    ("tiny_tp1_torch_dist", 1, "torch_dist", "float32"),
    ("tiny_tp2_torch_dist", 2, "torch_dist", "float32"),
    ("tiny_tp2_zarr", 2, "zarr", "bfloat16"),
]


# =============================================================================================================
# reference weights
# =============================================================================================================
def reference_layout() -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) for every parameter, in generation order, with MCore TE-spec names (no prefix)."""
    qkv_rows = (HEADS + 2 * GROUPS) * KV_CHANNELS
    out = [("embedding.word_embeddings.weight", (VOCAB_PADDED, HIDDEN), STD_MATRIX)]
    for i in range(NUM_LAYERS):
        p = f"decoder.layers.{i}."
        out += [
            (p + "self_attention.linear_qkv.layer_norm_weight", (HIDDEN,), STD_LN_WEIGHT),
            (p + "self_attention.linear_qkv.layer_norm_bias", (HIDDEN,), STD_LN_BIAS),
            (p + "self_attention.linear_qkv.weight", (qkv_rows, HIDDEN), STD_MATRIX),
            (p + "self_attention.linear_proj.weight", (HIDDEN, HEADS * KV_CHANNELS), STD_MATRIX),
            (p + "mlp.linear_fc1.layer_norm_weight", (HIDDEN,), STD_LN_WEIGHT),
            (p + "mlp.linear_fc1.layer_norm_bias", (HIDDEN,), STD_LN_BIAS),
            (p + "mlp.linear_fc1.weight", (FFN, HIDDEN), STD_MATRIX),
            (p + "mlp.linear_fc2.weight", (HIDDEN, FFN), STD_MATRIX),
        ]
    out += [
        ("decoder.final_layernorm.weight", (HIDDEN,), STD_LN_WEIGHT),
        ("decoder.final_layernorm.bias", (HIDDEN,), STD_LN_BIAS),
        ("output_layer.weight", (VOCAB_PADDED, HIDDEN), STD_MATRIX),
    ]
    return out


def make_reference_weights(path: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(SEED)
    weights = {name: torch.randn(shape, generator=g, dtype=torch.float32) * std
               for name, shape, std in reference_layout()}
    # one metadata key only: safetensors writes several keys in hash order, which would change the bytes per run
    meta = {"fixture": json.dumps({"description": "tiny Nemotron-4 reference weights, fp32, MCore TE-spec names",
                                   "seed": SEED, **model_shape_dict()}, sort_keys=True)}
    save_file(weights, str(path), metadata=meta)
    return weights


def load_reference(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def model_shape_dict() -> dict:
    return {"num_layers": NUM_LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN,
            "num_attention_heads": HEADS, "num_query_groups": GROUPS, "kv_channels": KV_CHANNELS,
            "padded_vocab_size": VOCAB_PADDED}


def tp_shard(name: str, full, tp: int, rank: int):
    """This rank's piece of a full reference tensor, by Megatron's TP rule (contiguous split)."""
    if name.endswith(COLUMN_PARALLEL):
        return full.chunk(tp, dim=0)[rank]
    if name.endswith(ROW_PARALLEL):
        return full.chunk(tp, dim=1)[rank]
    return full


def tp_offset(name: str, full_shape, tp: int, rank: int) -> tuple[int, ...]:
    off = [0] * len(full_shape)
    if name.endswith(COLUMN_PARALLEL):
        off[0] = rank * full_shape[0] // tp
    elif name.endswith(ROW_PARALLEL):
        off[1] = rank * full_shape[1] // tp
    return tuple(off)


# =============================================================================================================
# tokenizer
# =============================================================================================================
def corpus_lines() -> tuple[list[str], list[str]]:
    stdlib = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))
    lines, used, total = [], [], 0
    for f in files:
        with open(os.path.join(stdlib, f), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        lines.extend(text.splitlines())
        used.append(f)
        total += len(text.encode("utf-8"))
        if total >= CORPUS_BYTES:
            break
    return lines, used


def make_tokenizer(path: Path) -> dict:
    import sentencepiece as spm

    lines, used = corpus_lines()
    buf = io.BytesIO()
    # sentence_iterator + model_writer keep file paths out of the stored trainer_spec (byte-stable reruns).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=USER_SYMBOLS,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # keep indentation and repeated spaces: decode(encode(x)) == x
        num_threads=1,
        input_sentence_size=200_000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == TOKENIZER_VOCAB, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    for sym in USER_SYMBOLS:
        ids = sp.encode("a" + sym + "b")
        assert sp.piece_to_id(sym) in ids, (sym, ids)
    sample = "def f(x):\n    return x ** 2  # é ∑ 12345 <extra_id_1>User\n"
    assert sp.decode(sp.encode(sample)) == sample
    return {"files": used, "lines": len(lines), "python": sys.version.split()[0],
            "space_id": sp.piece_to_id("\u2581"), "extra_id_1": sp.encode("<extra_id_1>"),
            "sample_ids": sp.encode("<extra_id_1>User\nHello")}


# =============================================================================================================
# NeMo model directory
# =============================================================================================================
def model_config_yaml(tp: int, fmt: str) -> str:
    import yaml

    cfg = {
        "mcore_gpt": True,
        "num_layers": NUM_LAYERS,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN,
        "num_attention_heads": HEADS,
        "num_query_groups": GROUPS,
        "kv_channels": KV_CHANNELS,
        "encoder_seq_length": SEQ_LEN,
        "max_position_embeddings": SEQ_LEN,
        "position_embedding_type": "rope",
        "rotary_percentage": ROTARY_PERCENT,
        "rotary_base": ROTARY_BASE,
        "activation": "squared-relu",
        "normalization": "layernorm1p",
        "layernorm_epsilon": EPS,
        "bias": False,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "precision": "bf16",
        "megatron_amp_O2": False,
        "transformer_engine": True,
        "dist_ckpt_format": fmt,
        "tokenizer": {
            "library": "sentencepiece",
            "type": None,
            "model": f"nemo:{TOKENIZER_ARTIFACT}",
            "vocab_file": None,
            "merge_file": None,
            "sentencepiece_legacy": False,
        },
    }
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


# =============================================================================================================
# worker side (runs under either venv, one process per rank)
# =============================================================================================================
def _squared_relu(x):
    import torch
    return torch.pow(torch.nn.functional.relu(x), 2)


class _CpuCudaPatch:
    """dist_checkpointing's writers call torch.cuda.synchronize / current_device; make them harmless on CPU."""

    def __enter__(self):
        import torch
        self._saved = (torch.cuda.synchronize, torch.cuda.current_device)
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize, torch.cuda.current_device = self._saved
        return False


def _build_gpt(tp: int, dtype_name: str):
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, kv_channels=KV_CHANNELS, tensor_model_parallel_size=tp,
        normalization="LayerNorm", activation_func=_squared_relu, gated_linear_unit=False,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=EPS,
        use_cpu_initialization=True, perform_initialization=False, params_dtype=torch.float32,
    )
    zero_centered = True
    try:
        config = TransformerConfig(layernorm_zero_centered_gamma=True, **common)
        model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB_PADDED,
                         max_sequence_length=SEQ_LEN, position_embedding_type="rope",
                         rotary_percent=ROTARY_PERCENT, rotary_base=ROTARY_BASE,
                         share_embeddings_and_output_weights=False)
    except AssertionError as exc:
        zero_centered = False
        reason = str(exc).splitlines()[0]
        config = TransformerConfig(layernorm_zero_centered_gamma=False, **common)
        model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB_PADDED,
                         max_sequence_length=SEQ_LEN, position_embedding_type="rope",
                         rotary_percent=ROTARY_PERCENT, rotary_base=ROTARY_BASE,
                         share_embeddings_and_output_weights=False)
    if dtype_name == "bfloat16":
        model = model.to(torch.bfloat16)  # as NeMo's Float16Module (megatron_amp_O2) does: norms included
    info = {"layernorm_zero_centered_gamma": zero_centered}
    if not zero_centered:
        info["refused_because"] = reason
    return model, info


def _te_name(sharded_tensor) -> tuple[str, int | None]:
    """The reference (TE-spec, per-layer) name of a ShardedTensor, using MCore's own key and offsets."""
    key = sharded_tensor.key
    assert key.startswith("model."), key
    key = key[len("model."):]
    prepend = getattr(sharded_tensor, "prepend_axis_num", 0)
    if key.startswith("decoder.layers."):
        assert prepend == 1, (key, prepend)
        layer = sharded_tensor.global_offset[0]
        return "decoder.layers.%d.%s" % (layer, key[len("decoder.layers."):]), layer
    assert prepend == 0, (key, prepend)
    return key, None


def _walk_sharded(model, ref: dict, tp: int, rank: int):
    """Yield (local param name, sharded tensor, reference name, expected local piece) and check MCore's layout
    (key, global shape, offsets) against the reference names/shapes and our TP split rule."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    sd = model.sharded_state_dict(prefix="model.")
    seen_objects = []
    for local_key, sh in sd.items():
        if isinstance(sh, ShardedObject):
            seen_objects.append(sh.key)
            continue
        assert isinstance(sh, ShardedTensor), (local_key, type(sh))
        ref_name, layer = _te_name(sh)
        assert ref_name in ref, f"MCore key {sh.key} -> {ref_name} is not a reference name"
        full = ref[ref_name]
        gshape = tuple(sh.global_shape)
        expect_gshape = ((NUM_LAYERS,) if layer is not None else ()) + tuple(full.shape)
        assert gshape == expect_gshape, (ref_name, gshape, expect_gshape)
        piece = tp_shard(ref_name, full, tp, rank)
        assert tuple(sh.local_shape) == tuple(piece.shape), (ref_name, sh.local_shape, piece.shape)
        off = tuple(sh.global_offset[1:] if layer is not None else sh.global_offset)
        assert off == tp_offset(ref_name, full.shape, tp, rank), (ref_name, off)
        yield local_key[len("model."):], sh, ref_name, piece
    assert seen_objects, "expected _extra_state ShardedObjects"


def _init_dist(tp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return dist.get_rank()


def worker(job: dict) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import torch
    import megatron.core
    from megatron.core import dist_checkpointing, parallel_state

    tp, mode, ckpt_dir = job["tp"], job["mode"], Path(job["dir"]) / "model_weights"
    dtype = getattr(torch, job["dtype"])
    rank = _init_dist(tp)
    ref = load_reference(Path(job["reference"]))
    model, info = _build_gpt(tp, job["dtype"])
    info["megatron_core"] = megatron.core.__version__
    names = [n for n, _ in model.named_parameters()]

    if mode == "save":
        covered = set()
        with torch.no_grad():
            for pname, sh, ref_name, piece in _walk_sharded(model, ref, tp, rank):
                sh.data.copy_(piece.to(dtype))
                covered.add(ref_name)
                assert sh.data.data_ptr() == dict(model.named_parameters())[pname].data_ptr(), pname
        assert covered == set(ref), set(ref) ^ covered
        if rank == 0:
            # the name map MCore uses (local-spec module name -> checkpoint key), for the report
            info["local_to_checkpoint_key"] = {
                k[len("model."):]: v.key for k, v in model.sharded_state_dict(prefix="model.").items()
                if k.startswith("model.decoder.layers.0.") or not k.startswith("model.decoder.layers.")}
        strategy = ("zarr", 1) if job["format"] == "zarr" else None
        sd = model.sharded_state_dict(prefix="model.")
        with _CpuCudaPatch():
            dist_checkpointing.save(sd, str(ckpt_dir), sharded_strategy=strategy)
        info["saved"] = str(ckpt_dir)
    elif mode == "load":
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        sd = model.sharded_state_dict(prefix="model.")
        loaded = dist_checkpointing.load(sd, str(ckpt_dir))
        state = {k[len("model."):]: v for k, v in loaded.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert not [m for m in missing if not m.endswith("_extra_state")], missing
        worst = 0.0
        count = 0
        for pname, sh, ref_name, piece in _walk_sharded(model, ref, tp, rank):
            got = sh.data
            want = piece.to(dtype)
            assert got.dtype == want.dtype, (pname, got.dtype, want.dtype)
            if not torch.equal(got, want):
                worst = max(worst, (got.float() - want.float()).abs().max().item())
            count += 1
        assert count == len(names), (count, len(names))
        info["max_abs_diff"] = worst
        info["tensors_compared"] = count
        if worst != 0.0:
            raise SystemExit(f"rank {rank}: loaded weights differ from the reference by {worst}")
    else:
        raise ValueError(mode)

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(info), flush=True)


# =============================================================================================================
# parent side
# =============================================================================================================
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(python: str, job: dict, world: int, timeout: float = 600) -> dict:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([python, "-u", __file__, "--worker", json.dumps(job)], env=env,
                                      cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.time() + timeout
    outputs, failed = [], False
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"worker {job} timed out (is psutil installed in {python}'s venv?)")
        outputs.append(out)
        failed |= p.returncode != 0
    if failed:
        for rank, out in enumerate(outputs):
            sys.stderr.write(f"---- rank {rank} ({python}) ----\n{out}\n")
        raise SystemExit(f"worker failed: {job}")
    for line in outputs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"no result from worker {job}:\n{outputs[0]}")


def make_fixture_venv(python_for_venv: str) -> None:
    pip = str(FIXTURE_VENV / "bin" / "pip")
    steps = [
        [python_for_venv, "-m", "venv", str(FIXTURE_VENV)],
        [pip, "install", "torch==2.13.0"],
        [pip, "install", "--no-deps", "megatron-core==0.10.0"],
        [pip, "install", "zarr<3", "tensorstore==0.1.86", "numpy", "psutil", "packaging", "safetensors",
         "sentencepiece", "pyyaml"],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def inspect_torch_dist(weights_dir: Path) -> dict:
    """What is inside a torch_dist model_weights/ (for the README and the report)."""
    import pickle
    import torch

    out = {"metadata.json": json.loads((weights_dir / "metadata.json").read_text()),
           "files": sorted(p.name for p in weights_dir.iterdir())}
    try:
        common = torch.load(weights_dir / "common.pt", map_location="cpu", weights_only=True)
        out["common.pt"] = repr(common)
        out["common.pt_weights_only"] = True
    except Exception as exc:  # pragma: no cover - informative only
        out["common.pt_weights_only"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        out["common.pt"] = repr(torch.load(weights_dir / "common.pt", map_location="cpu", weights_only=False))
    with open(weights_dir / ".metadata", "rb") as fh:
        md = pickle.load(fh)
    out[".metadata"] = type(md).__module__ + "." + type(md).__name__
    out[".metadata_keys"] = {k: type(v).__name__ for k, v in sorted(md.state_dict_metadata.items())}
    return out


def check_zarr(weights_dir: Path, ref: dict, tp: int) -> dict:
    """Read every zarr array's raw chunk files with numpy and compare with the reference rounded to bf16."""
    import numpy as np
    import torch

    meta = json.loads((weights_dir / "metadata.json").read_text())
    assert meta["sharded_backend"] == "zarr", meta
    arrays, objects = 0, []
    for d in sorted(weights_dir.iterdir()):
        if not d.is_dir():
            continue
        if not (d / ".zarray").exists():
            objects.append(f"{d.name}/{','.join(sorted(p.name for p in d.iterdir()))}")
            continue
        z = json.loads((d / ".zarray").read_text())
        assert z["dtype"] == "bfloat16" and z["compressor"] is None and z["order"] == "C", (d.name, z)
        assert z["zarr_format"] == 2 and z.get("dimension_separator", ".") == ".", (d.name, z)
        key = d.name[len("model."):]
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            full = torch.stack([ref[f"decoder.layers.{i}.{rest}"] for i in range(NUM_LAYERS)])
        else:
            full = ref[key]
        assert list(full.shape) == z["shape"], (d.name, full.shape, z["shape"])
        want_bits = full.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        got = np.zeros(z["shape"], dtype=np.uint16)
        grid = [s // c for s, c in zip(z["shape"], z["chunks"])]
        for idx in np.ndindex(*grid):
            chunk_file = d / ".".join(str(i) for i in idx)
            raw = np.fromfile(chunk_file, dtype="<u2").reshape(z["chunks"])
            sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, z["chunks"]))
            got[sl] = raw
        assert np.array_equal(got, want_bits), f"{d.name}: zarr bytes differ from reference bf16"
        arrays += 1
    # one array, by hand, as a loader would do it: layer 1, TP rank 1 of linear_qkv
    d = weights_dir / "model.decoder.layers.self_attention.linear_qkv.weight"
    raw = np.fromfile(d / "1.1.0", dtype=np.uint16)
    shard = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).reshape(-1, HIDDEN)
    want = ref["decoder.layers.1.self_attention.linear_qkv.weight"].chunk(tp, 0)[1].to(torch.bfloat16)
    assert torch.equal(shard, want)
    qkv_zarray = json.loads((d / ".zarray").read_text())
    return {"arrays_checked": arrays, "extra_state_objects": objects, "example_zarray": qkv_zarray}


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def write_readme(report: dict) -> None:
    sizes = report["sizes"]
    total = sum(sizes.values())
    tok = report["tokenizer"]
    qkv_rows = (HEADS + 2 * GROUPS) * KV_CHANNELS
    td = report["torch_dist_layout"]
    lines = [
        "# Test fixtures",
        "",
        "Generated by `scripts/make_fixtures.py` (do not edit by hand). Rebuild with:",
        "",
        "```",
        ".venv/bin/python scripts/make_fixtures.py --make-fixture-venv   # once",
        ".venv/bin/python scripts/make_fixtures.py",
        "```",
        "",
        f"Writers: megatron-core {report['mcore_main']} (torch_dist) and megatron-core {report['mcore_zarr']} "
        f"(zarr, in `.fixture-venv`), torch {report['torch']}, sentencepiece {report['sentencepiece']}, "
        f"Python {tok['python']}.",
        "",
        "## The tiny Nemotron-4",
        "",
        f"`num_layers` {NUM_LAYERS}, `hidden_size` {HIDDEN}, `ffn_hidden_size` {FFN}, `num_attention_heads` {HEADS}, "
        f"`num_query_groups` {GROUPS}, `kv_channels` {KV_CHANNELS} (≠ hidden/heads, like Minitron-8B), padded vocab "
        f"{VOCAB_PADDED} (tokenizer {TOKENIZER_VOCAB} → multiple of 128·TP), squared-relu without GLU, LayerNorm1p "
        f"(eps {EPS}), no linear biases, RoPE base {ROTARY_BASE} on {ROTARY_PERCENT:g} of each head, untied output "
        f"layer, seq 256. Weights: `torch.Generator().manual_seed({SEED})`, `randn` in file order of "
        f"`reference_layout()`; matrices std {STD_MATRIX}, LayerNorm weights std {STD_LN_WEIGHT} (zero-centred: "
        f"gamma = 1 + w), LayerNorm biases std {STD_LN_BIAS}.",
        "",
        "## Files",
        "",
        "| fixture | what | bytes |",
        "|---|---|---|",
        f"| `tiny_tokenizer.model` | SentencePiece BPE, {TOKENIZER_VOCAB} pieces: `<pad>` 0, `<unk>` 1, `<s>` 2, "
        f"`</s>` 3, then user-defined `<extra_id_0>` 4, `<extra_id_1>` 5, `<|endoftext|>` 6, `\\n` 7, then 256 "
        f"byte pieces; identity normalisation, no whitespace collapsing, dummy prefix on, digits split | "
        f"{sizes['tiny_tokenizer.model']} |",
        f"| `tiny_reference.safetensors` | full fp32 weights, MCore TE-spec names without prefix | "
        f"{sizes['tiny_reference.safetensors']} |",
        f"| `tiny_tp1_torch_dist/` | NeMo model dir, TP=1, torch_dist, fp32 | {sizes['tiny_tp1_torch_dist']} |",
        f"| `tiny_tp2_torch_dist/` | NeMo model dir, TP=2, torch_dist, fp32 | {sizes['tiny_tp2_torch_dist']} |",
        f"| `tiny_tp2_zarr/` | NeMo model dir, TP=2, zarr, bf16 | {sizes['tiny_tp2_zarr']} |",
        f"| total | | {total} |",
        "",
        f"Tokenizer corpus: {len(tok['files'])} files ({tok['files'][0]} … {tok['files'][-1]}) from the standard "
        f"library of Python {tok['python']}, {tok['lines']} lines. `encode('<extra_id_1>')` = {tok['extra_id_1']}; "
        f"`encode('<extra_id_1>User\\nHello')` = {tok['sample_ids']}. The leading {tok['space_id']} is `▁` from "
        "`add_dummy_prefix` (on, the default): `<extra_id_1>` itself is one piece (5), but encoding text that "
        "starts with it yields `▁` first (NeMo's end-string check prefixes `<extra_id_1>` for this reason). "
        "`\\n` is piece 7 (without it SentencePiece would only know `<0x0A>`); characters outside the corpus "
        "fall back to byte pieces.",
        "",
        "## Reference tensors (`tiny_reference.safetensors`)",
        "",
        f"- `embedding.word_embeddings.weight` [{VOCAB_PADDED}, {HIDDEN}], `output_layer.weight` "
        f"[{VOCAB_PADDED}, {HIDDEN}]",
        f"- per layer `decoder.layers.{{i}}.`: `self_attention.linear_qkv.weight` [{qkv_rows}, {HIDDEN}] "
        f"(rows per query group: {HEADS // GROUPS} q heads, k, v; {KV_CHANNELS} each), "
        f"`self_attention.linear_qkv.layer_norm_{{weight,bias}}` [{HIDDEN}], `self_attention.linear_proj.weight` "
        f"[{HIDDEN}, {HEADS * KV_CHANNELS}], `mlp.linear_fc1.weight` [{FFN}, {HIDDEN}], "
        f"`mlp.linear_fc1.layer_norm_{{weight,bias}}` [{HIDDEN}], `mlp.linear_fc2.weight` [{HIDDEN}, {FFN}]",
        f"- `decoder.final_layernorm.{{weight,bias}}` [{HIDDEN}]",
        "",
        "These names and shapes were checked against the `sharded_state_dict()` of MCore's `GPTModel` (keys, "
        "global shapes, TP offsets) while writing the checkpoints.",
        "",
        "## NeMo model directories",
        "",
        "Each holds `model_config.yaml` (NeMo keys; `tokenizer.model: nemo:" + TOKENIZER_ARTIFACT + "`), "
        "the tokenizer under that name, and `model_weights/` written by `dist_checkpointing.save("
        "model.sharded_state_dict(prefix='model.'), ...)` from an MCore `GPTModel` (local layer spec, CPU, gloo; "
        "TP=2 uses two processes, each copying its own shard: `linear_qkv`, `linear_fc1`, embedding and "
        "output layer split along dim 0, `linear_proj` and `linear_fc2` along dim 1, contiguously).",
        "",
        f"- MCore's local spec refuses `layernorm_zero_centered_gamma=True` "
        f"(\"{report['zero_centered_refused']}\"), so the models were built without it. The stored numbers are "
        "the zero-centred weights w either way (the flag only changes the forward pass: gamma = 1 + w).",
        "- Per-layer tensors are stacked: the checkpoint key drops the layer index and gains a leading axis of "
        f"size {NUM_LAYERS} (`model.decoder.layers.self_attention.linear_qkv.weight` is "
        f"[{NUM_LAYERS}, {qkv_rows}, {HIDDEN}]). The local spec's `input_layernorm` / `pre_mlp_layernorm` are "
        "saved under the TE names `linear_qkv.layer_norm_*` / `linear_fc1.layer_norm_*`.",
        f"- torch_dist `model_weights/`: {', '.join(td['files'])}. `metadata.json` = "
        f"`{json.dumps(td['metadata.json'])}`. `.metadata` is a pickled `{td['.metadata']}` (tensor keys → "
        "global shape/dtype and per-chunk offsets, file and byte ranges); reading it needs `pickle` with torch "
        "importable. `common.pt` = `" + td["common.pt"] + "` (`torch.load(weights_only=True)`: "
        + ("works" if td["common.pt_weights_only"] is True else td["common.pt_weights_only"]) + "). "
        "The `_extra_state` entries (None for the local spec; TE fp8 metadata in real checkpoints) are stored "
        "inside the .distcp files as byte objects named `..._extra_state/shard_{layer}_" + str(NUM_LAYERS) + "`. "
        "Each item inside a `.distcp` file (a tensor chunk or an `_extra_state` object) is its own `torch.save` "
        "zip at the byte range that `.metadata`'s `storage_data` gives; tensor items load with "
        "`torch.load(weights_only=True)`. `__{rank}_{thread}.distcp`: MCore's torch_dist writer uses 2 threads per "
        "rank; replicated tensors (layer norms) are written once, by TP rank 0. `.metadata.storage_meta` holds the "
        "checkpoint path given to `save` (here relative to the repository) and a random `save_id`, so "
        "`.metadata` differs from run to run while the tensor bytes do not.",
        f"- zarr `model_weights/`: `metadata.json` = `{json.dumps(report['zarr']['metadata.json'])}`, `common.pt`, "
        "one zarr v2 directory per tensor (e.g. `model.decoder.layers.self_attention.linear_qkv.weight/` with "
        f"chunks `{{layer}}.{{tp_rank}}.0`; `.zarray` = `{json.dumps(report['zarr']['example_zarray'])}`) and one "
        "directory per `_extra_state` with `shard_{layer}_" + str(NUM_LAYERS) + ".pt` files (torch.save of None).",
        "",
        "## Checks run by the script",
        "",
    ] + [f"- {c}" for c in report["checks"]] + [""]
    (FIXTURES / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-fixture-venv", action="store_true", help="create .fixture-venv first")
    ap.add_argument("--zarr-python", default=str(FIXTURE_VENV / "bin" / "python"),
                    help="interpreter with megatron-core 0.10.0 + zarr<3 + tensorstore (default: .fixture-venv)")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.make_fixture_venv:
        make_fixture_venv(os.path.join(sys.base_prefix, "bin", "python3"))
    if not Path(args.zarr_python).exists():
        raise SystemExit(f"{args.zarr_python} missing: run with --make-fixture-venv (see the docstring)")

    import megatron.core
    import sentencepiece
    import torch

    FIXTURES.mkdir(parents=True, exist_ok=True)
    report: dict = {"checks": [], "mcore_main": megatron.core.__version__, "torch": torch.__version__,
                    "sentencepiece": sentencepiece.__version__}

    tok_path = FIXTURES / "tiny_tokenizer.model"
    report["tokenizer"] = make_tokenizer(tok_path)
    print(f"tokenizer: {tok_path} ({tok_path.stat().st_size} B, {len(report['tokenizer']['files'])} files)")

    ref_path = FIXTURES / "tiny_reference.safetensors"
    make_reference_weights(ref_path)
    ref = load_reference(ref_path)
    print(f"reference: {ref_path} ({ref_path.stat().st_size} B, {len(ref)} tensors, "
          f"{sum(t.numel() for t in ref.values())} parameters)")

    for name, tp, fmt, dtype in CHECKPOINTS:
        out = FIXTURES / name
        if out.exists():
            shutil.rmtree(out)
        (out / "model_weights").mkdir(parents=True)
        python = args.zarr_python if fmt == "zarr" else sys.executable
        # a path relative to the repository (the workers' cwd): torch_dist stores it in .metadata
        job = {"mode": "save", "tp": tp, "format": fmt, "dtype": dtype, "dir": str(out.relative_to(REPO)),
               "reference": str(ref_path)}
        info = run_ranks(python, job, world=tp)
        (out / "model_config.yaml").write_text(model_config_yaml(tp, fmt))
        shutil.copyfile(tok_path, out / TOKENIZER_ARTIFACT)
        meta = json.loads((out / "model_weights" / "metadata.json").read_text())
        assert meta["sharded_backend"] == fmt, meta
        print(f"{name}: written by megatron-core {info['megatron_core']} (TP={tp}, {fmt}, {dtype}); "
              f"layernorm_zero_centered_gamma accepted: {info['layernorm_zero_centered_gamma']}")
        if not info["layernorm_zero_centered_gamma"]:
            report["zero_centered_refused"] = info["refused_because"]
        if fmt == "zarr":
            report["mcore_zarr"] = info["megatron_core"]
        if "local_to_checkpoint_key" in info and name == "tiny_tp1_torch_dist":
            report["name_map"] = info["local_to_checkpoint_key"]

    # ---- self-check ------------------------------------------------------------------------------------------
    for src, tp_load, python in [("tiny_tp1_torch_dist", 1, sys.executable),
                                 ("tiny_tp2_torch_dist", 2, sys.executable),
                                 ("tiny_tp1_torch_dist", 2, sys.executable),
                                 ("tiny_tp2_torch_dist", 1, sys.executable),
                                 ("tiny_tp2_zarr", 1, args.zarr_python),
                                 ("tiny_tp2_zarr", 2, args.zarr_python)]:
        dtype = "bfloat16" if "zarr" in src else "float32"
        job = {"mode": "load", "tp": tp_load, "format": "", "dtype": dtype, "dir": str(FIXTURES / src),
               "reference": str(ref_path)}
        info = run_ranks(python, job, world=tp_load)
        msg = (f"{src} loaded by megatron-core {info['megatron_core']} dist_checkpointing.load into a fresh "
               f"TP={tp_load} GPTModel: {info['tensors_compared']} tensors equal the reference"
               f"{' rounded to bf16' if dtype == 'bfloat16' else ''} exactly (max |diff| {info['max_abs_diff']})")
        print("check:", msg)
        report["checks"].append(msg)

    zinfo = check_zarr(FIXTURES / "tiny_tp2_zarr" / "model_weights", ref, tp=2)
    zinfo["metadata.json"] = json.loads((FIXTURES / "tiny_tp2_zarr" / "model_weights" / "metadata.json").read_text())
    report["zarr"] = zinfo
    msg = (f"tiny_tp2_zarr: all {zinfo['arrays_checked']} zarr arrays read from raw chunk bytes with numpy "
           "(uint16 → bf16) equal the reference rounded to bf16 (round-to-nearest-even) bit for bit")
    print("check:", msg)
    report["checks"].append(msg)

    report["torch_dist_layout"] = inspect_torch_dist(FIXTURES / "tiny_tp2_torch_dist" / "model_weights")
    report["sizes"] = {p: dir_size(FIXTURES / p) for p in
                       ["tiny_tokenizer.model", "tiny_reference.safetensors", "tiny_tp1_torch_dist",
                        "tiny_tp2_torch_dist", "tiny_tp2_zarr"]}
    write_readme(report)

    print("\nsummary")
    for k, v in report["sizes"].items():
        print(f"  {k:30s} {v:>9d} B")
    print(f"  {'total':30s} {sum(report['sizes'].values()):>9d} B")
    print("  torch_dist files:", report["torch_dist_layout"]["files"])
    print("  common.pt:", report["torch_dist_layout"]["common.pt"],
          "| weights_only load:", report["torch_dist_layout"]["common.pt_weights_only"])
    print("  .metadata:", report["torch_dist_layout"][".metadata"])
    print("  zarr _extra_state dirs:", len(zinfo["extra_state_objects"]), zinfo["extra_state_objects"][:1])
    print("  local-spec name -> checkpoint key:")
    for k, v in report.get("name_map", {}).items():
        print(f"    {k} -> {v}")
    print("  sha256:", {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (tok_path, ref_path)})


if __name__ == "__main__":
    main()
