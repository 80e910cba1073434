"""Starting torch.distributed from whatever launched us: srun (Slurm), torchrun, or nothing (one process).

Rank discovery goes through lightning's cluster environments, as NeMo's Trainer does, so the same command line
works under `srun`, `torchrun --nproc-per-node N` and plain `python`. NCCL on CUDA, gloo on CPU; a separate gloo
"control" group carries rank 0's commands (so idle ranks wait on a CPU socket with a short timeout, never in NCCL),
and a TCP store carries heartbeats so a dead rank is noticed quickly and named.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from nemotron.parallel.peer_allreduce import enable_peer_all_reduce
from nemotron.parallel.state import ParallelConfigError, ParallelState

log = logging.getLogger("nemotron")


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    main_address: str
    main_port: int
    launcher: str


_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "WORLD_SIZE")


def detect_launch() -> Launch:
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        # No launcher: one process. (lightning_fabric takes seconds to import; skip it when it cannot help.)
        return Launch(0, 1, 0, 0, "127.0.0.1", 0, "single")
    from lightning_fabric.plugins.environments import (LightningEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)
    if TorchElasticEnvironment.detect():
        env, name = TorchElasticEnvironment(), "torchrun"
    elif SLURMEnvironment.detect():
        env, name = SLURMEnvironment(), "slurm"
    else:
        env, name = LightningEnvironment(), "single"
    if name == "single" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Launch(0, 1, 0, 0, "127.0.0.1", 0, name)
    return Launch(env.global_rank(), env.world_size(), env.local_rank(), env.node_rank(), env.main_address,
                  env.main_port, name)


def check_world(tp: int, pp: int, devices: int, num_nodes: int, world_size: int) -> None:
    """NeMo asserts devices * num_nodes == TP * PP; we also check what was actually launched."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(f"tensor_model_parallel_size ({tp}) and pipeline_model_parallel_size ({pp}) must "
                                  "be >= 1")
    if devices * num_nodes != tp * pp:
        raise ParallelConfigError(
            f"devices * num_nodes should equal tensor_model_parallel_size * pipeline_model_parallel_size: "
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {devices * num_nodes}, "
            f"but TP={tp} x PP={pp} = {tp * pp}")
    if world_size != tp * pp:
        raise ParallelConfigError(
            f"the launcher started {world_size} process(es) but TP={tp} x PP={pp} needs {tp * pp} "
            "(start one process per GPU: torchrun --nproc-per-node, or srun --ntasks-per-node)")


class Runtime:
    """The process-group side of a serving process: parallel state, control group, heartbeats."""

    def __init__(self, ps: ParallelState, launch: Launch, control: Optional[dist.ProcessGroup],
                 store: Optional[dist.Store]):
        self.ps, self.launch, self.control, self.store = ps, launch, control, store
        self._stop = threading.Event()

    @property
    def distributed(self) -> bool:
        return self.ps.world_size > 1

    # --- liveness ----------------------------------------------------------------------------------------------

    def start_heartbeats(self, interval: float = 2.0, deadline: float = 20.0) -> None:
        """Every rank stamps `hb/<rank>`; rank 0 exits (non-zero, naming the rank) when one goes stale, and
        every other rank exits when rank 0's store is gone. Runs in daemon threads, so it also fires while the
        main thread is blocked inside a collective."""
        if not self.distributed or self.store is None:
            return
        rank, world = self.ps.rank, self.ps.world_size
        host = os.uname().nodename

        def beat():
            while not self._stop.is_set():
                try:
                    self.store.set(f"hb/{rank}", f"{time.time()}|{host}|{os.getpid()}")
                except Exception:
                    if self._stop.is_set():
                        return
                    _die(f"rank {rank}: lost contact with rank 0 (its store at {self.launch.main_address} is gone); "
                         "exiting")
                self._stop.wait(interval)

        def watch():
            self._stop.wait(deadline)
            while not self._stop.is_set():
                now = time.time()
                for r in range(1, world):
                    try:
                        stamp, peer_host, pid = self.store.get(f"hb/{r}").decode().split("|")
                    except Exception:
                        continue
                    if now - float(stamp) > deadline:
                        _die(f"rank {r} (host {peer_host}, pid {pid}) stopped responding "
                             f"{now - float(stamp):.0f} s ago; shutting down")
                self._stop.wait(interval)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()
        if rank == 0:
            threading.Thread(target=watch, name="heartbeat-watch", daemon=True).start()

    def barrier(self) -> None:
        if self.control is not None:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Stop heartbeats. Process groups are left to process exit: destroying an NCCL group while a peer is
        already exiting can block forever (seen on H100s), and the CLI ends with os._exit anyway."""
        self._stop.set()


def _die(message: str) -> None:
    print(f"[nemotron] FATAL: {message}", file=sys.stderr, flush=True)
    os._exit(3)


#: Seconds every TP rank may take to set up the peer exchange (symmetric memory); a few normally.
PEER_SETUP_TIMEOUT_S = 300.0


@contextlib.contextmanager
def exit_unless_done_within(seconds: float, what: str) -> Iterator[None]:
    """Exit the process (code 3, naming `what`) if the block has not finished within `seconds`. For collective
    setup that heartbeats do not cover yet: when a peer fails or hangs part-way through symmetric memory's
    rendezvous, the others wait in the store for the collective timeout (hours), and Python cannot interrupt
    them."""
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            _die(f"{what} did not finish within {seconds:.0f} s: a peer failed or hung during it; exiting")
    threading.Thread(target=watch, name="deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def init_runtime(tp: int, pp: int, devices: int = 1, num_nodes: int = 1, *, cpu: bool = False,
                 control_timeout_s: float = 120.0, collective_timeout_s: float = 18000.0) -> Runtime:
    """Discover our rank, check the world, start process groups; returns the Runtime for this process."""
    launch = detect_launch()
    check_world(tp, pp, devices, num_nodes, launch.world_size)
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if launch.world_size == 1:
        return Runtime(ParallelState(device=device), launch, None, None)

    os.environ.setdefault("MASTER_ADDR", launch.main_address)
    os.environ.setdefault("MASTER_PORT", str(launch.main_port))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s),
                            **({"device_id": device} if use_cuda else {}))
    tp_group = pp_group = None
    for p in range(pp):  # every rank must create every group, in the same order
        ranks = list(range(p * tp, (p + 1) * tp))
        group = dist.new_group(ranks, backend=backend)
        if launch.rank in ranks:
            tp_group = group
    for t in range(tp):
        ranks = [p * tp + t for p in range(pp)]
        group = dist.new_group(ranks, backend=backend)
        if launch.rank in ranks:
            pp_group = group
    control = dist.new_group(list(range(launch.world_size)), backend="gloo",
                             timeout=datetime.timedelta(seconds=control_timeout_s))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, launch.world_size,
                          is_master=launch.rank == 0, timeout=datetime.timedelta(seconds=60))
    ps = ParallelState(tp_size=tp, pp_size=pp, rank=launch.rank, device=device,
                       tp_group=tp_group if tp > 1 else None, pp_group=pp_group if pp > 1 else None)
    if use_cuda and tp > 1:
        with exit_unless_done_within(PEER_SETUP_TIMEOUT_S, f"rank {launch.rank}: the TP group's peer-exchange setup"):
            enable_peer_all_reduce(tp_group, device)
    return Runtime(ps, launch, control, store)
