"""GET /health answers 503 until every rank has loaded its shard, then 200.

Rank 0 is started alone (torchrun's variables, by hand); its HTTP server listens at once while it waits for rank 1
at the rendezvous. Rank 1 starts only after the test has seen the 503.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import FIXTURES

TINY = os.path.join(FIXTURES, "tiny_tp1_torch_dist")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank, master, http_port, *overrides, stderr=subprocess.PIPE, layout=("tensor", "pipeline")):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", LOCAL_WORLD_SIZE="2",
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), OMP_NUM_THREADS="1",
               TORCHELASTIC_RUN_ID="health-test")
    cmd = [sys.executable, "-m", "nemotron.eval", f"gpt_model_file={TINY}", "trainer.precision=32",
           f"{layout[0]}_model_parallel_size=2", f"{layout[1]}_model_parallel_size=1", "trainer.devices=2",
           "server=True", "host=127.0.0.1",
           f"port={http_port}", "prompts=[]", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True)


def health(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except requests.RequestException:
        return None


def wait_healthy(procs, port, timeout=120):
    deadline = time.time() + timeout
    while health(port) != 200:
        assert all(p.poll() is None for p in procs), procs[-1].stderr.read()[-2000:]
        assert time.time() < deadline, "never became healthy"
        time.sleep(0.3)


def stop_ranks(procs):
    """SIGTERM to rank 0 must end every rank cleanly."""
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=60) == 0
    assert procs[1].wait(timeout=60) == 0


def kill_leftovers(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_health_is_503_until_all_ranks_loaded():
    master, port = free_port(), free_port()
    procs = [start_rank(0, master, port)]
    try:
        deadline = time.time() + 60
        while health(port) is None:
            assert procs[0].poll() is None, procs[0].stderr.read()[-2000:]
            assert time.time() < deadline, "rank 0's server never started listening"
            time.sleep(0.3)
        assert health(port) == 503
        put = requests.put(f"http://127.0.0.1:{port}/generate", json={"sentences": ["x"]}, timeout=5)
        assert put.status_code == 503 and "not loaded" in put.json()["message"]

        procs.append(start_rank(1, master, port))
        wait_healthy(procs, port)
        out = requests.put(f"http://127.0.0.1:{port}/generate", json={"sentences": ["x"], "greedy": True,
                                                                      "tokens_to_generate": 3}, timeout=60)
        assert out.status_code == 200 and out.json()["sentences"][0].startswith("x")
        stop_ranks(procs)
    finally:
        kill_leftovers(procs)


@pytest.mark.slow
def test_idle_followers_outlive_the_control_timeout():
    """With a 4 s control-group timeout, 12 s without traffic must not kill the worker: rank 0's heartbeats keep
    its wait alive, and the next request is served by both ranks."""
    master, port = free_port(), free_port()
    os.environ["NEMOTRON_CONTROL_TIMEOUT_S"] = "4"
    try:
        procs = [start_rank(0, master, port), start_rank(1, master, port)]
    finally:
        del os.environ["NEMOTRON_CONTROL_TIMEOUT_S"]
    try:
        wait_healthy(procs, port)
        time.sleep(12)
        assert all(p.poll() is None for p in procs), procs[1].stderr.read()[-2000:]
        out = requests.put(f"http://127.0.0.1:{port}/generate", json={"sentences": ["def f(x):"], "greedy": True,
                                                                      "tokens_to_generate": 4}, timeout=60)
        assert out.status_code == 200, out.text
        stop_ranks(procs)
    finally:
        kill_leftovers(procs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("tensor", "pipeline"), ("pipeline", "tensor")], ids=["tp2", "pp2"])
def test_warm_up_runs_every_batch_bucket_before_health_and_keeps_the_ranks_in_step(tmp_path, layout):
    """warm_up=true (on CPU, where the default, null, means off): before /health says 200, rank 0 sends one two-token
    request per decode batch bucket up to inference.max_batch_size, the largest first, through both ranks (TP2 or
    PP2); afterwards the server answers as one that skipped the warm-up."""
    answers = {}
    for warm in ("true", "false", "null"):
        master, port = free_port(), free_port()
        log_path = tmp_path / f"rank0_{warm}.log"
        with open(log_path, "w") as log:
            procs = [start_rank(r, master, port, f"warm_up={warm}", "inference.max_batch_size=6", layout=layout,
                                stderr=log if r == 0 else subprocess.DEVNULL) for r in (0, 1)]
            try:
                deadline = time.time() + 120
                while health(port) != 200:
                    assert all(p.poll() is None for p in procs), log_path.read_text()[-2000:]
                    assert time.time() < deadline, "never became healthy"
                    time.sleep(0.2)
                warm_lines = [line for line in log_path.read_text().splitlines() if "warm-up:" in line]
                assert len(warm_lines) == (1 if warm == "true" else 0), log_path.read_text()[-2000:]
                if warm == "true":  # buckets 1, 2, 4 and the 6 rows that bucket 8 serves
                    assert "4 requests (6, 4, 2, 1 rows)" in warm_lines[0], warm_lines
                body = {"sentences": ["def f(x):", "class A:"], "greedy": True, "tokens_to_generate": 6}
                out = requests.put(f"http://127.0.0.1:{port}/generate", json=body, timeout=60)
                assert out.status_code == 200, out.text
                answers[warm] = out.json()["token_ids"]
                stop_ranks(procs)
            finally:
                kill_leftovers(procs)
    assert answers["true"] == answers["false"] == answers["null"]
