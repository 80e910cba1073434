"""The main job: `python -m nemotron.eval` with no gpt_model_file completes with the embedded demo model, and the
same completion comes out of TP2 and PP2 runs (torchrun, gloo)."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = os.path.join(ROOT, "nemotron", "demo", "metrics.json")
# The recorded sample: greedy, fp32, no BOS, no repetition penalty (the CLI's yaml defaults differ: NeMo's).
SAMPLE_OVERRIDES = ["trainer.precision=32", "inference.greedy=True", "inference.add_BOS=False",
                    "inference.repetition_penalty=1.0", "inference.tokens_to_generate=48",
                    'prompts=["def fibonacci(n):"]', "trainer.enable_progress_bar=False"]


def sample():
    with open(METRICS) as f:
        return json.load(f)["sample"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion_ids(tmp_path, name, launcher=(), extra=()):
    results = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, *launcher, "-m", "nemotron.eval", *SAMPLE_OVERRIDES, *extra,
                           f"results_file={results}"], capture_output=True, text=True, timeout=240,
                          env=dict(env, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(results.read_text())[0]


def test_default_model_is_the_demo_and_completes_as_recorded(tmp_path):
    proc, out = completion_ids(tmp_path, "tp1")
    assert "using the embedded demo model" in proc.stderr
    assert proc.stdout.count("***************************") == 2
    want = sample()
    prompt_len = len(out["token_ids"][0]) - len(want["greedy_ids"])
    assert out["token_ids"][0][prompt_len:] == want["greedy_ids"]
    assert out["sentences"][0] == want["prompt"] + want["completion"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_demo_tp2_and_pp2_complete_like_tp1(tmp_path, layout):
    extra = ["tensor_model_parallel_size=2"] if layout == "tp2" else ["pipeline_model_parallel_size=2"]
    launcher = ("-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}")
    _, out = completion_ids(tmp_path, layout, launcher, [*extra, "trainer.devices=2"])
    assert out["token_ids"][0][-len(sample()["greedy_ids"]):] == sample()["greedy_ids"]
