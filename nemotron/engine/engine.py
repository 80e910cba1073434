"""The slot-based generation engine: NeMo's `generate` semantics over a static KV cache.

A request's rows each get a cache slot. Each row is prefilled at its own length (NeMo instead started every
row at the shortest prompt and teacher-forced the rest one token per step), then all rows advance one token per
decode step. Finished rows are fed EOS (NeMo's "EOS fill") until every row is done or `tokens_to_generate`
steps have run. Because slots are independent, rows could join and leave at step boundaries; the CUDA-graph
decode path reuses the same slots.

Distributed lockstep: every rank calls `generate` with the same request. Rank 0 alone returns the response;
the last pipeline stage's first TP rank samples and broadcasts each step's tokens to every rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from nemotron.engine.forward import broadcast_from, forward_logits
from nemotron.engine.request import GenerationRequest, RequestError
from nemotron.engine.sampling import apply_repetition_penalty, mask_logits, sample
from nemotron.model import Batch, KVCache, NemotronModel
from nemotron.tokenizer import Tokenizer, offsets_of

ENDOFTEXT = "<|endoftext|>"

log = logging.getLogger("nemotron")


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


class Engine:
    def __init__(self, model: NemotronModel, tokenizer: Tokenizer, max_slots: int = 128,
                 cuda_graphs: Optional[bool] = None):
        """cuda_graphs: decode through captured CUDA graphs (nemotron.engine.graphs; one per stage under
        pipeline parallelism). None means on when the model is on CUDA, unless NEMOTRON_CUDA_GRAPHS=0; elsewhere
        decode is eager. Every rank must make the same choice: the graph and eager paths are separate protocols."""
        self.model, self.tokenizer, self.ps = model, tokenizer, model.ps
        self.cfg = model.cfg
        self.max_slots = max_slots
        self.device = next(model.parameters()).device
        self.cache: Optional[KVCache] = None
        self.graphs = None
        want = cuda_graphs if cuda_graphs is not None else os.environ.get("NEMOTRON_CUDA_GRAPHS", "1") != "0"
        if want and self.device.type == "cuda":
            from nemotron.engine.graphs import DecodeGraphs
            ok, why = DecodeGraphs.supported(model)
            if ok:
                self.graphs = DecodeGraphs(model)
            else:
                log.info("CUDA-graph decode off: %s", why)

    # --- request preparation (rank 0 runs this before anything is broadcast) ---------------------------------

    def tokenize(self, req: GenerationRequest) -> List[List[int]]:
        """Prompt ids per row; raises RequestError for what the model cannot serve."""
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

    def _ensure_cache(self, slots: int, max_seq: int) -> KVCache:
        c = self.cache
        if self.graphs is not None:  # a batch replays in its bucket's graph; padding rows use spare slots
            slots = self.graphs.slots_for(slots)
        if c is None or c.num_slots < slots or c.max_seq < max_seq:
            self.cache = None  # free the old one first
            slots = max(slots, c.num_slots if c else 0)
            max_seq = max(-(-max_seq // 64) * 64, c.max_seq if c else 0)
            self.cache = self.model.new_cache(slots, min(max_seq, self.cfg.max_position_embeddings))
        return self.cache

    # --- generation ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, prompts: Optional[List[List[int]]] = None) -> Optional[dict]:
        """Run `req` on every rank in lockstep; rank 0 gets NeMo's response dict, the others None."""
        prompts = prompts if prompts is not None else self.tokenize(req)
        if req.random_seed is not None:
            from lightning_fabric.utilities.seed import seed_everything
            seed_everything(req.random_seed, verbose=False)

        ps, dev, tok = self.ps, self.device, self.tokenizer
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        steps_max = req.tokens_to_generate
        cache = self._ensure_cache(B, max(lengths) + steps_max)
        sampler = ps.rank == ps.last_stage_leader
        rows = [list(p) for p in prompts]
        logprobs: List[List[float]] = [[] for _ in range(B)]  # per row: log p(token t+1 | ..t)
        full_logprobs: List[List[torch.Tensor]] = [[] for _ in range(B)]  # per row: [n, V] blocks

        # Prefill: rows of equal length share one forward; each row is written to its own slot.
        last_logits = torch.empty(B, self.cfg.padded_vocab_size, device=dev) if sampler else None
        for length in sorted(set(lengths)):
            idx = [b for b in range(B) if lengths[b] == length]
            tokens = torch.tensor([prompts[b] for b in idx], device=dev)
            positions = torch.arange(length, device=dev).expand(len(idx), length)
            batch = Batch(positions, torch.tensor(idx, device=dev), kv_len=length, from_start=True)
            want = "all" if req.compute_logprob else "last"
            logits = forward_logits(self.model, tokens, batch, cache, positions=want)
            if sampler:
                if req.compute_logprob:
                    self._prompt_logprobs(logits, tokens, idx, req, logprobs, full_logprobs)
                    logits = logits[:, -1]
                last_logits[idx] = logits

        # Sampling state (used by the sampler rank only).
        if sampler:
            greedy = torch.full((B,), req.greedy, device=dev)
            temperature = torch.full((B,), float(req.temperature), device=dev)
            top_k = torch.full((B,), int(req.top_k), device=dev)
            top_p = torch.full((B,), float(req.top_p), device=dev)
            penalty = torch.full((B,), float(req.repetition_penalty), device=dev)
            seen = torch.zeros(B, self.cfg.padded_vocab_size, dtype=torch.bool, device=dev)
            if req.repetition_penalty != 1.0:
                for b, p in enumerate(prompts):
                    seen[b, torch.tensor(p, device=dev)] = True
        stop = StopRule.build(tok, req.end_strings)
        done = [False] * B
        step_out = torch.empty(2, B, dtype=torch.long, device=dev)  # [new tokens; done flags]

        distributed = dist.is_initialized() and dist.get_world_size() > 1
        for step in range(steps_max):
            if sampler:
                logits = last_logits
                if req.compute_logprob:  # NeMo scores tokens with the model's raw distribution
                    raw_lp = torch.log_softmax(logits, dim=-1)
                suppress = torch.full((B,), step < req.min_tokens_to_generate, device=dev)
                logits = mask_logits(logits, tok.vocab_size, tok.eos_id, suppress)
                if req.repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, seen, penalty)
                if req.greedy:  # what `sample` returns when every row is greedy, without its host sync
                    new = logits.argmax(dim=-1)
                else:
                    new = sample(logits, greedy, temperature, top_k, top_p)
                new = new.clamp_(max=tok.vocab_size - 1)
                if any(done):
                    new = torch.where(torch.tensor(done, device=dev), tok.eos_id, new)
                step_out[0] = new
                if req.compute_logprob:
                    picked = raw_lp.gather(1, new.view(-1, 1)).view(-1).tolist()
                    for b in range(B):
                        logprobs[b].append(picked[b])
                        if req.all_probs:
                            full_logprobs[b].append(raw_lp[b:b + 1].cpu())
                new_list = new.tolist()  # the step's one device-to-host sync
                flags = []
                for b in range(B):
                    t = new_list[b]
                    flags.append(done[b] or t in stop.ids
                                 or (bool(stop.texts) and stop.stops(tok, rows[b] + [t], t)))
                if distributed:
                    step_out[1] = torch.tensor(flags, device=dev)
            if distributed:
                broadcast_from(step_out, ps.last_stage_leader)
                new_tokens, flags = step_out.tolist()
            else:
                new_tokens = new_list
            for b in range(B):
                rows[b].append(new_tokens[b])
            done = [bool(x) for x in flags]
            if sampler and req.repetition_penalty != 1.0:
                seen[torch.arange(B, device=dev), step_out[0]] = True
            if all(done) or step == steps_max - 1:
                break
            # Decode: feed every row its newest token at its own position.
            pos_list = [len(r) - 1 for r in rows]
            kv_len = max(pos_list) + 1
            # Same branch on every rank (same B, same graphs setting); under PP the graph path passes hidden
            # states between stages like forward_logits and returns None off the last stage.
            if self.graphs is not None and self.graphs.handles(B):
                logits = self.graphs.run(step_out[0], pos_list, kv_len, cache)
            else:
                positions = torch.tensor([[p] for p in pos_list], device=dev)
                batch = Batch(positions, slice(0, B), kv_len=kv_len, from_start=False)
                logits = forward_logits(self.model, step_out[0].view(B, 1), batch, cache, positions="last")
            if sampler:
                last_logits = logits

        return self._respond(req, rows, logprobs, full_logprobs)

    # --- log-probabilities -----------------------------------------------------------------------------------

    @staticmethod
    def _prompt_logprobs(logits, tokens, idx, req, logprobs, full_logprobs):
        """logits [n, T, V] -> log p(prompt token t+1 | tokens ..t) for t < T-1 (the model's raw distribution)."""
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = torch.gather(lp, 2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        for j, b in enumerate(idx):
            logprobs[b].extend(picked[j].tolist())
            if req.all_probs:
                full_logprobs[b].append(lp[j].cpu())

    # --- response --------------------------------------------------------------------------------------------

    def _respond(self, req, rows, logprobs, full_logprobs) -> Optional[dict]:
        ps = self.ps
        lp_rows = full_rows = None
        if req.compute_logprob:
            if ps.rank == ps.last_stage_leader:
                lp_rows = logprobs
                if req.all_probs:
                    full_rows = [torch.cat(f, dim=0) for f in full_logprobs]
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
