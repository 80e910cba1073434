"""`sbatch slurm/launch.sh` on a real two-node Slurm cluster (issue 6): no mocks, no GPUs.

The cluster (tests/slurm_cluster.py) is munged + slurmctld + two slurmd "hosts", each in its own network namespace.
The job runs the script as users do, in bare-metal mode with this venv's Python and CPU overrides: 2 nodes x 2
tasks, TP2 x PP2, the tiny fixture checkpoint (4 layers), gloo. The card's request goes from this process to rank 0's
namespace address, through the card's client (scripts/call_server.py) and directly; the answer must equal the
greedy completion of the same weights computed in this process (TP1). Two ways to end: `scancel` of a job that keeps
serving, and RUN_CLIENT=1 (the card's flow) where the job ends by itself with exit status 0. Afterwards the job's
state, its output/error files (per node, the card's pattern) and the nodes' process tables are checked.

Container mode needs pyxis/enroot and an image, which this machine lacks: the last tests run the script outside Slurm
with stand-in `srun`/`scontrol` commands that record their arguments, to check the srun command line it builds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster  # noqa: E402
import conftest  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from slurm_cluster import TERMINAL_STATES, SlurmCluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "slurm" / "launch.sh"
CALL_SERVER = ROOT / "scripts" / "call_server.py"
MODEL = os.path.join(FIXTURES, "tiny_tp1_torch_dist")
PORT = 1424  # the card's port: each node has a network namespace of its own, so it is free there
PROMPT = "def f(x):"
TOKENS = 8
# The script's #SBATCH headers ask for 8 tasks and 8 GPUs per node; these command-line options win.
CPU_SBATCH = ["--ntasks-per-node=2", "--gpus-per-node=0", "-t", "5"]

_REASON = slurm_cluster.unavailable_reason()
# The two end-to-end tests need the real cluster; the command-line tests below run anywhere with bash.
needs_cluster = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def card_payload(prompt, tokens=TOKENS):
    return conftest.card_payload(prompt, tokens)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as c:
        yield c


@pytest.fixture(scope="module")
def expected_sentence(tiny_model, tiny_tokenizer):
    """The same weights (tiny_reference == tiny_tp1_torch_dist), one process, TP1: the greedy answer."""
    from nemotron.engine.engine import Engine
    from nemotron.engine.request import parse_request
    out = Engine(tiny_model, tiny_tokenizer).generate(parse_request(card_payload(PROMPT)))
    return out["sentences"][0]


def launch_env(results: Path, **extra) -> dict:
    env = {
        "MODE": "bare", "PYTHON": sys.executable, "MODEL": MODEL,
        "TP": "2", "PP": "2", "DEVICES": "2", "ACCELERATOR": "cpu", "PRECISION": "32",
        "PORT": str(PORT), "RESULTS": str(results),
        "EXTRA_OVERRIDES": "prompts=[] trainer.enable_progress_bar=False",
        "OMP_NUM_THREADS": "1",  # 4 ranks on 2 cores
        "PYTHONIOENCODING": "utf-8",  # the tiny model's completions are not ASCII
    }
    env.update(extra)
    return env


def no_proxy_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def submit(cluster, tmp_path: Path, **env) -> tuple[int, Path]:
    results = tmp_path / "results"
    job = cluster.sbatch(LAUNCH, [*CPU_SBATCH, "-o", str(tmp_path / "batch-%j.out")],
                         env=launch_env(results, **env), cwd=tmp_path)
    return job, results


def job_files(tmp_path: Path, results: Path, job: int) -> dict[str, str]:
    files = [tmp_path / f"batch-{job}.out"] + sorted(results.glob(f"*-{job}-*.out"))
    return {f.name: f.read_text(encoding="utf-8", errors="replace") for f in files if f.exists()}


def describe(cluster, tmp_path, results, job) -> str:
    parts = [f"--- {name} ---\n{text[-3000:]}" for name, text in job_files(tmp_path, results, job).items()]
    return "\n".join(parts) + "\n" + cluster.log_tails(15)


def rank_stream(text: str, rank: int) -> str:
    """One rank's lines of a per-node file written with srun --label ("<rank>: line"), labels removed."""
    prefix = re.compile(rf"^\s*{rank}: ?")
    return "".join(prefix.sub("", line, count=1) for line in text.splitlines(keepends=True) if prefix.match(line))


def wait_healthy(cluster, job, url, describe_job, timeout=150.0) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a CI proxy
    start = time.monotonic()
    while True:
        state = cluster.job_state(job)
        if state in TERMINAL_STATES:
            pytest.fail(f"job {job} ended ({state}) before {url} answered\n{describe_job()}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"{url} not healthy after {timeout:.0f} s (job {state})\n{describe_job()}")
        time.sleep(0.5)


def put_generate(addr: str, payload: dict) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"http://{addr}:{PORT}/generate", data=json.dumps(payload).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=60) as r:
        return json.loads(r.read())


def assert_nodes_empty(cluster, timeout=30.0) -> None:
    """Nothing of the job survives in either node: no task, no slurmstepd, nothing but slurmd."""
    deadline = time.monotonic() + timeout
    while True:
        left = {n.name: cluster.node_processes(n.index) for n in cluster.nodes}
        if not any(left.values()):
            break
        assert time.monotonic() < deadline, f"left running in the nodes: {left}"
        time.sleep(0.2)
    assert cluster.squeue() == []
    assert set(cluster.sinfo().values()) == {"idle"}


def assert_clean_logs(files: dict[str, str], job: int) -> None:
    for name in (f"slurm-{job}-0.out", f"slurm-{job}-1.out", f"error-{job}-0.out", f"error-{job}-1.out"):
        assert name in files, f"{name} missing: {sorted(files)}"
    for name, text in files.items():
        assert "Traceback" not in text, f"{name}:\n{text[-4000:]}"
        assert "FATAL" not in text, f"{name}:\n{text[-4000:]}"


@pytest.mark.slurm
@needs_cluster
def test_launch_serves_the_card_request_until_scancel(cluster, tmp_path, expected_sentence):
    started = time.monotonic()
    job, results = submit(cluster, tmp_path, RUN_CLIENT="0")
    addr = cluster.nodes[0].addr
    ready_s = wait_healthy(cluster, job, f"http://{addr}:{PORT}/health",
                           lambda: describe(cluster, tmp_path, results, job))

    # The card's client, as a user runs it against the first node.
    p = subprocess.run([sys.executable, str(CALL_SERVER), "--host", addr, "--port", str(PORT),
                        "--tokens", str(TOKENS), "--prompt", PROMPT],
                       env=no_proxy_env(), capture_output=True, encoding="utf-8", timeout=120)
    assert p.returncode == 0, p.stderr
    completion = expected_sentence[len(PROMPT):]
    assert completion, "the reference generated nothing"
    assert p.stdout == f"{PROMPT}\n{completion}\n"

    # The whole sentence (prompt included), as the card's get_generation() returns it.
    body = put_generate(addr, card_payload(PROMPT))
    assert body["sentences"][0].startswith(PROMPT)
    assert body["sentences"][0] == expected_sentence

    info = cluster.job_info(job)
    assert info["JobState"] == "RUNNING" and info["NumNodes"] == "2" and info["NumTasks"] == "4", info

    cluster.scancel(job)
    res = cluster.wait(job, timeout=60)
    assert res.state == "CANCELLED", res
    assert_nodes_empty(cluster)

    files = job_files(tmp_path, results, job)
    assert_clean_logs(files, job)
    batch = files[f"batch-{job}.out"]
    assert "mode bare, TP=2 PP=2, 2 node(s) x 2 task(s), MASTER_ADDR=node0" in batch, batch
    node0_err = files[f"error-{job}-0.out"]
    # Rank 0 loaded the model on all 4 ranks and served; its log lines carry srun's rank label.
    assert re.search(r"^0: .*loaded .* on 4 rank\(s\)", node0_err, re.M), node0_err[-4000:]
    assert re.search(r"^0: .*received SIGTERM", node0_err, re.M), node0_err[-4000:]
    assert re.search(r"^0: .*server stopped", node0_err, re.M), node0_err[-4000:]
    print(f"\nscancel path: healthy after {ready_s:.1f} s, total {time.monotonic() - started:.1f} s")


@pytest.mark.slurm
@needs_cluster
def test_launch_run_client_ends_the_job_by_itself(cluster, tmp_path, expected_sentence):
    started = time.monotonic()
    job, results = submit(cluster, tmp_path, RUN_CLIENT="1",
                          CLIENT_ARGS=f'--prompt "{PROMPT}" --tokens {TOKENS}')
    res = cluster.wait(job, timeout=180)
    files = job_files(tmp_path, results, job)
    assert res.ok, f"{res.state} exit={res.exit_code}:{res.signal}\n{describe(cluster, tmp_path, results, job)}"
    assert_nodes_empty(cluster)
    assert_clean_logs(files, job)

    # Rank 0's stdout: nemo_inference.sh's progress lines and the client's answer (prompt, then completion).
    rank0 = rank_stream(files[f"slurm-{job}-0.out"], 0)
    assert f"server (127.0.0.1:{PORT}) is up running" in rank0, rank0
    assert f"{PROMPT}\n{expected_sentence[len(PROMPT):]}\n" in rank0, rank0
    rank0_err = rank_stream(files[f"error-{job}-0.out"], 0)
    assert "received SIGTERM" in rank0_err and "server stopped" in rank0_err, rank0_err[-4000:]
    # Ranks 2 and 3 ran on the second node; their output went to its file.
    node1 = files[f"slurm-{job}-1.out"] + files[f"error-{job}-1.out"]
    assert not rank_stream(node1, 0) and not rank_stream(node1, 1), node1[-4000:]
    assert "srun exited with status 0" in files[f"batch-{job}.out"]
    print(f"\nRUN_CLIENT=1 path: job done in {time.monotonic() - started:.1f} s")


# --- the srun command line, with stand-in srun/scontrol (container mode cannot run here) -------------------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG"
env > "$FAKE_LOG.env"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
    "show job") echo "   Command=$FAKE_COMMAND" ;;
esac
"""


def run_launch_outside_slurm(tmp_path: Path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun.argv"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_COMMAND=str(LAUNCH),
                SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2",
                SLURM_NTASKS_PER_NODE="8", SLURM_SUBMIT_DIR=str(tmp_path), MODEL=MODEL, IMAGE="/images/nemotron.sqsh")
    base.update(env)
    p = subprocess.run(["bash", str(LAUNCH)], env=base, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    argv = log.read_bytes().decode().split("\0")[:-1] if log.exists() else None
    task_env = dict(line.split("=", 1) for line in Path(f"{log}.env").read_text().splitlines()
                    if "=" in line) if argv is not None else {}
    return p, argv, task_env


def test_container_mode_defaults_are_the_cards_layout(tmp_path):
    p, argv, env = run_launch_outside_slurm(tmp_path)
    assert p.returncode == 0, p.stderr
    results = tmp_path / "results"
    task = argv.index("nemotron-task")
    assert argv[:task - 3] == [
        "--export=ALL", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
        "-o", f"{results}/slurm-%j-%n.out", "-e", f"{results}/error-%j-%n.out", "--label",
        "--container-image=/images/nemotron.sqsh", f"--container-mounts={MODEL}:/model:ro",
        "--no-container-entrypoint"]
    assert argv[task - 3:task - 1] == ["bash", "-c"] and "trap \"\" TERM" in argv[task - 1]
    assert argv[task + 1:] == [
        "python", "-m", "nemotron.eval", "gpt_model_file=/model", "server=True", "host=0.0.0.0", "port=1424",
        "tensor_model_parallel_size=8", "pipeline_model_parallel_size=2", "trainer.devices=8",
        "trainer.num_nodes=2", "trainer.precision=bf16", "trainer.accelerator=gpu", "web_server=False"]
    assert env["MASTER_ADDR"] == "gpu-a01" and env["MASTER_PORT"] == str(20000 + 4242)
    assert results.is_dir()


def test_container_mode_run_client_uses_the_scripts_in_the_image(tmp_path):
    p, argv, env = run_launch_outside_slurm(
        tmp_path, RUN_CLIENT="1", CLIENT_ARGS="--prompt 'Write a poem' --tokens 64", MOUNTS="/m:/model,/s:/s",
        EXTRA_OVERRIDES="prompts=[] inference.max_batch_size=8")
    assert p.returncode == 0, p.stderr
    assert "--container-mounts=/m:/model,/s:/s" in argv
    assert argv[argv.index("nemotron-task") + 1:] == ["bash", "/opt/nemotron/scripts/nemo_inference.sh", "/model",
                                         "--prompt", "Write a poem", "--tokens", "64"]
    assert env["CALL_SERVER"] == "/opt/nemotron/scripts/call_server.py" and env["PYTHON"] == "python"
    assert env["WEB_PORT"] == "1424" and env["SERVER_HOST"] == "0.0.0.0" and env["CLIENT_HOST"] == "127.0.0.1"
    assert env["NEMOTRON_OVERRIDES"] == "trainer.accelerator=gpu prompts=[] inference.max_batch_size=8"
    assert (env["TP"], env["PP"], env["DEVICES"], env["NUM_NODES"], env["PRECISION"]) == ("8", "2", "8", "2", "bf16")


def test_empty_options_are_respected(tmp_path):
    p, argv, _ = run_launch_outside_slurm(tmp_path, CONTAINER_OPTS="", SRUN_ARGS="")
    assert p.returncode == 0, p.stderr
    assert "--no-container-entrypoint" not in argv and "--label" not in argv


def test_bare_mode_run_client_finds_the_repository_scripts(tmp_path):
    p, argv, env = run_launch_outside_slurm(tmp_path, MODE="bare", RUN_CLIENT="1", PYTHON="/venv/bin/python")
    assert p.returncode == 0, p.stderr
    assert not any(a.startswith("--container") for a in argv)
    assert argv[argv.index("nemotron-task") + 1:] == ["bash", str(ROOT / "scripts" / "nemo_inference.sh"), MODEL]
    assert env["PYTHON"] == "/venv/bin/python" and env["CALL_SERVER"] == str(ROOT / "scripts" / "call_server.py")


@pytest.mark.parametrize("env, message", [
    ({"MODEL": ""}, "set MODEL"),
    ({"IMAGE": ""}, "MODE=container needs IMAGE"),
    ({"MODE": "docker"}, "MODE must be 'container' or 'bare'"),
    ({"TP": "4"}, "TP x PP = 4 x 2 = 8 but DEVICES x NUM_NODES = 8 x 2 = 16"),
    ({"NUM_NODES": "4", "TP": "8", "PP": "4"}, "NUM_NODES=4 but the job has 2 node(s)"),
    ({"PORT": "http"}, "PORT must be a positive integer"),
    ({"MODEL": "/no/such/model"}, "MODEL /no/such/model does not exist"),
    ({"SLURM_JOB_ID": ""}, "not inside a Slurm job"),
    ({"RUN_CLIENT": "yes"}, "RUN_CLIENT must be 0 or 1"),
    ({"MASTER_PORT": "70000"}, "out of range"),
])
def test_bad_settings_fail_before_srun(tmp_path, env, message):
    p, argv, _ = run_launch_outside_slurm(tmp_path, **env)
    assert p.returncode == 2 and argv is None
    assert message in p.stderr, p.stderr
