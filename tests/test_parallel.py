"""Tensor and pipeline parallelism with real processes (torchrun, gloo): every layout equals TP1."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, free_port, run_torchrun_worker  # noqa: F401 (free_port: other tests)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_layout(tmp_path, tp, pp, source="reference"):
    out = str(tmp_path / f"tp{tp}pp{pp}-{os.path.basename(source)}.json")
    run_torchrun_worker("parallel_worker.py", (tp, pp, source, out), tp * pp)
    with open(out) as f:
        result = json.load(f)
    result["logits"] = torch.load(out + ".logits.pt")
    return result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("tp1"), 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layout_matches_tp1(tmp_path, baseline, tp, pp):
    got = run_layout(tmp_path, tp, pp)
    rel = (got["logits"] - baseline["logits"]).abs().max() / baseline["logits"].abs().max()
    assert rel <= 1e-5, f"logits differ from TP1 by {rel:.2e}"
    assert got["greedy"] == baseline["greedy"]
    assert got["sampled"] == baseline["sampled"]
    assert got["stopped"] == baseline["stopped"] and got["stopped"][1][-3:] == [3] * 3  # EOS fill (EOS: id 3)
    torch.testing.assert_close(torch.tensor(got["sampled_logprob"]), torch.tensor(baseline["sampled_logprob"]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ckpt", [(1, 2, "tiny_tp2_torch_dist"), (2, 1, "tiny_tp1_torch_dist")])
def test_checkpoint_written_at_one_tp_loads_at_another(tmp_path, baseline, tp, pp, ckpt):
    got = run_layout(tmp_path, tp, pp, os.path.join(FIXTURES, ckpt))
    rel = (got["logits"] - baseline["logits"]).abs().max() / baseline["logits"].abs().max()
    assert rel <= 1e-5
    assert got["greedy"] == baseline["greedy"]


@pytest.mark.slow
def test_error_inside_generation_keeps_ranks_in_step(tmp_path):
    """Generation fails on every rank (injected): rank 0 gets GenerationError and the next request still runs."""
    out = str(tmp_path / "fault.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           os.path.join(HERE, "lockstep_fault_worker.py"), out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        seen = json.load(f)
    assert seen["error"] and "injected: cannot allocate the KV cache" in seen["error"]
    assert seen["after"] == seen["before"]
