"""Loading the checkpoints megatron-core itself wrote (tests/fixtures/README.md) and Hugging Face directories.

The reference is HF transformers' NemotronForCausalLM built from tiny_reference.safetensors (the weights the
fixtures were written from). For the bf16 zarr fixture the reference weights are rounded to bf16 first (the
computation stays fp32).
"""
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from hf_reference import hf_model
from nemotron.checkpoint import hf, zarr
from nemotron.checkpoint.loader import load_model
from nemotron.checkpoint.shards import shard_specs
from nemotron.parallel.state import ParallelState

NEMO_FIXTURES = {"tp1_torch_dist": ("tiny_tp1_torch_dist", "nemo-torch_dist", torch.float32),
                 "tp2_torch_dist": ("tiny_tp2_torch_dist", "nemo-torch_dist", torch.float32),
                 "tp2_zarr": ("tiny_tp2_zarr", "nemo-zarr", torch.bfloat16)}
TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer.model")


def rounded(state, dtype):
    return {k: v.to(dtype).to(torch.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_cfg, tiny_state):
    """A HF directory written from the reference weights by our writer (checked against HF below)."""
    path = str(tmp_path_factory.mktemp("hf") / "tiny_hf")
    hf.save_hf_dir(path, tiny_state, tiny_cfg, TOKENIZER)
    return path


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 500, (2, 23), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def reference_logits(tiny_cfg, tiny_state, prompt):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            out[dtype] = hf_model(tiny_cfg, rounded(tiny_state, dtype))(prompt).logits
    return out


def assert_close_rel(got, want, tol=1e-5):
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= tol, f"max relative error {rel:.2e} > {tol}"


@pytest.mark.parametrize("name", sorted(NEMO_FIXTURES) + ["hf"])
def test_logits_match_hf_transformers(name, hf_dir, prompt, reference_logits, tiny_cfg, tiny_state):
    """Each fixture, loaded into a TP=1 model (so the TP=2-written ones are resharded), gives HF's logits."""
    if name == "hf":
        path, fmt, stored = hf_dir, "hf", torch.float32
    else:
        directory, fmt, stored = NEMO_FIXTURES[name]
        path = os.path.join(FIXTURES, directory)
    lm = load_model(path, progress=False)
    assert lm.format == fmt
    assert lm.cfg == tiny_cfg  # padded vocab 512 read from the stored embedding shape
    assert lm.tokenizer.vocab_size == 500
    with torch.no_grad():
        got = lm.model.logits(lm.model(prompt))
    assert_close_rel(got, reference_logits[stored])
    # and the weights themselves are bit-exact (bf16-rounded for zarr)
    ref = rounded(tiny_state, stored)
    for local, spec in shard_specs(lm.model).items():
        assert torch.equal(lm.model.get_parameter(local), ref[spec.name]), spec.name


@pytest.mark.parametrize("rank", [0, 1])
def test_zarr_tp2_rank_reads_exactly_its_rows(rank, tiny_cfg, tiny_state, monkeypatch):
    """A TP=2 rank (no process group needed to load) gets exactly its rows/columns, reading only its chunks."""
    opened = []
    real_memmap = np.memmap

    def spy(path, *args, **kwargs):
        opened.append(os.path.relpath(path, os.path.join(FIXTURES, "tiny_tp2_zarr", "model_weights")))
        return real_memmap(path, *args, **kwargs)

    monkeypatch.setattr(zarr.np, "memmap", spy)
    lm = load_model(os.path.join(FIXTURES, "tiny_tp2_zarr"), ParallelState(tp_size=2, rank=rank), progress=False)
    model, ref = lm.model, rounded(tiny_state, torch.bfloat16)
    r = rank
    # spelled out, independent of ShardSpec.slices(): column-parallel rows, row-parallel columns
    assert torch.equal(model.embedding.word_embeddings.weight,
                       ref["embedding.word_embeddings.weight"][r * 256:(r + 1) * 256])
    assert torch.equal(model.output_layer.weight, ref["output_layer.weight"][r * 256:(r + 1) * 256])
    for i in range(tiny_cfg.num_layers):
        layer, p = model.decoder.layers[i], f"decoder.layers.{i}."
        qkv = ref[p + "self_attention.linear_qkv.weight"]  # one query group (2 q, k, v) = 128 rows per rank
        assert torch.equal(layer.self_attention.linear_qkv.weight, qkv[r * 128:(r + 1) * 128])
        assert torch.equal(layer.self_attention.linear_proj.weight,
                           ref[p + "self_attention.linear_proj.weight"][:, r * 64:(r + 1) * 64])
        assert torch.equal(layer.mlp.linear_fc1.weight, ref[p + "mlp.linear_fc1.weight"][r * 128:(r + 1) * 128])
        assert torch.equal(layer.mlp.linear_fc2.weight, ref[p + "mlp.linear_fc2.weight"][:, r * 128:(r + 1) * 128])
        assert torch.equal(layer.mlp.linear_fc1.layer_norm_weight, ref[p + "mlp.linear_fc1.layer_norm_weight"])
    assert torch.equal(model.decoder.final_layernorm.bias, ref["decoder.final_layernorm.bias"])
    # only this rank's chunks of TP-split tensors were opened: array -> position of the TP index in a chunk key
    tp_axis = {"model.embedding.word_embeddings.weight": 0, "model.output_layer.weight": 0,
               "model.decoder.layers.self_attention.linear_qkv.weight": 1,
               "model.decoder.layers.mlp.linear_fc1.weight": 1,
               "model.decoder.layers.self_attention.linear_proj.weight": 2,
               "model.decoder.layers.mlp.linear_fc2.weight": 2}
    seen = set()
    for f in opened:
        array, chunk = f.split(os.sep)
        if array in tp_axis:
            seen.add(array)
            assert chunk.split(".")[tp_axis[array]] == str(r), f"rank {r} opened {f}"
    assert seen == set(tp_axis)


def test_zarr_tp2_pp2_stage_gets_its_layers(tiny_state):
    """Pipeline stage 1 of 2 (global rank 3 at TP=2) holds global layers 2 and 3 and the output layer."""
    lm = load_model(os.path.join(FIXTURES, "tiny_tp2_zarr"), ParallelState(tp_size=2, pp_size=2, rank=3),
                    progress=False)
    ref = rounded(tiny_state, torch.bfloat16)
    assert lm.model.embedding is None and len(lm.model.decoder.layers) == 2
    assert torch.equal(lm.model.decoder.layers[0].mlp.linear_fc1.weight,
                       ref["decoder.layers.2.mlp.linear_fc1.weight"][128:256])
    assert torch.equal(lm.model.output_layer.weight, ref["output_layer.weight"][256:512])


@pytest.mark.parametrize("rank", [0, 1])
def test_hf_tp2_rank_reads_its_query_groups(rank, hf_dir, tiny_state):
    """From HF q/k/v_proj, a TP=2 rank assembles linear_qkv for its query group only."""
    lm = load_model(hf_dir, ParallelState(tp_size=2, rank=rank), progress=False)
    for local, spec in shard_specs(lm.model).items():
        assert torch.equal(lm.model.get_parameter(local), tiny_state[spec.name][spec.slices()]), spec.name
    qkv = lm.model.decoder.layers[1].self_attention.linear_qkv.weight
    assert torch.equal(qkv,
                       tiny_state["decoder.layers.1.self_attention.linear_qkv.weight"][rank * 128:(rank + 1) * 128])


def test_hf_dir_is_what_transformers_loads(hf_dir, tiny_cfg, tiny_state, prompt, reference_logits):
    """Our HF writer's output loads in transformers' own from_pretrained and gives the reference logits."""
    from transformers import NemotronForCausalLM

    model = NemotronForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_rel(model(prompt).logits, reference_logits[torch.float32], tol=1e-6)


def test_progress_bar_on_rank0_only(capsys):
    path = os.path.join(FIXTURES, "tiny_tp2_zarr")
    load_model(path, ParallelState(tp_size=2, rank=0), progress=True)
    assert "loading tiny_tp2_zarr" in capsys.readouterr().err
    load_model(path, ParallelState(tp_size=2, rank=1), progress=True)
    load_model(path, ParallelState(tp_size=2, rank=0), progress=False)
    assert capsys.readouterr().err == ""
