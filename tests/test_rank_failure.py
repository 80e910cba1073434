"""A dead worker rank is noticed: rank 0 exits non-zero within 60 s naming it, and nothing is left running. Before
heartbeats run (collective setup), a deadline ends a collective that a peer never joins.

Ranks are started by hand with torchrun's variables (not under torchrun, whose agent would kill the others
itself), so the test exercises our own heartbeat watch.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import FIXTURES

TINY = os.path.join(FIXTURES, "tiny_tp1_torch_dist")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(http_port):
    master = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", LOCAL_WORLD_SIZE="2",
                   WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), OMP_NUM_THREADS="1",
                   TORCHELASTIC_RUN_ID="rank-failure-test")
        cmd = [sys.executable, "-m", "nemotron.eval", f"gpt_model_file={TINY}", "trainer.precision=32",
               "tensor_model_parallel_size=2", "trainer.devices=2", "server=True", "host=127.0.0.1",
               f"port={http_port}", "prompts=[]"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/health", timeout=1).status_code == 200:
                return procs
        except requests.RequestException:
            pass
        time.sleep(0.5)
    for p in procs:
        p.kill()
    pytest.fail("server did not come up: " + procs[0].communicate()[1][-2000:])


def finish(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["idle", "generating"])
def test_killed_worker_makes_rank0_exit_naming_it(when):
    port = free_port()
    procs = start_ranks(port)
    try:
        if when == "generating":
            # A long batch keeps the ranks inside collectives while the worker dies.
            payload = {"sentences": ["def f(x):"] * 64, "tokens_to_generate": 240, "greedy": True,
                       "min_tokens_to_generate": 240}
            threading.Thread(target=lambda: _put_quietly(port, payload), daemon=True).start()
            time.sleep(1.5)
        killed_at = time.time()
        procs[1].send_signal(signal.SIGKILL)
        try:
            code = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still running 60 s after a worker died")
        elapsed = time.time() - killed_at
        stderr = procs[0].stderr.read()
        assert code != 0
        assert elapsed < 60
        assert "rank 1" in stderr and "stopped responding" in stderr, stderr[-2000:]
    finally:
        finish(procs)
    for p in procs:
        assert p.poll() is not None


def _put_quietly(port, payload):
    try:
        requests.put(f"http://127.0.0.1:{port}/generate", json=payload, timeout=90)
    except requests.RequestException:
        pass


_PEER_NEVER_JOINS = r"""
import os, sys, time, datetime
import torch, torch.distributed as dist
from nemotron.parallel.runtime import exit_unless_done_within
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
with exit_unless_done_within(30, "a step every rank does"):  # one that finishes: the watch must stand down
    dist.barrier()
time.sleep(1 if rank == 0 else 60)  # rank 1 never joins the collective below, nor exits
if rank == 0:
    with exit_unless_done_within(2, "rank 0: the test's collective"):
        dist.all_reduce(torch.ones(1))
    print("not reached", flush=True)
"""


def test_a_collective_a_peer_never_joins_ends_at_the_deadline():
    """What guards the TP group's symmetric-memory setup in init_runtime: rank 0 blocked in a real gloo
    collective that rank 1 never joins (the group's own timeout is 10 minutes) exits with code 3 at the deadline,
    naming the step; a step that finished in time (the barrier) does not trip it."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _PEER_NEVER_JOINS, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in range(2)]
    try:
        start = time.time()
        out, err = procs[0].communicate(timeout=50)
        assert procs[0].returncode == 3, (out, err[-2000:])
        assert "rank 0: the test's collective did not finish within 2 s" in err, err[-2000:]
        assert "not reached" not in out
        assert time.time() - start < 40
    finally:
        finish(procs)
