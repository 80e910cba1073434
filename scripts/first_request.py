#!/usr/bin/env python3
"""How long do the first requests of each batch size wait, with and without the server's warm-up?

Starts the real server (`python -m nemotron.eval server=True`) three times: without the warm-up and with it, each
with an empty Triton cache (a fresh machine), then with it again on the second run's cache (a restart on the same
machine: Triton reuses its compiled kernels; timings and captures are redone). For each it measures:
* `ready_s`: from launch until GET /health answers 200 (loading, plus the warm-up when on);
* per batch size n: the first `PUT /generate` of n greedy rows (`first_s`), then the same request again
  (`again_s`). What the first pays beyond the second is what the warm-up is meant to take off it. The rows
  generate `--tokens` tokens, so they cross KV buckets, whose first steps capture new graphs;
* `captures_after_ready`: the graph captures the server logged while serving, and their seconds.

    python scripts/first_request.py --out out/first_request.json                  # the demo model on GPU 0
    python scripts/first_request.py --model /ckpt --sizes 1,8 --override trainer.precision=bf16
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_time(warm: bool, triton_cache: str, name: str, args) -> dict:
    port = free_port()
    log_path = os.path.join(args.logs, f"server_{name}.log")
    model = [f"gpt_model_file={args.model}"] if args.model else []
    cmd = [sys.executable, "-m", "nemotron.eval", "server=True", "host=127.0.0.1", f"port={port}", "prompts=[]",
           f"warm_up={warm}", *model, *args.override]
    with open(log_path, "w") as log:
        env = dict(os.environ, TRITON_CACHE_DIR=triton_cache)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.perf_counter() - started > args.timeout:
                    raise SystemExit(f"not healthy within {args.timeout} s; see {log_path}")
                time.sleep(0.25)
            with open(log_path) as f:
                ready_lines = len(f.read().splitlines())
            result = {"run": name, "warm_up": warm, "ready_s": round(time.perf_counter() - started, 2), "sizes": {}}
            for n in args.sizes:
                body = {"sentences": [f"{i} def f(x):" for i in range(n)], "greedy": True,
                        "tokens_to_generate": args.tokens, "min_tokens_to_generate": args.tokens}
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    out = requests.put(f"http://127.0.0.1:{port}/generate", json=body, timeout=args.timeout)
                    times.append(round(time.perf_counter() - t0, 3))
                    if out.status_code != 200:
                        raise SystemExit(f"{n} rows: HTTP {out.status_code} {out.text[:300]}")
                result["sizes"][n] = {"first_s": times[0], "again_s": times[1]}
                print(f"{name}: {n} rows x {args.tokens} tokens: first {times[0]:.3f} s, "
                      f"again {times[1]:.3f} s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(log_path) as f:
        lines = f.read().splitlines()
    result["server_log"] = [line for line in lines if "warm-up" in line or "captured" in line]
    serving = [float(line.split("captured in ")[1].split(" s")[0]) for line in lines[ready_lines:]
               if "captured in " in line]
    result["captures_after_ready"] = {"count": len(serving), "seconds": round(sum(serving), 2)}
    print(f"{name}: healthy after {result['ready_s']} s; {len(serving)} captures while serving, "
          f"{sum(serving):.2f} s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="gpt_model_file (default: the embedded demo model)")
    ap.add_argument("--sizes", default="1,8,64", help="batch sizes, in the order sent")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--override", action="append", default=["trainer.precision=bf16"],
                    help="more Hydra overrides for the server")
    ap.add_argument("--runs", default="no_warm_up,warm_up,warm_up_restart", help="which of the three to run")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default="first_request.json")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.logs = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(args.logs, exist_ok=True)
    with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as reused:
        plan = {"no_warm_up": (False, cold), "warm_up": (True, reused), "warm_up_restart": (True, reused)}
        runs = [serve_and_time(*plan[name], name, args) for name in args.runs.split(",")]
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "runs": runs}
    try:
        import torch
        if torch.cuda.is_available():
            report["card"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
