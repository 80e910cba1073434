"""A real, throw-away Slurm cluster on one machine, for tests.

``SlurmCluster`` brings up ``munged``, ``slurmctld`` and N ``slurmd`` daemons.  Every slurmd is a
separate "host": it runs in its own network namespace (own ``lo`` + ``eth0`` with an address from a
private /24), its own UTS namespace (``hostname`` is the Slurm node name) and its own mount
namespace in which ``/etc/hosts`` is bind-mounted from the cluster's temp dir, so node names resolve
to node addresses inside jobs (``MASTER_ADDR=$(scontrol show hostnames ... | head -n1)`` works, and
so does gloo/NCCL's "bind to the address my hostname resolves to").

Network layout (``<tag>`` is unique per cluster, so several clusters can coexist)::

    root netns                 "<tag>-sw" netns             "<tag>-n0" netns ...
    slurmctld, munged,         bridge br0                    slurmd -N node0
    clients (sbatch...)        ports p-host, p-n0, p-n1 ...   eth0 10.213.X.2/24, lo
    veth <tag>h 10.213.X.1 --- p-host        p-n0 ---------- eth0

The bridge lives in a namespace of its own so that the host's firewall / br_netfilter settings never
see the traffic between the nodes.  slurmctld runs in the root network namespace (so clients and the
test process reach it directly on 10.213.X.1), on a free TCP port, under its own UTS namespace whose
hostname matches ``SlurmctldHost``.  The root namespace can reach every node address directly, e.g.
``curl http://<c.nodes[0].addr>:8000/health`` from the test process works.

Everything the daemons write (conf, munge key and socket, state, spool, logs, pid files) is under the
cluster's directory.  Client commands get ``SLURM_CONF`` through ``c.env`` (``c.client_env()``).

Usage::

    reason = slurm_cluster.unavailable_reason()     # None when usable
    with SlurmCluster(tmp_path, nodes=2, cpus_per_node=2) as c:
        job = c.sbatch("job.sh", args=["-o", str(tmp_path / "out.txt")], env={"FOO": "1"})
        res = c.wait(job, timeout=60)                # JobResult(state="COMPLETED", exit_code=0, ...)
        c.exec_in_node(0, ["curl", "-s", f"http://{c.nodes[0].addr}:8000/health"])

Only the standard library is used.  The harness installs nothing; see ``.ci/apt-packages.txt``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from nemotron.checkpoint.nemo import pid_alive

__all__ = [
    "REQUIRED_BINARIES",
    "SlurmCluster",
    "SlurmClusterError",
    "Node",
    "JobResult",
    "missing_binaries",
    "unavailable_reason",
    "cleanup_stale",
]

# Binaries the harness runs.  sbatch/squeue/scontrol/sinfo/scancel/srun come with slurm-client;
# unshare/nsenter/mount/hostname with util-linux/mount/hostname (always on Debian).
REQUIRED_BINARIES = (
    "slurmctld", "slurmd", "slurmstepd", "munged", "munge", "ip",
    "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel",
    "unshare", "mount", "hostname",
)
# Where the Debian packages put the daemons; PATH of a non-login shell may lack /usr/sbin.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")

_REGISTRY_DIR = Path("/run/nemotron-slurm-test")   # one json per live cluster, for stale cleanup
_NS_PREFIX = "slurmtest-"
_SUBNET_BASE = "10.213"                             # clusters get 10.213.X.0/24, X free
_CONTROLLER_NAME = "slurmctl"                       # SlurmctldHost name (UTS hostname of slurmctld)
# Run inside ``ip netns exec <ns> unshare --uts`` (which gives a private mount namespace with a
# fresh sysfs for the netns): the cluster's hosts file over /etc/hosts, hostname = node name, and an
# empty tmpfs on /sys/fs/cgroup.  The latter matters: slurmd 22.05 always initialises a cgroup plugin
# and fails with "No filesystem mounted on /sys/fs/cgroup" on the netns' fresh sysfs; an empty tmpfs
# makes it detect cgroup/v1 and, with proctrack/linuxproc + task/none, never touch it -- so the host's
# cgroup setup (v1, v2, systemd or not) cannot matter.
_NODE_SCRIPT = ('mount --bind "$1" /etc/hosts && hostname "$2" && '
                'mount -t tmpfs -o mode=755 slurmtest-cgroup /sys/fs/cgroup && '
                'mkdir /sys/fs/cgroup/systemd && shift 2 && exec "$@"')
_SLURMD_PORT = 6818                                 # fine: every slurmd has a netns of its own

# Terminal job states (see squeue(1) "JOB STATE CODES").
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED", "SPECIAL_EXIT",
})


class SlurmClusterError(RuntimeError):
    """The cluster could not be brought up or a Slurm command failed (message has log tails)."""


@dataclasses.dataclass(frozen=True)
class Node:
    index: int
    name: str          # Slurm NodeName == hostname inside the node == name in the nodes' /etc/hosts
    addr: str          # NodeAddr: the node's IPv4 address on the cluster bridge
    netns: str         # network namespace name (``ip netns exec <netns> ...``)


@dataclasses.dataclass(frozen=True)
class JobResult:
    job_id: int
    state: str                 # e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT
    exit_code: int             # first half of ExitCode=a:b (the batch script's exit status)
    signal: int                # second half of ExitCode=a:b (signal that ended it, 0 if none)
    info: dict                 # every Key=Value of ``scontrol show job -o`` at the end

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0


# --------------------------------------------------------------------------------------------------
# Availability checks (cheap, no side effects) -- for pytest skip reasons.
# --------------------------------------------------------------------------------------------------

def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", "")] + list(_EXTRA_PATH))
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if _which(b) is None]


def _has_caps(*bits: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff >> b & 1 for b in bits)
    except OSError:
        pass
    return False


def unavailable_reason() -> str | None:
    """None if a cluster can be started here, else a one-line reason (use it for pytest.skip)."""
    if sys.platform != "linux":
        return "Slurm test cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "Slurm test cluster needs root (network namespaces, slurmd as root)"
    missing = missing_binaries()
    if missing:
        return ("Slurm test cluster: missing binaries " + ", ".join(missing)
                + " (apt-get install $(cat .ci/apt-packages.txt))")
    if not _has_caps(12, 21):   # CAP_NET_ADMIN, CAP_SYS_ADMIN
        return "Slurm test cluster needs CAP_NET_ADMIN and CAP_SYS_ADMIN (privileged container)"
    # Probe what the harness does (seccomp/AppArmor may forbid it even with the capabilities).
    try:
        p = subprocess.run([_which("unshare") or "unshare", "--net", "--uts", "--mount", "--",
                            "sh", "-c", "mount -t tmpfs slurmtest-probe /mnt && hostname probe"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm test cluster: cannot create namespaces here ({e})"
    if p.returncode != 0:
        return ("Slurm test cluster: cannot create net/uts/mount namespaces here: "
                + (p.stderr.strip() or f"rc={p.returncode}"))
    return None


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _run(argv: Sequence[str], *, check: bool = True, env: Mapping[str, str] | None = None,
         timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), env=None if env is None else dict(env), input=input,
                       stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SlurmClusterError(
            f"command failed (rc={p.returncode}): {shlex.join(argv)}\n{p.stdout}{p.stderr}")
    return p


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _netns_pids(netns: str) -> list[int]:
    p = _run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  <{e.strerror}>"
    return "\n".join("  " + ln for ln in lines[-n:]) or "  <empty>"


def _parse_kv(text: str) -> dict:
    """Parse ``scontrol show -o`` output: Key=Value pairs separated by spaces (values may not)."""
    out: dict = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def cleanup_stale() -> list[str]:
    """Remove what clusters of dead test processes left behind (daemons, namespaces, links).

    Safe to call any time: only clusters whose owning process is gone are touched, and a pid is
    only killed when its command line names that cluster's directory.  Returns what it removed.
    """
    removed: list[str] = []
    if not _REGISTRY_DIR.is_dir():
        return removed
    for f in sorted(_REGISTRY_DIR.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(rec.get("owner_pid", 0))):
            continue
        _force_teardown(rec)
        with contextlib.suppress(OSError):
            f.unlink()
        removed.append(rec.get("tag", f.stem))
    return removed


def _force_teardown(rec: dict) -> None:
    """Kill and delete everything listed in a registry record (idempotent)."""
    root = str(rec.get("root", "\0"))
    daemons = [int(p) for p in rec.get("daemon_pids", [])]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = [p for p in daemons if pid_alive(p) and root in _cmdline(p)]
        for ns in rec.get("netns", []):
            targets += _netns_pids(ns) if sig == signal.SIGKILL else []
        _kill_pids(targets, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
            time.sleep(0.05)
    for ns in rec.get("netns", []):
        # Processes may still be exiting; kill stragglers again right before deleting.
        _kill_pids(_netns_pids(ns), signal.SIGKILL)
        _run(["ip", "netns", "del", ns], check=False)
    for link in rec.get("links", []):
        _run(["ip", "link", "del", link], check=False)


# --------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------

class SlurmCluster:
    """A real Slurm cluster (munged + slurmctld + one slurmd per network namespace).

    Parameters
    ----------
    workdir:        directory for everything the cluster writes (created; a subdir ``slurm-<tag>``
                    is used, so a pytest ``tmp_path`` is fine).  Keep the path short-ish: Unix
                    socket paths are limited to 107 bytes.
    nodes:          number of slurmd "hosts".
    cpus_per_node:  CPUs each node advertises (may exceed the real core count).
    partition:      name of the single (default) partition.
    start_timeout:  seconds to wait for all nodes to become idle.
    debug:          SlurmctldDebug/SlurmdDebug level (``info``, ``verbose``, ``debug``, ...).
    extra_conf:     extra lines appended to slurm.conf.
    """

    def __init__(self, workdir: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2, *,
                 partition: str = "test", cluster_name: str = "nemotest",
                 real_memory_mb: int = 4096, start_timeout: float = 30.0, debug: str = "info",
                 extra_conf: Sequence[str] = ()):
        if nodes < 1 or nodes > 200:
            raise ValueError("nodes must be in 1..200")
        self.n_nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.cluster_name = cluster_name
        self.real_memory_mb = real_memory_mb
        self.start_timeout = start_timeout
        self.debug = debug
        self.extra_conf = list(extra_conf)

        self.tag = f"{os.getpid() % 100000}{os.urandom(2).hex()}"   # <= 9 chars: fits IFNAMSIZ
        self.root = Path(workdir).resolve() / f"slurm-{self.tag}"
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.hosts_path = self.root / "etc" / "hosts"
        self.log_dir = self.root / "log"
        self.job_dir = self.root / "jobs"            # default cwd of sbatch
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.sw_netns = f"{_NS_PREFIX}{self.tag}-sw"
        self.host_link = f"st{self.tag}h"             # root-namespace end of the host veth
        self.controller_name = _CONTROLLER_NAME
        self.controller_addr = ""                     # filled in by start()
        self.controller_port = 0
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[Node] = []
        self._procs: dict[str, subprocess.Popen] = {}   # "munged", "slurmctld", "slurmd-node0", ...
        self._log_files: list = []
        self._started = False
        self._torn_down = False
        self._registry_file = _REGISTRY_DIR / f"{self.tag}.json"

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ public helpers
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (and the base environment of submitted jobs)."""
        return self.client_env()

    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SALLOC_")
                       or k.startswith("SRUN_"))}   # never inherit an enclosing job's settings
        path = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join([p for p in path if p] + [p for p in _EXTRA_PATH if p not in path])
        env["SLURM_CONF"] = str(self.conf_path)
        if extra:
            env.update({k: str(v) for k, v in extra.items()})
        return env

    def run_client(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
                   env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``sinfo``, ``scontrol``...) against this cluster."""
        return _run(argv, check=check, env=self.client_env(env), timeout=timeout)

    def node_argv(self, node: int | str, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` "on" a node: in its netns, with its hostname and /etc/hosts."""
        n = self._node(node)
        return ["ip", "netns", "exec", n.netns, "unshare", "--uts", "--",
                "sh", "-c", _NODE_SCRIPT, "sh", str(self.hosts_path), n.name, *argv]

    def exec_in_node(self, node: int | str, argv: Sequence[str], *, timeout: float = 60,
                     check: bool = False, env: Mapping[str, str] | None = None,
                     input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside node ``node`` (index or name) and wait; returns CompletedProcess
        with text stdout/stderr.  ``env`` is added to the client environment (SLURM_CONF set)."""
        return _run(self.node_argv(node, argv), check=check, env=self.client_env(env),
                    timeout=timeout, input=input)

    def popen_in_node(self, node: int | str, argv: Sequence[str], *,
                      env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start a command inside a node without waiting (killed at teardown if still running)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.node_argv(node, argv), env=self.client_env(env), **kwargs)

    def node_processes(self, node: int | str) -> list[tuple[int, str]]:
        """(pid, cmdline) of every process in the node's netns except its slurmd daemon --
        i.e. job processes, slurmstepd and whatever ``exec_in_node`` left running."""
        n = self._node(node)
        daemon = self._procs.get(f"slurmd-{n.name}")
        skip = {daemon.pid} if daemon else set()
        return [(p, _cmdline(p)) for p in _netns_pids(n.netns) if p not in skip and pid_alive(p)]

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: str | os.PathLike, args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, *, cwd: str | os.PathLike | None = None,
               script_args: Sequence[str] = ()) -> int:
        """Submit a batch script; returns the job id.

        ``args`` are sbatch options (e.g. ``["-N", "2", "-o", "/path/out.txt"]``); ``script_args``
        are passed to the script.  ``env`` is added to the submitting environment, which sbatch
        exports to the job (``--export=ALL``).  ``cwd`` defaults to ``<root>/jobs`` (where the
        default ``slurm-<id>.out`` then lands).
        """
        cwd = Path(cwd) if cwd is not None else self.job_dir
        argv = ["sbatch", "--parsable", *args, str(script), *script_args]
        p = subprocess.run(argv, env=self.client_env(env), cwd=cwd, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
        if p.returncode != 0:
            raise SlurmClusterError(f"sbatch failed (rc={p.returncode}): {shlex.join(argv)}\n"
                                    f"{p.stdout}{p.stderr}\n{self.log_tails()}")
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict | None:
        """``scontrol show job -o`` as a dict, or None if slurmctld has forgotten the job."""
        p = self.run_client(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0 or "JobId=" not in p.stdout:
            return None
        return _parse_kv(p.stdout.splitlines()[0])

    def job_state(self, job_id: int) -> str | None:
        info = self.job_info(job_id)
        return None if info is None else info.get("JobState")

    def wait_state(self, job_id: int, states: Iterable[str] = ("RUNNING",), timeout: float = 30,
                   poll: float = 0.2) -> str:
        """Wait until the job is in one of ``states`` (or terminal); returns the state."""
        want = set(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in want or state in TERMINAL_STATES:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(want)} after {timeout}s (state {state})\n"
                           f"{self.log_tails()}")

    def wait(self, job_id: int, timeout: float = 60, poll: float = 0.25) -> JobResult:
        """Wait for a job to finish; returns its final state and exit code.  TimeoutError (with
        the job record and daemon log tails) if it has not finished within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        info = None
        while True:
            info = self.job_info(job_id)
            if info is None:
                raise SlurmClusterError(f"job {job_id} unknown to slurmctld\n{self.log_tails()}")
            if info.get("JobState") in TERMINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(job_id, info["JobState"], int(code or 0), int(sig or 0), info)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s\n"
                                   f"{info}\n{self.log_tails()}")
            time.sleep(poll)

    def scancel(self, job_id: int | None = None, *, signal_name: str | None = None) -> None:
        """Cancel a job (all of this cluster's jobs when ``job_id`` is None)."""
        argv = ["scancel"]
        if signal_name:
            argv += ["--signal", signal_name]
        if job_id is None:
            argv += ["--user", str(os.geteuid())]
        else:
            argv.append(str(job_id))
        self.run_client(argv, check=False)

    def squeue(self) -> list[dict]:
        """Jobs slurmctld still lists as pending/running: [{"job_id", "state", "name", "nodes"}]."""
        p = self.run_client(["squeue", "-h", "-o", "%i|%T|%j|%N"], check=False)
        out = []
        for line in p.stdout.splitlines():
            jid, state, name, nodes = (line.split("|") + ["", "", "", ""])[:4]
            if jid.strip().isdigit():
                out.append({"job_id": int(jid), "state": state, "name": name, "nodes": nodes})
        return out

    def sinfo(self) -> dict[str, str]:
        """{node name: state} as sinfo reports it (``idle``, ``alloc``, ``down*``, ...)."""
        p = self.run_client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        return dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)

    def log_tails(self, n: int = 25) -> str:
        """Last ``n`` lines of every daemon log (for error messages)."""
        parts = []
        for f in sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []:
            parts.append(f"--- {f.name} (last {n} lines) ---\n{_tail(f, n)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "SlurmCluster":
        if self._started:
            return self
        reason = unavailable_reason()
        if reason:
            raise SlurmClusterError(reason)
        self._started = True
        atexit.register(self.stop)
        try:
            cleanup_stale()
            self._make_dirs()
            self._setup_network()
            self._write_configs()
            self._start_munged()
            self._start_slurmctld()
            for n in self.nodes:
                self._start_slurmd(n)
            self._wait_nodes_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Tear everything down: cancel jobs, stop daemons, kill leftovers, delete netns/links."""
        if self._torn_down or not self._started:
            return
        self._torn_down = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            ctl = self._procs.get("slurmctld")
            if ctl is not None and ctl.poll() is None:
                with contextlib.suppress(Exception):
                    self.scancel()
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and self.squeue():
                        time.sleep(0.2)
            # slurmd first (so it does not re-register), then slurmctld, munged last.
            order = [k for k in self._procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
            for key in order:
                p = self._procs.get(key)
                if p is None:
                    continue
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=5)
        finally:
            _force_teardown(self._record())
            for f in self._log_files:
                with contextlib.suppress(Exception):
                    f.close()
            with contextlib.suppress(OSError):
                self._registry_file.unlink()

    # ------------------------------------------------------------------ internals
    def _node(self, node: int | str) -> Node:
        if isinstance(node, int):
            return self.nodes[node]
        for n in self.nodes:
            if node in (n.name, n.addr, n.netns):
                return n
        raise KeyError(node)

    def _record(self) -> dict:
        return {
            "tag": self.tag, "owner_pid": os.getpid(), "root": str(self.root),
            "daemon_pids": [p.pid for p in self._procs.values()],
            "netns": [n.netns for n in self.nodes] + [self.sw_netns],
            "links": [self.host_link],
        }

    def _save_record(self) -> None:
        _REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self._registry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._record()))
        tmp.replace(self._registry_file)

    def _make_dirs(self) -> None:
        for d in ("etc", "munge", "state", "spool", "run", "log", "jobs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)           # job scripts are read by slurmd from the spool dir
        os.chmod(self.root / "munge", 0o755)  # munged wants its socket dir traversable; key is 0400
        os.chmod(self.root / "spool", 0o755)
        if len(str(self.munge_socket)) > 100:
            raise SlurmClusterError(f"workdir path too long for a Unix socket: {self.munge_socket}")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = set(re.findall(r"inet (\d+\.\d+\.\d+)\.\d+/", _run(["ip", "-o", "-4", "addr"]).stdout))
        claimed = set()
        for f in _REGISTRY_DIR.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                claimed.add(json.loads(f.read_text()).get("subnet", ""))
        for x in list(range(0, 256)):
            net = f"{_SUBNET_BASE}.{x}"
            if net not in used and f"{net}.0/24" not in claimed:
                return ipaddress.IPv4Network(f"{net}.0/24")
        raise SlurmClusterError(f"no free /24 in {_SUBNET_BASE}.0.0/16")

    def _setup_network(self) -> None:
        _REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        with open(_REGISTRY_DIR / "lock", "w") as lock:     # serialise subnet choice between runs
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = self._pick_subnet()
            hosts = list(self.subnet.hosts())
            self.controller_addr = str(hosts[0])
            self.nodes = [Node(i, f"node{i}", str(hosts[1 + i]), f"{_NS_PREFIX}{self.tag}-n{i}")
                          for i in range(self.n_nodes)]
            rec = self._record()
            rec["subnet"] = str(self.subnet)
            self._registry_file.write_text(json.dumps(rec))    # claim it before creating anything
        plen = self.subnet.prefixlen
        sw = self.sw_netns

        def ip(*args: str, ns: str | None = None) -> None:
            _run((["ip", "-n", ns] if ns else ["ip"]) + list(args))

        ip("netns", "add", sw)
        ip("link", "add", "br0", "type", "bridge", ns=sw)
        ip("link", "set", "br0", "up", ns=sw)
        ip("link", "set", "lo", "up", ns=sw)
        # host <-> switch
        ip("link", "add", self.host_link, "type", "veth", "peer", "name", "p-host", "netns", sw)
        ip("link", "set", "p-host", "master", "br0", "up", ns=sw)
        ip("addr", "add", f"{self.controller_addr}/{plen}", "dev", self.host_link)
        ip("link", "set", self.host_link, "up")
        # node <-> switch
        for n in self.nodes:
            ip("netns", "add", n.netns)
            ip("link", "add", "eth0", "netns", n.netns, "type", "veth",
               "peer", "name", f"p-n{n.index}", "netns", sw)
            ip("link", "set", f"p-n{n.index}", "master", "br0", "up", ns=sw)
            ip("link", "set", "lo", "up", ns=n.netns)
            ip("addr", "add", f"{n.addr}/{plen}", "dev", "eth0", ns=n.netns)
            ip("link", "set", "eth0", "up", ns=n.netns)
        self._save_record()
        # Fail early (and clearly) if the wiring does not pass traffic.
        self._check_connectivity()

    def _check_connectivity(self) -> None:
        for n in self.nodes:
            srv = socket.socket()
            try:
                srv.bind((self.controller_addr, 0))
                srv.listen(1)
                srv.settimeout(5)
                port = srv.getsockname()[1]
                code = ("import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])),"
                        " timeout=5).close()")
                p = subprocess.Popen(["ip", "netns", "exec", n.netns, sys.executable, "-c", code,
                                      self.controller_addr, str(port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
                try:
                    conn, _ = srv.accept()
                    conn.close()
                except OSError as e:
                    p.kill()
                    raise SlurmClusterError(
                        f"node {n.name} ({n.addr}, netns {n.netns}) cannot reach the host "
                        f"{self.controller_addr}: {e}; {p.communicate()[0]}") from None
                p.wait(timeout=10)
            finally:
                srv.close()

    def _write_configs(self) -> None:
        r = self.root
        self.controller_port = _free_tcp_port()
        hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.controller_addr} {self.controller_name}"]
        hosts += [f"{n.addr} {n.name}" for n in self.nodes]
        self.hosts_path.write_text("\n".join(hosts) + "\n")
        os.chmod(self.hosts_path, 0o644)

        conf = [
            "# Generated by tests/slurm_cluster.py -- a throw-away test cluster.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.controller_name}({self.controller_addr})",
            f"SlurmctldPort={self.controller_port}",
            f"SlurmdPort={_SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            f"SlurmctldDebug={self.debug}",
            f"SlurmdDebug={self.debug}",
            f"PlugStackConfig={r}/etc/plugstack.conf",
            # No cgroups: plain process-tree tracking, no task binding/containment.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobContainerType=job_container/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Nodes may advertise more CPUs/memory than this machine has.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "PropagateResourceLimits=NONE",
            "MinJobAge=600",
            "KillWait=2",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "TCPTimeout=5",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            "UnkillableStepTimeout=30",
            "HealthCheckInterval=0",
            "MailProg=/bin/true",
            f"TmpFS={r}/run",
            *self.extra_conf,
        ]
        for n in self.nodes:
            conf.append(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} "
                        f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN")
        conf.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE "
                    "State=UP OverSubscribe=NO")
        self.conf_path.write_text("\n".join(conf) + "\n")
        (r / "etc" / "plugstack.conf").write_text("")
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\n"
                                                "ConstrainRAMSpace=no\nConstrainDevices=no\n")
        for n in self.nodes:
            (r / "spool" / n.name).mkdir(exist_ok=True)
            os.chmod(r / "spool" / n.name, 0o755)

    def _spawn(self, key: str, argv: Sequence[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{key}.stdout.log", "ab")
        self._log_files.append(out)
        p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=self.client_env(), cwd=self.root, start_new_session=True)
        self._procs[key] = p
        self._save_record()
        return p

    def _fail(self, msg: str) -> SlurmClusterError:
        return SlurmClusterError(f"{msg}\n{self.log_tails()}")

    def _wait_for(self, what: str, cond, timeout: float, procs: Sequence[str] = ()) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for key in procs:
                p = self._procs[key]
                if p.poll() is not None:
                    raise self._fail(f"{key} exited with rc={p.returncode} while waiting for {what}")
            if cond():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        m = self.root / "munge"
        self._spawn("munged", [
            _which("munged") or "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={self.log_dir}/munged.log", f"--pid-file={m}/munged.pid",
            f"--seed-file={m}/munged.seed", "--num-threads=4",
        ])

        def ok() -> bool:
            if not self.munge_socket.exists():
                return False
            p = subprocess.run([_which("munge") or "munge", "-n", "-S", str(self.munge_socket)],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            return p.returncode == 0
        self._wait_for("munged to answer", ok, 15, ["munged"])

    def _start_slurmctld(self) -> None:
        # Own UTS namespace (hostname == SlurmctldHost, which slurmctld insists on) and own mount
        # namespace (the cluster's /etc/hosts); network namespace: the root one.
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        self._spawn("slurmctld", [
            "unshare", "--uts", "--mount", "--propagation", "private", "--",
            "sh", "-c", script, "sh", str(self.hosts_path), self.controller_name,
            _which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf_path),
        ])

        def ok() -> bool:
            p = subprocess.run(["scontrol", "ping"], env=self.client_env(), capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=15)
            return p.returncode == 0 and "UP" in p.stdout
        self._wait_for("slurmctld to answer `scontrol ping`", ok, 20, ["slurmctld"])

    def _start_slurmd(self, n: Node) -> None:
        self._spawn(f"slurmd-{n.name}", self.node_argv(
            n.index, [_which("slurmd") or "slurmd", "-D", "-N", n.name, "-f", str(self.conf_path)]))

    def _wait_nodes_idle(self) -> None:
        names = {n.name for n in self.nodes}

        def ok() -> bool:
            st = self.sinfo()
            return names <= st.keys() and all(st[k] == "idle" for k in names)
        keys = ["munged", "slurmctld"] + [f"slurmd-{n.name}" for n in self.nodes]
        try:
            self._wait_for(f"nodes {sorted(names)} to be idle", ok, self.start_timeout, keys)
        except SlurmClusterError as e:
            raise SlurmClusterError(f"{e}\nsinfo: {self.sinfo()}") from None
