"""One rank of the lockstep fault test (run under torchrun, TP2 gloo): an engine iteration raises on every rank
while a request whose prompt is "FAIL" runs (injected into this process's engine); rank 0 must get GenerationError,
and the ranks must stay in step so the next request succeeds. Rank 0 writes what it saw to OUT as JSON."""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import FIXTURES, run_worker, tiny_model_on_ranks  # noqa: E402
from nemotron.engine.engine import Engine  # noqa: E402
from nemotron.engine.lockstep import Coordinator, GenerationError, follow  # noqa: E402
from nemotron.engine.request import parse_request  # noqa: E402
from nemotron.tokenizer import Tokenizer  # noqa: E402


class FaultyEngine(Engine):
    def _prefill(self):
        if any(job.req.sentences[0] == "FAIL" for job in self.active):  # every rank runs the same jobs, so
            raise MemoryError("injected: cannot allocate the KV cache")   # every rank fails here, in one iteration
        super()._prefill()


def main():
    out = sys.argv[1]
    runtime, model = tiny_model_on_ranks(2, 1)
    engine = FaultyEngine(model, Tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.model")), overlap=True)
    if runtime.ps.rank != 0:
        follow(engine, runtime.control)
        runtime.close()
        return
    coord = Coordinator(engine, runtime.control)
    good = {"sentences": ["def f(x):"], "greedy": True, "tokens_to_generate": 6}
    seen = {"before": coord.generate(parse_request(good))["token_ids"]}
    try:
        coord.generate(parse_request({"sentences": ["FAIL"], "tokens_to_generate": 6}))
        seen["error"] = None
    except GenerationError as exc:
        seen["error"] = str(exc)
    seen["after"] = coord.generate(parse_request(good))["token_ids"]
    coord.shutdown()
    with open(out, "w") as f:
        json.dump(seen, f)
    runtime.close()


if __name__ == "__main__":
    run_worker(main)
