"""Conversions are lossless: HF -> NeMo -> HF and NeMo -> HF -> NeMo bit for bit, in every dtype; a .nemo tar
(plain or gzip) is the same checkpoint as its unpacked directory; a sharded HF checkpoint equals a single file."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from nemotron.checkpoint import hf, nemo
from nemotron.checkpoint.loader import load_full_state, load_model
from nemotron.convert import convert, parse_size

TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer.model")


def read_dir_tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def assert_bit_exact(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # compare raw bits: also exact for -0.0 / NaN payloads, which torch.equal would not distinguish
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def same_bytes(p, q):
    with open(p, "rb") as f, open(q, "rb") as g:
        return f.read() == g.read()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hf_nemo_hf_is_bit_exact(dtype, tmp_path, tiny_cfg, tiny_state):
    src = str(tmp_path / "hf")
    hf.save_hf_dir(src, {k: v.to(dtype) for k, v in tiny_state.items()}, tiny_cfg, TOKENIZER)
    assert convert(src, str(tmp_path / "nemo")) == "nemo"
    assert convert(str(tmp_path / "nemo"), str(tmp_path / "hf2")) == "hf"
    assert_bit_exact(read_dir_tensors(src), read_dir_tensors(str(tmp_path / "hf2")))
    with open(os.path.join(src, "config.json")) as f, open(tmp_path / "hf2" / "config.json") as g:
        assert json.load(f) == json.load(g)
    assert same_bytes(os.path.join(src, "tokenizer.model"), tmp_path / "hf2" / "tokenizer.model")
    # the intermediate NeMo directory is a normal one: loadable, stored in the same dtype, torch_dist backend
    lm = load_model(str(tmp_path / "nemo"), progress=False)
    assert lm.format == "nemo-torch_dist" and lm.nemo_config["tokenizer"]["library"] == "sentencepiece"
    assert lm.nemo_config["precision"] == {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}[dtype]


@pytest.mark.parametrize("fixture", ["tiny_tp2_torch_dist", "tiny_tp2_zarr"])
def test_nemo_hf_nemo_is_bit_exact(fixture, tmp_path):
    """fp32 torch_dist written at TP=2, and bf16 zarr: the stored dtype survives both hops."""
    src = os.path.join(FIXTURES, fixture)
    convert(src, str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "nemo"))
    cfg_a, state_a, tok_a = load_full_state(src)
    cfg_b, state_b, tok_b = load_full_state(str(tmp_path / "nemo"))
    assert cfg_a == cfg_b
    assert_bit_exact(state_a, state_b)
    assert same_bytes(tok_a, tok_b)
    expected = torch.bfloat16 if "zarr" in fixture else torch.float32
    assert {v.dtype for v in state_b.values()} == {expected}


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])
def test_nemo_archive_equals_unpacked_dir(gzip, tmp_path):
    src = os.path.join(FIXTURES, "tiny_tp2_zarr")
    archive = str(tmp_path / "tiny.nemo")
    nemo.pack_nemo(src, archive, gzip=gzip)
    home = nemo._extraction_home()
    before = set(os.listdir(home))
    cfg_a, state_a, tok_a = load_full_state(src)
    cfg_b, state_b, tok_b = load_full_state(archive)
    assert cfg_a == cfg_b
    assert_bit_exact(state_a, state_b)
    assert same_bytes(tok_a, tok_b)  # still readable: copied out of the (now deleted) extraction
    lm = load_model(archive, progress=False)
    assert lm.format == "nemo-zarr" and lm.tokenizer.text_to_ids("<extra_id_1>") == [413, 5]
    leftovers = set(os.listdir(home)) - before
    assert not leftovers, f"extraction directories left behind: {leftovers}"
    # and the archive converts like the directory
    convert(archive, str(tmp_path / "hf"))
    assert_bit_exact(hf.load_full_state(str(tmp_path / "hf"), cfg_a), state_a)


def test_torch_dist_archive_equals_unpacked_dir(tmp_path):
    src = os.path.join(FIXTURES, "tiny_tp1_torch_dist")
    archive = str(tmp_path / "tiny.nemo")
    nemo.pack_nemo(src, archive)
    assert_bit_exact(load_full_state(src)[1], load_full_state(archive)[1])


def test_hf_sharded_with_index_equals_single_file(tmp_path, tiny_cfg, tiny_state):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    hf.save_hf_dir(single, tiny_state, tiny_cfg, TOKENIZER)
    hf.save_hf_dir(sharded, tiny_state, tiny_cfg, TOKENIZER, max_shard_bytes=parse_size("300KB"))
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not os.path.exists(os.path.join(single, hf.INDEX)) and os.listdir(single).count(hf.SINGLE) == 1
    with open(os.path.join(sharded, hf.INDEX)) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in read_dir_tensors(single).values())
    assert_bit_exact(read_dir_tensors(single), read_dir_tensors(sharded))
    a, b = load_full_state(single)[1], load_full_state(sharded)[1]
    assert_bit_exact(a, b)
    assert_bit_exact(a, tiny_state)
    # shards without an index are found by their names too
    os.remove(os.path.join(sharded, hf.INDEX))
    assert_bit_exact(load_full_state(sharded)[1], tiny_state)


def test_convert_casts_dtype(tmp_path):
    convert(os.path.join(FIXTURES, "tiny_tp1_torch_dist"), str(tmp_path / "hf"), dtype="bf16")
    tensors = read_dir_tensors(str(tmp_path / "hf"))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31
    assert parse_size("500 mb") == 5 * 10**8 and parse_size("1234") == 1234 and parse_size("1.5KB") == 1500


def test_write_nemo_dir_keeps_extra_config_keys(tmp_path, tiny_cfg, tiny_state):
    """Extra keys of a source model_config.yaml survive; shape keys and the tokenizer block are the writer's."""
    import yaml

    from nemotron.model import NemotronModel

    model = NemotronModel(tiny_cfg)
    model.load_state_dict(tiny_state)
    source = {"micro_batch_size": 4, "num_layers": 99, "tokenizer": {"library": "megatron"}}
    nemo.write_nemo_dir(str(tmp_path / "out"), model, TOKENIZER, source)
    with open(tmp_path / "out" / "model_config.yaml") as f:
        written = yaml.safe_load(f)
    assert written["micro_batch_size"] == 4 and written["num_layers"] == 4 and written["precision"] == 32
    tok = written["tokenizer"]
    assert tok["library"] == "sentencepiece" and tok["sentencepiece_legacy"] is False and tok["type"] is None
    assert tok["model"].startswith("nemo:") and tok["model"].endswith("_tokenizer.model")
    assert same_bytes(tmp_path / "out" / tok["model"][len("nemo:"):], TOKENIZER)
    lm = load_model(str(tmp_path / "out"), progress=False)
    assert lm.cfg == tiny_cfg
    assert torch.equal(lm.model.output_layer.weight, tiny_state["output_layer.weight"])
