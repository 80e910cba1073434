"""End-to-end tests of the real Slurm test cluster (tests/slurm_cluster.py).

Needs root and the Debian packages listed in .ci/apt-packages.txt; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster  # noqa: E402
from slurm_cluster import SlurmCluster  # noqa: E402

pytestmark = pytest.mark.slurm

_REASON = slurm_cluster.unavailable_reason()
if _REASON:
    pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=_REASON)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as c:
        yield c


ALLREDUCE_PY = textwrap.dedent("""\
    import datetime, json, os, socket
    import torch
    import torch.distributed as dist

    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    print("RESULT " + json.dumps({
        "rank": rank, "world": world, "local_rank": int(os.environ["SLURM_LOCALID"]),
        "node": os.environ["SLURMD_NODENAME"], "hostname": socket.gethostname(),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_ip": socket.gethostbyname(os.environ["MASTER_ADDR"]),
        "sum": t.item(), "hosts": hosts,
    }), flush=True)
    dist.destroy_process_group()
""")

ALLREDUCE_SH = textwrap.dedent("""\
    #!/bin/bash
    #SBATCH -J allreduce
    #SBATCH -N 2
    #SBATCH --ntasks-per-node=2
    #SBATCH -t 5
    set -euo pipefail
    # The first node's name resolves to its NodeAddr inside the nodes (cluster /etc/hosts).
    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export MASTER_PORT=29533
    echo "batch host $(hostname) master $MASTER_ADDR nodes $SLURM_JOB_NODELIST"
    srun --kill-on-bad-exit=1 "$PYTHON" "$PROG"
""")


def test_two_node_torch_allreduce(cluster, tmp_path):
    pytest.importorskip("torch")
    prog = tmp_path / "allreduce.py"
    prog.write_text(ALLREDUCE_PY)
    script = tmp_path / "allreduce.sh"
    script.write_text(ALLREDUCE_SH)
    out = tmp_path / "allreduce.out"

    job = cluster.sbatch(script, ["-o", str(out)], env={"PYTHON": sys.executable, "PROG": str(prog)},
                         cwd=tmp_path)
    res = cluster.wait(job, timeout=90)
    text = out.read_text() if out.exists() else "<no output file>"
    assert res.ok, f"{res.state} exit={res.exit_code}:{res.signal}\n{text}\n{cluster.log_tails()}"

    results = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3], text
    assert all(r["world"] == 4 for r in results)
    assert all(r["sum"] == 1 + 2 + 3 + 4 for r in results), text
    per_node: dict[str, list[int]] = {}
    for r in results:
        per_node.setdefault(r["node"], []).append(r["local_rank"])
        assert r["hostname"] == r["node"]            # each node is its own UTS namespace
    assert {k: sorted(v) for k, v in per_node.items()} == {"node0": [0, 1], "node1": [0, 1]}
    # MASTER_ADDR (a node name) resolved inside the job to the first node's NodeAddr.
    assert {r["master_addr"] for r in results} == {"node0"}
    assert {r["master_ip"] for r in results} == {cluster.nodes[0].addr}
    assert sorted(results[0]["hosts"]) == ["node0", "node0", "node1", "node1"]


SLEEP_SH = textwrap.dedent("""\
    #!/bin/bash
    #SBATCH -J sleeper
    #SBATCH -N 2
    #SBATCH --ntasks-per-node=1
    srun sh -c 'echo $$ > "$MARK_DIR/task.$SLURM_PROCID.pid"; exec sleep 300'
""")


def test_scancel_ends_job_and_leaves_no_process(cluster, tmp_path):
    script = tmp_path / "sleep.sh"
    script.write_text(SLEEP_SH)
    job = cluster.sbatch(script, ["-o", str(tmp_path / "sleep.out")], env={"MARK_DIR": str(tmp_path)},
                         cwd=tmp_path)
    assert cluster.wait_state(job, ["RUNNING"], timeout=30) == "RUNNING"

    # Both tasks started (one per node) and are visible as processes in their node's netns.
    marks = [tmp_path / f"task.{i}.pid" for i in range(2)]
    deadline = time.monotonic() + 30
    while not all(m.exists() and m.read_text().strip() for m in marks):
        assert time.monotonic() < deadline, f"tasks never started\n{cluster.log_tails()}"
        time.sleep(0.1)
    pids = [int(m.read_text()) for m in marks]
    for i, pid in enumerate(pids):
        procs = dict(cluster.node_processes(i))
        assert pid in procs and "sleep 300" in procs[pid], procs

    cluster.scancel(job)
    res = cluster.wait(job, timeout=30)
    assert res.state == "CANCELLED", res

    # Nothing of the job survives: no task, no slurmstepd, nothing but slurmd in either node.
    deadline = time.monotonic() + 20
    while True:
        left = {n.name: cluster.node_processes(n.index) for n in cluster.nodes}
        if not any(left.values()) and not any(_alive(p) for p in pids):
            break
        assert time.monotonic() < deadline, f"left behind after scancel: {left}"
        time.sleep(0.2)
    assert cluster.squeue() == []
    assert set(cluster.sinfo().values()) == {"idle"}


def test_exec_in_node_reaches_other_node(cluster):
    # A listener inside node1, reached from node0 by node name and from the host by address.
    srv = cluster.popen_in_node(1, [sys.executable, "-m", "http.server", "--bind",
                                    cluster.nodes[1].addr, "18080"])
    try:
        code = ("import sys,time,urllib.request as u\n"
                "o = u.build_opener(u.ProxyHandler({}))\n"   # never via a CI proxy
                "for _ in range(100):\n"
                "    try:\n"
                "        print(o.open(sys.argv[1], timeout=2).status); break\n"
                "    except OSError: time.sleep(0.1)\n")
        p = cluster.exec_in_node(0, [sys.executable, "-c", code, "http://node1:18080/"])
        assert p.stdout.strip() == "200", p
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{cluster.nodes[1].addr}:18080/", timeout=5) as r:
            assert r.status == 200
        assert cluster.exec_in_node(0, ["hostname"]).stdout.strip() == "node0"
    finally:
        srv.terminate()
        srv.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
