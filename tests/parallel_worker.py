"""One rank of a multi-process test (run under torchrun): loads the tiny model sharded TP x PP, then
computes logits, a greedy completion, a seeded sample and a completion cut by an end string; rank 0 writes them to
OUT as JSON. Layouts of several ranks serve with overlap (each iteration's tokens retired in the next), TP1
without: equal answers check both.

usage: torchrun --nproc-per-node N tests/parallel_worker.py TP PP SOURCE OUT
SOURCE: "reference" (full weights sliced per rank) or a NeMo checkpoint directory (megatron-core resharding).
"""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import FIXTURES, run_worker, tiny_config, tiny_reference_state  # noqa: E402
from nemotron.checkpoint import torch_dist  # noqa: E402
from nemotron.checkpoint.shards import fill_from_full_state  # noqa: E402
from nemotron.engine.engine import Engine  # noqa: E402
from nemotron.engine.forward import forward_logits  # noqa: E402
from nemotron.engine.lockstep import Coordinator, follow  # noqa: E402
from nemotron.engine.request import parse_request  # noqa: E402
from nemotron.model import Batch, NemotronModel  # noqa: E402
from nemotron.parallel.runtime import init_runtime  # noqa: E402
from nemotron.tokenizer import Tokenizer  # noqa: E402


def main():
    tp, pp, source, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    runtime = init_runtime(tp, pp, devices=tp * pp, num_nodes=1, cpu=True)
    ps = runtime.ps
    model = NemotronModel(tiny_config(), ps).eval()
    if source == "reference":
        fill_from_full_state(model, tiny_reference_state())
    else:
        torch_dist.load(model, os.path.join(source, "model_weights"))
    tok = Tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.model"))
    engine = Engine(model, tok, overlap=tp * pp > 1)

    ids = torch.tensor([tok.text_to_ids("def main(argv):\n    return 0")])
    pos = torch.arange(ids.shape[1]).view(1, -1)
    logits = forward_logits(model, ids, Batch(pos), None, positions="all")
    if ps.rank == ps.last_stage_leader:
        torch.save(logits, out + ".logits.pt")

    if ps.rank != 0:
        follow(engine, runtime.control)
        runtime.close()
        return
    coord = Coordinator(engine, runtime.control)
    greedy = coord.generate(parse_request({"sentences": ["import os", "class A(object):"], "greedy": True,
                                           "tokens_to_generate": 12, "min_tokens_to_generate": 12}))
    sampled = coord.generate(parse_request({"sentences": ["def f(x):"], "tokens_to_generate": 12,
                                            "random_seed": 1234, "temperature": 1.0, "top_p": 0.95,
                                            "compute_logprob": True}))
    stopped = coord.generate(parse_request({"sentences": ["x = 1", "import os"], "greedy": True,
                                            "tokens_to_generate": 8, "end_strings": [";"]}))
    coord.shutdown()
    with open(out, "w") as f:
        json.dump({"greedy": greedy["token_ids"], "sampled": sampled["token_ids"],
                   "sampled_logprob": sampled["logprob"], "stopped": stopped["token_ids"]}, f)
    runtime.close()


if __name__ == "__main__":
    run_worker(main)
