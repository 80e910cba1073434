"""One rank of the pipelined graph-decode test (run under torchrun, gloo): the tiny model sharded TP x PP, then

* the decode step through `DecodeGraphs(capture=False).run` (the graphs' stage protocol: static buffers, the
  hidden-state recv/send between stages, bucket padding) against `forward_logits` on a second, identical cache;
* `Engine.generate` with that decode path against the eager engine.

Each rank writes what it saw to OUT.rank<r>.json; the test makes the assertions.

usage: torchrun --nproc-per-node N tests/graphs_pp_worker.py TP PP OUT
"""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import FIXTURES, run_worker, tiny_model_on_ranks  # noqa: E402
from nemotron.engine.engine import Engine  # noqa: E402
from nemotron.engine.forward import forward_logits  # noqa: E402
from nemotron.engine.graphs import DecodeGraphs  # noqa: E402
from nemotron.engine.request import parse_request  # noqa: E402
from nemotron.model import Batch  # noqa: E402
from nemotron.tokenizer import Tokenizer  # noqa: E402

ROWS = 3  # runs in bucket 4: one padding row


@torch.inference_mode()
def check_steps(model, cfg):
    """Prefill ROWS rows of different lengths into two caches, then decode both ways; returns what differs."""
    graphs = DecodeGraphs(model, capture=False)
    V = cfg.padded_vocab_size
    g = torch.Generator().manual_seed(0)  # same draws on every rank: every rank must see the same batch
    lengths = [3, 30, 60]  # decoding crosses kv_len 64, so two KV buckets (64, 128) are used
    ref_cache, cache = model.new_cache(ROWS + 1, 128), model.new_cache(ROWS + 1, 128)  # + the padding slot
    for b, n in enumerate(lengths):
        toks = torch.randint(0, V, (1, n), generator=g)
        for c in (ref_cache, cache):
            forward_logits(model, toks, Batch(torch.arange(n).view(1, n), torch.tensor([b]), kv_len=n), c)
    pos = list(lengths)  # next position of each row
    seen = {"worst_logits": 0.0, "steps": 0, "none_off_last": True, "shapes": []}
    # Batches: 3 rows (bucket 4, padded), then 2 rows (bucket 2), then 1, then 3 again.
    for B in (3, 3, 3, 2, 2, 1, 3, 3):
        tokens = torch.randint(0, V, (B,), generator=g)
        positions = torch.tensor(pos[:B])
        kv = int(positions.max()) + 1
        ref = forward_logits(model, tokens.view(B, 1), Batch(positions.view(B, 1), slice(0, B), kv_len=kv,
                                                             from_start=False), ref_cache)
        got = graphs.run(tokens, pos[:B], kv, cache)
        if model.ps.is_last_stage:
            seen["shapes"].append(list(got.shape))
            err = (got - ref).abs() - 1e-5 * ref.abs()  # > 1e-5 where assert_close(atol=rtol=1e-5) fails
            seen["worst_logits"] = max(seen["worst_logits"], float(err.max()))
        else:
            seen["none_off_last"] &= got is None and ref is None
        for b in range(B):
            pos[b] += 1
        seen["steps"] += 1
    # The real rows' slots must hold the same keys/values; the padding slot (3) holds the padding rows' writes.
    seen["cache_k"] = float((cache.k[:, :ROWS] - ref_cache.k[:, :ROWS]).abs().max())
    seen["cache_v"] = float((cache.v[:, :ROWS] - ref_cache.v[:, :ROWS]).abs().max())
    seen["cache_slots"] = cache.num_slots
    return seen


def check_engine(model, tok):
    """The same requests through the eager engine and through the graph protocol (uncaptured, with overlap), one at
    a time and both in flight together."""
    eager = Engine(model, tok)
    graph = Engine(model, tok, overlap=True)  # decode inputs straight from the last iteration's device tokens
    graph.graphs = DecodeGraphs(model, capture=False)
    assert eager.graphs is None  # CPU: the engine itself never builds graphs
    requests = [
        {"sentences": ["import os", "class A(object):", "def f(x):"], "greedy": True, "tokens_to_generate": 10,
         "min_tokens_to_generate": 10},
        {"sentences": ["def main(argv):", "x = "], "tokens_to_generate": 8, "random_seed": 1234,
         "temperature": 1.0, "top_p": 0.95, "compute_logprob": True},
    ]
    out = {}
    for name, engine in (("eager", eager), ("graph", graph)):
        alone = [engine.generate(parse_request(r)) for r in requests]
        # Both requests in flight together (continuous batching): rows of both in each decode step.
        jobs = [engine.submit(parse_request(r), engine.tokenize(parse_request(r))) for r in requests]
        while not all(job.finished for job in jobs):
            engine.step()
        if model.ps.rank == 0:
            for key, got in ((name, alone), (name + "_together", [job.response for job in jobs])):
                out[key] = [{"token_ids": g["token_ids"], "logprob": g.get("logprob")} for g in got]
    out["graph_cache_slots"] = graph.cache.num_slots
    return out


def main():
    tp, pp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    runtime, model = tiny_model_on_ranks(tp, pp)
    ps, cfg = runtime.ps, model.cfg
    tok = Tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.model"))
    result = {"rank": ps.rank, "pp_rank": ps.pp_rank, "last_stage": ps.is_last_stage,
              "steps": check_steps(model, cfg), "engine": check_engine(model, tok)}
    with open(f"{out}.rank{ps.rank}.json", "w") as f:
        json.dump(result, f)
    runtime.close()


if __name__ == "__main__":
    run_worker(main)
