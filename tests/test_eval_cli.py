"""`python -m nemotron.eval` as users run it: a real subprocess with Hydra overrides."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES

TINY = os.path.join(FIXTURES, "tiny_tp1_torch_dist")
CARD_LINE = ["pipeline_model_parallel_split_rank=0", "server=True", "tensor_model_parallel_size=8",
             "trainer.precision=bf16", "pipeline_model_parallel_size=2", "trainer.devices=8", "trainer.num_nodes=2",
             "web_server=False", "port=1424"]


def run_eval(*overrides, timeout=120, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "SLURM_NTASKS")}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "nemotron.eval", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert fragment in errors[0], errors[0]


def test_prompts_printed_once_between_star_lines_and_results_file(tmp_path):
    results = tmp_path / "out.json"
    proc = run_eval(f"gpt_model_file={TINY}", "trainer.precision=32", "inference.greedy=True",
                    "inference.tokens_to_generate=6", "inference.min_tokens_to_generate=6",
                    'prompts=["def f(x):","import os"]', f"results_file={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines.count("***************************") == 2
    saved = json.loads(results.read_text())
    assert len(saved) == 1 and saved[0]["sentences"][0].startswith("def f(x):")
    assert saved[0]["sentences"][1].startswith("import os")
    # CLI defaults are NeMo's yaml ones: add_BOS True -> BOS first
    assert saved[0]["token_ids"][0][0] == 2
    # the same request through the engine path gives the same greedy ids on a second run (determinism)
    results.unlink()
    proc2 = run_eval(f"gpt_model_file={TINY}", "trainer.precision=32", "inference.greedy=True",
                     "inference.tokens_to_generate=6", "inference.min_tokens_to_generate=6",
                     'prompts=["def f(x):","import os"]', f"results_file={results}")
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    assert json.loads(results.read_text())[0]["token_ids"] == saved[0]["token_ids"]


def test_card_command_line_parses_and_names_the_world_mismatch():
    proc = run_eval(f"gpt_model_file={TINY}", *CARD_LINE)
    assert_one_line_error(proc, "the launcher started 1 process(es) but TP=8 x PP=2 needs 16")


def test_devices_times_nodes_must_equal_tp_times_pp():
    proc = run_eval(f"gpt_model_file={TINY}", "trainer.devices=2", "tensor_model_parallel_size=1")
    assert_one_line_error(proc, "devices * num_nodes should equal tensor_model_parallel_size * "
                                "pipeline_model_parallel_size")


@pytest.mark.parametrize("overrides,fragment", [
    (["inference.temperature=0"], "temperature must be a positive number less than or equal to 100.0"),
    (["inference.top_k=1.5"], "top_k must be a positive integer number"),
    (["gpt_model_file=/nonexistent/model.nemo"], "/nonexistent/model.nemo"),
    (["web_server=True"], "web_server=True (NeMo's Gradio UI) is not implemented"),
    (["chat=True"], "chat=True"),
    (["checkpoint_dir=/tmp/ckpt"], "checkpoint_dir"),
    (["trainer.precision=8"], "unsupported trainer.precision"),
    (["prompts=[]"], "Expected at least one prompt"),
    (["inference.tokens_to_generate=300"], "max_position_embeddings"),
    (["warm_up=sometimes"], "warm_up must be true, false or null"),
])
def test_bad_values_exit_nonzero_with_one_line(overrides, fragment):
    base = [] if any(o.startswith("gpt_model_file=") for o in overrides) else [f"gpt_model_file={TINY}"]
    proc = run_eval(*base, "trainer.precision=32", *overrides)
    assert_one_line_error(proc, fragment)


@pytest.mark.parametrize("name,value,fragment", [
    ("NEMOTRON_OVERLAP", "yes", "NEMOTRON_OVERLAP='yes': expected 0 or 1"),
    ("NEMOTRON_CUDA_GRAPHS", "false", "NEMOTRON_CUDA_GRAPHS='false': expected 0 or 1"),
    ("NEMOTRON_DECODE_MATMUL", "cuBLAS", "NEMOTRON_DECODE_MATMUL='cuBLAS': expected auto, cublas or triton"),
    ("NEMOTRON_PEER_EXCHANGE", "off", "NEMOTRON_PEER_EXCHANGE='off': expected 0 or 1"),
    ("NEMOTRON_STEP_TUNE", "auto", "NEMOTRON_STEP_TUNE='auto': expected 0 or 1"),
    ("NEMOTRON_CONTROL_TIMEOUT_S", "2m", "NEMOTRON_CONTROL_TIMEOUT_S='2m': expected a positive number"),
])
def test_bad_environment_switch_exits_with_one_line_before_loading(name, value, fragment):
    proc = run_eval(f"gpt_model_file={TINY}", "trainer.precision=32", extra_env={name: value})
    assert_one_line_error(proc, fragment)
    assert "loaded" not in proc.stderr  # refused before the model was read


def test_unknown_key_is_refused_by_hydra():
    proc = run_eval(f"gpt_model_file={TINY}", "no_such_key=1")
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr
