#!/usr/bin/env python3
"""The Nemotron-4-340B model card's ``call_server.py``, made into a small command-line client.

    python scripts/call_server.py --port 1424 --prompt "Write a poem on NVIDIA in the style of Shakespeare"

With no options it sends the card's request (greedy, add_BOS false, 1024 tokens, min 1 token, top_k 0, top_p 1.0,
repetition_penalty 1.0, the card's four end strings) for the card's question to localhost:1424, and prints each
prompt followed by its completion (the response minus the prompt, as the card does). HTTP errors print the server's
message and exit non-zero. ``--api-key`` (or ``NEMOTRON_API_KEY``) sends ``Authorization: Bearer <key>``.

Imported, the card's functions keep their signatures: ``text_generation(data, ip='localhost', port=None)`` and
``get_generation(prompt, greedy, add_BOS, token_to_gen, min_tokens, temp, top_p, top_k, repetition, batch=False)``.
Unlike the card's, they raise :class:`ServerError` on an HTTP error instead of failing later on a missing key.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import requests

headers = {"Content-Type": "application/json"}

#: The card's end strings.
END_STRINGS = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
PROMPT_TEMPLATE = "{prompt}"
QUESTION = "Write a poem on NVIDIA in the style of Shakespeare"
DEFAULT_PORT = 1424
API_KEY_ENV = "NEMOTRON_API_KEY"


class ServerError(RuntimeError):
    """The server answered with an HTTP error (``status``) or something that is not a generation response."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def text_generation(data, ip="localhost", port=None, *, api_key=None, timeout=None):
    """PUT ``data`` to ``http://ip:port/generate`` and return the decoded JSON response."""
    port = DEFAULT_PORT if port is None else port
    url = f"http://{ip}:{port}/generate"
    request_headers = dict(headers)
    if api_key:
        request_headers["Authorization"] = f"Bearer {api_key}"
    resp = requests.put(url, data=json.dumps(data), headers=request_headers, timeout=timeout)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        message = body.get("message") if isinstance(body, dict) else None
        raise ServerError(f"{url} answered HTTP {resp.status_code}: {message or resp.text.strip()[:500]}",
                          resp.status_code)
    if not isinstance(body, dict) or not isinstance(body.get("sentences"), list):
        raise ServerError(f"{url} answered HTTP 200 without a list of sentences: {resp.text.strip()[:500]}", 200)
    return body


def get_generation(prompt, greedy, add_BOS, token_to_gen, min_tokens, temp, top_p, top_k, repetition, batch=False,
                   *, ip="localhost", port=DEFAULT_PORT, end_strings=None, api_key=None, timeout=None):
    """The card's function: the generated sentence (prompt included) for ``prompt``, or a list with ``batch``."""
    data = {
        "sentences": [prompt] if not batch else prompt,
        "tokens_to_generate": int(token_to_gen),
        "temperature": temp,
        "add_BOS": add_BOS,
        "top_k": top_k,
        "top_p": top_p,
        "greedy": greedy,
        "all_probs": False,
        "repetition_penalty": repetition,
        "min_tokens_to_generate": int(min_tokens),
        "end_strings": list(END_STRINGS if end_strings is None else end_strings),
    }
    sentences = text_generation(data, ip=ip, port=port, api_key=api_key, timeout=timeout)["sentences"]
    return sentences[0] if not batch else sentences


def completion(prompt: str, sentence: str) -> str:
    """The response minus the prompt, as the card computes it (``response[len(prompt):]``)."""
    return sentence[len(prompt):]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Send prompts to a nemotron (NeMo megatron_gpt_eval) server and print "
                                            "the completions.")
    p.add_argument("--host", default="localhost", help="server host (default: localhost)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="a prompt; repeat for a batch (default: the card's question)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens_to_generate (default: 1024)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy decoding (default: on)")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to each prompt (default: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--min-tokens", type=int, default=1, help="min_tokens_to_generate (default: 1)")
    p.add_argument("--end-string", action="append", dest="end_strings", metavar="TEXT",
                   help="an end string; repeat for several (default: the card's four)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the answer (default: no limit)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = [PROMPT_TEMPLATE.format(prompt=p) for p in (args.prompts or [QUESTION])]
    try:
        sentences = get_generation(prompts, args.greedy, args.add_bos, args.tokens, args.min_tokens,
                                   args.temperature, args.top_p, args.top_k, args.repetition_penalty, batch=True,
                                   ip=args.host, port=args.port, end_strings=args.end_strings,
                                   api_key=args.api_key, timeout=args.timeout)
    except ServerError as exc:
        print(f"call_server.py: error: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"call_server.py: error: cannot reach the server at http://{args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 2
    if len(sentences) != len(prompts):
        print(f"call_server.py: error: sent {len(prompts)} prompt(s), got {len(sentences)} sentence(s)",
              file=sys.stderr)
        return 1
    for prompt, sentence in zip(prompts, sentences):
        print(prompt)
        print(completion(prompt, sentence), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
