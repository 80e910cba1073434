"""Continuous batching and chunked prefill in the engine: requests join and leave a running batch at iteration
boundaries, long prompts are prefilled a chunk per iteration, and none of it changes any request's answer."""
import pytest
import torch

from nemotron.engine.engine import Engine
from nemotron.engine.request import RequestError, parse_request

LONG = "def long_function_name(argument_one, argument_two):\n    return [x * 2 for x in range(argument_one)]\n"

# Requests with every per-request setting that sampling treats per row.
MIXED = [
    {"sentences": ["def f(x):", "a"], "greedy": True, "tokens_to_generate": 12, "min_tokens_to_generate": 12},
    {"sentences": ["import os"], "tokens_to_generate": 9, "random_seed": 7, "temperature": 0.8, "top_k": 20,
     "top_p": 0.9},
    {"sentences": [LONG, "x = [1, 2"], "greedy": True, "tokens_to_generate": 6, "compute_logprob": True},
    {"sentences": ["class Stack:"], "greedy": True, "tokens_to_generate": 10, "repetition_penalty": 1.5,
     "min_tokens_to_generate": 4},
    {"sentences": ["while True:"], "tokens_to_generate": 7, "random_seed": 99, "temperature": 1.2,
     "compute_logprob": True, "all_probs": True},
]


def run_together(engine, payloads, join_after=()):
    """Submit payloads (payload i after join_after[i] iterations, default 0) and step until all have ended."""
    delays = list(join_after) + [0] * (len(payloads) - len(join_after))
    jobs = [None] * len(payloads)
    iteration = 0
    while any(j is None or not j.finished for j in jobs):
        for i, p in enumerate(payloads):
            if jobs[i] is None and delays[i] <= iteration:
                req = parse_request(p)
                jobs[i] = engine.submit(req, engine.tokenize(req))
        engine.step()
        iteration += 1
    return [j.response for j in jobs]


def assert_same(got, want):
    assert got["token_ids"] == want["token_ids"]
    assert got["sentences"] == want["sentences"]
    for key in ("logprob", "full_logprob"):
        if want.get(key) is None:
            assert got.get(key) is None
            continue
        for g, w in zip(got[key], want[key]):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-4, atol=1e-4)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def engine(request, tiny_model, tiny_tokenizer):
    return Engine(tiny_model, tiny_tokenizer, prefill_chunk=16, overlap=request.param)


@pytest.fixture(scope="module")
def alone(tiny_model, tiny_tokenizer):
    """Each MIXED request on its own, whole prompts prefilled at once (the engine without chunking)."""
    engine = Engine(tiny_model, tiny_tokenizer, prefill_chunk=0)
    return [engine.generate(parse_request(p)) for p in MIXED]


def test_requests_in_flight_together_answer_as_alone(engine, alone):
    for got, want in zip(run_together(engine, MIXED), alone):
        assert_same(got, want)
    assert not engine.busy and sorted(engine.free_slots) == list(range(engine.cache.num_slots - 1))


def test_requests_joining_a_running_batch_answer_as_alone(engine, alone):
    for got, want in zip(run_together(engine, MIXED, join_after=(0, 3, 5, 6, 11)), alone):
        assert_same(got, want)


def test_chunked_prefill_equals_whole_prefill(tiny_model, tiny_tokenizer, alone):
    for chunk in (1, 5):
        engine = Engine(tiny_model, tiny_tokenizer, prefill_chunk=chunk)
        assert_same(engine.generate(parse_request(MIXED[2])), alone[2])  # the long prompt, with prompt log-probs
        assert_same(engine.generate(parse_request(MIXED[4])), alone[4])  # all_probs


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_running_rows_keep_decoding_while_a_long_prompt_prefills(tiny_model, tiny_tokenizer, overlap):
    engine = Engine(tiny_model, tiny_tokenizer, prefill_chunk=8, overlap=overlap)
    short = parse_request({"sentences": ["x"], "greedy": True, "tokens_to_generate": 60,
                           "min_tokens_to_generate": 60})
    running = engine.submit(short, engine.tokenize(short))
    engine.step()
    assert running.started and running.sampled == 1
    long_req = parse_request({"sentences": [LONG * 2], "greedy": True, "tokens_to_generate": 2})
    prompt_len = len(engine.tokenize(long_req)[0])
    assert prompt_len > 40
    joining = engine.submit(long_req, engine.tokenize(long_req))
    iterations = 0
    while not joining.started:
        before = running.sampled
        engine.step()
        iterations += 1
        assert running.sampled == before + 1  # one token per iteration: the prompt never stalls the running row
        assert joining.rows[0].prefilled <= 8 * iterations
    assert iterations == -(-prompt_len // 8)  # a chunk per iteration
    while not (running.finished and joining.finished):
        engine.step()


def test_a_request_larger_than_the_free_slots_waits_for_them(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer, max_slots=4)
    first = parse_request({"sentences": ["a", "b", "c"], "greedy": True, "tokens_to_generate": 8,
                           "min_tokens_to_generate": 8})
    second = parse_request({"sentences": ["d", "e"], "greedy": True, "tokens_to_generate": 3})
    a = engine.submit(first, engine.tokenize(first))
    b = engine.submit(second, engine.tokenize(second))
    engine.step()
    assert a.started and not b.rows and list(engine.queue) == [b]  # 3 + 2 rows > 4 slots: b waits its turn
    while not a.finished:
        engine.step()
    while not b.finished:
        engine.step()
    assert b.response["token_ids"] == Engine(tiny_model, tiny_tokenizer).generate(second)["token_ids"]
    assert engine.cache.num_slots == 5  # 4 slots (the most in flight) + the padding slot
    with pytest.raises(RequestError, match="Maximum number of sentences is 4"):
        engine.tokenize(parse_request({"sentences": ["x"] * 5}))


def test_the_cache_grows_while_rows_run_and_keeps_their_keys(tiny_model, tiny_tokenizer, alone):
    engine = Engine(tiny_model, tiny_tokenizer, prefill_chunk=16)
    small = parse_request(MIXED[0])
    job = engine.submit(small, engine.tokenize(small))
    engine.step()
    slots, seq = engine.cache.num_slots, engine.cache.max_seq
    got = run_together(engine, MIXED[2:5])  # more rows and longer rows than the cache holds: it grows
    assert engine.cache.num_slots > slots and engine.cache.max_seq > seq
    while not job.finished:
        engine.step()
    assert_same(job.response, alone[0])
    for g, w in zip(got, alone[2:5]):
        assert_same(g, w)


def test_a_cache_that_cannot_be_allocated_refuses_only_that_request(tiny_model, tiny_tokenizer, monkeypatch):
    engine = Engine(tiny_model, tiny_tokenizer)
    ok = parse_request({"sentences": ["a"], "greedy": True, "tokens_to_generate": 4})
    engine.generate(ok)  # a small cache exists

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("injected")
    monkeypatch.setattr(tiny_model, "new_cache", out_of_memory)
    big = parse_request({"sentences": ["b"] * 50, "tokens_to_generate": 4})
    with pytest.raises(RequestError, match="does not fit in memory"):
        engine.generate(big)
    monkeypatch.undo()
    assert not engine.busy
    assert engine.generate(ok)["token_ids"]  # the engine still serves


def test_a_request_whose_cache_cannot_grow_waits_without_retrying_every_iteration(tiny_model, tiny_tokenizer,
                                                                                  monkeypatch):
    engine = Engine(tiny_model, tiny_tokenizer)
    running = parse_request({"sentences": ["a"], "greedy": True, "tokens_to_generate": 20,
                             "min_tokens_to_generate": 20})
    job = engine.submit(running, engine.tokenize(running))
    engine.step()  # the cache exists, the job decodes
    attempts = []

    def out_of_memory(slots, max_seq):
        attempts.append((slots, max_seq))
        raise torch.OutOfMemoryError("injected")
    monkeypatch.setattr(tiny_model, "new_cache", out_of_memory)
    big = parse_request({"sentences": ["b"] * 50, "tokens_to_generate": 4})
    waiting = engine.submit(big, engine.tokenize(big))
    while not job.finished:
        engine.step()
        assert len(attempts) == 2  # power of two, then exact: once, not once per iteration
    while not waiting.finished:
        engine.step()
    assert len(attempts) == 4 and isinstance(waiting.error, RequestError)  # retried once alone, then refused


def test_the_cache_falls_back_to_the_exact_size_when_the_power_of_two_does_not_fit(tiny_model, tiny_tokenizer,
                                                                                    monkeypatch):
    engine = Engine(tiny_model, tiny_tokenizer)
    real = tiny_model.new_cache
    asked = []

    def at_most_40_slots(slots, max_seq):  # a memory limit between the exact need (34 + 1) and 64 + 1 slots
        asked.append((slots, max_seq))
        if slots > 40:
            raise torch.OutOfMemoryError("injected")
        return real(slots, max_seq)
    monkeypatch.setattr(tiny_model, "new_cache", at_most_40_slots)
    req = parse_request({"sentences": ["x"] * 34, "greedy": True, "tokens_to_generate": 3})
    out = engine.generate(req)
    assert asked == [(65, 64), (35, 64)] and engine.cache.num_slots == 35
    assert out["token_ids"] == Engine(tiny_model, tiny_tokenizer).generate(req)["token_ids"]


def test_a_long_request_after_a_wide_one_gets_a_cache_of_its_own_width_when_the_wider_does_not_fit(
        tiny_model, tiny_tokenizer, monkeypatch):
    """Growing keeps the old rows (no reallocation per request), but not at the price of refusing a request that
    fits alone: after 34 rows of 64 positions, one row of ~110 positions gets 1 + 1 slots when 64 + 1 do not fit."""
    engine = Engine(tiny_model, tiny_tokenizer)
    wide = parse_request({"sentences": ["x"] * 34, "greedy": True, "tokens_to_generate": 3})
    engine.generate(wide)
    assert (engine.cache.num_slots, engine.cache.max_seq) == (65, 64)
    real = tiny_model.new_cache
    asked = []

    def at_most_4096_slot_positions(slots, max_seq):  # 65 x 64 fitted; 65 x 128 does not
        asked.append((slots, max_seq))
        if slots * max_seq > 4096:
            raise torch.OutOfMemoryError("injected")
        return real(slots, max_seq)
    monkeypatch.setattr(tiny_model, "new_cache", at_most_4096_slot_positions)
    long = parse_request({"sentences": ["def f(x):"], "greedy": True, "tokens_to_generate": 100,
                          "min_tokens_to_generate": 100})
    out = engine.generate(long)
    assert asked == [(65, 128), (2, 128)] and engine.cache.num_slots == 2
    assert out["token_ids"] == Engine(tiny_model, tiny_tokenizer).generate(long)["token_ids"]


def test_abort_drops_every_job_and_frees_their_slots(engine):
    req = parse_request({"sentences": ["a", "b"], "tokens_to_generate": 30})
    jobs = [engine.submit(req, engine.tokenize(req)) for _ in range(3)]
    engine.step()
    dropped = engine.abort()
    assert dropped == jobs and not engine.busy
    assert engine.free_slots == list(range(engine.cache.num_slots - 1))


def test_overlap_retires_each_iteration_in_the_next_one(tiny_model, tiny_tokenizer):
    """Under overlap the host sees an iteration's tokens one iteration later: the next decode was launched from the
    tokens still on the device. Same answer, one more iteration; a row that stops on a token costs one wasted
    row-step and its job ends an iteration later, with the same tokens (EOS fill applied by the host)."""
    want_job = parse_request({"sentences": ["def f(x):"], "greedy": True, "tokens_to_generate": 5,
                              "min_tokens_to_generate": 5})
    want = Engine(tiny_model, tiny_tokenizer, overlap=False).generate(want_job)["token_ids"][0]
    engine = Engine(tiny_model, tiny_tokenizer, overlap=True)
    job = engine.submit(want_job, engine.tokenize(want_job))
    prompt_len = len(job.prompts[0])
    engine.step()  # prefill, first token sampled, not yet seen by the host
    assert (job.sampled, job.steps, job.rows[0].tokens) == (1, 0, want[:prompt_len])
    engine.step()  # the second token's decode launched from the device's first token, then the first retired
    assert (job.sampled, job.steps, job.rows[0].tokens) == (2, 1, want[:prompt_len + 1])
    iterations = 2
    while not job.finished:
        engine.step()
        iterations += 1
    assert iterations == 6 and job.sampled == 5  # the length limit is known at launch: no sixth token
    assert job.response["token_ids"][0] == want

    # Stop on a token: the second row stops early and is EOS-filled while the first row runs on.
    prompts, stop = ["x = 1", "import os"], ";"
    stop_id = tiny_tokenizer.single_piece_id(stop)
    sync = Engine(tiny_model, tiny_tokenizer, overlap=False)
    free = sync.generate(parse_request({"sentences": prompts, "greedy": True, "tokens_to_generate": 8,
                                        "end_strings": []}))["token_ids"]
    gen = [row[len(row) - 8:] for row in free]
    at = gen[1].index(stop_id)  # the premise, from the fixture model: row 2 makes ";" early, row 1 never does
    assert at < 6 and stop_id not in gen[0]
    req = parse_request({"sentences": prompts, "greedy": True, "tokens_to_generate": 8, "end_strings": [stop]})
    want = sync.generate(req)["token_ids"]
    assert want[0] == free[0] and want[1][len(want[1]) - 8:] == gen[1][:at + 1] + [tiny_tokenizer.eos_id] * (7 - at)
    assert engine.generate(req)["token_ids"] == want
    # Alone, that row's stop ends its job: the iteration launched meanwhile is wasted, and not kept for later.
    solo = parse_request({"sentences": prompts[1:], "greedy": True, "tokens_to_generate": 8, "end_strings": [stop]})
    got = engine.generate(solo)["token_ids"]
    assert got == sync.generate(solo)["token_ids"] and got[0][-1] == stop_id and len(got[0]) < len(want[1])
    assert engine._pending is None and not engine.busy
