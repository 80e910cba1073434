"""Rank 0 coordinates, every other rank follows: one engine loop, its iterations run in lockstep on every rank.

Requests reach rank 0 from any thread (`Coordinator.generate`, e.g. the HTTP server's workers). They are validated
and tokenized there, before anything is sent, so a bad request never reaches another rank. One thread on rank 0,
the engine loop, owns the engine. Before each iteration it exchanges a header with every rank, an all-reduce of
int64 [command, payload bytes, failures, next on device] to which rank 0 gives the command, the size and where the
next header travels, and every rank adds 1 to `failures` if its own previous iteration raised; then it broadcasts
the payload, the jobs rank 0 admits (UTF-8 JSON). Then every rank runs `Engine.step`. So requests join the running
batch at the next iteration (continuous batching), and every rank sees the same jobs in the same order.

Where the header travels: on the gloo control group, where followers can wait any time (an NCCL wait would time
out) and rank 0 sends NOOP heartbeats while idle so even gloo's timeout never expires. Under the engine's overlap
(on CUDA) that is also where it travels while jobs run: a gloo exchange waits for nothing on the GPU, so the header
and the next launch happen while the previous step computes. Without overlap, a busy engine's headers travel on the
default (NCCL) group through the GPUs, a ~20 us exchange instead of gloo's, which cost ~1 ms on a 2-core host. Each
header says where the next one travels, so every rank, including one whose last iteration failed, waits on the
same group.

When an iteration raised on any rank, every rank learns it from the next header and drops every job; rank 0
answers their requests with GenerationError, and the ranks stay in step for the next ones.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from nemotron.engine.engine import Engine, Job
from nemotron.engine.request import GenerationRequest, RequestError, parse_request, to_json_dict

log = logging.getLogger("nemotron")

NOOP, STEP, SHUTDOWN = 0, 1, 2


class GenerationError(RuntimeError):
    """Generation failed on at least one rank; the ranks are still in step."""


class _Control:
    """The header exchange: on the gloo control group, or on the default group with tensors on `device`."""

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device):
        self.group, self.device = group, device
        self.on_device = False  # where the next exchange travels (every rank tracks it from the headers)
        self.busy_exchanges, self.busy_seconds = 0, 0.0  # STEP exchanges and their time (the benchmark's)

    def exchange(self, kind: int, payload: bytes, failed: bool, next_on_device: bool):
        """Every rank calls this once per iteration; rank 0's kind, payload and next_on_device win (the others pass
        NOOP, b"" and False) -> (kind, payload, failures)."""
        group, device = (None, self.device) if self.on_device else (self.group, torch.device("cpu"))
        started = time.perf_counter()
        header = torch.tensor([kind, len(payload), int(failed), int(next_on_device)], dtype=torch.long)
        header = header.to(device)
        dist.all_reduce(header, group=group)
        kind, size, failures, on_device = header.tolist()
        if size:
            buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
                   else torch.empty(size, dtype=torch.uint8)).to(device)
            dist.broadcast(buf, src=0, group=group)
            payload = bytes(buf.cpu().numpy())
        if kind == STEP:
            self.busy_exchanges += 1
            self.busy_seconds += time.perf_counter() - started
        self.on_device = bool(on_device)
        return kind, payload, failures


@dataclass
class _Ticket:
    """A request waiting on rank 0 for its answer."""
    req: GenerationRequest
    prompts: List[List[int]]
    done: threading.Event = field(default_factory=threading.Event)
    response: Optional[dict] = None
    error: Optional[Exception] = None

    def answer(self, response: Optional[dict] = None, error: Optional[Exception] = None) -> None:
        self.response, self.error = response, error
        self.done.set()


class Coordinator:
    """Rank 0's handle on the model: `generate(request)` from any thread; requests run together in the engine."""

    def __init__(self, engine: Engine, control_group: Optional[dist.ProcessGroup] = None,
                 heartbeat_s: float = 5.0):
        self.engine = engine
        self.control = _Control(control_group, engine.device) if control_group is not None else None
        self._cv = threading.Condition()
        self._incoming: List[_Ticket] = []
        self._tickets: Dict[int, _Ticket] = {}  # by job id; the engine loop's own
        self._closing = False
        self._broken: Optional[str] = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, args=(heartbeat_s,), name="engine-loop", daemon=True)
        self._thread.start()

    def generate(self, req: GenerationRequest) -> dict:
        prompts = self.engine.tokenize(req)  # RequestError here: nothing was queued
        ticket = _Ticket(req, prompts)
        with self._cv:
            if self._closing or self._broken:
                raise GenerationError(self._broken or "the model is shutting down")
            self._incoming.append(ticket)
            self._cv.notify()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.response

    def load(self) -> Dict[str, int]:
        """Requests running in the engine's batch, and those waiting for its next iteration (any thread)."""
        with self._cv:
            return {"running": len(self._tickets), "queued": len(self._incoming)}

    def shutdown(self) -> None:
        """Refuse new requests, finish those already taken, then stop every rank."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    # --- the engine loop (rank 0's only thread touching the engine) -------------------------------------------

    def _loop(self, heartbeat_s: float) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # the current device is per thread (Triton launches on it)
        error: Optional[Exception] = None  # this rank's failure in the previous iteration
        try:
            while True:
                on_device = self.control is not None and self.control.on_device  # followers wait in NCCL: go on
                with self._cv:
                    if not (self._incoming or self.engine.busy or self._closing or error or on_device):
                        self._cv.wait(heartbeat_s)  # woken by a request; else a heartbeat
                    taken, self._incoming = self._incoming, []
                    stopping = self._closing and not taken and not self.engine.busy
                kind = SHUTDOWN if stopping else STEP if taken or self.engine.busy else NOOP
                admitted = [(next(self._ids), t) for t in taken]
                failures = int(error is not None)
                if self.control is not None:
                    payload = json.dumps([{"id": i, "request": to_json_dict(t.req), "prompts": t.prompts}
                                          for i, t in admitted]).encode() if admitted else b""
                    # This iteration runs, so the next header comes right after it: through the GPUs, unless it
                    # should not wait for them (overlap).
                    on_device_next = kind == STEP and not self.engine.overlap
                    _, _, failures = self.control.exchange(kind, payload, error is not None, on_device_next)
                if failures:
                    self._fail_running(error, failures)
                error = None
                if kind == SHUTDOWN:
                    return
                for job_id, ticket in admitted:
                    self._tickets[job_id] = ticket
                    self.engine.submit(ticket.req, ticket.prompts, job_id)
                if kind == NOOP:
                    continue
                try:
                    ended = self.engine.step()
                except Exception as exc:  # reported to every rank by the next header
                    log.exception("generation failed on rank 0")
                    error = exc
                    continue
                for job in ended:
                    self._answer(job)
        except Exception as exc:  # the control group itself failed: a rank is gone
            log.error("the engine loop stopped: %s", str(exc).splitlines()[0][:300] if str(exc) else repr(exc))
            with self._cv:
                self._broken = f"the model is unavailable: {type(exc).__name__}"
        finally:
            with self._cv:
                self._closing = True
                left, self._incoming = self._incoming, []
            for ticket in left + list(self._tickets.values()):
                ticket.answer(error=GenerationError(self._broken or "the model is shutting down"))
            self._tickets.clear()

    def _answer(self, job: Job) -> None:
        ticket = self._tickets.pop(job.id)
        if job.error is not None:
            ticket.answer(error=job.error)
        else:
            ticket.answer(response=job.response)

    def _fail_running(self, error: Optional[Exception], failures: int) -> None:
        dropped = self.engine.abort()
        if error is not None:
            others = f" (and on {failures - 1} other rank(s))" if failures > 1 else ""
            message = f"generation failed: {type(error).__name__}: {error}{others}"
        else:
            message = f"generation failed on {failures} worker rank(s)"
        for job in dropped:
            ticket = self._tickets.pop(job.id, None)
            if ticket is not None:
                ticket.answer(error=GenerationError(message))


def follow(engine: Engine, control_group: dist.ProcessGroup) -> None:
    """Every rank but 0: run the same iterations as rank 0's engine loop until SHUTDOWN."""
    control = _Control(control_group, engine.device)
    failed = False
    while True:
        kind, payload, failures = control.exchange(NOOP, b"", failed, False)
        failed = False
        if failures:
            engine.abort()
        if kind == SHUTDOWN:
            return
        for item in json.loads(payload) if payload else []:
            engine.submit(parse_request(item["request"], max_sentences=None), item["prompts"], item["id"])
        if kind == NOOP:
            continue
        try:
            engine.step()
        except Exception:
            log.exception("generation failed on rank %d", engine.ps.rank)
            failed = True


__all__ = ["Coordinator", "GenerationError", "RequestError", "follow"]
