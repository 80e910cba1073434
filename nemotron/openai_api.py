"""OpenAI-compatible routes (non-streaming): translation between OpenAI's request/response shapes and NeMo's.

NeMo added ``POST /v1/completions`` and ``POST /v1/chat/completions`` in PR #10785 (Oct 2024). Here each OpenAI
request is translated into a NeMo ``PUT /generate`` payload, which the server validates with
:func:`nemotron.engine.request.parse_request` (the one validation path) and runs like any other request; the engine's
response dict is then translated back. Everything here is a pure function of its arguments (plus a fresh id and the
clock in the responses).

* :func:`completion_request` / :func:`chat_request`: an OpenAI body -> :class:`Translation` (the NeMo payload and the
  OpenAI-only options). They refuse what cannot be honoured (streaming, ``n`` > 1, log-probabilities, presence and
  frequency penalties, unknown keys) with :class:`RequestError` (400); everything NeMo knows about is left to
  ``parse_request``, whose messages name NeMo's keys (``max_tokens`` -> ``tokens_to_generate``, ``stop`` ->
  ``end_strings``, ``seed`` -> ``random_seed``, ``prompt`` -> ``sentences``).
* :func:`completion_response` / :func:`chat_response`: the engine's output -> OpenAI's response. ``text`` is the
  generated part only (the EOS fill and a matched stop string removed), ``finish_reason`` is ``"stop"`` when EOS or an
  end string ended the row and ``"length"`` otherwise, ``usage`` counts tokens.
* :func:`render_chat`: the Nemotron-4 Instruct prompt of a list of messages.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from nemotron.engine.engine import ENDOFTEXT, StopRule
from nemotron.engine.request import GenerationRequest, RequestError

__all__ = [
    "COMPLETION_KEYS",
    "CHAT_KEYS",
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "CHAT_DEFAULT_MAX_TOKENS",
    "TURN_START",
    "Translation",
    "completion_request",
    "chat_request",
    "render_chat",
    "completion_response",
    "chat_response",
    "models_response",
]

#: The keys each route accepts. ``top_k`` and ``repetition_penalty`` are extensions (NeMo's sampling knobs).
_SAMPLING_KEYS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "n", "logprobs",
    "presence_penalty", "frequency_penalty", "stream", "user",
})
COMPLETION_KEYS: frozenset = _SAMPLING_KEYS | {"prompt", "echo"}
CHAT_KEYS: frozenset = _SAMPLING_KEYS | {"messages"}

#: OpenAI's default ``max_tokens`` for completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16
#: The chat default: the model card's ``tokens_to_generate``. It is not shortened to fit the context; a prompt that
#: leaves no room for it is refused by the engine's length check (400 naming the numbers).
CHAT_DEFAULT_MAX_TOKENS = 1024

#: Nemotron-4 Instruct's turn marker; generation of the next turn is stopped on it.
TURN_START = "<extra_id_1>"
_SYSTEM_START = "<extra_id_0>"
_ROLES = ("system", "user", "assistant")

_MSG_NOT_OBJECT = "request body must be a JSON object"  # as parse_request says it
_MSG_STREAM = "streaming is not supported"
_MSG_N = "n must be 1: only one choice per prompt is supported"
_MSG_LOGPROBS = "logprobs is not supported on {route}; use PUT /generate with compute_logprob"
_MSG_PENALTY = "{key} must be 0: it is not supported (repetition_penalty is)"


@dataclass(frozen=True)
class Translation:
    """An OpenAI request as a NeMo payload (for ``parse_request``) plus the options only the response needs."""
    payload: dict
    echo: bool = False


# --- requests ---------------------------------------------------------------------------------------------------------


def _fail(message: str, field: Optional[str] = None) -> RequestError:
    return RequestError(message, status=400, field=field)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def _get(body: Mapping[str, Any], key: str, default: Any) -> Any:
    """``body[key]``, with a missing key or ``null`` meaning the default (OpenAI's optional fields are nullable)."""
    value = body.get(key)
    return default if value is None else value


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _check_common(body: Any, allowed: frozenset, route: str) -> None:
    if not isinstance(body, Mapping):
        raise _fail(_MSG_NOT_OBJECT)
    unknown = sorted((key for key in body if key not in allowed), key=str)
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise _fail(f"unknown request key{'s' if len(unknown) > 1 else ''} for {route}: {names}; allowed keys: "
                    f"{', '.join(sorted(allowed))}", str(unknown[0]) if len(unknown) == 1 else None)
    if _get(body, "stream", False) is not False:
        raise _fail(_MSG_STREAM, "stream")
    n = _get(body, "n", 1)
    if not (isinstance(n, int) and not isinstance(n, bool) and n == 1):
        raise _fail(_MSG_N, "n")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:  # chat's logprobs is a boolean, false asks for nothing
        raise _fail(_MSG_LOGPROBS.format(route=route), "logprobs")
    for key in ("presence_penalty", "frequency_penalty"):
        if not _is_zero(_get(body, key, 0)):
            raise _fail(_MSG_PENALTY.format(key=key), key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _fail(f"model must be a string, got {_type_name(model)}", "model")


def _payload(body: Mapping[str, Any], sentences: Any, default_max_tokens: int, end_strings: Sequence[str]) -> dict:
    """The NeMo payload. Values are passed as given: ``parse_request`` judges them with NeMo's messages."""
    temperature = _get(body, "temperature", 1.0)
    greedy = _is_zero(temperature)  # OpenAI's temperature 0 is greedy; NeMo wants greedy=true and a valid temperature
    stop = _get(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    # A stop that is not a string or a list is passed on alone, so that parse_request refuses it with NeMo's message.
    return {
        "sentences": sentences,
        "tokens_to_generate": _get(body, "max_tokens", default_max_tokens),
        "greedy": greedy,
        "temperature": 1.0 if greedy else temperature,
        "top_k": _get(body, "top_k", 0),
        "top_p": _get(body, "top_p", 1.0),
        "repetition_penalty": _get(body, "repetition_penalty", 1.0),
        "end_strings": [*end_strings, *stop] if isinstance(stop, list) else stop,
        "add_BOS": False,
        "random_seed": body.get("seed"),
    }


def completion_request(body: Any) -> Translation:
    """``POST /v1/completions``: the body -> the NeMo payload (``add_BOS`` false, ``end_strings`` EOS + ``stop``)."""
    route = "/v1/completions"
    _check_common(body, COMPLETION_KEYS, route)
    if "prompt" not in body or body["prompt"] is None:
        raise _fail("prompt is required: a string or a list of 1 to 128 strings", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        sentences = [prompt]
    elif isinstance(prompt, list) and prompt:
        sentences = list(prompt)  # item types and the 128 limit: parse_request
    elif isinstance(prompt, list):
        raise _fail("prompt must not be an empty list", "prompt")
    else:
        raise _fail(f"prompt must be a string or a list of strings, got {_type_name(prompt)}", "prompt")
    echo = _get(body, "echo", False)
    if not isinstance(echo, bool):
        raise _fail("echo must be a boolean value", "echo")
    return Translation(_payload(body, sentences, COMPLETION_DEFAULT_MAX_TOKENS, [ENDOFTEXT]), echo=echo)


def _check_messages(messages: Any) -> list:
    if messages is None:
        raise _fail("messages is required: a non-empty list of {role, content} objects", "messages")
    if not isinstance(messages, list):
        raise _fail(f"messages must be a list of {{role, content}} objects, got {_type_name(messages)}", "messages")
    if not messages:
        raise _fail("messages must not be empty", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _fail(f"messages[{i}] must be an object with role and content, got {_type_name(message)}",
                        "messages")
        extra = sorted((key for key in message if key not in ("role", "content")), key=str)
        if extra:
            raise _fail(f"messages[{i}] has unknown key{'s' if len(extra) > 1 else ''} "
                        f"{', '.join(repr(key) for key in extra)}; a message has role and content", "messages")
        role = message.get("role")
        if role not in _ROLES:
            raise _fail(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}", "messages")
        if not isinstance(message.get("content"), str):
            raise _fail(f"messages[{i}].content must be a string, got {_type_name(message.get('content'))}",
                        "messages")
        if role == "system" and i > 0:
            raise _fail(f"messages[{i}] is a system message: only the first message may be one", "messages")
    if messages[-1]["role"] != "user":
        raise _fail(f"the last message must have role user, got {messages[-1]['role']!r}", "messages")
    return messages


def render_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """The Nemotron-4 Instruct prompt: NeMo's SFT chat format, as on the 340B-Instruct model card.

    ``<extra_id_0>System\\n{system}\\n``, then ``<extra_id_1>User\\n{content}\\n`` or
    ``<extra_id_1>Assistant\\n{content}\\n`` per turn, then ``<extra_id_1>Assistant\\n``. Without a system message
    that is the card's ``<extra_id_0>System\\n\\n<extra_id_1>User\\n{prompt}\\n<extra_id_1>Assistant\\n``.
    """
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    parts = [f"{_SYSTEM_START}System\n{system}\n"]
    for message in messages:
        if message["role"] == "user":
            parts.append(f"{TURN_START}User\n{message['content']}\n")
        elif message["role"] == "assistant":
            parts.append(f"{TURN_START}Assistant\n{message['content']}\n")
    parts.append(f"{TURN_START}Assistant\n")
    return "".join(parts)


def chat_request(body: Any) -> Translation:
    """``POST /v1/chat/completions``: the body -> the NeMo payload of the rendered prompt; ``<extra_id_1>`` stops."""
    _check_common(body, CHAT_KEYS, "/v1/chat/completions")
    messages = _check_messages(body.get("messages"))
    return Translation(_payload(body, [render_chat(messages)], CHAT_DEFAULT_MAX_TOKENS, [ENDOFTEXT, TURN_START]))


# --- responses --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    text: str  # the generated text, EOS fill and a matched stop string removed
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int  # generated tokens up to and including the one that stopped the row


def _decode_after(tokenizer: Any, prompt_ids: list, generated: list) -> str:
    """The text ``generated`` adds to the prompt. Decoding it alone would lose SentencePiece's leading space."""
    prefix = tokenizer.ids_to_text(prompt_ids)
    full = tokenizer.ids_to_text(prompt_ids + generated)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.ids_to_text(generated)


def _choice(req: GenerationRequest, row: Sequence[int], prompt: str, tokenizer: Any, stop: StopRule) -> _Choice:
    n_prompt = len(tokenizer.text_to_ids(prompt))  # add_BOS is always false here
    prompt_ids, generated = list(row[:n_prompt]), list(row[n_prompt:])
    # The engine's own stop test, token by token: the first token it fires on ended the row (the rest is EOS fill).
    end = next((i for i, token in enumerate(generated)
                if stop.stops(tokenizer, prompt_ids + generated[:i + 1], token)), None)
    if end is None:
        return _Choice(_decode_after(tokenizer, prompt_ids, generated), "length", n_prompt, len(generated))
    kept = generated[:end + 1]
    if kept[-1] == tokenizer.eos_id:  # EOS renders as nothing: leave it out of the text
        return _Choice(_decode_after(tokenizer, prompt_ids, kept[:-1]), "stop", n_prompt, end + 1)
    # An end string ended the row: the decoded row ends with it (OpenAI leaves it out of the text). Remove the longest
    # that matches; it may have begun inside the prompt, so at most the generated text goes.
    full = tokenizer.ids_to_text(prompt_ids + kept)
    matched = max((s for s in req.end_strings if s != ENDOFTEXT and full.endswith(s)), key=len, default=None)
    if matched is None:  # a stop piece that renders differently from its string: leave the piece out
        text = _decode_after(tokenizer, prompt_ids, kept[:-1])
    else:
        text = _decode_after(tokenizer, prompt_ids, kept)
        text = text[:max(0, len(text) - len(matched))]
    return _Choice(text, "stop", n_prompt, end + 1)


def _choices(req: GenerationRequest, out: Mapping[str, Any], tokenizer: Any) -> list:
    stop = StopRule.build(tokenizer, req.end_strings)
    rows = out["token_ids"]
    if len(rows) != len(req.sentences):
        raise ValueError(f"the engine answered {len(rows)} rows for {len(req.sentences)} prompts")
    return [_choice(req, row, prompt, tokenizer, stop) for row, prompt in zip(rows, req.sentences)]


def _usage(choices: Sequence[_Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(req: GenerationRequest, out: Mapping[str, Any], tokenizer: Any, *, model: str,
                        echo: bool = False) -> dict:
    """The engine's answer to ``req`` as an OpenAI ``text_completion``: one choice per prompt, in order.

    ``tokenizer`` must be the engine's (prompt lengths are counted with it). With ``echo`` the prompt, as sent, is put
    in front of each text.
    """
    choices = _choices(req, out, tokenizer)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": (prompt + c.text) if echo else c.text, "finish_reason": c.finish_reason,
                     "logprobs": None}
                    for i, (c, prompt) in enumerate(zip(choices, req.sentences))],
        "usage": _usage(choices),
    }


def chat_response(req: GenerationRequest, out: Mapping[str, Any], tokenizer: Any, *, model: str) -> dict:
    """The engine's answer to a rendered chat prompt as an OpenAI ``chat.completion``.

    The content is the generated text without the stop (``<extra_id_1>``, EOS or a client's stop string) and without
    the newline that ends an assistant turn in the template.
    """
    (choice,) = _choices(req, out, tokenizer)
    content = choice.text[:-1] if choice.text.endswith("\n") else choice.text
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": choice.finish_reason}],
        "usage": _usage([choice]),
    }


def models_response(model: str) -> dict:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "nemotron"}]}
