"""Time the demo model on this machine: imports, checkpoint load, and a 32-token greedy completion.

    python scripts/cpu_demo_speed.py [--precision 32|16|bf16] [--tokens 32]
Prints one JSON line. The end-to-end figure for docs/benchmarks.md is `time python -m nemotron.eval ...`.
"""
import argparse
import json
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t_torch = time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="32")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    from nemotron.checkpoint.loader import load_model
    from nemotron.config import dtype_from_precision
    from nemotron.engine.engine import Engine
    from nemotron.engine.request import parse_request
    from nemotron.eval import DEMO_MODEL

    t_imports = time.perf_counter()
    import megatron.core.dist_checkpointing  # noqa: F401  (the torch_dist reader; timed on its own)
    t_mcore = time.perf_counter()
    loaded = load_model(DEMO_MODEL, dtype=dtype_from_precision(args.precision), progress=False)
    t_load = time.perf_counter()
    engine = Engine(loaded.model, loaded.tokenizer)
    req = parse_request({"sentences": ["def fibonacci(n):"], "greedy": True, "tokens_to_generate": args.tokens,
                         "min_tokens_to_generate": args.tokens})
    engine.generate(req)  # warm-up (first-call allocations)
    t_gen0 = time.perf_counter()
    out = engine.generate(req)
    t_gen = time.perf_counter()
    print(json.dumps({
        "precision": args.precision, "threads": torch.get_num_threads(),
        "import_torch_s": round(t_torch - t0, 2), "import_nemotron_s": round(t_imports - t_torch, 2),
        "import_megatron_core_s": round(t_mcore - t_imports, 2), "load_s": round(t_load - t_mcore, 2),
        "generate_s": round(t_gen - t_gen0, 3), "tokens": args.tokens,
        "tok_per_s": round(args.tokens / (t_gen - t_gen0), 1),
        "sample": out["sentences"][0][:80],
    }))


if __name__ == "__main__":
    main()
