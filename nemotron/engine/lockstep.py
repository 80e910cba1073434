"""Rank 0 coordinates, every other rank follows: the command protocol that keeps ranks in lockstep.

Rank 0 validates and tokenizes a request *before* anything is broadcast, so a bad request never leaves a rank
waiting. A command is an int64 header [kind, payload bytes] broadcast on the gloo control group, then the
payload (UTF-8 JSON). While idle, rank 0 broadcasts NOOP heartbeats so followers' control-group waits never
time out. After every GENERATE all ranks agree on success with one all-reduce, so an error raised on every rank
(e.g. out of memory) becomes an error response and the ranks stay in step.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Optional

import torch
import torch.distributed as dist

from nemotron.engine.engine import Engine
from nemotron.engine.request import GenerationRequest, RequestError, parse_request, to_json_dict

log = logging.getLogger("nemotron")

NOOP, GENERATE, SHUTDOWN = 0, 1, 2


class GenerationError(RuntimeError):
    """Generation failed on at least one rank; the ranks are still in step."""


class _Control:
    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group

    def send(self, kind: int, payload: bytes = b"") -> None:
        header = torch.tensor([kind, len(payload)], dtype=torch.long)
        dist.broadcast(header, src=0, group=self.group)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.group)

    def receive(self):
        header = torch.empty(2, dtype=torch.long)
        dist.broadcast(header, src=0, group=self.group)
        kind, size = int(header[0]), int(header[1])
        payload = b""
        if size:
            buf = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
            payload = bytes(buf.numpy())
        return kind, payload

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([0 if ok else 1], dtype=torch.long)
        dist.all_reduce(flag, group=self.group)
        return int(flag) == 0


class Coordinator:
    """Rank 0's handle on the model: `generate(request)` runs it on every rank. Thread-safe (one at a time)."""

    def __init__(self, engine: Engine, control_group: Optional[dist.ProcessGroup] = None,
                 heartbeat_s: float = 5.0):
        self.engine = engine
        self.distributed = control_group is not None
        self.control = _Control(control_group) if self.distributed else None
        self.lock = threading.Lock()
        self._closed = threading.Event()
        if self.distributed:
            threading.Thread(target=self._heartbeat, args=(heartbeat_s,), name="control-heartbeat",
                             daemon=True).start()

    def generate(self, req: GenerationRequest) -> dict:
        with self.lock:
            if self._closed.is_set():
                raise GenerationError("the model is shutting down")
            prompts = self.engine.tokenize(req)  # RequestError here: nothing was broadcast
            if self.distributed:
                payload = json.dumps({"request": to_json_dict(req), "prompts": prompts}).encode()
                self.control.send(GENERATE, payload)
            error = None
            try:
                out = self.engine.generate(req, prompts)
            except Exception as exc:  # reported after the ranks agree
                log.exception("generation failed on rank 0")
                error, out = exc, None
            if self.distributed and not self.control.all_ok(error is None):
                raise GenerationError(f"generation failed on a worker rank"
                                      f"{'' if error is None else f' and on rank 0: {error}'}")
            if error is not None:
                raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error
            return out

    def shutdown(self) -> None:
        with self.lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self.distributed:
                try:
                    self.control.send(SHUTDOWN)
                except Exception as exc:  # a follower already gone (e.g. scancel signalled every task)
                    log.warning("could not tell every rank to shut down: %s", str(exc).splitlines()[0][:200])

    def _heartbeat(self, interval: float) -> None:
        while not self._closed.wait(interval):
            if self.lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set():
                        self.control.send(NOOP)
                finally:
                    self.lock.release()


def follow(engine: Engine, control_group: dist.ProcessGroup) -> None:
    """Every rank but 0: run rank 0's commands until SHUTDOWN."""
    control = _Control(control_group)
    while True:
        kind, payload = control.receive()
        if kind == NOOP:
            continue
        if kind == SHUTDOWN:
            return
        if kind != GENERATE:
            raise RuntimeError(f"unknown command {kind} from rank 0")
        message = json.loads(payload)
        ok = True
        try:
            engine.generate(parse_request(message["request"], max_sentences=None), message["prompts"])
        except Exception:
            log.exception("generation failed on rank %d", engine.ps.rank)
            ok = False
        control.all_ok(ok)


__all__ = ["Coordinator", "GenerationError", "RequestError", "follow"]
