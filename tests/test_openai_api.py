"""The OpenAI-compatible routes: the translation functions (nemotron.openai_api) on their own, then a real
`python -m nemotron.eval server=True` process (TP1, tiny model, API key) talked to over loopback with `requests`.

The server's answers are checked against PUT /generate on the same server: the OpenAI routes must be the same
generation, only translated.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import requests

from conftest import FIXTURES
from nemotron import openai_api
from nemotron.engine.request import RequestError, parse_request
from nemotron.tokenizer import Tokenizer
from test_server import API_KEY, AUTH, BODY_LIMIT, MAX_POSITIONS, Server, eval_args, free_ports

MODEL_NAME = "tiny_tp1_torch_dist"
EOT = "<|endoftext|>"
_TEMP = "temperature must be a positive number less than or equal to 100.0"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.model"))


# --- requests: OpenAI body -> NeMo payload ----------------------------------------------------------------------------


def test_completion_defaults_map_to_nemo_keys():
    t = openai_api.completion_request({"prompt": "def f(x):"})
    assert t.echo is False
    assert t.payload == {"sentences": ["def f(x):"], "tokens_to_generate": 16, "greedy": False, "temperature": 1.0,
                         "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "end_strings": [EOT],
                         "add_BOS": False, "random_seed": None}
    req = parse_request(t.payload)
    assert (req.min_tokens_to_generate, req.compute_logprob, req.all_probs) == (0, False, False)


def test_completion_every_key_is_mapped():
    body = {"model": "anything", "prompt": ["a", "b"], "max_tokens": 5, "temperature": 0.7, "top_p": 0.5, "top_k": 3,
            "stop": ["\n", "xy"], "seed": 42, "n": 1, "echo": True, "logprobs": None, "presence_penalty": 0,
            "frequency_penalty": 0.0, "repetition_penalty": 1.3, "stream": False, "user": "someone"}
    t = openai_api.completion_request(body)
    assert t.echo is True
    assert t.payload == {"sentences": ["a", "b"], "tokens_to_generate": 5, "greedy": False, "temperature": 0.7,
                         "top_k": 3, "top_p": 0.5, "repetition_penalty": 1.3, "end_strings": [EOT, "\n", "xy"],
                         "add_BOS": False, "random_seed": 42}
    parse_request(t.payload)


def test_null_means_the_default():
    keys = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "echo", "logprobs",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "stream", "user")
    t = openai_api.completion_request({"prompt": "x", **{k: None for k in keys}})
    assert t == openai_api.completion_request({"prompt": "x"})


@pytest.mark.parametrize("temperature", [0, 0.0])
def test_temperature_zero_is_greedy_with_a_valid_temperature(temperature):
    payload = openai_api.completion_request({"prompt": "x", "temperature": temperature}).payload
    assert (payload["greedy"], payload["temperature"]) == (True, 1.0)
    assert parse_request(payload).greedy is True


@pytest.mark.parametrize("stop,end_strings", [("\n", [EOT, "\n"]), (["a", "b"], [EOT, "a", "b"]), (None, [EOT]),
                                              ([], [EOT])])
def test_stop_becomes_end_strings_after_eos(stop, end_strings):
    assert openai_api.completion_request({"prompt": "x", "stop": stop}).payload["end_strings"] == end_strings


@pytest.mark.parametrize("body,message", [
    ({"stream": True}, "streaming is not supported"),
    ({"n": 2}, "n must be 1: only one choice per prompt is supported"),
    ({"n": True}, "n must be 1: only one choice per prompt is supported"),
    ({"logprobs": 1}, "logprobs is not supported on /v1/completions; use PUT /generate with compute_logprob"),
    ({"logprobs": 0}, "logprobs is not supported on /v1/completions; use PUT /generate with compute_logprob"),
    ({"presence_penalty": 0.5}, "presence_penalty must be 0: it is not supported (repetition_penalty is)"),
    ({"frequency_penalty": -1}, "frequency_penalty must be 0: it is not supported (repetition_penalty is)"),
    ({"frequency_penalty": False}, "frequency_penalty must be 0: it is not supported (repetition_penalty is)"),
    ({"echo": "yes"}, "echo must be a boolean value"),
    ({"model": 3}, "model must be a string, got integer"),
    ({"best_of": 2}, "unknown request key for /v1/completions: 'best_of'; allowed keys: " +
     ", ".join(sorted(openai_api.COMPLETION_KEYS))),
    ({"suffix": "x", "logit_bias": {}}, "unknown request keys for /v1/completions: 'logit_bias', 'suffix'; "
                                        "allowed keys: " + ", ".join(sorted(openai_api.COMPLETION_KEYS))),
])
def test_completion_refusals(body, message):
    with pytest.raises(RequestError) as info:
        openai_api.completion_request({"prompt": "x", **body})
    assert (info.value.message, info.value.status) == (message, 400)


@pytest.mark.parametrize("body,message", [
    ({}, "prompt is required: a string or a list of 1 to 128 strings"),
    ({"prompt": None}, "prompt is required: a string or a list of 1 to 128 strings"),
    ({"prompt": []}, "prompt must not be an empty list"),
    ({"prompt": 5}, "prompt must be a string or a list of strings, got integer"),
    ({"prompt": {"a": 1}}, "prompt must be a string or a list of strings, got object"),
    (["x"], "request body must be a JSON object"),
])
def test_completion_prompt_refusals(body, message):
    with pytest.raises(RequestError) as info:
        openai_api.completion_request(body)
    assert info.value.message == message


@pytest.mark.parametrize("body,message", [
    ({"temperature": -1}, _TEMP),
    ({"temperature": "0"}, _TEMP),
    ({"temperature": False}, _TEMP),
    ({"max_tokens": 0}, "tokens_to_generate must be an integer greater than 0"),
    ({"top_p": 2}, "top_p must be a positive number less than or equal to 1.0"),
    ({"top_k": 1.5}, "top_k must be a positive integer number"),
    ({"repetition_penalty": 0.5}, "repetition_penalty must be a positive number no less than 1.0"),
    ({"stop": [1]}, "expect end_strings to be a list of strings"),
    ({"stop": 7}, "expect end_strings to be a list of strings"),
    ({"seed": -3}, "random_seed must be a positive integer number or None"),
    ({"prompt": ["x", 2]}, "sentences[1] must be a string, got integer"),
    ({"prompt": ["x"] * 129}, "Maximum number of sentences is 128"),
])
def test_nemo_values_are_judged_by_parse_request(body, message):
    payload = openai_api.completion_request({"prompt": "x", **body}).payload  # passed on as given
    with pytest.raises(RequestError) as info:
        parse_request(payload)
    assert info.value.message == message


def test_chat_template_single_turn_is_the_model_cards_prompt():
    t = openai_api.chat_request({"messages": [{"role": "user", "content": "Write a poem"}]})
    assert t.payload["sentences"] == ["<extra_id_0>System\n\n<extra_id_1>User\nWrite a poem\n<extra_id_1>Assistant\n"]
    assert t.payload["end_strings"] == [EOT, "<extra_id_1>"]
    assert t.payload["tokens_to_generate"] == 1024 and t.echo is False
    parse_request(t.payload)


def test_chat_template_with_system_and_history():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert openai_api.render_chat(messages) == (
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello.\n"
        "<extra_id_1>User\nBye\n<extra_id_1>Assistant\n")
    payload = openai_api.chat_request({"messages": messages, "stop": "!", "temperature": 0, "max_tokens": 9}).payload
    assert payload["end_strings"] == [EOT, "<extra_id_1>", "!"]
    assert (payload["greedy"], payload["tokens_to_generate"]) == (True, 9)


@pytest.mark.parametrize("body,message", [
    ({}, "messages is required: a non-empty list of {role, content} objects"),
    ({"messages": "hi"}, "messages must be a list of {role, content} objects, got string"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": ["hi"]}, "messages[0] must be an object with role and content, got string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be one of system, user, assistant, "
                                                       "got 'tool'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content must be a string, got null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "messages[0].content must be a string, got list"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]},
     "messages[0] has unknown key 'name'; a message has role and content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "the last message must have role user, got 'assistant'"),
    ({"messages": [{"role": "system", "content": "x"}]}, "the last message must have role user, got 'system'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                   {"role": "user", "content": "z"}]},
     "messages[1] is a system message: only the first message may be one"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True},
     "unknown request key for /v1/chat/completions: 'echo'; allowed keys: " +
     ", ".join(sorted(openai_api.CHAT_KEYS))),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True},
     "logprobs is not supported on /v1/chat/completions; use PUT /generate with compute_logprob"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "streaming is not supported"),
])
def test_chat_refusals(body, message):
    with pytest.raises(RequestError) as info:
        openai_api.chat_request(body)
    assert (info.value.message, info.value.status) == (message, 400)


def test_chat_logprobs_false_is_accepted():
    openai_api.chat_request({"messages": [{"role": "user", "content": "x"}], "logprobs": False})


# --- responses: engine output -> OpenAI answer ------------------------------------------------------------------------


def _row(tok, prompt, continuation, fill=0):
    """The token_ids row the engine would give: prompt ids, then the continuation's ids, then `fill` EOS."""
    prompt_ids, full = tok.text_to_ids(prompt), tok.text_to_ids(prompt + continuation)
    assert full[:len(prompt_ids)] == prompt_ids
    return full + [tok.eos_id] * fill


def _complete(tok, body, rows):
    t = openai_api.completion_request(body)
    req = parse_request(t.payload)
    return openai_api.completion_response(req, {"token_ids": rows}, tok, model="m", echo=t.echo)


def test_length_keeps_the_leading_space_and_counts_tokens(tok):
    row = _row(tok, "def f(x):", " return x")
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 3}, [row])
    assert out["choices"] == [{"index": 0, "text": " return x", "finish_reason": "length", "logprobs": None}]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert out["object"] == "text_completion" and out["model"] == "m"
    assert out["id"].startswith("cmpl-") and len(out["id"]) == 5 + 32
    assert abs(out["created"] - time.time()) < 5 and isinstance(out["created"], int)


def test_eos_stops_and_its_fill_is_neither_text_nor_counted(tok):
    row = _row(tok, "def f(x):", " return x") + [tok.eos_id, tok.eos_id, tok.eos_id]
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 6}, [row])
    assert out["choices"][0]["text"] == " return x" and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}  # the EOS counts once
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 6}, [tok.text_to_ids("def f(x):") + [tok.eos_id]])
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == ("", "stop")
    assert out["usage"]["completion_tokens"] == 1


def test_a_multi_token_stop_string_is_cut(tok):
    # "return" is not one piece: the engine stops on the decoded text, at the token "▁return".
    assert tok.single_piece_id("return") is None
    row = _row(tok, "def f(x):", " return", fill=2)
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 3, "stop": ["zz", "return"]}, [row])
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (" ", "stop")
    assert out["usage"]["completion_tokens"] == 1


def test_a_single_piece_stop_string_is_cut(tok):
    assert tok.single_piece_id("\n") == 7
    row = _row(tok, "def f(x):", " return x\n", fill=1)
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 5, "stop": "\n"}, [row])
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (" return x", "stop")
    assert out["usage"]["completion_tokens"] == 4


def test_a_stop_on_the_last_allowed_token_is_stop_not_length(tok):
    row = _row(tok, "def f(x):", " return x\n")
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 4, "stop": "\n"}, [row])
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (" return x", "stop")


def test_a_stop_string_begun_in_the_prompt_cuts_only_generated_text(tok):
    row = _row(tok, "def f(x):", "\n  y")
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 4, "stop": "):\n"}, [row[:6]])
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == ("", "stop")
    assert out["usage"]["completion_tokens"] == 1


def test_the_longest_matching_stop_string_is_removed(tok):
    row = _row(tok, "def f(x):", " return x", fill=1)
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 4, "stop": ["x", "n x"]}, [row])
    # "x" is one piece: the row stopped on it; both "x" and "n x" end the text.
    assert out["choices"][0]["text"] == " retur"


def test_echo_puts_the_prompt_in_front(tok):
    row = _row(tok, "def f(x):", " return x")
    out = _complete(tok, {"prompt": "def f(x):", "max_tokens": 3, "echo": True}, [row])
    assert out["choices"][0]["text"] == "def f(x): return x"
    assert out["usage"]["prompt_tokens"] == 5


def test_several_prompts_give_choices_in_order_and_summed_usage(tok):
    rows = [_row(tok, "def f(x):", " return x"), _row(tok, "import os", "\nx", fill=1)]
    rows[1] = rows[1][: len(tok.text_to_ids("import os")) + 1] + [tok.eos_id, tok.eos_id]  # "\n", then EOS fill
    out = _complete(tok, {"prompt": ["def f(x):", "import os"], "max_tokens": 3, "stop": "\n"}, rows)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [
        (0, " return x", "length"), (1, "", "stop")]
    n0, n1 = len(tok.text_to_ids("def f(x):")), len(tok.text_to_ids("import os"))
    assert out["usage"] == {"prompt_tokens": n0 + n1, "completion_tokens": 3 + 1, "total_tokens": n0 + n1 + 4}


def test_chat_response_drops_the_turn_marker_and_the_newline(tok):
    t = openai_api.chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
    req = parse_request(t.payload)
    prompt = t.payload["sentences"][0]
    row = _row(tok, prompt, "Hello!\n<extra_id_1>", fill=2)
    out = openai_api.chat_response(req, {"token_ids": [row]}, tok, model="m")
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                               "finish_reason": "stop"}]
    n = len(tok.text_to_ids(prompt))
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 7, "total_tokens": n + 7}
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    # Cut by length: only one trailing newline goes.
    row = _row(tok, prompt, "Hi\n\n")
    out = openai_api.chat_response(parse_request({**t.payload, "tokens_to_generate": 4}), {"token_ids": [row]}, tok,
                                   model="m")
    assert out["choices"][0]["message"]["content"] == "Hi\n" and out["choices"][0]["finish_reason"] == "length"


def test_models_response():
    assert openai_api.models_response("x") == {"object": "list",
                                               "data": [{"id": "x", "object": "model", "owned_by": "nemotron"}]}


def test_not_ready_is_503_on_every_openai_route():
    from nemotron.server import create_app

    class NoModel:
        def generate(self, req):
            raise AssertionError("must not run")

    client = create_app(NoModel(), ready=lambda: False).test_client()
    for method, path, body in (("POST", "/v1/completions", {"prompt": "x"}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("GET", "/v1/models", None)):
        r = client.open(path, method=method, json=body)
        assert r.status_code == 503 and "GET /health" in r.get_json()["message"], path


# --- a real server ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_ports()
    argv = [sys.executable, *eval_args(port, f"server_api_key={API_KEY}", f"max_body_bytes={BODY_LIMIT}")]
    with Server("openai", argv, port, str(tmp_path_factory.mktemp("openai")), auth=AUTH) as s:
        yield s


def post(server, path, body, **headers):
    return server.session.post(server.url(path), data=json.dumps(body),
                               headers={"Content-Type": "application/json", **AUTH, **headers}, timeout=120)


def generate(server, payload):
    r = server.put(payload)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_greedy_equals_put_generate(server, tok):
    prompt = "def f(x):"
    nemo = generate(server, {"sentences": [prompt], "tokens_to_generate": 8, "greedy": True, "top_p": 1.0})
    ids = nemo["token_ids"][0]
    n = len(tok.text_to_ids(prompt))
    assert tok.eos_id not in ids[n:] and len(ids) == n + 8  # ran to the length limit
    r = post(server, "/v1/completions", {"model": "whatever", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    out = r.json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["model"] == MODEL_NAME and out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": nemo["sentences"][0][len(prompt):], "finish_reason": "length",
                               "logprobs": None}]
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 8, "total_tokens": n + 8}
    # echo, and a list of prompts
    r = post(server, "/v1/completions", {"prompt": [prompt, "import os"], "max_tokens": 8, "temperature": 0,
                                         "echo": True})
    choices = r.json()["choices"]
    assert choices[0]["text"] == nemo["sentences"][0]
    other = generate(server, {"sentences": ["import os"], "tokens_to_generate": 8, "greedy": True})
    assert choices[1] == {"index": 1, "text": other["sentences"][0], "finish_reason": "length", "logprobs": None}


def test_a_stop_string_cuts_the_text_like_put_generate_end_strings(server, tok):
    prompt = "import os"
    n = len(tok.text_to_ids(prompt))
    ids = generate(server, {"sentences": [prompt], "tokens_to_generate": 16, "greedy": True})["token_ids"][0]
    # A stop string made of generated tokens 3..4 (ending on a token boundary, so the engine sees it end the text).
    before, upto = tok.ids_to_text(ids[:n + 3]), tok.ids_to_text(ids[:n + 5])
    assert upto.startswith(before)
    stop = upto[len(before):]
    assert stop and "\ufffd" not in stop, stop
    nemo = generate(server, {"sentences": [prompt], "tokens_to_generate": 16, "greedy": True,
                             "end_strings": [EOT, stop]})
    sentence, stopped_ids = nemo["sentences"][0], nemo["token_ids"][0]
    assert sentence.endswith(stop) and len(stopped_ids) <= n + 5
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": stop})
    out = r.json()
    assert out["choices"][0]["text"] == sentence[len(prompt):-len(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    generated = len(stopped_ids) - n  # the stop token included; a single row has no EOS fill
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}


def test_sampling_with_a_seed_equals_put_generate(server):
    body = {"prompt": "class Stack:", "max_tokens": 10, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7}
    first = post(server, "/v1/completions", body).json()
    assert post(server, "/v1/completions", body).json()["choices"] == first["choices"]
    nemo = generate(server, {"sentences": ["class Stack:"], "tokens_to_generate": 10, "temperature": 0.8, "top_k": 50,
                             "top_p": 0.9, "random_seed": 7})
    assert first["choices"][0]["text"] == nemo["sentences"][0][len("class Stack:"):]


def test_chat_renders_the_template(server, tok):
    rendered = "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n"
    nemo = generate(server, {"sentences": [rendered], "tokens_to_generate": 8, "greedy": True,
                             "end_strings": [EOT, "<extra_id_1>"]})
    n = len(tok.text_to_ids(rendered))
    generated = len(nemo["token_ids"][0]) - n
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "chat.completion" and out["model"] == MODEL_NAME
    content = nemo["sentences"][0][len(rendered):]
    finish = "length"
    if content.endswith("<extra_id_1>"):
        content, finish = content[:-len("<extra_id_1>")], "stop"
    content = content[:-1] if content.endswith("\n") else content
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": content},
                               "finish_reason": finish}]
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}


def test_chat_default_max_tokens_is_refused_by_the_length_check(server, tok):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    n = len(tok.text_to_ids(openai_api.render_chat([{"role": "user", "content": "hi"}])))
    assert (r.status_code, r.json()) == (400, {"message": f"sentences[0] has {n} tokens; with tokens_to_generate=1024 "
                                                          f"that is {n + 1024} positions, more than the model's "
                                                          f"max_position_embeddings ({MAX_POSITIONS})"})


def test_models_and_root(server):
    r = server.session.get(server.url("/v1/models"), headers=AUTH)
    assert (r.status_code, r.json()) == (200, {"object": "list", "data": [
        {"id": MODEL_NAME, "object": "model", "owned_by": "nemotron"}]})
    routes = server.session.get(server.url("/"), headers=AUTH).json()["routes"]
    assert routes["/v1/completions"] == ["POST"] and routes["/v1/chat/completions"] == ["POST"]
    assert routes["/v1/models"] == ["GET"] and routes["/generate"] == ["PUT"]


_USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", {"prompt": "x", "stream": True}, "streaming is not supported"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n must be 1: only one choice per prompt is supported"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5},
     "presence_penalty must be 0: it is not supported (repetition_penalty is)"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2},
     "logprobs is not supported on /v1/completions; use PUT /generate with compute_logprob"),
    ("/v1/completions", {"prompt": "x", "foo": 1},
     "unknown request key for /v1/completions: 'foo'; allowed keys: " + ", ".join(sorted(openai_api.COMPLETION_KEYS))),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, _TEMP),
    ("/v1/completions", {"max_tokens": 4}, "prompt is required: a string or a list of 1 to 128 strings"),
    ("/v1/completions", ["x"], "request body must be a JSON object"),
    ("/v1/chat/completions", {"messages": _USER, "stream": True}, "streaming is not supported"),
    ("/v1/chat/completions", {"messages": _USER, "temperature": 101}, _TEMP),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages is required: a non-empty list of {role, content} objects"),
    ("/v1/chat/completions", {"messages": _USER + [{"role": "assistant", "content": "y"}]},
     "the last message must have role user, got 'assistant'"),
])
def test_errors_are_400_with_messages(server, path, body, message):
    r = post(server, path, body)
    assert r.headers["Content-Type"] == "application/json"
    assert (r.status_code, r.json()) == (400, {"message": message})


def test_auth_body_limit_content_type_and_methods(server):
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = requests.post(server.url(path), data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["message"].startswith("missing API key")
        r = server.session.post(server.url(path), data=body, headers={"Content-Type": "text/plain", **AUTH})
        assert (r.status_code, r.json()) == (415, {"message": "Content-Type must be application/json (got "
                                                              "'text/plain')"})
        r = server.session.post(server.url(path), data=b'{"prompt": ', headers={"Content-Type": "application/json",
                                                                                 **AUTH})
        assert r.status_code == 400 and r.json()["message"].startswith("request body is not valid JSON: ")
        r = post(server, path, {"prompt": "x" * BODY_LIMIT})
        assert (r.status_code, r.json()) == (413, {"message": f"request body too large: the limit is {BODY_LIMIT} "
                                                              f"bytes"})
    assert requests.get(server.url("/v1/models")).status_code == 401
    for method, path, allow in (("GET", "/v1/completions", "POST"), ("PUT", "/v1/chat/completions", "POST"),
                                ("POST", "/v1/models", "GET"), ("POST", "/generate", "PUT")):
        r = server.session.request(method, server.url(path), headers=AUTH, json={})
        assert (r.status_code, r.headers["Allow"]) == (405, allow), (method, path)
        assert r.json() == {"message": f"method {method} is not allowed on {path}; use {allow}"}


def test_one_log_line_per_request_with_the_completion_tokens(server):
    assert post(server, "/v1/completions", {"prompt": "x = [1, 2", "max_tokens": 3, "temperature": 0}).status_code \
        == 200
    assert post(server, "/v1/chat/completions", {"messages": _USER, "n": 3}).status_code == 400
    time.sleep(0.2)
    log = server.log()
    assert "x = [1, 2" not in log and API_KEY not in log
    assert "127.0.0.1 POST /v1/completions 200 sentences=1 tokens=3 " in log
    assert "127.0.0.1 POST /v1/chat/completions 400 sentences=- tokens=- " in log


def test_unknown_path_404_lists_the_openai_routes(server):
    r = server.session.get(server.url("/v1/embeddings"), headers=AUTH)
    routes = "PUT /generate; GET/PUT /; GET /health; POST /v1/completions; POST /v1/chat/completions; GET /v1/models"
    assert (r.status_code, r.json()) == (404, {"message": f"no route /v1/embeddings; routes: {routes}"})
