"""`python -m nemotron.convert` as a user runs it: a subprocess, exit codes, one line on stderr when it fails."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES
from nemotron.checkpoint.loader import load_full_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "nemotron.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_convert_nemo_to_hf_and_back(tmp_path, tiny_state):
    """zarr .nemo directory -> HF (sharded, since --max-shard-size is small) -> NeMo torch_dist: bf16 throughout."""
    hf_dir, nemo_dir = tmp_path / "hf", tmp_path / "nemo"
    first = run(os.path.join(FIXTURES, "tiny_tp2_zarr"), hf_dir, "--max-shard-size", "200KB")
    assert first.returncode == 0, first.stderr
    assert f"wrote Hugging Face checkpoint to {hf_dir}" in first.stdout
    assert os.path.isfile(hf_dir / "model.safetensors.index.json") and os.path.isfile(hf_dir / "tokenizer.model")
    second = run(hf_dir, nemo_dir)
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip() == "", second.stderr  # warnings from megatron-core/torch are kept quiet
    cfg, state, _ = load_full_state(str(nemo_dir))
    for name, value in tiny_state.items():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], value.to(torch.bfloat16)), name


@pytest.mark.parametrize("case", ["dst_not_empty", "src_missing", "bad_config", "bad_size"])
def test_convert_error_is_one_line(case, tmp_path):
    src, dst, extra = os.path.join(FIXTURES, "tiny_tp2_zarr"), tmp_path / "out", []
    if case == "dst_not_empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    elif case == "src_missing":
        src = tmp_path / "missing.nemo"
    elif case == "bad_config":
        import shutil
        src = tmp_path / "ck"
        shutil.copytree(os.path.join(FIXTURES, "tiny_tp2_zarr"), src)
        text = (src / "model_config.yaml").read_text().replace("activation: squared-relu", "activation: gelu")
        (src / "model_config.yaml").write_text(text)
    else:
        extra = ["--max-shard-size", "lots"]
    result = run(src, dst, *extra)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    expected = {"dst_not_empty": "not empty", "src_missing": "no such file", "bad_config": "activation",
                "bad_size": "invalid size"}[case]
    assert expected in lines[0]
    if case == "dst_not_empty":
        assert os.listdir(dst) == ["keep.txt"]  # untouched
    else:
        assert not dst.exists()  # nothing half-written left behind
