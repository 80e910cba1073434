"""Tests of nemotron.engine.request: the request schema and its one validation path (server and CLI)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import CARD_PAYLOAD
from nemotron.engine.request import (
    API_ALLOWED_KEYS,
    CLI_DEFAULTS,
    CLI_IGNORED_INFERENCE_KEYS,
    CLI_INFERENCE_KEYS,
    SERVER_DEFAULTS,
    GenerationRequest,
    RequestError,
    parse_request,
    request_from_inference_config,
    to_json_dict,
)

NEMO_KEYS = {
    "all_probs", "sentences", "task_ids", "tokens_to_generate", "temperature", "add_BOS", "greedy", "top_k", "top_p",
    "neighbors", "repetition_penalty", "min_tokens_to_generate", "end_strings", "compute_logprob", "random_seed",
}

SERVED = ("add_BOS, all_probs, compute_logprob, end_strings, greedy, min_tokens_to_generate, random_seed, "
          "repetition_penalty, sentences, temperature, tokens_to_generate, top_k, top_p")

# NeMo's exact texts (nemo-reference.md §1).
M_TOKENS = "tokens_to_generate must be an integer greater than 0"
M_ALL_PROBS = "all_probs must be a boolean value"
M_TEMPERATURE = "temperature must be a positive number less than or equal to 100.0"
M_ADD_BOS = "add_BOS must be a boolean value"
M_GREEDY = "greedy must be a boolean value"
M_TOP_K = "top_k must be a positive integer number"
M_TOP_P = "top_p must be a positive number less than or equal to 1.0"
M_RP = "repetition_penalty must be a positive number no less than 1.0"
M_END = "expect end_strings to be a list of strings"
M_MIN = "min_tokens_to_generate must be an integer no less than 0"
M_LOGPROB = "compute_logprob must be a boolean value"
M_SEED = "random_seed must be a positive integer number or None"
M_TASK_IDS = ("Input at 'sentences' must by a tuple of two tensors like: (context_tokens_tensor, "
              "context_length_tensor) if task ids are given")


def ok(**extra):
    return {"sentences": ["Hello"], **extra}


def expect_error(payload, message, field=None, status=400, **kwargs):
    with pytest.raises(RequestError) as info:
        parse_request(payload, **kwargs)
    err = info.value
    assert err.message == message
    assert str(err) == message
    assert err.status == status
    if field is not None:
        assert err.field == field
    assert isinstance(err, ValueError)
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Constants and the dataclass


def test_api_allowed_keys_are_nemos_fifteen():
    assert API_ALLOWED_KEYS == NEMO_KEYS
    assert len(API_ALLOWED_KEYS) == 15


def test_server_defaults_are_nemos_with_repetition_penalty_one():
    assert dict(SERVER_DEFAULTS) == {
        "tokens_to_generate": 64,
        "all_probs": False,
        "temperature": 1.0,
        "add_BOS": False,
        "greedy": False,
        "top_k": 0,
        "top_p": 0.9,
        "repetition_penalty": 1.0,  # what NeMo's server actually applied, not the advertised 1.2
        "end_strings": ("<|endoftext|>",),
        "min_tokens_to_generate": 0,
        "compute_logprob": False,
        "random_seed": None,
    }
    with pytest.raises(TypeError):
        SERVER_DEFAULTS["top_p"] = 0.5  # read-only


def test_cli_defaults_are_nemos_inference_yaml():
    assert CLI_DEFAULTS["add_BOS"] is True
    assert CLI_DEFAULTS["tokens_to_generate"] == 30
    assert CLI_DEFAULTS["repetition_penalty"] == 1.2
    assert CLI_DEFAULTS["top_p"] == 0.9
    assert set(CLI_DEFAULTS) == set(SERVER_DEFAULTS)


def test_request_is_frozen_and_hashable():
    req = parse_request(ok())
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.top_k = 5
    assert hash(req) == hash(parse_request(ok()))
    assert req == parse_request(ok())
    assert len({req, parse_request(ok()), parse_request(ok(top_k=3))}) == 2
    assert isinstance(req.sentences, tuple) and isinstance(req.end_strings, tuple)
    assert [f.name for f in dataclasses.fields(GenerationRequest)] == [
        "sentences", "tokens_to_generate", "all_probs", "temperature", "add_BOS", "greedy", "top_k", "top_p",
        "repetition_penalty", "end_strings", "min_tokens_to_generate", "compute_logprob", "random_seed",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Valid requests


def test_minimal_payload_gets_server_defaults():
    req = parse_request({"sentences": ["Hello", "World"]})
    assert req == GenerationRequest(
        sentences=("Hello", "World"),
        tokens_to_generate=64,
        all_probs=False,
        temperature=1.0,
        add_BOS=False,
        greedy=False,
        top_k=0,
        top_p=0.9,
        repetition_penalty=1.0,
        end_strings=("<|endoftext|>",),
        min_tokens_to_generate=0,
        compute_logprob=False,
        random_seed=None,
    )


def test_card_payload_accepted_as_is():
    req = parse_request(json.loads(json.dumps(CARD_PAYLOAD)))
    assert req.sentences == ("Write a poem on NVIDIA in the style of Shakespeare",)
    assert req.tokens_to_generate == 1024
    assert req.temperature == 1.0
    assert req.add_BOS is False
    assert req.top_k == 0
    assert req.top_p == 1.0
    assert req.greedy is True
    assert req.all_probs is False
    assert req.repetition_penalty == 1.0
    assert req.min_tokens_to_generate == 1
    assert req.end_strings == ("<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User")
    assert req.compute_logprob is False and req.random_seed is None


def test_every_key_given_overrides_defaults():
    payload = {
        "sentences": ["a", "b"],
        "tokens_to_generate": 7,
        "all_probs": True,
        "temperature": 0.5,
        "add_BOS": True,
        "greedy": True,
        "top_k": 5,
        "top_p": 0.25,
        "repetition_penalty": 1.3,
        "end_strings": ["x"],
        "min_tokens_to_generate": 7,
        "compute_logprob": True,
        "random_seed": 1234,
    }
    req = parse_request(payload)
    assert to_json_dict(req) == payload


@pytest.mark.parametrize(
    "key, value, attr_value",
    [
        ("temperature", 100, 100.0),  # upper bound inclusive; an int is a number
        ("temperature", 1e-6, 1e-6),
        ("top_p", 0, 0.0),
        ("top_p", 1, 1.0),
        ("top_k", 0, 0),
        ("top_k", 50, 50),
        ("repetition_penalty", 1, 1.0),
        ("repetition_penalty", 10.5, 10.5),
        ("tokens_to_generate", 1, 1),
        ("random_seed", 0, 0),
        ("random_seed", 2**63 - 1, 2**63 - 1),
        ("random_seed", None, None),
        ("end_strings", [], ()),
    ],
)
def test_boundary_values_accepted(key, value, attr_value):
    req = parse_request(ok(**{key: value}))
    got = getattr(req, key)
    assert got == attr_value
    assert type(got) is type(attr_value)


def test_numbers_stored_as_float():
    req = parse_request(ok(temperature=2, top_p=1, repetition_penalty=2))
    assert type(req.temperature) is float and type(req.top_p) is float and type(req.repetition_penalty) is float


def test_empty_prompt_allowed_with_bos():
    assert parse_request(ok(sentences=[""], add_BOS=True)).sentences == ("",)


def test_128_sentences_accepted():
    assert len(parse_request({"sentences": ["x"] * 128}).sentences) == 128


def test_to_json_dict_round_trip_and_serialisable():
    req = parse_request(CARD_PAYLOAD)
    d = to_json_dict(req)
    assert json.loads(json.dumps(d)) == d
    assert parse_request(d) == req
    assert set(d) == API_ALLOWED_KEYS - {"task_ids", "neighbors"}
    assert d["end_strings"] == CARD_PAYLOAD["end_strings"] and isinstance(d["sentences"], list)


# ---------------------------------------------------------------------------------------------------------------------
# Invalid requests: status 400 and the exact message

NAN = float("nan")
INF = float("inf")

BAD_VALUES = [
    # tokens_to_generate
    ("tokens_to_generate", 0, M_TOKENS),
    ("tokens_to_generate", -5, M_TOKENS),
    ("tokens_to_generate", 5.0, M_TOKENS),
    ("tokens_to_generate", True, M_TOKENS),
    ("tokens_to_generate", "64", M_TOKENS),
    ("tokens_to_generate", None, M_TOKENS),
    # all_probs
    ("all_probs", 1, M_ALL_PROBS),
    ("all_probs", 0, M_ALL_PROBS),
    ("all_probs", "true", M_ALL_PROBS),
    ("all_probs", None, M_ALL_PROBS),
    # temperature
    ("temperature", 0, M_TEMPERATURE),
    ("temperature", 0.0, M_TEMPERATURE),
    ("temperature", -1.0, M_TEMPERATURE),
    ("temperature", 100.0001, M_TEMPERATURE),
    ("temperature", NAN, M_TEMPERATURE),
    ("temperature", INF, M_TEMPERATURE),
    ("temperature", True, M_TEMPERATURE),
    ("temperature", "1.0", M_TEMPERATURE),
    ("temperature", 10**400, M_TEMPERATURE),
    # add_BOS
    ("add_BOS", 1, M_ADD_BOS),
    ("add_BOS", "false", M_ADD_BOS),
    ("add_BOS", None, M_ADD_BOS),
    # greedy
    ("greedy", 0, M_GREEDY),
    ("greedy", 1.0, M_GREEDY),
    ("greedy", "yes", M_GREEDY),
    # top_k
    ("top_k", -1, M_TOP_K),
    ("top_k", 2.0, M_TOP_K),
    ("top_k", 0.5, M_TOP_K),
    ("top_k", True, M_TOP_K),
    ("top_k", False, M_TOP_K),
    ("top_k", NAN, M_TOP_K),
    ("top_k", "5", M_TOP_K),
    # top_p
    ("top_p", -0.1, M_TOP_P),
    ("top_p", 1.0001, M_TOP_P),
    ("top_p", 2, M_TOP_P),
    ("top_p", NAN, M_TOP_P),
    ("top_p", -INF, M_TOP_P),
    ("top_p", True, M_TOP_P),
    ("top_p", None, M_TOP_P),
    # repetition_penalty
    ("repetition_penalty", 0.99, M_RP),
    ("repetition_penalty", 0, M_RP),
    ("repetition_penalty", NAN, M_RP),
    ("repetition_penalty", INF, M_RP),
    ("repetition_penalty", 10**400, M_RP),
    ("repetition_penalty", True, M_RP),
    ("repetition_penalty", "1.2", M_RP),
    # end_strings
    ("end_strings", "<|endoftext|>", M_END),
    ("end_strings", ["a", 1], M_END),
    ("end_strings", [None], M_END),
    ("end_strings", None, M_END),
    ("end_strings", {"a": 1}, M_END),
    ("end_strings", ["a", ""], "end_strings[1] is an empty string; each end string must be non-empty"),
    # min_tokens_to_generate
    ("min_tokens_to_generate", -1, M_MIN),
    ("min_tokens_to_generate", 1.0, M_MIN),
    ("min_tokens_to_generate", True, M_MIN),
    ("min_tokens_to_generate", None, M_MIN),
    # compute_logprob
    ("compute_logprob", 1, M_LOGPROB),
    ("compute_logprob", "True", M_LOGPROB),
    ("compute_logprob", None, M_LOGPROB),
    # random_seed
    ("random_seed", -1, M_SEED),
    ("random_seed", 2**63, M_SEED),
    ("random_seed", 1.0, M_SEED),
    ("random_seed", True, M_SEED),
    ("random_seed", "42", M_SEED),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_bad_value_refused_with_exact_message(key, value, message):
    err = expect_error(ok(**{key: value}), message, field=key)
    assert key in err.message  # the message names the field


def test_every_validated_key_has_a_bad_value_case():
    covered = {key for key, _, _ in BAD_VALUES}
    assert covered == set(SERVER_DEFAULTS)


@pytest.mark.parametrize(
    "key, int_value, bool_value",
    [("tokens_to_generate", 5, True), ("top_k", 1, True), ("min_tokens_to_generate", 1, True),
     ("random_seed", 1, True)],
)
def test_bool_for_int_refused_but_int_accepted(key, int_value, bool_value):
    assert getattr(parse_request(ok(**{key: int_value})), key) == int_value
    with pytest.raises(RequestError) as info:
        parse_request(ok(**{key: bool_value}))
    assert info.value.status == 400 and info.value.field == key


@pytest.mark.parametrize("key", ["all_probs", "add_BOS", "greedy", "compute_logprob"])
def test_int_for_bool_refused_but_bool_accepted(key):
    extra = {"compute_logprob": True} if key == "all_probs" else {}
    assert getattr(parse_request(ok(**{key: True}, **extra)), key) is True
    for value in (1, 0):
        with pytest.raises(RequestError) as info:
            parse_request(ok(**{key: value}, **extra))
        assert info.value.status == 400 and info.value.field == key


# ---------------------------------------------------------------------------------------------------------------------
# Shape of the body, sentences, refused keys


@pytest.mark.parametrize("payload", [[], ["Hello"], "Hello", None, 5, True])
def test_body_must_be_object(payload):
    expect_error(payload, "request body must be a JSON object")


def test_unknown_key_named_and_allowed_listed():
    err = expect_error(ok(temprature=0.5), f"unknown request key: 'temprature'; allowed keys: {SERVED}")
    assert err.field == "temprature"


def test_unknown_keys_all_named():
    err = expect_error(ok(foo=1, bar=2), f"unknown request keys: 'bar', 'foo'; allowed keys: {SERVED}")
    assert "'foo'" in err.message and "'bar'" in err.message


def test_unknown_key_checked_before_other_errors():
    expect_error({"foo": 1}, f"unknown request key: 'foo'; allowed keys: {SERVED}")


@pytest.mark.parametrize(
    "payload, message",
    [
        ({}, "sentences is required: a list of prompt strings"),
        ({"tokens_to_generate": 5}, "sentences is required: a list of prompt strings"),
        ({"sentences": "Hello"}, "sentences must be a list of strings, got string"),
        ({"sentences": None}, "sentences must be a list of strings, got null"),
        ({"sentences": {"a": "b"}}, "sentences must be a list of strings, got object"),
        ({"sentences": []}, "sentences must not be empty"),
        ({"sentences": ["a", 5]}, "sentences[1] must be a string, got integer"),
        ({"sentences": ["a", "b", None]}, "sentences[2] must be a string, got null"),
        ({"sentences": [["a"]]}, "sentences[0] must be a string, got list"),
        ({"sentences": ["a", ""]}, "sentences[1] is an empty string: an empty prompt needs add_BOS=true"),
    ],
)
def test_sentences_rules(payload, message):
    expect_error(payload, message, field="sentences")


def test_129_sentences_refused_with_nemos_text():
    expect_error({"sentences": ["x"] * 129}, "Maximum number of sentences is 128", field="sentences")


def test_max_sentences_configurable():
    expect_error({"sentences": ["x"] * 5}, "Maximum number of sentences is 4", max_sentences=4)
    assert len(parse_request({"sentences": ["x"] * 4}, max_sentences=4).sentences) == 4
    assert len(parse_request({"sentences": ["x"] * 500}, max_sentences=None).sentences) == 500


@pytest.mark.parametrize("value", [[0], None, 0])
def test_task_ids_refused_with_nemos_text(value):
    expect_error(ok(task_ids=value), M_TASK_IDS, field="task_ids")
    assert "  " not in M_TASK_IDS


@pytest.mark.parametrize("value", [0, 2, None])
def test_neighbors_refused(value):
    err = expect_error(ok(neighbors=value), "neighbors is not supported: RETRO models are not served",
                       field="neighbors")
    assert "RETRO" in err.message


# ---------------------------------------------------------------------------------------------------------------------
# Cross-field rules


def test_all_probs_requires_compute_logprob():
    expect_error(ok(all_probs=True), "all_probs requires compute_logprob=True", field="all_probs")
    expect_error(ok(all_probs=True, compute_logprob=False), "all_probs requires compute_logprob=True")
    req = parse_request(ok(all_probs=True, compute_logprob=True))
    assert req.all_probs is True and req.compute_logprob is True


def test_min_tokens_not_above_tokens_to_generate():
    expect_error(
        ok(tokens_to_generate=5, min_tokens_to_generate=6),
        "min_tokens_to_generate (6) must not be greater than tokens_to_generate (5)",
        field="min_tokens_to_generate",
    )
    # against the default tokens_to_generate (64)
    expect_error(ok(min_tokens_to_generate=65),
                 "min_tokens_to_generate (65) must not be greater than tokens_to_generate (64)")
    assert parse_request(ok(min_tokens_to_generate=64)).min_tokens_to_generate == 64


def test_custom_defaults_used_and_checked():
    defaults = dict(SERVER_DEFAULTS, tokens_to_generate=8, top_p=1.0)
    req = parse_request(ok(), defaults=defaults)
    assert req.tokens_to_generate == 8 and req.top_p == 1.0
    with pytest.raises(TypeError):
        parse_request(ok(), defaults={"top_p": 1.0})
    with pytest.raises(RequestError) as info:
        parse_request(ok(), defaults=dict(SERVER_DEFAULTS, top_p=5.0))
    assert info.value.message == M_TOP_P


# ---------------------------------------------------------------------------------------------------------------------
# CLI path


def card_inference():
    inference = {k: v for k, v in CARD_PAYLOAD.items() if k != "sentences"}
    inference["compute_logprob"] = False
    inference["random_seed"] = None
    return inference


def test_cli_equals_server_for_same_values():
    inference = card_inference()
    cli = request_from_inference_config(inference, CARD_PAYLOAD["sentences"])
    server = parse_request({"sentences": CARD_PAYLOAD["sentences"], **inference})
    assert cli == server


def test_cli_nemo_yaml_inference_section():
    # NeMo's megatron_gpt_inference.yaml inference: section, plus the flag it reads with .get
    inference = {
        "greedy": False, "top_k": 0, "top_p": 0.9, "temperature": 1.0, "add_BOS": True, "tokens_to_generate": 30,
        "all_probs": False, "repetition_penalty": 1.2, "min_tokens_to_generate": 0, "compute_logprob": False,
        "end_strings": ["<|endoftext|>"], "use_flash_attention": True,
    }
    req = request_from_inference_config(inference, ["Q: How are you?", "Q: How big is the universe?"])
    assert req.sentences == ("Q: How are you?", "Q: How big is the universe?")
    assert req.add_BOS is True and req.tokens_to_generate == 30 and req.repetition_penalty == 1.2
    assert req.random_seed is None


def test_cli_missing_keys_use_cli_defaults():
    req = request_from_inference_config({}, ("a",))
    assert req.add_BOS is True and req.tokens_to_generate == 30 and req.repetition_penalty == 1.2
    assert req.sentences == ("a",)


def test_cli_ignored_keys_explicit():
    assert CLI_IGNORED_INFERENCE_KEYS == {"use_flash_attention"}
    assert CLI_INFERENCE_KEYS <= API_ALLOWED_KEYS
    assert "sentences" not in CLI_INFERENCE_KEYS


def test_cli_unknown_key_refused():
    with pytest.raises(RequestError) as info:
        request_from_inference_config({"temprature": 0.5}, ["a"])
    assert info.value.status == 400
    assert info.value.message.startswith("unknown inference key: inference.temprature; allowed keys: ")
    assert "use_flash_attention" in info.value.message and "top_p" in info.value.message


def test_cli_request_keys_not_in_cli_refused():
    with pytest.raises(RequestError) as info:
        request_from_inference_config({"sentences": ["a"]}, ["a"])
    assert "inference.sentences" in info.value.message


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_cli_refuses_same_bad_values(key, value, message):
    with pytest.raises(RequestError) as info:
        request_from_inference_config({key: value}, ["a"])
    assert info.value.message == message and info.value.status == 400 and info.value.field == key


def test_cli_cross_field_rules():
    with pytest.raises(RequestError) as info:
        request_from_inference_config({"all_probs": True}, ["a"])
    assert info.value.message == "all_probs requires compute_logprob=True"
    with pytest.raises(RequestError) as info:
        request_from_inference_config({"min_tokens_to_generate": 31}, ["a"])
    assert info.value.message == "min_tokens_to_generate (31) must not be greater than tokens_to_generate (30)"


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "prompts must not be empty"),
        ("Hello", "prompts must be a list of strings, got string"),
        (["a", 3], "prompts[1] must be a string, got integer"),
    ],
)
def test_cli_prompt_errors_name_prompts(prompts, message):
    with pytest.raises(RequestError) as info:
        request_from_inference_config({}, prompts)
    assert info.value.message == message


def test_cli_no_sentence_limit_by_default():
    assert len(request_from_inference_config({}, ["x"] * 300).sentences) == 300
    with pytest.raises(RequestError) as info:
        request_from_inference_config({}, ["x"] * 3, max_sentences=2)
    assert info.value.message == "Maximum number of sentences is 2"


def test_cli_accepts_omegaconf_containers():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"inference": {**card_inference(), "use_flash_attention": False},
                                      "prompts": ["p1", "p2"]})
    cli = request_from_inference_config(cfg.inference, cfg.prompts)
    assert cli == parse_request({"sentences": ["p1", "p2"], **card_inference()})
    assert cli.end_strings == tuple(CARD_PAYLOAD["end_strings"])


def test_cli_inference_must_be_mapping():
    with pytest.raises(RequestError) as info:
        request_from_inference_config(["greedy"], ["a"])
    assert info.value.status == 400 and "inference" in info.value.message


def test_nan_is_refused_even_though_comparisons_pass():
    # NaN compares False to every bound, so a naive `t <= 0 or t > 100` check lets it through
    assert not (NAN <= 0 or NAN > 100)
    for key in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(RequestError):
            parse_request(ok(**{key: NAN}))
    assert math.isnan(NAN)
