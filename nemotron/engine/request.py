"""The generation request: one schema and one validation path for the HTTP server and the CLI.

NeMo's ``megatron_gpt_eval.py server=True`` accepts a JSON object on ``PUT /generate`` with the keys in
``API_ALLOWED_KEYS``. Its checks and their message texts are kept here (``nemo-reference.md`` §1), with these
deliberate differences:

* Unknown keys are refused (NeMo only logged them).
* Types are checked strictly, as NeMo's checks intended: ``true`` is not an integer or a number (Python's
  ``isinstance(True, int)`` let NeMo accept it), ``1`` is not a boolean, ``top_k`` must be an integer (a float broke
  ``torch.topk``), numbers must be finite.
* What made NeMo answer 500 or crash is a 400 here: a missing ``sentences``, a non-list, non-string items, an empty
  list, ``all_probs`` without ``compute_logprob``, an empty prompt without ``add_BOS``.
* ``task_ids`` (prompt-learning) and ``neighbors`` (RETRO) are refused: over JSON NeMo always refused ``task_ids``,
  and RETRO models are not served.

Every error is a :class:`RequestError` carrying the HTTP status the server should answer with; NeMo answered most
of them with HTTP 200.

The CLI (``python -m nemotron.eval``) builds its request from the ``inference:`` config section through
:func:`request_from_inference_config`, which goes through :func:`parse_request` as well.

Pure Python: no torch, no flask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "API_ALLOWED_KEYS",
    "SERVED_KEYS",
    "CLI_INFERENCE_KEYS",
    "CLI_IGNORED_INFERENCE_KEYS",
    "SERVER_DEFAULTS",
    "CLI_DEFAULTS",
    "MAX_SENTENCES",
    "MAX_RANDOM_SEED",
    "GenerationRequest",
    "RequestError",
    "parse_request",
    "request_from_inference_config",
    "to_json_dict",
]

#: NeMo's ``API_ALLOWED_KEYS`` (text_generation_server.py): the 15 keys a request may carry.
API_ALLOWED_KEYS: frozenset[str] = frozenset(
    {
        "all_probs",
        "sentences",
        "task_ids",
        "tokens_to_generate",
        "temperature",
        "add_BOS",
        "greedy",
        "top_k",
        "top_p",
        "neighbors",
        "repetition_penalty",
        "min_tokens_to_generate",
        "end_strings",
        "compute_logprob",
        "random_seed",
    }
)

#: Keys NeMo allowed but this server refuses (see the module docstring).
_REFUSED_KEYS: frozenset[str] = frozenset({"task_ids", "neighbors"})

#: The keys a request to this server can actually use.
SERVED_KEYS: frozenset[str] = API_ALLOWED_KEYS - _REFUSED_KEYS

#: The generation parameters: every served key except ``sentences``. A ``defaults`` mapping must give all of them.
_PARAMETER_KEYS: frozenset[str] = SERVED_KEYS - {"sentences"}

#: NeMo's server limit on the number of sentences per request.
MAX_SENTENCES = 128

#: ``random_seed`` must be below this (it has to fit a signed 64-bit integer).
MAX_RANDOM_SEED = 2**63

#: NeMo's server defaults (text_generation_server.py), used for keys a request leaves out.
SERVER_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "tokens_to_generate": 64,
        "all_probs": False,
        "temperature": 1.0,
        "add_BOS": False,
        "greedy": False,
        "top_k": 0,
        "top_p": 0.9,
        # NeMo's server advertised 1.2, but passed the request's value into generate()'s 10th positional parameter,
        # which is compute_attention_mask, not repetition_penalty: the penalty NeMo actually applied was always 1.0.
        # NeMo itself changed the server default to 1.0 in PR #10785. We default to what NeMo did, 1.0, and (unlike
        # NeMo) apply a value the client sends.
        "repetition_penalty": 1.0,
        "end_strings": ("<|endoftext|>",),
        "min_tokens_to_generate": 0,
        "compute_logprob": False,
        "random_seed": None,
    }
)

#: The ``inference:`` keys of NeMo's ``megatron_gpt_inference.yaml`` (all named as the request keys), plus
#: ``random_seed``, which NeMo's ``generate(**cfg)`` also accepts.
CLI_INFERENCE_KEYS: frozenset[str] = frozenset(
    {
        "greedy",
        "top_k",
        "top_p",
        "temperature",
        "add_BOS",
        "tokens_to_generate",
        "all_probs",
        "repetition_penalty",
        "min_tokens_to_generate",
        "compute_logprob",
        "end_strings",
        "random_seed",
    }
)

#: ``inference:`` keys that configure the model or the launch, not a request: the CLI reads them elsewhere and
#: :func:`request_from_inference_config` skips them. Any other key that is not in ``CLI_INFERENCE_KEYS`` is refused.
CLI_IGNORED_INFERENCE_KEYS: frozenset[str] = frozenset({"use_flash_attention"})

#: NeMo's ``megatron_gpt_inference.yaml`` ``inference:`` defaults, for keys a CLI config leaves out. They differ from
#: the server's: ``add_BOS`` True, ``tokens_to_generate`` 30, ``repetition_penalty`` 1.2 (the CLI's second method
#: passes it by keyword, so NeMo's CLI did use 1.2).
CLI_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "greedy": False,
        "top_k": 0,
        "top_p": 0.9,
        "temperature": 1.0,
        "add_BOS": True,
        "tokens_to_generate": 30,
        "all_probs": False,
        "repetition_penalty": 1.2,
        "min_tokens_to_generate": 0,
        "compute_logprob": False,
        "end_strings": ("<|endoftext|>",),
        "random_seed": None,
    }
)

# NeMo's message texts (nemo-reference.md §1). The task_ids text had a backslash continuation in NeMo's source; the
# run of spaces it left inside the string is normalised to one space.
_MSG_TOO_MANY = "Maximum number of sentences is {n}"
_MSG_TASK_IDS = (
    "Input at 'sentences' must by a tuple of two tensors like: (context_tokens_tensor, context_length_tensor) "
    "if task ids are given"
)
_MSG_TOKENS_TO_GENERATE = "tokens_to_generate must be an integer greater than 0"
_MSG_ALL_PROBS = "all_probs must be a boolean value"
_MSG_TEMPERATURE = "temperature must be a positive number less than or equal to 100.0"
_MSG_ADD_BOS = "add_BOS must be a boolean value"
_MSG_GREEDY = "greedy must be a boolean value"
_MSG_TOP_K = "top_k must be a positive integer number"
_MSG_TOP_P = "top_p must be a positive number less than or equal to 1.0"
_MSG_REPETITION_PENALTY = "repetition_penalty must be a positive number no less than 1.0"
_MSG_END_STRINGS = "expect end_strings to be a list of strings"
_MSG_MIN_TOKENS = "min_tokens_to_generate must be an integer no less than 0"
_MSG_COMPUTE_LOGPROB = "compute_logprob must be a boolean value"
_MSG_RANDOM_SEED = "random_seed must be a positive integer number or None"
# Ours.
_MSG_NOT_OBJECT = "request body must be a JSON object"
_MSG_NEIGHBORS = "neighbors is not supported: RETRO models are not served"
_MSG_END_STRINGS_EMPTY_ITEM = "end_strings[{i}] is an empty string; each end string must be non-empty"
_MSG_ALL_PROBS_NEEDS_LOGPROB = "all_probs requires compute_logprob=True"
_MSG_MIN_GT_MAX = (
    "min_tokens_to_generate ({min}) must not be greater than tokens_to_generate ({max})"
)


class RequestError(ValueError):
    """A request that cannot be served: ``message`` is the text for the client, ``status`` the HTTP status.

    ``field`` names the offending key when the problem is in one key (``None`` otherwise).
    """

    def __init__(self, message: str, status: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field

    def __repr__(self) -> str:
        return f"RequestError({self.message!r}, status={self.status}, field={self.field!r})"


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request. Build it with :func:`parse_request` or :func:`request_from_inference_config`."""

    sentences: tuple[str, ...]
    tokens_to_generate: int
    all_probs: bool
    temperature: float
    add_BOS: bool
    greedy: bool
    top_k: int
    top_p: float
    repetition_penalty: float
    end_strings: tuple[str, ...]
    min_tokens_to_generate: int
    compute_logprob: bool
    random_seed: int | None


# ----------------------------------------------------------------------------------------------------------------------
# Type checks. JSON gives bool, int, float, str, list, dict, None; bool is a subclass of int in Python, so every
# integer/number check excludes it explicitly.


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return result if math.isfinite(result) else None


def _fail(message: str, field: str | None) -> RequestError:
    return RequestError(message, status=400, field=field)


def _check_bool(values: Mapping[str, Any], key: str, message: str) -> bool:
    value = values[key]
    if not _is_bool(value):
        raise _fail(message, key)
    return value


def _check_number(values: Mapping[str, Any], key: str, message: str, low: float, high: float,
                  low_inclusive: bool = True) -> float:
    number = _as_finite_float(values[key])
    if number is None or number > high or number < low or (not low_inclusive and number == low):
        raise _fail(message, key)
    return number


def _check_int(values: Mapping[str, Any], key: str, message: str, low: int) -> int:
    value = values[key]
    if not _is_int(value) or value < low:
        raise _fail(message, key)
    return int(value)


def _check_sentences(payload: Mapping[str, Any], label: str, max_sentences: int | None) -> list[str]:
    if "sentences" not in payload:
        raise _fail(f"{label} is required: a list of prompt strings", "sentences")
    sentences = payload["sentences"]
    if not isinstance(sentences, list):
        raise _fail(f"{label} must be a list of strings, got {_type_name(sentences)}", "sentences")
    if not sentences:
        raise _fail(f"{label} must not be empty", "sentences")
    if max_sentences is not None and len(sentences) > max_sentences:
        raise _fail(_MSG_TOO_MANY.format(n=max_sentences), "sentences")
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise _fail(f"{label}[{i}] must be a string, got {_type_name(sentence)}", "sentences")
    return sentences


def _check_end_strings(values: Mapping[str, Any]) -> tuple[str, ...]:
    end_strings = values["end_strings"]
    if not isinstance(end_strings, list) or not all(isinstance(s, str) for s in end_strings):
        raise _fail(_MSG_END_STRINGS, "end_strings")
    for i, s in enumerate(end_strings):
        if not s:
            raise _fail(_MSG_END_STRINGS_EMPTY_ITEM.format(i=i), "end_strings")
    return tuple(end_strings)


def _check_random_seed(values: Mapping[str, Any]) -> int | None:
    seed = values["random_seed"]
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= seed < MAX_RANDOM_SEED:
        raise _fail(_MSG_RANDOM_SEED, "random_seed")
    return int(seed)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _key_list(keys: Any) -> str:
    return ", ".join(sorted(keys))


def _normalise_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults as request values: every parameter key present, tuples (immutable defaults) as lists."""
    missing = _PARAMETER_KEYS - set(defaults)
    extra = set(defaults) - _PARAMETER_KEYS
    if missing or extra:
        # A programming error, not a client's: not a RequestError.
        raise TypeError(f"defaults must give exactly the keys {_key_list(_PARAMETER_KEYS)}; "
                        f"missing: {_key_list(missing) or '-'}; unexpected: {_key_list(map(str, extra)) or '-'}")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in defaults.items()}


# ----------------------------------------------------------------------------------------------------------------------


def _parse(payload: Any, defaults: Mapping[str, Any], max_sentences: int | None, label: str) -> GenerationRequest:
    if not isinstance(payload, Mapping):
        raise _fail(_MSG_NOT_OBJECT, None)

    unknown = [key for key in payload if key not in API_ALLOWED_KEYS]
    if unknown:
        names = ", ".join(repr(key) for key in sorted(unknown, key=str))
        plural = "s" if len(unknown) > 1 else ""
        raise _fail(
            f"unknown request key{plural}: {names}; allowed keys: {_key_list(SERVED_KEYS)}",
            str(unknown[0]) if len(unknown) == 1 else None,
        )

    sentences = _check_sentences(payload, label, max_sentences)
    if "task_ids" in payload:
        raise _fail(_MSG_TASK_IDS, "task_ids")
    if "neighbors" in payload:
        raise _fail(_MSG_NEIGHBORS, "neighbors")

    values = _normalise_defaults(defaults)
    values.update((key, payload[key]) for key in _PARAMETER_KEYS if key in payload)

    # In NeMo's order of checks.
    tokens_to_generate = _check_int(values, "tokens_to_generate", _MSG_TOKENS_TO_GENERATE, low=1)
    all_probs = _check_bool(values, "all_probs", _MSG_ALL_PROBS)
    temperature = _check_number(values, "temperature", _MSG_TEMPERATURE, 0.0, 100.0, low_inclusive=False)
    add_bos = _check_bool(values, "add_BOS", _MSG_ADD_BOS)
    greedy = _check_bool(values, "greedy", _MSG_GREEDY)
    top_k = _check_int(values, "top_k", _MSG_TOP_K, low=0)
    top_p = _check_number(values, "top_p", _MSG_TOP_P, 0.0, 1.0)
    repetition_penalty = _check_number(values, "repetition_penalty", _MSG_REPETITION_PENALTY, 1.0, math.inf)
    end_strings = _check_end_strings(values)
    min_tokens = _check_int(values, "min_tokens_to_generate", _MSG_MIN_TOKENS, low=0)
    compute_logprob = _check_bool(values, "compute_logprob", _MSG_COMPUTE_LOGPROB)
    random_seed = _check_random_seed(values)

    # Across fields: what NeMo crashed on, or silently did something else with.
    if all_probs and not compute_logprob:
        raise _fail(_MSG_ALL_PROBS_NEEDS_LOGPROB, "all_probs")
    if min_tokens > tokens_to_generate:
        raise _fail(_MSG_MIN_GT_MAX.format(min=min_tokens, max=tokens_to_generate), "min_tokens_to_generate")
    if not add_bos:
        for i, sentence in enumerate(sentences):
            if not sentence:
                raise _fail(f"{label}[{i}] is an empty string: an empty prompt needs add_BOS=true", "sentences")

    return GenerationRequest(
        sentences=tuple(sentences),
        tokens_to_generate=tokens_to_generate,
        all_probs=all_probs,
        temperature=temperature,
        add_BOS=add_bos,
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        end_strings=end_strings,
        min_tokens_to_generate=min_tokens,
        compute_logprob=compute_logprob,
        random_seed=random_seed,
    )


def parse_request(
    payload: Any,
    defaults: Mapping[str, Any] = SERVER_DEFAULTS,
    max_sentences: int | None = MAX_SENTENCES,
) -> GenerationRequest:
    """Validate a decoded JSON request body and return the request, keys it leaves out taken from ``defaults``.

    ``defaults`` must give every parameter key (all served keys but ``sentences``); it is validated like the payload.
    ``max_sentences=None`` sets no limit. Raises :class:`RequestError` (status 400) naming the offending field.
    """
    return _parse(payload, defaults, max_sentences, label="sentences")


def request_from_inference_config(
    inference: Mapping[str, Any],
    prompts: Sequence[str],
    *,
    defaults: Mapping[str, Any] = CLI_DEFAULTS,
    max_sentences: int | None = None,
) -> GenerationRequest:
    """The CLI's request: NeMo's ``inference:`` config section plus the ``prompts``, validated by :func:`parse_request`.

    ``inference`` may be a plain mapping or an OmegaConf ``DictConfig`` (lists may be ``ListConfig``). Keys in
    ``CLI_IGNORED_INFERENCE_KEYS`` are skipped; other keys outside ``CLI_INFERENCE_KEYS`` are refused. Keys it leaves
    out come from ``defaults`` (NeMo's config defaults). NeMo's CLI had no limit on the number of prompts, so
    ``max_sentences`` is None by default. Errors are :class:`RequestError`; problems with the prompts name ``prompts``.
    """
    if not isinstance(inference, Mapping):
        raise _fail(f"inference must be a mapping of settings, got {_type_name(inference)}", "inference")
    unknown = [key for key in inference if key not in CLI_INFERENCE_KEYS and key not in CLI_IGNORED_INFERENCE_KEYS]
    if unknown:
        names = ", ".join(f"inference.{key}" for key in sorted(unknown, key=str))
        raise _fail(
            f"unknown inference key{'s' if len(unknown) > 1 else ''}: {names}; allowed keys: "
            f"{_key_list(CLI_INFERENCE_KEYS | CLI_IGNORED_INFERENCE_KEYS)}",
            str(unknown[0]) if len(unknown) == 1 else None,
        )
    payload: dict[str, Any] = {
        key: _plain(value) for key, value in inference.items() if key in CLI_INFERENCE_KEYS
    }
    payload["sentences"] = _plain(prompts)
    return _parse(payload, defaults, max_sentences, label="prompts")


def _plain(value: Any) -> Any:
    """A config sequence (list, tuple, OmegaConf ListConfig) as a list; anything else unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return list(value)
    return value


def to_json_dict(req: GenerationRequest) -> dict[str, Any]:
    """The request as a JSON-serialisable dict with the API's key names; ``parse_request`` of it gives ``req`` back."""
    return {
        "sentences": list(req.sentences),
        "tokens_to_generate": req.tokens_to_generate,
        "all_probs": req.all_probs,
        "temperature": req.temperature,
        "add_BOS": req.add_BOS,
        "greedy": req.greedy,
        "top_k": req.top_k,
        "top_p": req.top_p,
        "repetition_penalty": req.repetition_penalty,
        "end_strings": list(req.end_strings),
        "min_tokens_to_generate": req.min_tokens_to_generate,
        "compute_logprob": req.compute_logprob,
        "random_seed": req.random_seed,
    }
