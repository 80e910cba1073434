"""Bad checkpoints fail with one clear error naming the file (and the tensor where there is one).

Pickles: a `common.pt` or `.metadata` holding an object whose `__reduce__` creates a marker file is refused, and
the marker proves the payload never ran (a positive control shows the same payload does run when unpickled).
"""
import io
import json
import os
import pickle
import shutil
import tarfile

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from hf_reference import random_mcore_state
from nemotron.checkpoint import hf, nemo
from nemotron.checkpoint.loader import load_full_state, load_model
from nemotron.checkpoint.shards import CheckpointError
from nemotron.config import ConfigError, ModelConfig

TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer.model")
QKV = "model.decoder.layers.self_attention.linear_qkv.weight"
FC2 = "model.decoder.layers.mlp.linear_fc2.weight"


class Payload:
    """Unpickling this creates `marker` (builtins open in write mode): the side effect we must never see."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def edit_yaml(path, **changes):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def error_of(path, exc=CheckpointError, loader=load_model):
    with pytest.raises(exc) as info:
        loader(str(path)) if loader is not load_model else load_model(str(path), progress=False)
    print("ERROR:", info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_cfg, tiny_state):
    path = tmp_path_factory.mktemp("hf") / "tiny_hf"
    hf.save_hf_dir(str(path), tiny_state, tiny_cfg, TOKENIZER)
    return path


def copy_hf(hf_dir, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_dir, dst)
    return dst


# --- truncated / missing data ---------------------------------------------------------------------------------

def test_truncated_zarr_chunk(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    chunk = ck / "model_weights" / FC2 / "2.0.1"
    truncate(chunk, 100)
    msg = error_of(ck)
    assert str(chunk) in msg and FC2 in msg and "truncated" in msg


def test_missing_zarr_chunk(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    chunk = ck / "model_weights" / QKV / "3.1.0"
    os.remove(chunk)
    msg = error_of(ck)
    assert str(chunk) in msg and QKV in msg and "missing" in msg


def test_missing_zarr_tensor(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    shutil.rmtree(ck / "model_weights" / "model.decoder.final_layernorm.bias")
    msg = error_of(ck)
    assert "model.decoder.final_layernorm.bias" in msg and "missing" in msg


def test_compressed_zarr_refused(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    meta = ck / "model_weights" / QKV / ".zarray"
    data = json.loads(meta.read_text())
    data["compressor"] = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}
    meta.write_text(json.dumps(data))
    msg = error_of(ck)
    assert str(meta) in msg and QKV in msg and "compress" in msg


@pytest.mark.parametrize("content,message", [("{\"shape\": [4,", "unreadable JSON"),
                                             ("[1, 2]", "expected a JSON object")])
def test_bad_json_named_in_both_formats(content, message, hf_dir, tmp_path):
    """A zarr array's .zarray and an HF config.json go through one reader (checkpoint/shards.py): a broken or
    non-object file is named, and for zarr so is the tensor."""
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    meta = ck / "model_weights" / QKV / ".zarray"
    meta.write_text(content)
    msg = error_of(ck)
    assert str(meta) in msg and QKV in msg and message in msg
    hf_ck = copy_hf(hf_dir, tmp_path)
    (hf_ck / "config.json").write_text(content)
    msg = error_of(hf_ck)
    assert str(hf_ck / "config.json") in msg and message in msg


def test_truncated_distcp(tmp_path):
    ck = copy_fixture("tiny_tp1_torch_dist", tmp_path)
    data = ck / "model_weights" / "__0_1.distcp"
    truncate(data, os.path.getsize(data) // 2)
    msg = error_of(ck)
    assert str(data) in msg and "truncated" in msg and "model.decoder.layers." in msg


def test_missing_distcp(tmp_path):
    ck = copy_fixture("tiny_tp2_torch_dist", tmp_path)
    os.remove(ck / "model_weights" / "__1_0.distcp")
    msg = error_of(ck)
    assert "__1_0.distcp" in msg and "missing" in msg


def test_truncated_safetensors(hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    data = ck / "model.safetensors"
    truncate(data, os.path.getsize(data) - 1000)
    msg = error_of(ck)
    assert str(data) in msg and "truncated" in msg


def test_missing_hf_tensor(hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    tensors = load_file(ck / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, ck / "model.safetensors")
    msg = error_of(ck)
    assert "model.layers.2.self_attn.k_proj.weight" in msg and "missing" in msg and "model.safetensors" in msg


def test_index_names_missing_shard(hf_dir, tmp_path, tiny_cfg, tiny_state):
    ck = tmp_path / "sharded"
    hf.save_hf_dir(str(ck), tiny_state, tiny_cfg, TOKENIZER, max_shard_bytes=400_000)
    victim = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[-1]
    os.remove(ck / victim)
    msg = error_of(ck)
    assert victim in msg and "missing" in msg


def test_missing_torch_dist_tensor(tmp_path, tiny_cfg, tiny_state):
    """A torch_dist checkpoint (written by megatron-core) that lacks output_layer.weight."""
    from megatron.core import dist_checkpointing

    from nemotron.checkpoint import torch_dist
    from nemotron.model import NemotronModel

    ck = copy_fixture("tiny_tp1_torch_dist", tmp_path)
    shutil.rmtree(ck / "model_weights")
    os.mkdir(ck / "model_weights")
    model = NemotronModel(tiny_cfg)
    model.load_state_dict(tiny_state)
    sharded = torch_dist.sharded_state_dict(model, {k: v.detach() for k, v in model.named_parameters()})
    del sharded["output_layer.weight"]
    torch_dist.ensure_process_group()
    torch_dist._fork_results_queue()
    with torch_dist._cpu_safe_writer():
        dist_checkpointing.save(sharded, str(ck / "model_weights"))
    msg = error_of(ck)
    assert "model.output_layer.weight" in msg and "missing" in msg and "model_weights" in msg


def test_nan_weights_refused(hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    tensors = load_file(ck / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, ck / "model.safetensors")
    msg = error_of(ck)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in msg and "NaN" in msg


# --- config / weights disagreement ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_tp1_torch_dist", "tiny_tp2_zarr"])
def test_config_disagrees_with_weights(fixture, tmp_path):
    ck = copy_fixture(fixture, tmp_path)
    edit_yaml(ck / "model_config.yaml", ffn_hidden_size=128)
    msg = error_of(ck)
    assert "model.decoder.layers.mlp.linear_fc1.weight" in msg and "(4, 256, 64)" in msg and "(4, 128, 64)" in msg


def test_hf_config_disagrees_with_weights(hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (ck / "config.json").write_text(json.dumps(cfg))
    msg = error_of(ck)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "model.safetensors" in msg and "(512, 64)" in msg


def test_hf_vocab_disagrees_with_embedding(hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vocab_size"] = 640
    (ck / "config.json").write_text(json.dumps(cfg))
    msg = error_of(ck)
    assert "model.embed_tokens.weight" in msg and "512" in msg and "640" in msg


def test_tokenizer_larger_than_padded_vocab(tmp_path):
    cfg = ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1,
                      kv_channels=8, padded_vocab_size=256, max_position_embeddings=32)
    hf.save_hf_dir(str(tmp_path / "small"), random_mcore_state(cfg), cfg, TOKENIZER)
    msg = error_of(tmp_path / "small")
    assert "500" in msg and "256" in msg and "tokenizer" in msg


@pytest.mark.parametrize("key,value", [("activation", "gelu"), ("position_embedding_type", "learned_absolute"),
                                       ("bias", True), ("share_embeddings_and_output_weights", True),
                                       ("gated_linear_unit", True), ("num_moe_experts", 8), ("mcore_gpt", False)])
def test_unsupported_nemo_config_values(key, value, tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    edit_yaml(ck / "model_config.yaml", **{key: value})
    msg = error_of(ck, ConfigError)
    assert key in msg and str(ck / "model_config.yaml") in msg


@pytest.mark.parametrize("key,value", [("hidden_act", "silu"), ("model_type", "llama"), ("tie_word_embeddings", True)])
def test_unsupported_hf_config_values(key, value, hf_dir, tmp_path):
    ck = copy_hf(hf_dir, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    msg = error_of(ck, ConfigError)
    assert key in msg and "config.json" in msg


# --- pickles ---------------------------------------------------------------------------------------------------

def test_payload_positive_control(tmp_path):
    """The payload really runs when unpickled naively, so its absence below means something."""
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "common.pt")
    torch.load(tmp_path / "common.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_common_pt_with_pickled_object_refused(tmp_path):
    ck = copy_fixture("tiny_tp1_torch_dist", tmp_path)
    marker = tmp_path / "ran"
    common = ck / "model_weights" / "common.pt"
    torch.save({"x": Payload(marker)}, common)
    msg = error_of(ck)
    assert str(common) in msg and "refus" in msg
    assert not marker.exists()


def test_malicious_metadata_refused(tmp_path):
    ck = copy_fixture("tiny_tp2_torch_dist", tmp_path)
    marker = tmp_path / "ran"
    meta = ck / "model_weights" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload(marker)))
    msg = error_of(ck)
    assert str(meta) in msg and "refusing to unpickle io.open" in msg
    assert not marker.exists()
    # the converter path too
    with pytest.raises(CheckpointError):
        load_full_state(str(ck))
    assert not marker.exists()


def test_zarr_extra_state_pickles_never_unpickled(tmp_path, tiny_state):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    marker = tmp_path / "ran"
    extra = ck / "model_weights" / "model.decoder.layers.mlp.linear_fc1._extra_state"
    for f in os.listdir(extra):
        torch.save(Payload(marker), extra / f)
    torch.save({"x": Payload(marker)}, ck / "model_weights" / "common.pt")
    lm = load_model(str(ck), progress=False)
    assert not marker.exists()
    assert torch.equal(lm.model.output_layer.weight, tiny_state["output_layer.weight"].to(torch.bfloat16).float())


# --- archives and layout ---------------------------------------------------------------------------------------

def _tar_with(path, extra):
    """A .nemo tar of the zarr fixture's config plus one hostile member."""
    with tarfile.open(path, "w") as tar:
        tar.add(os.path.join(FIXTURES, "tiny_tp2_zarr", "model_config.yaml"), arcname="model_config.yaml")
        extra(tar)


def _add_file(tar, name, data=b"owned"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


@pytest.mark.parametrize("case", ["dotdot", "nested_dotdot", "absolute", "symlink_out", "hardlink_out", "device"])
def test_hostile_tar_members_refused(case, tmp_path):
    archive = tmp_path / "evil.nemo"
    outside = tmp_path / "escaped.txt"
    hostile = {
        "dotdot": lambda t: _add_file(t, "../escaped.txt"),
        "nested_dotdot": lambda t: _add_file(t, "model_weights/../../escaped.txt"),
        "absolute": lambda t: _add_file(t, str(outside)),
        "symlink_out": lambda t: _add_link(t, "tok.model", "../../../etc/passwd"),
        "hardlink_out": lambda t: _add_link(t, "tok.model", "/etc/passwd", tarfile.LNKTYPE),
        "device": lambda t: _add_link(t, "dev", "", tarfile.CHRTYPE),
    }[case]
    _tar_with(archive, hostile)
    msg = error_of(archive)
    assert str(archive) in msg and "refusing" in msg
    assert not outside.exists()


def test_not_a_tar(tmp_path):
    bogus = tmp_path / "model.nemo"
    bogus.write_bytes(b"this is not a tar archive" * 40)
    msg = error_of(bogus)
    assert str(bogus) in msg and "archive" in msg


def test_truncated_tar(tmp_path):
    archive = tmp_path / "tiny.nemo"
    nemo.pack_nemo(os.path.join(FIXTURES, "tiny_tp2_zarr"), str(archive))
    truncate(archive, os.path.getsize(archive) // 2)
    msg = error_of(archive)
    assert str(archive) in msg


def test_path_not_found(tmp_path):
    msg = error_of(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "no such file" in msg


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    assert "not a model checkpoint" in error_of(tmp_path)


def test_legacy_weights_layout_refused(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    shutil.rmtree(ck / "model_weights")
    (ck / "model_weights.ckpt").write_bytes(b"\0" * 16)
    msg = error_of(ck)
    assert "model_weights.ckpt" in msg and "not supported" in msg


def test_unknown_sharded_backend(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    (ck / "model_weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_save"}))
    msg = error_of(ck)
    assert "torch_save" in msg and "metadata.json" in msg


# --- tokenizer block ---------------------------------------------------------------------------------------------

def test_missing_tokenizer_file(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    name = [f for f in os.listdir(ck) if f.endswith("_tokenizer.model")][0]
    os.remove(ck / name)
    msg = error_of(ck)
    assert "tokenizer.model" in msg and name in msg and "missing" in msg


def test_non_sentencepiece_tokenizer_refused(tmp_path):
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    edit_yaml(ck / "model_config.yaml",
              tokenizer={"library": "huggingface", "type": "gpt2", "model": None, "vocab_file": None})
    msg = error_of(ck)
    assert "tokenizer.library" in msg and "huggingface" in msg and "sentencepiece" in msg


def test_tokenizer_model_key_is_used(tmp_path):
    """Some configs name the SentencePiece file under tokenizer.tokenizer_model."""
    ck = copy_fixture("tiny_tp2_zarr", tmp_path)
    with open(ck / "model_config.yaml") as f:
        block = yaml.safe_load(f)["tokenizer"]
    block["tokenizer_model"], block["model"] = block["model"], None
    edit_yaml(ck / "model_config.yaml", tokenizer=block)
    assert load_model(str(ck), progress=False).tokenizer.vocab_size == 500
    os.remove(ck / block["tokenizer_model"][len("nemo:"):])
    assert "tokenizer.tokenizer_model" in error_of(ck)
