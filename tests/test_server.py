"""The HTTP server (issue 5): real `python -m nemotron.eval server=True` processes, a real HTTP client, loopback only.

One TP1 server (with an API key and a 64 KiB body limit) serves most tests; a TP2 server (torchrun, 2 gloo ranks)
checks lockstep after bad requests; `scripts/nemo_inference.sh` runs end to end with its own server. A few tests run
`nemotron.server.serve` in a thread with a fake coordinator, for what a real model cannot be made to do on demand
(generation errors, not ready yet).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

import conftest
from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(FIXTURES, "tiny_tp1_torch_dist")
TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer.model")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SCRIPTS = os.path.join(ROOT, "scripts")

API_KEY = "k3y-for-tests_only"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 65536
MAX_POSITIONS = 256  # the tiny model's max_position_embeddings

ALLOWED_KEYS = ("add_BOS, all_probs, compute_logprob, end_strings, greedy, min_tokens_to_generate, random_seed, "
                "repetition_penalty, sentences, temperature, tokens_to_generate, top_k, top_p")
PROMPTS = ["def f(x):", "class Stack:", "import os", "for i in range(3):", "x = [1, 2", "while True:"]


def card_payload(prompt, tokens=8):
    """The model card's request with a small tokens_to_generate."""
    return conftest.card_payload(prompt, tokens)


def greedy(prompt, tokens=8):
    return {"sentences": [prompt], "tokens_to_generate": tokens, "greedy": True}


# --- processes ----------------------------------------------------------------------------------------------------


def free_ports(count=1):
    """A base port such that `count` consecutive loopback ports are free (torchrun: master port and store port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free loopback ports")


def clean_env(**extra):
    """Our environment without launcher/Slurm variables (the server must see a plain launch) or an API key."""
    drop = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "NEMOTRON_API_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(drop)}
    env.update(PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **extra)
    return env


def eval_args(port, *extra):
    return ["-m", "nemotron.eval", f"gpt_model_file={MODEL}", "server=True", f"port={port}", "host=127.0.0.1",
            "trainer.precision=32", "prompts=[]", "trainer.enable_progress_bar=False", *extra]


class Server:
    """A server process (group) we started: readiness, its log, a clean SIGTERM stop, and cleanup."""

    def __init__(self, name, argv, port, log_dir, auth=None, env=None):
        self.name, self.port, self.auth = name, port, dict(auth or {})
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env or clean_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.session = requests.Session()

    def url(self, path="/generate"):
        return self.base + path

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                     f"{self.log()[-4000:]}")
            try:
                if requests.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log()[-4000:]}")

    def __enter__(self):
        """`with Server(...) as s:` waits until it is ready and always cleans up."""
        try:
            self.wait_ready()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False

    def put(self, payload, headers=None, **kw):
        """PUT a JSON payload to /generate with this server's credentials."""
        return self.session.put(self.url(), data=json.dumps(payload),
                                headers={"Content-Type": "application/json", **self.auth, **(headers or {})},
                                timeout=kw.pop("timeout", 120), **kw)

    def processes(self):
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def rank0(self):
        """The global-rank-0 process, which hosts HTTP: the process itself, or torchrun's worker with RANK=0."""
        root = psutil.Process(self.proc.pid)
        if "torchrun" not in " ".join(root.cmdline()):
            return root
        for child in root.children():
            if child.environ().get("RANK") == "0":
                return child
        raise AssertionError(f"{self.name}: no rank-0 process under torchrun")

    def sigterm(self, timeout=60):
        """SIGTERM to rank 0 only (as nemo_inference.sh does); returns the launched process's exit status."""
        everyone = self.processes()
        os.kill(self.rank0().pid, signal.SIGTERM)
        rc = self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(everyone, timeout=10)
        assert not alive, f"{self.name}: still running after SIGTERM: {[p.pid for p in alive]}"
        return rc

    def cleanup(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session's process group
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self.session.close()
        self._log.close()


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    port = free_ports()
    with Server("tp1", [sys.executable, *eval_args(port, f"server_api_key={API_KEY}", f"max_body_bytes={BODY_LIMIT}")],
                port, str(tmp_path_factory.mktemp("tp1")), auth=AUTH) as server:
        yield server


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    port, master = free_ports(), free_ports(2)
    argv = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(master),
            *eval_args(port, "tensor_model_parallel_size=2", "trainer.devices=2")]
    with Server("tp2", argv, port, str(tmp_path_factory.mktemp("tp2")), env=clean_env(OMP_NUM_THREADS="1")) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer():
    from nemotron.tokenizer import Tokenizer
    return Tokenizer(TOKENIZER)


_answers: dict = {}


def answer_alone(server, payload):
    """The TP1 server's answer to `payload` sent on its own (cached: greedy answers are deterministic)."""
    key = json.dumps(payload, sort_keys=True)
    if key not in _answers:
        r = server.put(payload)
        assert r.status_code == 200, r.text
        _answers[key] = r.json()
    return _answers[key]


# --- the card's request ---------------------------------------------------------------------------------------------


def test_card_payload_returns_the_prompt_and_a_completion(tp1):
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    r = tp1.put(card_payload(prompt))
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    out = r.json()
    assert set(out) == {"sentences", "tokens", "logprob", "token_ids", "offsets"}
    assert len(out["sentences"]) == 1
    assert out["sentences"][0].startswith(prompt)
    assert len(out["sentences"][0]) > len(prompt)


def test_card_tokens_to_generate_1024_is_refused_naming_max_position_embeddings(tp1, tokenizer):
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    r = tp1.put(card_payload(prompt, tokens=1024))
    n = len(tokenizer.text_to_ids(prompt))
    assert r.status_code == 400
    assert r.json() == {"message": f"sentences[0] has {n} tokens; with tokens_to_generate=1024 that is {n + 1024} "
                                   f"positions, more than the model's max_position_embeddings ({MAX_POSITIONS})"}


def test_response_fields(tp1, tokenizer):
    prompt = "import os"
    out = tp1.put({"sentences": [prompt, "x = 1"], "tokens_to_generate": 5, "greedy": True,
                   "min_tokens_to_generate": 5}).json()
    assert set(out) == {"sentences", "tokens", "logprob", "token_ids", "offsets"}
    assert out["logprob"] is None
    ids = out["token_ids"][0]
    assert ids[: len(tokenizer.text_to_ids(prompt))] == tokenizer.text_to_ids(prompt)
    assert len(ids) == len(tokenizer.text_to_ids(prompt)) + 5
    assert out["tokens"][0] == tokenizer.ids_to_tokens(ids)
    assert out["sentences"][0] == tokenizer.ids_to_text(ids)
    assert len(out["offsets"][0]) == len(ids) and out["offsets"][0][0] == 0

    out = tp1.put({"sentences": [prompt], "tokens_to_generate": 3, "greedy": True, "compute_logprob": True,
                   "all_probs": True}).json()
    assert set(out) == {"sentences", "tokens", "logprob", "token_ids", "offsets", "full_logprob"}
    n = len(out["token_ids"][0])
    assert len(out["logprob"][0]) == n - 1
    assert len(out["full_logprob"][0]) == n - 1 and len(out["full_logprob"][0][0]) == 512


def test_omitted_keys_take_nemo_server_defaults(tp1, tokenizer):
    # NeMo's server defaults, written out: tokens_to_generate 64, top_p 0.9, add_BOS false, repetition_penalty 1.0
    # (NeMo advertised 1.2 but applied 1.0: see nemotron/engine/request.py), end_strings ['<|endoftext|>'].
    explicit = {"sentences": ["def f(x):"], "tokens_to_generate": 64, "all_probs": False, "temperature": 1.0,
                "add_BOS": False, "greedy": False, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0,
                "end_strings": ["<|endoftext|>"], "min_tokens_to_generate": 0, "compute_logprob": False,
                "random_seed": 1234}
    omitted = tp1.put({"sentences": ["def f(x):"], "random_seed": 1234}).json()
    assert omitted == tp1.put(explicit).json()
    ids = omitted["token_ids"][0]
    prompt_ids = tokenizer.text_to_ids("def f(x):")
    assert ids[: len(prompt_ids)] == prompt_ids  # no BOS
    assert len(prompt_ids) < len(ids) <= len(prompt_ids) + 64
    # A value the client sends is applied (NeMo dropped repetition_penalty): 2.0 samples something else here.
    assert tp1.put({**explicit, "repetition_penalty": 2.0}).json()["token_ids"] != omitted["token_ids"]


# --- validation -----------------------------------------------------------------------------------------------------

_TOKENS = "tokens_to_generate must be an integer greater than 0"
_TEMP = "temperature must be a positive number less than or equal to 100.0"
_TOP_K = "top_k must be a positive integer number"
_TOP_P = "top_p must be a positive number less than or equal to 1.0"
_RP = "repetition_penalty must be a positive number no less than 1.0"
_MIN = "min_tokens_to_generate must be an integer no less than 0"
_SEED = "random_seed must be a positive integer number or None"
_END = "expect end_strings to be a list of strings"

VALIDATION = [
    # (request keys beside sentences=["x"], exact message)
    ({"tokens_to_generate": 0}, _TOKENS),
    ({"tokens_to_generate": "8"}, _TOKENS),
    ({"tokens_to_generate": True}, _TOKENS),
    ({"tokens_to_generate": 8.0}, _TOKENS),
    ({"all_probs": 1}, "all_probs must be a boolean value"),
    ({"temperature": 0}, _TEMP),
    ({"temperature": 100.5}, _TEMP),
    ({"temperature": "1"}, _TEMP),
    ({"temperature": True}, _TEMP),
    ({"add_BOS": "false"}, "add_BOS must be a boolean value"),
    ({"greedy": 1}, "greedy must be a boolean value"),
    ({"top_k": -1}, _TOP_K),
    ({"top_k": 1.5}, _TOP_K),
    ({"top_k": False}, _TOP_K),
    ({"top_p": 1.1}, _TOP_P),
    ({"top_p": -0.1}, _TOP_P),
    ({"top_p": "0.9"}, _TOP_P),
    ({"repetition_penalty": 0.9}, _RP),
    ({"repetition_penalty": None}, _RP),
    ({"end_strings": "<|endoftext|>"}, _END),
    ({"end_strings": ["a", 1]}, _END),
    ({"end_strings": [""]}, "end_strings[0] is an empty string; each end string must be non-empty"),
    ({"min_tokens_to_generate": -1}, _MIN),
    ({"min_tokens_to_generate": 0.5}, _MIN),
    ({"min_tokens_to_generate": 9, "tokens_to_generate": 8},
     "min_tokens_to_generate (9) must not be greater than tokens_to_generate (8)"),
    ({"compute_logprob": "yes"}, "compute_logprob must be a boolean value"),
    ({"random_seed": -1}, _SEED),
    ({"random_seed": 1.5}, _SEED),
    ({"random_seed": "7"}, _SEED),
    ({"all_probs": True}, "all_probs requires compute_logprob=True"),
    ({"foo": 1}, f"unknown request key: 'foo'; allowed keys: {ALLOWED_KEYS}"),
    ({"foo": 1, "Greedy": True}, f"unknown request keys: 'Greedy', 'foo'; allowed keys: {ALLOWED_KEYS}"),
    ({"task_ids": [0]}, "Input at 'sentences' must by a tuple of two tensors like: (context_tokens_tensor, "
                        "context_length_tensor) if task ids are given"),
    ({"neighbors": 2}, "neighbors is not supported: RETRO models are not served"),
]


@pytest.mark.parametrize("keys,message", VALIDATION, ids=[f"{i}-{'-'.join(k)}" for i, (k, _) in
                                                          enumerate(VALIDATION)])
def test_invalid_parameter_is_400_with_nemo_message(tp1, keys, message):
    r = tp1.put({"sentences": ["x"], **keys})
    assert r.status_code == 400
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"message": message}


SENTENCES = [
    ({"tokens_to_generate": 4}, "sentences is required: a list of prompt strings"),
    ({"sentences": "x"}, "sentences must be a list of strings, got string"),
    ({"sentences": None}, "sentences must be a list of strings, got null"),
    ({"sentences": []}, "sentences must not be empty"),
    ({"sentences": ["x", 3]}, "sentences[1] must be a string, got integer"),
    ({"sentences": ["x", ["y"]]}, "sentences[1] must be a string, got list"),
    ({"sentences": ["x"] * 129}, "Maximum number of sentences is 128"),
    ({"sentences": [""]}, "sentences[0] is an empty string: an empty prompt needs add_BOS=true"),
    (["x"], "request body must be a JSON object"),
    ("x", "request body must be a JSON object"),
]


@pytest.mark.parametrize("payload,message", SENTENCES, ids=[str(i) for i in range(len(SENTENCES))])
def test_invalid_sentences_are_400(tp1, payload, message):
    r = tp1.put(payload)
    assert (r.status_code, r.json()) == (400, {"message": message})


def test_128_sentences_are_served(tp1):
    r = tp1.put({"sentences": [f"x{i}" for i in range(128)], "tokens_to_generate": 1, "greedy": True})
    assert r.status_code == 200, r.text
    assert len(r.json()["sentences"]) == 128


def test_prompt_longer_than_max_positions_is_400(tp1, tokenizer):
    prompt = "x = 1\n" * 100
    n = len(tokenizer.text_to_ids(prompt))
    assert n + 8 > MAX_POSITIONS
    r = tp1.put(greedy(prompt))
    assert r.status_code == 400
    assert r.json() == {"message": f"sentences[0] has {n} tokens; with tokens_to_generate=8 that is {n + 8} "
                                   f"positions, more than the model's max_position_embeddings ({MAX_POSITIONS})"}


def test_malformed_json_is_400(tp1):
    for body in (b'{"sentences": ["x"],', b"", b"\xff\xfe", b"[" * 50000):
        r = tp1.session.put(tp1.url(), data=body, headers={"Content-Type": "application/json", **AUTH})
        assert r.status_code == 400, body[:20]
        assert r.json()["message"].startswith("request body is not valid JSON: ")


@pytest.mark.parametrize("content_type,message", [
    ("text/plain", "Content-Type must be application/json (got 'text/plain')"),
    ("application/x-www-form-urlencoded",
     "Content-Type must be application/json (got 'application/x-www-form-urlencoded')"),
    (None, "Content-Type must be application/json (the request has no Content-Type header)"),
])
def test_wrong_content_type_is_415(tp1, content_type, message):
    headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
    r = tp1.session.put(tp1.url(), data=json.dumps(greedy("x")), headers=headers)
    assert (r.status_code, r.json()) == (415, {"message": message})


def test_json_content_type_with_charset_is_accepted(tp1):
    r = tp1.put(greedy("x", 1), headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_oversized_body_is_413(tp1):
    body = json.dumps({"sentences": ["x" * BODY_LIMIT]}).encode()
    expected = {"message": f"request body too large: the limit is {BODY_LIMIT} bytes"}
    r = tp1.session.put(tp1.url(), data=body, headers={"Content-Type": "application/json", **AUTH})
    assert (r.status_code, r.json()) == (413, expected)
    # Chunked (no Content-Length): the limit holds too.
    r = tp1.session.put(tp1.url(), data=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                        headers={"Content-Type": "application/json", **AUTH})
    assert (r.status_code, r.json()) == (413, expected)
    # Just under the limit is fine (and then refused for its length in tokens, not bytes).
    r = tp1.put({"sentences": ["x" * (BODY_LIMIT - 100)]})
    assert r.status_code == 400 and "max_position_embeddings" in r.json()["message"]


# --- routes, methods, auth ------------------------------------------------------------------------------------------


def test_root_answers_put_and_get(tp1):
    for method in ("PUT", "GET"):
        r = tp1.session.request(method, tp1.url("/"), headers=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert body["ready"] is True and body["model"] == "tiny_tp1_torch_dist"
        assert body["routes"]["/generate"] == ["PUT"]
        assert body["requests"] == {"running": 0, "queued": 0}  # nothing in flight between tests


def test_health(tp1):
    r = requests.get(tp1.url("/health"))
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("method,path,allow", [
    ("POST", "/generate", "PUT"), ("GET", "/generate", "PUT"), ("DELETE", "/generate", "PUT"),
    ("DELETE", "/", "GET, PUT"), ("POST", "/", "GET, PUT"), ("OPTIONS", "/", "GET, PUT"),
    ("PUT", "/health", "GET"), ("POST", "/health", "GET"),
])
def test_other_methods_are_405(tp1, method, path, allow):
    r = tp1.session.request(method, tp1.url(path), headers=AUTH, json={"sentences": ["x"]})
    assert r.status_code == 405
    assert r.headers["Allow"] == allow
    assert r.json() == {"message": f"method {method} is not allowed on {path}; use {allow}"}


def test_unknown_path_is_404(tp1):
    r = tp1.session.get(tp1.url("/v1/nope"), headers=AUTH)
    assert r.status_code == 404
    assert r.json() == {"message": "no route /v1/nope; routes: PUT /generate; GET/PUT /; GET /health; "
                                   "POST /v1/completions; POST /v1/chat/completions; GET /v1/models"}


def test_api_key(tp1):
    payload = json.dumps(greedy("x", 1))
    json_type = {"Content-Type": "application/json"}
    missing = "missing API key: send the header 'Authorization: Bearer <key>'"
    invalid = "invalid API key: send the header 'Authorization: Bearer <key>'"
    for headers, message in [
        ({}, missing),
        ({"Authorization": "Bearer wrong"}, invalid),
        ({"Authorization": f"Bearer {API_KEY}x"}, invalid),
        ({"Authorization": f"Bearer {API_KEY[:-1]}"}, invalid),
        ({"Authorization": API_KEY}, invalid),
        ({"Authorization": f"Basic {API_KEY}"}, invalid),
    ]:
        r = requests.put(tp1.url(), data=payload, headers={**json_type, **headers})
        assert (r.status_code, r.json()) == (401, {"message": message}), headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # Every route but /health, known or not.
        for method, path in (("PUT", "/"), ("GET", "/"), ("GET", "/nope")):
            assert requests.request(method, tp1.url(path), headers=headers).status_code == 401
    assert requests.get(tp1.url("/health")).status_code == 200
    assert requests.put(tp1.url(), data=payload, headers={**json_type, **AUTH}).status_code == 200
    assert requests.put(tp1.url("/"), headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


# --- concurrency and isolation --------------------------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer(tp1):
    payloads = [greedy(p, 12) for p in PROMPTS]
    alone = [answer_alone(tp1, p) for p in payloads]
    barrier = threading.Barrier(len(payloads))
    results = [None] * len(payloads)

    def client(i):
        with requests.Session() as s:
            barrier.wait()
            results[i] = s.put(tp1.url(), data=json.dumps(payloads[i]),
                               headers={"Content-Type": "application/json", **AUTH}, timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for i, r in enumerate(results):
        assert r is not None and r.status_code == 200, i
        assert r.json() == alone[i], PROMPTS[i]


def test_a_short_request_finishes_while_a_long_one_runs(tp1):
    """Continuous batching through HTTP: a request sent while a long one runs joins its batch and answers first
    (NeMo's server, one request at a time, would answer it only after the long one)."""
    long_payload = dict(greedy("def f(x):", 240), min_tokens_to_generate=240)
    short_payload = greedy("class Stack:", 4)
    done = {}

    def long_client():
        with requests.Session() as s:
            done["long"] = s.put(tp1.url(), data=json.dumps(long_payload),
                                 headers={"Content-Type": "application/json", **AUTH}, timeout=300)
    thread = threading.Thread(target=long_client)
    thread.start()
    # Send the short one once the long one is in the engine's batch (GET / reports it). A fixed wait was wrong on
    # a fast machine: the tiny model's 240 tokens took 0.22 s, less than the wait.
    deadline = time.time() + 30
    while tp1.session.get(tp1.url("/"), headers=AUTH).json()["requests"]["running"] < 1:
        assert thread.is_alive() and time.time() < deadline, "the long request was never seen running"
    short = tp1.put(short_payload)
    still_running = thread.is_alive()
    thread.join(300)
    assert short.status_code == 200 and done["long"].status_code == 200
    assert still_running, "the short request waited for the long one"
    assert short.json() == answer_alone(tp1, short_payload)
    assert done["long"].json() == answer_alone(tp1, long_payload)  # joining it changed neither answer


def test_bad_request_between_two_good_ones_changes_nothing(tp1):
    good = greedy("class Stack:", 16)
    first = tp1.put(good)
    assert first.status_code == 200
    assert tp1.put(greedy("y = 2\n" * 100)).status_code == 400  # refused inside the coordinator (too long)
    assert tp1.put({"sentences": ["x"], "top_k": -1}).status_code == 400
    assert tp1.put({"sentences": ["x"] * 129}).status_code == 400
    second = tp1.put(good)
    assert second.status_code == 200
    assert second.json() == first.json()


def test_one_log_line_per_request_without_prompt_text(tp1):
    secret = "def very_private_prompt_3141():"
    assert tp1.put(greedy(secret, 8)).status_code == 200
    assert tp1.put({"sentences": [secret], "top_p": 7}).status_code == 400
    time.sleep(0.2)
    log = tp1.log()
    assert secret not in log and "very_private" not in log
    assert API_KEY not in log
    lines = [line for line in log.splitlines() if "PUT /generate" in line]
    assert any("127.0.0.1 PUT /generate 200 sentences=1 tokens=8 " in line for line in lines)
    assert any("127.0.0.1 PUT /generate 400 sentences=- tokens=- " in line for line in lines)


# --- the card's client ----------------------------------------------------------------------------------------------


def _call_server_module():
    spec = importlib.util.spec_from_file_location("call_server", os.path.join(SCRIPTS, "call_server.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_call_server_get_generation_keeps_the_card_signature(tp1):
    call_server = _call_server_module()
    prompt = "def f(x):"
    # The card's positional call, pointed at our port and key.
    got = call_server.get_generation(prompt, True, False, 8, 1, 1.0, 1.0, 0, 1.0, port=tp1.port, api_key=API_KEY)
    assert got == answer_alone(tp1, card_payload(prompt))["sentences"][0]
    got = call_server.get_generation([prompt, "x"], True, False, 8, 1, 1.0, 1.0, 0, 1.0, batch=True,
                                     port=tp1.port, api_key=API_KEY)
    assert len(got) == 2 and got[0].startswith(prompt)
    with pytest.raises(call_server.ServerError, match="HTTP 401: missing API key"):
        call_server.get_generation(prompt, True, False, 8, 1, 1.0, 1.0, 0, 1.0, port=tp1.port)


def test_call_server_cli(tp1):
    prompt = "def f(x):"
    expected = answer_alone(tp1, card_payload(prompt))["sentences"][0][len(prompt):]
    cli = [sys.executable, os.path.join(SCRIPTS, "call_server.py"), "--host", "127.0.0.1", "--port", str(tp1.port),
           "--prompt", prompt, "--tokens", "8"]
    ok = subprocess.run(cli, env=clean_env(NEMOTRON_API_KEY=API_KEY), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{prompt}\n{expected}\n"
    bad = subprocess.run(cli + ["--top-p", "2"], env=clean_env(NEMOTRON_API_KEY=API_KEY), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "answered HTTP 400: top_p must be a positive number less than or equal to 1.0" in bad.stderr
    denied = subprocess.run(cli, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr
    nobody = subprocess.run(cli[:5] + [str(free_ports())] + cli[6:], env=clean_env(), capture_output=True,
                            text=True, timeout=60)
    assert nobody.returncode == 2 and "cannot reach the server" in nobody.stderr


# --- two ranks ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tp2_stays_in_step_after_a_burst_of_bad_requests(tp1, tp2):
    good = card_payload("def f(x):", 12)
    reference = answer_alone(tp1, good)
    first = tp2.put(good)
    assert first.status_code == 200 and first.json() == reference

    long_prompt = "z = 3\n" * 100
    bad = [
        greedy(long_prompt),  # passes parsing, refused by the coordinator before anything is broadcast
        {"sentences": ["x", long_prompt], "tokens_to_generate": 4},
        card_payload("x", tokens=1024),
        {"sentences": ["x"] * 129},
        {"sentences": []},
        {"sentences": ["x"], "top_p": 2},
        {"sentences": ["x"], "greedy": "yes"},
        {"sentences": ["x"], "all_probs": True},
        {"sentences": ["x"], "bogus": 1},
        {"prompts": ["x"]},
    ]
    statuses = []
    lock = threading.Lock()

    def send(payload):
        r = tp2.put(payload)
        with lock:
            statuses.append(r.status_code)

    for payload in bad:  # one after another
        send(payload)
    threads = [threading.Thread(target=send, args=(p,)) for p in bad]  # and all at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [400] * 20
    r = tp2.session.put(tp2.url(), data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400

    after = tp2.put(good)
    assert after.status_code == 200 and after.json() == reference
    batch = {**good, "sentences": PROMPTS}
    assert tp2.put(batch).json() == tp1.put(batch).json()


@pytest.mark.slow
def test_tp2_sigterm_ends_every_rank(tp2):
    ranks = [p for p in tp2.processes() if p.pid != tp2.proc.pid]
    assert len(ranks) == 2
    assert tp2.sigterm() == 0  # torchrun: both workers exited 0
    assert not any(p.is_running() for p in ranks)
    assert "server stopped" in tp2.log()


# --- nemo_inference.sh ----------------------------------------------------------------------------------------------


def _session_members(sid):
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


@pytest.mark.slow
def test_nemo_inference_script_end_to_end(tp1, tmp_path):
    prompt = "def f(x):"
    expected = answer_alone(tp1, card_payload(prompt))["sentences"][0][len(prompt):]
    port = free_ports()
    env = clean_env(WEB_PORT=str(port), TP="1", PP="1", DEVICES="1", NUM_NODES="1", PRECISION="32",
                    SERVER_HOST="127.0.0.1", PYTHON=sys.executable,
                    NEMOTRON_OVERRIDES="prompts=[] trainer.enable_progress_bar=False")
    proc = subprocess.Popen(["bash", os.path.join(SCRIPTS, "nemo_inference.sh"), MODEL, "--prompt", prompt,
                             "--tokens", "8"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    assert f"{prompt}\n{expected}\n" in out
    assert "server (127.0.0.1:%d) is up running" % port in out
    assert "received SIGTERM" in err and "server stopped" in err
    assert not _session_members(proc.pid), "processes left behind"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "port still open"
    assert os.listdir(tmp_path) == []  # nothing written to the working directory


# --- serve() with a fake coordinator: errors and readiness ----------------------------------------------------------


class FakeCoordinator:
    def __init__(self):
        self.fail = None

    def generate(self, req):
        if self.fail is not None:
            raise self.fail
        return {"sentences": [s + "!" for s in req.sentences], "tokens": [[]], "logprob": None,
                "token_ids": [[1]], "offsets": [[0]]}


@contextlib.contextmanager
def serving_fake(**kwargs):
    """`nemotron.server.serve` on a thread (stopped through its `stop` event), with a fake coordinator."""
    from nemotron.server import serve
    coordinator, stop = FakeCoordinator(), threading.Event()
    port = free_ports()
    thread = threading.Thread(target=serve, args=(coordinator, "127.0.0.1", port),
                              kwargs=dict(threads=2, stop=stop, **kwargs), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            requests.get(base + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    try:
        yield base, coordinator
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "serve() did not return after stop"


@pytest.fixture()
def fake_server():
    ready = threading.Event()
    with serving_fake(ready=ready.is_set) as (base, coordinator):
        yield base, coordinator, ready


def _put(base, payload):
    return requests.put(base + "/generate", json=payload, timeout=10)


def test_not_ready_is_503_then_200(fake_server):
    base, _, ready = fake_server
    assert requests.get(base + "/health").status_code == 503
    r = _put(base, {"sentences": ["a"]})
    assert r.status_code == 503 and "GET /health" in r.json()["message"]
    assert requests.put(base).status_code == 200 and requests.put(base).json()["ready"] is False
    ready.set()
    assert requests.get(base + "/health").json() == {"status": "ok"}
    assert _put(base, {"sentences": ["a"]}).json()["sentences"] == ["a!"]


def test_generation_failures_are_500_json_and_the_server_keeps_serving(fake_server):
    from nemotron.engine.lockstep import GenerationError
    from nemotron.engine.request import RequestError
    base, coordinator, ready = fake_server
    ready.set()
    coordinator.fail = GenerationError("generation failed on a worker rank")
    r = _put(base, {"sentences": ["a"]})
    assert (r.status_code, r.json()) == (500, {"message": "generation failed: generation failed on a worker rank"})
    coordinator.fail = ZeroDivisionError("secret internals")
    r = _put(base, {"sentences": ["a"]})
    assert r.status_code == 500 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {"message": "internal server error (ZeroDivisionError); see the server log"}
    assert "Traceback" not in r.text and "secret" not in r.text
    coordinator.fail = RequestError("too many for this model", status=422)
    r = _put(base, {"sentences": ["a"]})
    assert (r.status_code, r.json()) == (422, {"message": "too many for this model"})
    coordinator.fail = None
    assert _put(base, {"sentences": ["a"]}).json()["sentences"] == ["a!"]


def test_log_prompts_adds_the_prompt_text(caplog):
    caplog.set_level(logging.INFO, logger="nemotron.server")
    with serving_fake(log_prompts=True) as (base, _):
        assert _put(base, {"sentences": ["hello prompt", "two"]}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("127.0.0.1 PUT /generate")]
    assert len(lines) == 1
    assert lines[0].startswith("127.0.0.1 PUT /generate 200 sentences=2 tokens=- ")
    assert lines[0].endswith(' prompts=["hello prompt", "two"]')


# --- shutdown (last: stops the shared TP1 server) -------------------------------------------------------------------


def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(tp1):
    # A batch that takes a few seconds: SIGTERM arrives while it runs; its answer still comes, then the server exits 0.
    long = {"sentences": [f"x{i}" for i in range(96)], "tokens_to_generate": 240, "min_tokens_to_generate": 240,
            "greedy": True}
    result = {}

    def long_request():
        result["r"] = tp1.put(long, timeout=120)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 30
    while tp1.session.get(tp1.url("/"), headers=AUTH).json()["requests"]["running"] < 1:  # in the batch: stop now
        assert t.is_alive() and time.time() < deadline, "the request was never seen running"
    assert "r" not in result, "the request finished before SIGTERM: make it longer"
    assert tp1.sigterm() == 0
    t.join(60)
    assert result["r"].status_code == 200
    assert all(len(ids) > 240 for ids in result["r"].json()["token_ids"])
    log = tp1.log()
    assert "Traceback" not in log
    signalled = log.index("received SIGTERM")
    assert log.index("PUT /generate 200 sentences=96", signalled) < log.index("server stopped", signalled)
    with pytest.raises(requests.ConnectionError):
        requests.get(tp1.url("/health"), timeout=2)
