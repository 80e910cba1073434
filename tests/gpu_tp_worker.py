"""One rank of the TP2 graph-decode GPU test (run under torchrun on two GPUs, NCCL + the peer exchange): the demo
model sharded over the ranks in bf16, greedy requests at batch buckets 1 and 8 through the captured graphs and
through eager decode, with the whole-step tuner on (its default, under TP too; the test also sets
NEMOTRON_STEP_TUNE=1).

Each rank writes what it saw to OUT.rank<r>.json: its tokens (rank 0), the tuner's records and the choices in
force; the test makes the assertions.

usage: torchrun --nproc-per-node 2 tests/gpu_tp_worker.py OUT
"""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import run_worker  # noqa: E402
from nemotron.checkpoint.loader import load_model  # noqa: E402
from nemotron.engine import kernels  # noqa: E402
from nemotron.engine.engine import Engine  # noqa: E402
from nemotron.engine.request import parse_request  # noqa: E402
from nemotron.parallel.runtime import init_runtime  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nemotron", "demo")
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os", "for i in range(10):", "# Copyright"]


def greedy(engine, prompts, tokens=32):
    """The rows' token ids on rank 0 (where responses are made), None on the other ranks."""
    response = engine.generate(parse_request({"sentences": prompts, "greedy": True, "tokens_to_generate": tokens,
                                              "min_tokens_to_generate": tokens}))
    return None if response is None else response["token_ids"]


def main():
    out = sys.argv[1]
    runtime = init_runtime(2, 1, devices=2)
    loaded = load_model(DEMO, runtime.ps, dtype=torch.bfloat16, progress=False)
    graph = Engine(loaded.model, loaded.tokenizer, cuda_graphs=True)
    eager = Engine(loaded.model, loaded.tokenizer, cuda_graphs=False)
    seen = {"rank": runtime.ps.rank, "graph": {}, "eager": {}}
    for name, engine in (("graph", graph), ("eager", eager)):
        for rows in (1, 5):  # buckets 1 and 8
            seen[name][str(rows)] = greedy(engine, PROMPTS[:rows])
    seen["step_tuning"] = kernels.step_tuning
    seen["in_force"] = {str(rows): {name: kernels.choice_name(cfg)
                                    for name, cfg in kernels.step_tunable_products(rows)} for rows in (1, 8)}
    with open(f"{out}.rank{runtime.ps.rank}.json", "w") as f:
        json.dump(seen, f)
    runtime.close()


if __name__ == "__main__":
    run_worker(main)
