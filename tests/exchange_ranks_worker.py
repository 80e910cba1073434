"""One rank of the peer-exchange test with real processes (torchrun, gloo; the kernels in Triton's interpreter).

The exchange's buffers are files that every rank maps shared, so each rank's address table points into the others'
buffers, as symmetric memory's does across GPUs. Then the fused decode step (`DecodeGraphs`,
uncaptured) runs with its TP sums through the exchange and, on a second cache, with them through gloo's
all-reduce; both against `forward_logits`.

usage: torchrun --nproc-per-node N tests/exchange_ranks_worker.py TP PP OUT
"""
import json
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: its kernels are interpreted on CPU
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import run_worker, tiny_model_on_ranks  # noqa: E402
from nemotron.engine.forward import forward_logits  # noqa: E402
from nemotron.engine.graphs import DecodeGraphs  # noqa: E402
from nemotron.model import Batch  # noqa: E402
from nemotron.parallel import peer_allreduce  # noqa: E402
from nemotron.parallel.peer_allreduce import PeerExchange, without_exchange  # noqa: E402

ROWS, SLOT = 3, 4 * 1024


def shared_exchange(ps, prefix: str) -> PeerExchange:
    """A PeerExchange over files: every rank of the TP group maps every rank's file (MAP_SHARED)."""
    world, rank = ps.tp_size, ps.tp_rank
    total = PeerExchange.layout_bytes(world, SLOT)
    paths = [f"{prefix}.tp{r}" for r in range(world)]
    with open(paths[rank], "wb") as f:
        f.truncate(total)  # zeros
    dist.barrier(group=ps.tp_group)
    maps = [torch.from_file(p, shared=True, size=total, dtype=torch.uint8) for p in paths]
    data = maps[rank].view(torch.int64).view(2, world, SLOT)
    xch = PeerExchange(rank, world, data, [m.data_ptr() for m in maps])
    xch.maps = maps  # keep every mapping alive as long as the exchange
    return xch


@torch.inference_mode()
def decode(model, cfg, graphs, g):
    """Prefill ROWS rows into two caches, then decode through `graphs` and through forward_logits."""
    V = cfg.padded_vocab_size
    lengths = [3, 20, 41]
    ref_cache, cache = model.new_cache(ROWS + 1, 64), model.new_cache(ROWS + 1, 64)
    for b, n in enumerate(lengths):
        toks = torch.randint(0, V, (1, n), generator=g)
        for c in (ref_cache, cache):
            forward_logits(model, toks, Batch(torch.arange(n).view(1, n), torch.tensor([b]), kv_len=n), c)
    pos, worst, logits = list(lengths), 0.0, []
    for B in (3, 3, 2, 1, 3):  # buckets 4 (one padding row), 2, 1
        tokens = torch.randint(0, V, (B,), generator=g)
        kv = max(pos[:B]) + 1
        ref = forward_logits(model, tokens.view(B, 1), Batch(torch.tensor(pos[:B]).view(B, 1), slice(0, B),
                                                             kv_len=kv, from_start=False), ref_cache)
        got = graphs.run(tokens, pos[:B], kv, cache)
        if model.ps.is_last_stage:
            worst = max(worst, float(((got - ref).abs() - 1e-5 * ref.abs()).max()))
            logits.append(got.clone())
        for b in range(B):
            pos[b] += 1
    return worst, logits


def main():
    tp, pp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    runtime, model = tiny_model_on_ranks(tp, pp)
    ps, cfg = runtime.ps, model.cfg
    # Files every rank maps MAP_SHARED: in /dev/shm where there is one (a file system's mapping works too, slower).
    where = "/dev/shm" if os.access("/dev/shm", os.W_OK) else os.path.dirname(out)
    prefix = os.path.join(where, f"{os.path.basename(out)}.pp{ps.pp_rank}")
    xch = shared_exchange(ps, prefix)
    peer_allreduce._exchanges[ps.tp_group.group_name] = xch  # what enable_peer_all_reduce does on GPUs
    graphs = DecodeGraphs(model, capture=False)
    worst_xch, logits_xch = decode(model, cfg, graphs, torch.Generator().manual_seed(0))
    steps = int(xch.epoch)
    with without_exchange(ps.tp_group):
        worst_ar, logits_ar = decode(model, cfg, graphs, torch.Generator().manual_seed(0))
    diff = max((float((a - b).abs().max()) for a, b in zip(logits_xch, logits_ar)), default=0.0)
    result = {"rank": ps.rank, "last_stage": ps.is_last_stage, "exchange_steps": steps, "tp": tp,
              "layers": len(model.decoder.layers),
              "epoch_after_all_reduce_path": int(xch.epoch), "flags": [int((xch.data[r] >> 32).max()) for r in (0, 1)],
              "worst_exchange": worst_xch, "worst_all_reduce": worst_ar, "exchange_vs_all_reduce": diff}
    with open(f"{out}.rank{ps.rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    os.remove(f"{prefix}.tp{ps.tp_rank}")
    runtime.close()


if __name__ == "__main__":
    run_worker(main)
