"""The embedded demo checkpoint (`nemotron/demo/`): loads through the real NeMo/torch_dist path and still is the
model that was trained (reference loss), with decisive, deterministic greedy completions, and stays small.

How the directory was made: scripts/train_demo.py (corpus -> train on a GPU -> package); numbers in its README.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import nemotron
from nemotron.config import ModelConfig, from_nemo_config
from nemotron.model import NemotronModel
from nemotron.tokenizer import Tokenizer

DEMO = Path(nemotron.__file__).resolve().parent / "demo"
MAX_BYTES = 16_000_000  # "<= 16 MB" on disk, everything in the directory


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DEMO / "metrics.json").read_text())


@pytest.fixture(scope="module")
def nemo_cfg() -> dict:
    return yaml.safe_load((DEMO / "model_config.yaml").read_text())


@pytest.fixture(scope="module")
def tokenizer(nemo_cfg) -> Tokenizer:
    artifact = nemo_cfg["tokenizer"]["model"]
    assert artifact.startswith("nemo:"), artifact
    return Tokenizer(str(DEMO / artifact[len("nemo:"):]))


@pytest.fixture(scope="module")
def model(nemo_cfg) -> NemotronModel:
    """Read exactly as a real checkpoint is: NeMo config keys, vocab rows from the stored embedding shape,
    torch_dist."""
    from nemotron.checkpoint import torch_dist

    ckpt = str(DEMO / "model_weights")
    assert torch_dist.is_torch_dist(ckpt)
    shapes = torch_dist.global_shapes(ckpt)
    cfg = from_nemo_config(nemo_cfg, padded_vocab_size=shapes["embedding.word_embeddings.weight"][0])
    m = NemotronModel(cfg, dtype=torch.float32)
    torch_dist.load(m, ckpt)
    return m.eval()


def greedy(model: NemotronModel, prompt_ids: list[int], n: int, eos_id: int) -> list[int]:
    """Plain-recompute greedy decoding, as scripts/train_demo.py recorded the sample."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([prompt_ids + new])
            nxt = int(model.logits(model(x))[0, -1].argmax())
            new.append(nxt)
            if nxt == eos_id:
                break
    return new


def test_demo_directory_is_small_and_complete(nemo_cfg):
    files = [p for p in DEMO.rglob("*") if p.is_file()]
    names = {p.relative_to(DEMO).as_posix() for p in files}
    for required in ("model_config.yaml", "metrics.json", "model_weights/metadata.json",
                     "model_weights/.metadata", "model_weights/common.pt"):
        assert required in names, required
    assert any(n.startswith("model_weights/__") and n.endswith(".distcp") for n in names)
    assert nemo_cfg["tokenizer"]["model"][len("nemo:"):] in names
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"nemotron/demo is {total} bytes (limit {MAX_BYTES})"


def test_config_is_the_trained_one(nemo_cfg, metrics, model, tokenizer):
    assert nemo_cfg["tokenizer"]["library"] == "sentencepiece"
    assert nemo_cfg["tokenizer"]["sentencepiece_legacy"] is False
    assert model.cfg == ModelConfig(**metrics["model_config"])
    assert tokenizer.vocab_size <= model.cfg.padded_vocab_size
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    for piece in ("<extra_id_0>", "<extra_id_1>", "<|endoftext|>", "\n"):
        assert tokenizer.token_to_id(piece) > 3, piece
    # Stored as bf16 (to stay small), read back into fp32: every weight is exactly a bf16 number.
    for name, p in model.named_parameters():
        assert torch.equal(p, p.to(torch.bfloat16).float()), name


def test_reference_validation_loss_matches_metrics(model, metrics):
    ref = metrics["reference"]
    rows, seq = ref["rows"], ref["seq_len"]
    tokens = ref["tokens"]
    assert len(tokens) == rows * seq + 1
    block = torch.tensor([tokens[r * seq: r * seq + seq + 1] for r in range(rows)])
    with torch.no_grad():
        logits = model.logits(model(block[:, :-1])).float()
        loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), block[:, 1:].reshape(-1)))
    assert math.isfinite(loss)
    assert abs(loss - ref["loss"]) <= 1e-3 * abs(ref["loss"]), (loss, ref["loss"])
    # A trained model, not a random one (ln 4096 = 8.3).
    assert loss < 3.0


def test_greedy_fibonacci_is_deterministic_and_code_like(model, tokenizer, metrics):
    sample = metrics["sample"]
    prompt_ids = tokenizer.text_to_ids(sample["prompt"])
    first = greedy(model, prompt_ids, sample["max_tokens"], tokenizer.eos_id)
    second = greedy(model, prompt_ids, sample["max_tokens"], tokenizer.eos_id)
    assert first == second
    text = tokenizer.ids_to_text(first)
    assert "\n" in text
    lines = text.split("\n")
    assert any(line.startswith("    ") and line.strip() for line in lines), text
    assert len(set(first)) > 8, "degenerate: a handful of tokens repeated"
    # The same tokens as recorded when the checkpoint was packaged (fp32 CPU forward of the same bf16 weights).
    assert first == sample["greedy_ids"], (text, sample["completion"])
    assert text == sample["completion"]
