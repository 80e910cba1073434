"""GPU-only checks (skipped without CUDA; run on a lent GPU with `pytest tests/test_gpu.py`): the CUDA-graph decode
path inside the real engine and the real server, with the trained demo model in bf16."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "nemotron", "demo")
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os", "for i in range(10):", "    def __init__(self",
           "def main(argv):", "# Copyright", "    return", "x = {", "try:", "with open(path) as f:"]


@pytest.fixture(scope="module")
def engines():
    from nemotron.checkpoint.loader import load_model
    from nemotron.engine.engine import Engine
    loaded = load_model(DEMO, dtype=torch.bfloat16, device=torch.device("cuda"), progress=False)
    graph = Engine(loaded.model, loaded.tokenizer, cuda_graphs=True)
    eager = Engine(loaded.model, loaded.tokenizer, cuda_graphs=False)
    assert graph.graphs is not None and eager.graphs is None
    return graph, eager


def greedy(engine, prompts, tokens=48):
    from nemotron.engine.request import parse_request
    return engine.generate(parse_request({"sentences": prompts, "greedy": True, "tokens_to_generate": tokens,
                                          "min_tokens_to_generate": tokens}))["token_ids"]


def test_graph_decode_agrees_with_eager_and_is_stable_across_buckets(engines):
    graph, eager = engines
    sizes = [1, 5, 11, 3, 11, 1]  # buckets 1, 8, 16, 4, 16, 1: graphs captured, then reused
    runs = [greedy(graph, (PROMPTS * 2)[:n]) for n in sizes]
    assert runs[4] == runs[2] and runs[5] == runs[0], "replaying a bucket changed the result"
    reference = greedy(eager, PROMPTS)
    pairs = [(a, b) for a, b in zip(runs[2], reference)]
    identical = sum(a == b for a, b in pairs)
    agreement = sum(sum(x == y for x, y in zip(a, b)) / len(a) for a, b in pairs) / len(pairs)
    print(f"graph vs eager: {identical}/{len(pairs)} rows identical, mean token agreement {agreement:.3f}")
    assert agreement >= 0.8
    # A row's result does not depend on which other rows share its batch.
    assert runs[0][0] == runs[2][0] == runs[1][0]


def test_requests_in_flight_together_on_graphs_answer_as_alone(engines):
    """Continuous batching on the graph path: rows of different requests in scattered slots (a request ends
    early and frees slots that a later one takes), joining at different iterations."""
    from nemotron.engine.request import parse_request
    graph, _ = engines
    payloads = [{"sentences": PROMPTS[i:i + k], "greedy": True, "tokens_to_generate": n, "min_tokens_to_generate": n}
                for i, k, n in ((0, 3, 40), (3, 1, 8), (4, 4, 32), (8, 2, 24), (1, 5, 16))]
    alone = [graph.generate(parse_request(p))["token_ids"] for p in payloads]
    jobs, iteration = [None] * len(payloads), 0
    while any(j is None or not j.finished for j in jobs):
        for i, p in enumerate(payloads):
            if jobs[i] is None and iteration >= 4 * i:
                req = parse_request(p)
                jobs[i] = graph.submit(req, graph.tokenize(req))
        graph.step()
        iteration += 1
    together = [j.response["token_ids"] for j in jobs]
    rows = [(a, b) for x, y in zip(together, alone) for a, b in zip(x, y)]
    agreement = sum(sum(u == v for u, v in zip(a, b)) / len(a) for a, b in rows) / len(rows)
    print(f"together vs alone: {sum(a == b for a, b in rows)}/{len(rows)} rows identical, agreement {agreement:.3f}")
    assert agreement >= 0.9  # bf16 sums differ with the batch's size; the trained model's greedy path is robust


def test_seeded_sampling_reproduces_on_gpu(engines):
    from nemotron.engine.request import parse_request
    graph, _ = engines
    req = parse_request({"sentences": PROMPTS[:4], "tokens_to_generate": 32, "random_seed": 1234,
                         "temperature": 0.8, "top_p": 0.95, "top_k": 50})
    assert graph.generate(req)["token_ids"] == graph.generate(req)["token_ids"]


def test_overlap_answers_as_sync_and_never_waits_for_the_gpu(engines):
    """Overlap (the default on CUDA) gives the same answers as retiring each iteration at once, for every kind of
    request; and a steady-state iteration queues its work without one host-device synchronisation (the iteration's
    one wait is on an event, for the previous iteration's tokens)."""
    from nemotron.engine.engine import Engine
    from nemotron.engine.request import parse_request
    graph, _ = engines
    assert graph.overlap
    sync = Engine(graph.model, graph.tokenizer, overlap=False)
    payloads = [
        {"sentences": PROMPTS[:3], "greedy": True, "tokens_to_generate": 24, "end_strings": ["\n"]},
        {"sentences": PROMPTS[3:5], "tokens_to_generate": 20, "random_seed": 7, "temperature": 0.9, "top_k": 40,
         "repetition_penalty": 1.2, "min_tokens_to_generate": 4},
        {"sentences": PROMPTS[5:6], "greedy": True, "tokens_to_generate": 12, "compute_logprob": True},
    ]
    for p in payloads:
        got, want = graph.generate(parse_request(p)), sync.generate(parse_request(p))
        assert got["token_ids"] == want["token_ids"]
        if p.get("compute_logprob"):
            torch.testing.assert_close(torch.tensor(got["logprob"]), torch.tensor(want["logprob"]))
    req = parse_request({"sentences": PROMPTS[:2], "greedy": True, "tokens_to_generate": 40,
                         "min_tokens_to_generate": 40})
    job = graph.submit(req, graph.tokenize(req))
    for _ in range(4):  # prefill, graphs of this bucket captured, overlap under way
        graph.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for _ in range(8):
            graph.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while not job.finished:
        graph.step()
    assert job.response["token_ids"] == greedy(sync, PROMPTS[:2], 40)


def test_step_tuning_tries_each_product_once_and_runs_what_it_kept(engines):
    """A batch size's first capture tries each of its products on the other side (a Triton kernel on cuBLAS,
    cuBLAS on the fastest Triton config), by timing the whole captured step, and keeps the faster; the choices in
    force are the recorded ones, and nothing is tuned twice (engine/graphs.py, `DecodeGraphs._tune_products`)."""
    from nemotron.engine import kernels
    graph, _ = engines
    greedy(graph, PROMPTS[:5], 8)  # bucket 8
    tuned = {k: v for k, v in kernels.step_tuning.items() if k.startswith("M8 ")}
    current = dict(kernels.step_tunable_products(8))
    assert tuned and set(tuned) == set(current)
    for name, record in tuned.items():
        in_force = kernels.choice_name(current[name])
        assert in_force == record["kept"], (name, record)
        if "step_ms" in record:  # tried: both whole steps were timed, on the other side of cuBLAS
            assert record["step_ms"] > 0 and record["trial_step_ms"] > 0
            assert (record["alone"] == "cublas") != (record["trial"] == "cublas"), record
    print("step tuning at batch 8:", tuned)
    count = len(kernels.step_tuning)
    greedy(graph, PROMPTS[:6], 40)  # the same bucket, a longer KV bucket: captured, not tuned again
    assert len(kernels.step_tuning) == count

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_graphs_with_step_tuning_agree_over_the_group(tmp_path, monkeypatch):
    """TP2 on two GPUs (NCCL, the peer exchange) with the whole-step tuner on under TP: both ranks tune the same
    products in the same order and take the same decisions (their collectives stay in step), the choices in force
    are the recorded ones, and the graphs' greedy tokens match eager decode's (tests/gpu_tp_worker.py)."""
    import glob
    import json
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import run_torchrun_worker
    monkeypatch.setenv("NEMOTRON_STEP_TUNE", "1")
    out = str(tmp_path / "tp2")
    run_torchrun_worker("gpu_tp_worker.py", (out,), 2, timeout=420)
    ranks = []
    for path in sorted(glob.glob(out + ".rank*.json")):
        with open(path) as f:
            ranks.append(json.load(f))
    assert [r["rank"] for r in ranks] == [0, 1]
    first, second = ranks
    print("TP2 step tuning, rank 0:", first["step_tuning"])
    assert first["step_tuning"] and set(first["step_tuning"]) == set(second["step_tuning"])
    for name, record in first["step_tuning"].items():
        other = second["step_tuning"][name]
        # Timed alone, the ranks may choose differently (seen: cuBLAS on one, Triton on the other); the step's
        # decision, whether to move the product to its trial kernel, is the group's and must be the same on both.
        assert record["moved"] == other["moved"], (name, record, other)
        for r in (record, other):
            assert r["kept"] == (r["trial"] if r["moved"] else r["alone"]), (name, r)
        if "step_ms" in record:  # the group's slowest times: the same numbers on both ranks
            assert record["step_ms"] == other["step_ms"] > 0 and record["trial_step_ms"] == other["trial_step_ms"]
            assert (record["trial"] == "cublas") == (other["trial"] == "cublas"), (name, record, other)
    for r in ranks:
        for rows, products in r["in_force"].items():
            assert products, f"rank {r['rank']}: no products at {rows} rows"
            for name, in_force in products.items():
                assert in_force == r["step_tuning"][name]["kept"], (r["rank"], name)
    for rows in ("1", "5"):  # the responses are made on rank 0
        assert len(first["graph"][rows]) == int(rows) and second["graph"][rows] is None
        pairs = list(zip(first["graph"][rows], first["eager"][rows]))
        agreement = sum(sum(x == y for x, y in zip(a, b)) / len(a) for a, b in pairs) / len(pairs)
        print(f"TP2 graph vs eager, {rows} rows: mean token agreement {agreement:.3f}")
        assert agreement >= 0.8


def test_server_on_gpu_answers_the_card_request():
    import requests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = os.path.join(os.environ.get("OUT", "/tmp"), "gpu_server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "nemotron.eval", "server=True", "host=127.0.0.1", f"port={port}",
                             "trainer.precision=bf16", "prompts=[]"], stdout=subprocess.DEVNULL, stderr=log)

    def server_log(tail=3000):
        log.flush()
        with open(log_path) as f:
            text = f.read()
        return text if tail is None else text[-tail:]
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, server_log()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        # The warm-up (on by default with CUDA graphs) ran every batch bucket before /health said ok, and tuned
        # each bucket's step then (the tuner logs "step-tuned" on the capture that tuned).
        before = server_log(None).splitlines()
        assert any("warm-up: 8 requests (128, 64, 32, 16, 8, 4, 2, 1 rows)" in line for line in before), before
        assert sum("step-tuned" in line for line in before) >= 1, before
        payload = {"sentences": PROMPTS * 6, "tokens_to_generate": 64, "temperature": 1.0, "add_BOS": False,
                   "top_k": 0, "top_p": 1.0, "greedy": True, "all_probs": False, "repetition_penalty": 1.0,
                   "min_tokens_to_generate": 1,
                   "end_strings": ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]}
        start = time.time()
        out = requests.put(f"http://127.0.0.1:{port}/generate", json=payload, timeout=120)
        elapsed = time.time() - start
        assert out.status_code == 200, (out.text, server_log())
        body = out.json()
        assert len(body["sentences"]) == len(PROMPTS) * 6
        assert all(s.startswith(p) for s, p in zip(body["sentences"], PROMPTS * 6))
        print(f"66 rows x 64 tokens through PUT /generate in {elapsed:.2f} s")
        # Concurrent clients share the engine's batches (the engine loop is its own thread: its CUDA device and
        # Triton launches must still be right).
        import concurrent.futures
        bodies = [dict(payload, sentences=[p], tokens_to_generate=16 + 8 * i) for i, p in enumerate(PROMPTS[:8])]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: requests.put(f"http://127.0.0.1:{port}/generate", json=b, timeout=120),
                                    bodies))
        assert [a.status_code for a in answers] == [200] * 8, server_log()
        assert [a.json()["sentences"][0].startswith(b["sentences"][0]) for a, b in zip(answers, bodies)] == [True] * 8
        # Requests recapture graphs (their KV lengths outgrow the warm-up's cache) but tune nothing again.
        after = server_log(None).splitlines()[len(before):]
        assert not [line for line in after if "step-tuned" in line], after
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("server did not exit within 60 s of SIGTERM:\n" + server_log())
    assert proc.returncode == 0, server_log()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_peer_exchange_kernels_on_one_gpu(dtype):
    """The peer exchange's producer and consumer kernels, compiled for the card, with three simulated ranks
    (tests/exchange_check.py; the real multi-GPU path runs in the TP benchmark, which checks its tokens)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from exchange_check import check
    check(torch.device("cuda"), dtype)
    torch.cuda.synchronize()
