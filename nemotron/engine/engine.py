"""The slot-based generation engine: NeMo's `generate` semantics for many requests at once over one KV cache.

A request is a `Job`; each of its rows (sentences) owns a cache slot from admission to the end. The engine runs
*iterations* (`step`), and requests join and leave at iteration boundaries (continuous batching):

1. admit: queued jobs, in arrival order, take free slots (the cache grows when it must, copying what it holds);
2. prefill: at most `prefill_chunk` prompt tokens of the oldest unfinished prompts, in one forward (rows at the
   same offset with the same chunk length share it). A long prompt is spread over several iterations, so the rows
   of other requests keep decoding meanwhile instead of stalling behind it (chunked prefill);
3. decode: every row of every started job is fed its newest token, in one forward (a CUDA graph on GPU);
4. sample: those rows, and the rows of jobs whose prompts just finished prefilling, get one new token each, on the
   device;
5. retire: the host reads the tokens, applies the stop rules and ends jobs. A job's rows advance together as in
   NeMo: a finished row is fed EOS ("EOS fill") until all its rows are done or `tokens_to_generate` tokens were
   generated; then the job ends and frees its slots.

Overlap (on CUDA by default): an iteration's tokens are retired in the *next* iteration, after that iteration's
decode was launched from the tokens still on the device, so the host's work (the stop rules, responses, the next
launch) runs while the GPU computes instead of between its steps. The responses are the same as without overlap:
the host applies EOS fill itself when it retires a token, and the length limit is known at launch. A job that stops
on a token costs one wasted row-step, computed before the host saw the stop. Iterations that sample a job with
`compute_logprob` run without overlap (its log-probs need the host's view of finished rows at sampling time).

Each row is prefilled at its own length (NeMo started every row at the shortest prompt and teacher-forced the
rest). Sampling parameters are per row, so jobs with different settings share a batch; a job with `random_seed`
draws from its own generator, so its tokens do not depend on what else runs.

Distributed lockstep: every rank runs the same iterations over the same jobs (`nemotron.engine.lockstep` tells
the other ranks which jobs rank 0 admitted); the last pipeline stage's first TP rank samples and broadcasts each
iteration's tokens; every rank applies the stop rules itself. Rank 0 alone builds responses.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional

import torch
import torch.distributed as dist

from nemotron.config import env_switch
from nemotron.engine.forward import broadcast_from, forward_logits, to_device
from nemotron.engine.request import GenerationRequest, RequestError, parse_request
from nemotron.engine.sampling import apply_repetition_penalty, mask_logits, sample
from nemotron.model import Batch, KVCache, NemotronModel
from nemotron.tokenizer import Tokenizer, offsets_of

ENDOFTEXT = "<|endoftext|>"

log = logging.getLogger("nemotron")


def cuda_graphs_switch() -> str:
    """NEMOTRON_CUDA_GRAPHS: 1 (default) decodes through captured CUDA graphs on CUDA; 0 decodes eagerly."""
    return env_switch("NEMOTRON_CUDA_GRAPHS", ("0", "1"), "1")


def overlap_switch() -> str:
    """NEMOTRON_OVERLAP: 1 (default) retires each iteration in the next one on CUDA; 0 retires it at once."""
    return env_switch("NEMOTRON_OVERLAP", ("0", "1"), "1")


@dataclass
class StopRule:
    """How a request stops: token ids that end a row, and end strings matched on the decoded text."""
    ids: frozenset
    texts: tuple

    @classmethod
    def build(cls, tokenizer: Tokenizer, end_strings) -> "StopRule":
        ids, texts = {tokenizer.eos_id}, []
        for s in end_strings:
            if s == ENDOFTEXT:  # NeMo: the text form of EOS for every tokenizer
                continue
            piece = tokenizer.single_piece_id(s)
            if piece is not None:
                ids.add(piece)
            else:
                texts.append(s)
        return cls(frozenset(ids), tuple(texts))

    def stops(self, tokenizer: Tokenizer, row: List[int], token: int) -> bool:
        if token in self.ids:
            return True
        if not self.texts:
            return False
        # Decoding a tail is enough to test `endswith`; NeMo decoded the whole row every step.
        tail = tokenizer.ids_to_text(row[-max(32, 4 * max(len(s) for s in self.texts)):])
        return any(tail.endswith(s) for s in self.texts)


@dataclass
class Row:
    """One sentence of a job: its cache slot and its tokens (prompt, then generated)."""
    index: int             # within its job
    slot: int
    tokens: List[int]
    prompt_len: int
    prefilled: int = 0     # prompt tokens already in the cache
    done: bool = False
    logprobs: List[float] = field(default_factory=list)            # sampler rank: log p(token t+1 | ..t)
    full_logprobs: List[torch.Tensor] = field(default_factory=list)  # sampler rank: [n, V] blocks (all_probs)


@dataclass
class Job:
    """A request in the engine. `response` (rank 0) or `error` is set when `finished`."""
    id: int
    req: GenerationRequest
    prompts: List[List[int]]
    stop: StopRule
    rows: List[Row] = field(default_factory=list)  # set at admission
    steps: int = 0                                 # tokens generated (retired) per row so far
    sampled: int = 0                               # tokens sampled per row so far, retired or not
    started: bool = False                          # its first token was sampled: its rows decode
    finished: bool = False
    response: Optional[dict] = None
    error: Optional[Exception] = None
    # sampler rank only
    first_logits: Optional[torch.Tensor] = None    # [rows, V] float32: each row's last prompt position
    seen: Optional[torch.Tensor] = None            # [rows, V] bool: tokens of each row (repetition penalty)
    generator: Optional[torch.Generator] = None    # random_seed: this job's own draws

    @property
    def prefilled(self) -> bool:
        return all(r.prefilled == r.prompt_len for r in self.rows)

    @property
    def positions_needed(self) -> int:
        return max(len(p) for p in self.prompts) + self.req.tokens_to_generate


@dataclass
class _Sampled:
    """An iteration's new tokens, one per row of `jobs` (in order), on their way to the host."""
    jobs: List[Job]
    tokens: torch.Tensor                   # [R] int64 on the device, every rank: the next decode's inputs
    host: torch.Tensor                     # [R] int64 on the host (pinned on CUDA: filled asynchronously)
    copied: Optional[torch.cuda.Event]     # recorded after the copy to `host`; None: `host` is already filled


@dataclass
class _RowParams:
    """Per-row sampling tensors [R] for one ordered set of jobs (`key`: their ids); None where every row is off."""
    key: tuple
    penalty: Optional[torch.Tensor] = None
    greedy: Optional[torch.Tensor] = None  # None: every row is greedy
    temperature: Optional[torch.Tensor] = None
    top_k: Optional[torch.Tensor] = None
    top_p: Optional[torch.Tensor] = None


class Engine:
    def __init__(self, model: NemotronModel, tokenizer: Tokenizer, max_slots: int = 128,
                 cuda_graphs: Optional[bool] = None, prefill_chunk: int = 512, overlap: Optional[bool] = None):
        """max_slots: the most rows in flight (all jobs together), so also the most sentences of one request.
        prefill_chunk: prompt tokens per iteration (0: whole prompts). cuda_graphs: decode through captured CUDA
        graphs (nemotron.engine.graphs; one per stage under pipeline parallelism). None means on when the model is
        on CUDA, unless NEMOTRON_CUDA_GRAPHS=0; elsewhere decode is eager. overlap: retire each iteration's tokens
        in the next one (see the module's docstring); None means on when the model is on CUDA, unless
        NEMOTRON_OVERLAP=0 (on CPU there is nothing to overlap, but it can be asked for). Every rank must use the
        same settings: they decide the iterations, which all ranks run in lockstep."""
        if max_slots < 1 or prefill_chunk < 0:
            raise ValueError(f"max_slots must be >= 1 and prefill_chunk >= 0 (got {max_slots}, {prefill_chunk})")
        self.model, self.tokenizer, self.ps = model, tokenizer, model.ps
        self.cfg = model.cfg
        self.max_slots, self.prefill_chunk = max_slots, prefill_chunk
        self.device = next(model.parameters()).device
        self.cache: Optional[KVCache] = None
        self.free_slots: List[int] = []
        self.queue: Deque[Job] = deque()
        self.active: List[Job] = []
        self._ids = itertools.count()
        self._no_room: Optional[tuple] = None  # (job id, running job ids) of a failed cache growth
        self._params: Optional[_RowParams] = None  # the sampler's per-row settings for the last set of jobs
        self._pending: Optional[_Sampled] = None    # the last iteration's tokens, not yet retired (overlap)
        self._sampler = self.ps.rank == self.ps.last_stage_leader
        self._distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.overlap = overlap if overlap is not None else (self.device.type == "cuda" and overlap_switch() == "1")
        self.graphs = None
        want = cuda_graphs if cuda_graphs is not None else cuda_graphs_switch() == "1"
        if want and self.device.type == "cuda":
            from nemotron.engine.graphs import DecodeGraphs
            ok, why = DecodeGraphs.supported(model)
            if ok:
                self.graphs = DecodeGraphs(model)
            else:
                log.info("CUDA-graph decode off: %s", why)

    # --- requests in and out ---------------------------------------------------------------------------------

    def tokenize(self, req: GenerationRequest) -> List[List[int]]:
        """Prompt ids per row; raises RequestError for what the model cannot serve (rank 0, before any broadcast)."""
        if len(req.sentences) > self.max_slots:
            raise RequestError(f"Maximum number of sentences is {self.max_slots}")
        rows = []
        for i, text in enumerate(req.sentences):
            ids = ([self.tokenizer.bos_id] if req.add_BOS else []) + self.tokenizer.text_to_ids(text)
            if not ids:
                raise RequestError(f"sentences[{i}] encodes to no tokens; set add_BOS=true for an empty prompt")
            total = len(ids) + req.tokens_to_generate
            if total > self.cfg.max_position_embeddings:
                raise RequestError(
                    f"sentences[{i}] has {len(ids)} tokens; with tokens_to_generate={req.tokens_to_generate} that is "
                    f"{total} positions, more than the model's max_position_embeddings "
                    f"({self.cfg.max_position_embeddings})")
            rows.append(ids)
        return rows

    def submit(self, req: GenerationRequest, prompts: List[List[int]], job_id: Optional[int] = None) -> Job:
        """Queue a job; it is admitted at the next `step`. Every rank submits the same jobs in the same order."""
        job = Job(next(self._ids) if job_id is None else job_id, req, [list(p) for p in prompts],
                  StopRule.build(self.tokenizer, req.end_strings))
        self.queue.append(job)
        return job

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active)

    def warm_up_requests(self) -> List[GenerationRequest]:
        """Short requests that make each decode batch size the engine can meet pay its one-off costs now: a CUDA-graph
        bucket's first step compiles its Triton kernels, times each product's kernels, tunes the captured step and
        captures it, which otherwise falls on the first request of that size (27-34 s at one row with an empty
        Triton cache, on an H200: docs/benchmarks.md, fifteenth round). One request per bucket up to `max_slots`
        rows, the largest first, so the cache is allocated once; each generates two tokens, so its rows take one
        decode step."""
        from nemotron.engine.graphs import BATCH_BUCKETS
        buckets = self.graphs.buckets if self.graphs is not None else BATCH_BUCKETS
        rows = [b for b in buckets if b < self.max_slots] + ([self.max_slots] if self.max_slots <= buckets[-1] else [])
        return [parse_request({"sentences": ["warm up"] * n, "tokens_to_generate": 2, "min_tokens_to_generate": 2},
                              max_sentences=None) for n in sorted(rows, reverse=True)]

    def abort(self) -> List[Job]:
        """Drop every queued and running job (after a failure on some rank); returns them."""
        dropped = list(self.active) + list(self.queue)
        self._pending = None
        for job in self.active:
            self.free_slots.extend(r.slot for r in job.rows)
        self.free_slots.sort()
        self.active.clear()
        self.queue.clear()
        return dropped

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, prompts: Optional[List[List[int]]] = None) -> Optional[dict]:
        """Run one request to the end (every rank calls this with the same request); rank 0 gets NeMo's response
        dict, the other ranks None. Jobs submitted earlier advance too."""
        job = self.submit(req, prompts if prompts is not None else self.tokenize(req))
        while not job.finished:
            self.step()
        if job.error is not None:
            raise job.error
        return job.response

    # --- one iteration ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> List[Job]:
        """Admit, prefill one chunk, decode one token for every started row, sample, retire; returns the jobs that
        ended (under overlap, those whose last tokens were sampled in the previous iteration)."""
        ended = self._admit()
        sync = not self.overlap or any(job.req.compute_logprob for job in self.active)
        if sync and self._pending is not None:  # this iteration's sampling needs the host's view first
            ended += self._retire()
        self._prefill()
        # A job whose last token is sampled but not retired does not decode again (its length is known at launch).
        decoding = [job for job in self.active if job.started and job.sampled < job.req.tokens_to_generate]
        logits = self._decode(decoding) if decoding else None
        ready = [job for job in self.active if not job.started and job.prefilled]
        if decoding or ready:
            sampled = self._sample(decoding + ready, logits)
            if self._pending is not None:  # the previous iteration's, while this one's step runs on the device
                ended += self._retire()
            self._pending = sampled
        if self._pending is not None and (sync or not (decoding or ready)):
            ended += self._retire()
        if not self.active:  # what is left pending belongs to jobs that ended since: nothing to retire
            self._pending = None
        return ended

    # --- admission and the cache -----------------------------------------------------------------------------

    def _admit(self) -> List[Job]:
        """Give queued jobs slots, in arrival order (a job that does not fit yet waits, and so do those behind it).
        Returns jobs refused because their cache cannot be allocated."""
        refused = []
        while self.queue:
            job = self.queue[0]
            rows = len(job.prompts)
            in_use = sum(len(j.rows) for j in self.active)
            if in_use + rows > self.max_slots:
                break
            running = (job.id,) + tuple(j.id for j in self.active)
            if running == self._no_room:
                break  # the cache could not grow for this job beside these jobs: wait until one of them ends
            if not self._fit_cache(in_use + rows, job.positions_needed):
                if self.active:
                    self._no_room = running  # retried when a running job has ended (its memory may be freed)
                    break
                self.queue.popleft()
                job.finished = True
                job.error = RequestError(
                    f"the KV cache for {rows} sentences of up to {job.positions_needed} positions does not fit in "
                    f"memory; send fewer sentences or a smaller tokens_to_generate")
                refused.append(job)
                continue
            self.queue.popleft()
            job.rows = [Row(b, self.free_slots.pop(0), list(p), len(p)) for b, p in enumerate(job.prompts)]
            if self._sampler:
                job.first_logits = torch.empty(rows, self.cfg.padded_vocab_size, device=self.device)
                if job.req.random_seed is not None:
                    job.generator = torch.Generator(device=self.device).manual_seed(job.req.random_seed)
            self.active.append(job)
        return refused

    def _fit_cache(self, rows: int, positions: int) -> bool:
        """Make the cache hold `rows` rows of `positions` positions, plus the last slot, which the graphs' padding
        rows write to. It grows in powers of two (rarely, then), or to the exact need (positions in 64s) when the
        power of two does not fit; the running rows' keys are copied over, or, when none run, the old cache is
        freed first. Growing keeps the larger of the old and new rows and positions, unless that does not fit while
        nothing runs: then the need alone is tried, so a long request is never refused for the width of an earlier
        one (e.g. the server's warm-up at 128 rows). Every rank agrees on each attempt's success before going on."""
        c = self.cache
        if c is not None and c.num_slots - 1 >= rows and c.max_seq >= positions:
            return True
        old_usable, old_seq = (c.num_slots - 1, c.max_seq) if c is not None else (0, 0)
        max_pos = self.cfg.max_position_embeddings
        alone = (rows, min(max_pos, -(-positions // 64) * 64))
        rows, positions = max(rows, old_usable), max(positions, old_seq)
        roomy = (min(self.max_slots, 1 << (rows - 1).bit_length()),
                 min(max_pos, max(64, 1 << (positions - 1).bit_length())))
        exact = (rows, min(max_pos, -(-positions // 64) * 64))
        keep = c is not None and bool(self.active)
        if not keep:
            self.cache = c = None
            if self.graphs is not None:
                self.graphs.reset()  # they hold the old cache too
        for usable, seq in dict.fromkeys((roomy, exact) if keep else (roomy, exact, alone)):
            try:
                new = self.model.new_cache(usable + 1, seq)
                if keep:  # rows keep their slot numbers
                    new.k[:, :old_usable, :, :old_seq].copy_(c.k[:, :old_usable])
                    new.v[:, :old_usable, :, :old_seq].copy_(c.v[:, :old_usable])
                ok = True
            except (torch.OutOfMemoryError, MemoryError):
                new, ok = None, False
            if self._all_ranks(ok):
                break
        else:
            return False
        self.cache = new
        self.free_slots = sorted(set(self.free_slots) | set(range(old_usable, usable))) if keep else list(range(usable))
        log.info("KV cache: %d slots x %d positions", usable, seq)
        return True

    def _all_ranks(self, ok: bool) -> bool:
        if not self._distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.long, device=self.device)
        dist.all_reduce(flag)
        return int(flag) == 0

    # --- prefill ---------------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """One forward of prompt tokens: the oldest unprefilled row's next chunk, with every other row at the same
        offset, chunk length and log-prob setting, up to `prefill_chunk` tokens in all."""
        pending = [(job, row) for job in self.active if not job.started for row in job.rows
                   if row.prefilled < row.prompt_len]
        if not pending:
            return
        budget = self.prefill_chunk or 1 << 62

        def chunk(row):
            return min(budget, row.prompt_len - row.prefilled)
        job0, row0 = pending[0]
        start, T, want_all = row0.prefilled, chunk(row0), job0.req.compute_logprob
        group = [(j, r) for j, r in pending
                 if r.prefilled == start and chunk(r) == T and j.req.compute_logprob == want_all]
        group = group[:max(1, budget // T)]
        n, dev = len(group), self.device
        tokens = to_device([r.tokens[start:start + T] for _, r in group], dev)
        positions = torch.arange(start, start + T, device=dev).expand(n, T)
        slots = to_device([r.slot for _, r in group], dev)
        batch = Batch(positions, slots, kv_len=start + T, from_start=start == 0, aligned=True)
        logits = forward_logits(self.model, tokens, batch, self.cache, positions="all" if want_all else "last")
        for i, (job, row) in enumerate(group):
            row.prefilled += T
            if not self._sampler:
                continue
            if want_all:
                self._prompt_logprobs(logits[i], row, start, T, job.req.all_probs)
            if row.prefilled == row.prompt_len:
                job.first_logits[row.index] = logits[i, -1] if want_all else logits[i]

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, row: Row, start: int, T: int, all_probs: bool) -> None:
        """logits [T, V] of prompt positions start..start+T-1 -> log p(prompt token t+1 | ..t) for those t whose
        next token is in the prompt (the model's raw distribution)."""
        targets = row.tokens[start + 1:min(start + T + 1, row.prompt_len)]
        if not targets:
            return
        lp = torch.log_softmax(logits[:len(targets)], dim=-1)
        picked = lp.gather(1, torch.tensor(targets, device=lp.device).view(-1, 1)).view(-1)
        row.logprobs.extend(picked.tolist())
        if all_probs:
            row.full_logprobs.append(lp.cpu())

    # --- decode ----------------------------------------------------------------------------------------------

    def _decode(self, jobs: List[Job]) -> Optional[torch.Tensor]:
        """Feed every row of `jobs` its newest token at its own position -> logits [rows, V] on the sampler. The
        newest tokens are the pending ones, still on the device, when the last iteration was not retired yet."""
        rows = [r for job in jobs for r in job.rows]
        R, dev = len(rows), self.device
        pending = self._pending
        if pending is None:
            tokens = to_device([r.tokens[-1] for r in rows], dev)
        else:  # every decoding row was sampled in the last iteration
            at = {id(r): i for i, r in enumerate(r for job in pending.jobs for r in job.rows)}
            index = [at[id(r)] for r in rows]
            tokens = (pending.tokens[:R] if index == list(range(R))
                      else pending.tokens[to_device(index, dev)])
        # A row's newest token, retired or not, sits at its prompt length + the job's sampled tokens - 1.
        pos_list = [r.prompt_len + job.sampled - 1 for job in jobs for r in job.rows]
        slot_list = [r.slot for r in rows]
        kv_len = max(pos_list) + 1
        # The same branch on every rank (same rows, same graphs setting); under PP the graph path passes hidden
        # states between stages like forward_logits and returns None off the last stage.
        if self.graphs is not None and self.graphs.handles(R):
            return self.graphs.run(tokens, pos_list, kv_len, self.cache, slots=slot_list)
        batch = Batch(to_device(pos_list, dev).view(R, 1), to_device(slot_list, dev),
                      kv_len=kv_len, from_start=False)
        return forward_logits(self.model, tokens.view(R, 1), batch, self.cache, positions="last")

    # --- sampling --------------------------------------------------------------------------------------------

    def _sample(self, jobs: List[Job], decoded: Optional[torch.Tensor]) -> _Sampled:
        """One new token for every row of `jobs` (the decoded ones first, whose logits are `decoded`, then jobs
        whose prefill just completed), on the device of every rank; the copy to the host is started, not awaited."""
        rows = [r for job in jobs for r in job.rows]
        R, dev = len(rows), self.device
        if self._sampler:
            parts = [] if decoded is None else [decoded]
            parts += [job.first_logits for job in jobs if not job.started]
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            new = self._choose(jobs, rows, logits)
        if self._distributed:  # straight from the sampler's GPU: no host round trip before the broadcast
            if not self._sampler:
                new = torch.empty(R, dtype=torch.long, device=dev)
            broadcast_from(new, self.ps.last_stage_leader)
        at = 0
        for job in jobs:
            n = len(job.rows)
            if job.seen is not None:  # the sampler's repetition-penalty record, kept on the device
                job.seen[torch.arange(n, device=dev), new[at:at + n]] = True
            job.sampled += 1
            job.started = True
            job.first_logits = None
            at += n
        if dev.type != "cuda":
            return _Sampled(jobs, new, new, None)
        host = torch.empty(R, dtype=torch.long, pin_memory=True)
        host.copy_(new, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return _Sampled(jobs, new, host, copied)

    def _retire(self) -> List[Job]:
        """The host's part of the pending iteration: its tokens join their rows (the iteration's one device-to-host
        wait), stop rules apply, jobs end; returns the jobs that ended. Rows of jobs that ended meanwhile (a stop
        token retired after this iteration was launched) are skipped."""
        sampled, self._pending = self._pending, None
        if sampled.copied is not None:
            sampled.copied.synchronize()
        new_list = sampled.host.tolist()
        tok, ended = self.tokenizer, []
        at = 0
        for job in sampled.jobs:
            tokens, at = new_list[at:at + len(job.rows)], at + len(job.rows)
            if job.finished:
                continue
            for row, t in zip(job.rows, tokens):
                # Every rank applies the stop rule itself (same tokens, same tokenizer): no flags to send. A row
                # that finished is fed EOS; under overlap it may have finished after this token was sampled.
                if row.done:
                    t = tok.eos_id
                row.done = (row.done or t in job.stop.ids
                            or (bool(job.stop.texts) and job.stop.stops(tok, row.tokens + [t], t)))
                row.tokens.append(t)
            job.steps += 1
            if all(r.done for r in job.rows) or job.steps >= job.req.tokens_to_generate:
                self._end(job)
                ended.append(job)
        return ended

    def _choose(self, jobs: List[Job], rows: List[Row], logits: torch.Tensor) -> torch.Tensor:
        """The sampler's part: logits [R, V] float32 -> the rows' new tokens [R] (on the device); finished rows get
        EOS."""
        dev, tok = self.device, self.tokenizer
        per_row = [job for job in jobs for _ in job.rows]
        logprob_jobs = any(job.req.compute_logprob for job in jobs)
        if logprob_jobs:  # NeMo scores tokens with the model's raw distribution
            raw_lp = torch.log_softmax(logits, dim=-1)
        suppress = [job.sampled < job.req.min_tokens_to_generate for job in per_row]
        logits = mask_logits(logits, tok.vocab_size, tok.eos_id,
                             to_device(suppress, dev) if any(suppress) else None)
        params = self._row_params(jobs, per_row)
        if params.penalty is not None:  # only the rows of jobs that ask for it, each against its own seen tokens
            at = 0
            for job in jobs:
                n = len(job.rows)
                if job.req.repetition_penalty != 1.0:
                    if job.seen is None:  # its prompt tokens count as seen
                        job.seen = torch.zeros(n, self.cfg.padded_vocab_size, dtype=torch.bool, device=dev)
                        for b, r in enumerate(job.rows):
                            job.seen[b, to_device(r.tokens, dev)] = True
                    logits[at:at + n] = apply_repetition_penalty(logits[at:at + n], job.seen,
                                                                 params.penalty[at:at + n])
                at += n
        if params.greedy is None:  # every row greedy: what `sample` returns then, without its sync
            new = logits.argmax(dim=-1)
        else:
            own, at = [], 0
            for job in jobs:
                if job.generator is not None and not job.req.greedy:
                    own.append((at, at + len(job.rows), job.generator))
                at += len(job.rows)
            new = sample(logits, params.greedy, params.temperature, params.top_k, params.top_p, own_generators=own)
        new = new.clamp_(max=tok.vocab_size - 1)
        done = [r.done for r in rows]
        if any(done):
            new = torch.where(to_device(done, dev), tok.eos_id, new)
        if logprob_jobs:
            picked = raw_lp.gather(1, new.view(-1, 1)).view(-1).tolist()
            for i, (job, row) in enumerate(zip(per_row, rows)):
                if job.req.compute_logprob:
                    row.logprobs.append(picked[i])
                    if job.req.all_probs:
                        row.full_logprobs.append(raw_lp[i:i + 1].cpu())
        return new

    def _row_params(self, jobs: List[Job], per_row: List[Job]) -> "_RowParams":
        """The rows' sampling settings as device tensors, rebuilt only when the jobs sampled change."""
        key = tuple(job.id for job in jobs)
        if self._params is not None and self._params.key == key:
            return self._params
        dev = self.device
        p = _RowParams(key)
        if any(job.req.repetition_penalty != 1.0 for job in jobs):
            p.penalty = to_device([job.req.repetition_penalty for job in per_row], dev)
        if not all(job.req.greedy for job in jobs):
            p.greedy = to_device([job.req.greedy for job in per_row], dev)
            p.temperature = to_device([float(job.req.temperature) for job in per_row], dev)
            p.top_k = to_device([int(job.req.top_k) for job in per_row], dev)
            p.top_p = to_device([float(job.req.top_p) for job in per_row], dev)
        self._params = p
        return p

    # --- the end of a job --------------------------------------------------------------------------------------

    def _end(self, job: Job) -> None:
        self.active.remove(job)
        self.free_slots = sorted(self.free_slots + [r.slot for r in job.rows])
        job.finished = True
        job.seen = job.generator = None
        job.response = self._respond(job)

    def _respond(self, job: Job) -> Optional[dict]:
        req, ps = job.req, self.ps
        rows = [r.tokens for r in job.rows]
        lp_rows = full_rows = None
        if req.compute_logprob:
            if self._sampler:
                lp_rows = [r.logprobs for r in job.rows]
                if req.all_probs:
                    full_rows = [torch.cat(r.full_logprobs, dim=0) for r in job.rows]
            lp_rows, full_rows = self._to_rank0(lp_rows, full_rows, rows, req)
        if ps.rank != 0:
            return None
        tok = self.tokenizer
        pieces = [tok.ids_to_tokens(r) for r in rows]
        out = {
            "sentences": [tok.ids_to_text(r) for r in rows],
            "tokens": pieces,
            "logprob": lp_rows,
            "full_logprob": [f.tolist() for f in full_rows] if full_rows is not None else None,
            "token_ids": [list(r) for r in rows],
            "offsets": [offsets_of(p) for p in pieces],
        }
        if not req.all_probs:
            del out["full_logprob"]
        return out

    def _to_rank0(self, lp_rows, full_rows, rows, req):
        """Move log-probs from the sampling rank to rank 0 (only differs under pipeline parallelism)."""
        ps = self.ps
        src = ps.last_stage_leader
        if src == 0:
            return lp_rows, full_rows
        B = len(rows)
        width = max(len(r) for r in rows) - 1
        buf = torch.zeros(B, width, dtype=torch.float32, device=self.device)
        if ps.rank == src:
            for b in range(B):
                buf[b, : len(lp_rows[b])] = torch.tensor(lp_rows[b])
            dist.send(buf, dst=0)
        elif ps.rank == 0:
            dist.recv(buf, src=src)
            lp_rows = [buf[b, : len(rows[b]) - 1].tolist() for b in range(B)]
        if req.all_probs:
            V = self.cfg.padded_vocab_size
            full = torch.zeros(B, width, V, dtype=torch.float32, device=self.device)
            if ps.rank == src:
                for b in range(B):
                    full[b, : full_rows[b].shape[0]] = full_rows[b].to(self.device)
                dist.send(full, dst=0)
            elif ps.rank == 0:
                dist.recv(full, src=src)
                full_rows = [full[b, : len(rows[b]) - 1].cpu() for b in range(B)]
        return lp_rows, full_rows


__all__ = ["Engine", "Job", "StopRule", "ENDOFTEXT"]
