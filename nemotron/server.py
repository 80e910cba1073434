"""The HTTP server of ``python -m nemotron.eval server=True``: NeMo's ``PUT /generate``, served by waitress.

Routes (every answer is JSON, errors are ``{"message": "<text>"}``):

* ``PUT /generate``: a NeMo generation request (keys, defaults and messages: :mod:`nemotron.engine.request`);
  answers the engine's response dict: ``sentences, tokens, logprob, token_ids, offsets`` (+ ``full_logprob`` with
  ``all_probs``). Up to 128 sentences.
* ``GET /`` and ``PUT /``: 200 with a small description and the requests running and queued (the 340B card's start-up
  probe is ``curl -X PUT host:port``).
* ``GET /health``: 200 ``{"status": "ok"}`` once ``ready()`` says the model is loaded on every rank (and warmed up),
  503 before.
* ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible (non-streaming).
  :mod:`nemotron.openai_api` translates each request into a NeMo payload, which goes through ``parse_request`` and
  the coordinator like ``PUT /generate``, and translates the answer back. Same auth, readiness, body limit,
  Content-Type, errors and log line as ``PUT /generate``.

Statuses: 400 for a bad request (NeMo answered most of them with HTTP 200 and a bare string) or malformed JSON,
415 for a Content-Type other than ``application/json``, 413 for a body over ``max_body_bytes``, 401 when an API key
is configured and the request does not carry it (every route but ``/health``), 404 for unknown paths, 405 for other
methods (``OPTIONS`` included), 503 while not ready or shutting down, 500 when generation fails (the ranks stay in
step and the server keeps serving). No HTML page and no traceback ever reaches a client.

Requests arrive concurrently on waitress's worker threads; the coordinator runs them together, each joining the
engine's running batch at its next iteration (NeMo ran one at a time under a module-level lock), and each thread
gets its own answer.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Optional

import flask
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from nemotron import openai_api
from nemotron.engine.lockstep import GenerationError
from nemotron.engine.request import RequestError, parse_request

__all__ = ["create_app", "serve", "ROUTES"]

log = logging.getLogger("nemotron.server")

#: What ``GET /`` advertises, and what a 404 lists.
ROUTES = {"/generate": ["PUT"], "/": ["GET", "PUT"], "/health": ["GET"], "/v1/completions": ["POST"],
          "/v1/chat/completions": ["POST"], "/v1/models": ["GET"]}

_JSON = "application/json"
_STATE = "nemotron"  # key of our state in app.extensions


def _json_response(body: Any, status: int = 200, headers: Optional[dict] = None) -> flask.Response:
    # NeMo's jsonify wrote non-finite floats as NaN/Infinity (Python's json default); so do we.
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    response = flask.Response(text + "\n", status=status, mimetype=_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _error(message: str, status: int, headers: Optional[dict] = None) -> flask.Response:
    return _json_response({"message": message}, status, headers)


class _Refused(Exception):
    """A request refused before it is parsed (not ready, wrong Content-Type, bad JSON): ``message`` and ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def _check_api_key(api_key: str) -> bytes:
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("api_key must be a non-empty string")
    if not all(0x21 <= ord(c) <= 0x7E for c in api_key):
        # It has to travel in an HTTP header as "Bearer <key>": printable ASCII without spaces.
        raise ValueError("api_key must be printable ASCII without spaces")
    return hashlib.sha256(api_key.encode()).digest()


def _generated_tokens(coordinator: Any, req: Any, out: dict) -> Optional[int]:
    """New tokens in the response (all rows, EOS fill included), or None when we cannot tell."""
    tokenizer = getattr(getattr(coordinator, "engine", None), "tokenizer", None)
    try:
        ids = out["token_ids"]
        if tokenizer is None:
            return None
        prompt = sum(len(tokenizer.text_to_ids(s)) + (1 if req.add_BOS else 0) for s in req.sentences)
        return sum(len(row) for row in ids) - prompt
    except Exception:  # logging must never fail a request
        return None


def create_app(
    coordinator: Any,
    *,
    ready: Callable[[], bool] = lambda: True,
    api_key: Optional[str] = None,
    max_body_bytes: int = 1 << 20,
    log_prompts: bool = False,
    model_name: str = "",
) -> flask.Flask:
    """The Flask app serving ``coordinator`` (anything with ``generate(GenerationRequest) -> dict``).

    ``ready()`` gates ``/health``, ``/generate`` and the ``/v1`` routes (503 until it returns True). ``api_key``: when
    set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``. ``max_body_bytes``: larger bodies get
    413. ``log_prompts``: also log the prompt text (off by default: prompts may be private). ``model_name`` is shown by
    ``GET /`` and is the model of the OpenAI routes.
    """
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    key_digest = _check_api_key(api_key) if api_key is not None else None

    app = flask.Flask("nemotron.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.config["TRAP_HTTP_EXCEPTIONS"] = False
    state = {"draining": False}
    app.extensions[_STATE] = state

    def is_ready() -> bool:
        try:
            return bool(ready())
        except Exception:
            log.exception("ready() failed")
            return False

    # --- per-request bookkeeping, auth ------------------------------------------------------------------------

    @app.before_request
    def _start() -> Optional[flask.Response]:
        flask.g.started = time.perf_counter()
        flask.g.sentences = None
        flask.g.tokens = None
        flask.g.prompts = None
        if key_digest is None or flask.request.path == "/health":
            return None
        header = flask.request.headers.get("Authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="nemotron"'}
        if header is None:
            return _error("missing API key: send the header 'Authorization: Bearer <key>'", 401, challenge)
        scheme, _, given = header.strip().partition(" ")
        given = given.strip()
        # Compare fixed-length digests in constant time: neither the key nor its length leaks through timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(), key_digest):
            return _error("invalid API key: send the header 'Authorization: Bearer <key>'", 401, challenge)
        return None

    @app.after_request
    def _log(response: flask.Response) -> flask.Response:
        started = getattr(flask.g, "started", None)
        elapsed = time.perf_counter() - started if started is not None else 0.0
        sentences = getattr(flask.g, "sentences", None)
        tokens = getattr(flask.g, "tokens", None)
        line = "%s %s %s %d sentences=%s tokens=%s %.3fs"
        args = [flask.request.remote_addr or "-", flask.request.method, flask.request.path, response.status_code,
                "-" if sentences is None else sentences, "-" if tokens is None else tokens, elapsed]
        prompts = getattr(flask.g, "prompts", None)
        if log_prompts and prompts is not None:
            line += " prompts=%s"
            args.append(json.dumps(prompts, ensure_ascii=False))
        log.info(line, *args)
        return response

    # --- routes -----------------------------------------------------------------------------------------------

    def check_serving() -> None:
        if state["draining"]:
            raise _Refused("the server is shutting down", 503)
        if not is_ready():
            raise _Refused("the model is not loaded on all ranks yet (or is warming up); retry when GET /health "
                           "answers 200", 503)

    def json_body() -> Any:
        """The decoded JSON body of a generation request, once the server can serve it (else _Refused / 413)."""
        check_serving()
        request = flask.request
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise RequestEntityTooLarge()
        if request.mimetype != _JSON:
            got = request.headers.get("Content-Type")
            raise _Refused(f"Content-Type must be {_JSON} (got {got!r})" if got else
                           f"Content-Type must be {_JSON} (the request has no Content-Type header)", 415)
        body = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH, also for chunked bodies
        try:
            return json.loads(body.decode(request.mimetype_params.get("charset", "utf-8")))
        except (ValueError, LookupError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, charset
            raise _Refused(f"request body is not valid JSON: {exc}", 400) from None

    def generate() -> flask.Response:
        payload = json_body()
        if log_prompts and isinstance(payload, dict) and isinstance(payload.get("sentences"), list):
            flask.g.prompts = payload["sentences"]
        req = parse_request(payload)  # RequestError -> its status
        flask.g.sentences = len(req.sentences)
        out = coordinator.generate(req)  # RequestError (nothing ran) or GenerationError (ranks in step)
        flask.g.tokens = _generated_tokens(coordinator, req, out)
        return _json_response(out)

    # --- OpenAI-compatible routes: translated to a NeMo payload, validated by parse_request, run like /generate ----

    def engine_tokenizer() -> Any:
        tokenizer = getattr(getattr(coordinator, "engine", None), "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("the coordinator exposes no engine tokenizer; the OpenAI routes need it")
        return tokenizer

    def run_openai(translation: openai_api.Translation):
        tokenizer = engine_tokenizer()
        payload = translation.payload
        if log_prompts and isinstance(payload["sentences"], list):
            flask.g.prompts = payload["sentences"]
        req = parse_request(payload)  # RequestError -> its status, with NeMo's message
        flask.g.sentences = len(req.sentences)
        return req, coordinator.generate(req), tokenizer

    def log_usage(answer: dict) -> flask.Response:
        flask.g.tokens = answer["usage"]["completion_tokens"]
        return _json_response(answer)

    def completions() -> flask.Response:
        translation = openai_api.completion_request(json_body())
        req, out, tokenizer = run_openai(translation)
        return log_usage(openai_api.completion_response(req, out, tokenizer, model=model_name,
                                                        echo=translation.echo))

    def chat_completions() -> flask.Response:
        req, out, tokenizer = run_openai(openai_api.chat_request(json_body()))
        return log_usage(openai_api.chat_response(req, out, tokenizer, model=model_name))

    def models() -> flask.Response:
        check_serving()
        return _json_response(openai_api.models_response(model_name))

    def root() -> flask.Response:
        info = {"service": "nemotron", "model": model_name, "ready": is_ready(),
                "routes": {path: methods for path, methods in ROUTES.items()}}
        if hasattr(coordinator, "load"):  # requests running / waiting: for a balancer, and for the tests
            info["requests"] = coordinator.load()
        return _json_response(info)

    def health() -> flask.Response:
        if state["draining"]:
            return _json_response({"status": "shutting down"}, 503)
        if not is_ready():
            return _json_response({"status": "loading"}, 503)
        return _json_response({"status": "ok"})

    for path, view in (("/generate", generate), ("/", root), ("/health", health), ("/v1/completions", completions),
                       ("/v1/chat/completions", chat_completions), ("/v1/models", models)):
        # No automatic OPTIONS: every method not listed answers 405. HEAD comes with GET.
        app.add_url_rule(path, view.__name__, view, methods=ROUTES[path], provide_automatic_options=False)

    # --- errors: always JSON ----------------------------------------------------------------------------------

    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> flask.Response:
        return _error(exc.message, exc.status)

    @app.errorhandler(_Refused)
    def _refused(exc: _Refused) -> flask.Response:
        return _error(exc.message, exc.status)

    @app.errorhandler(GenerationError)
    def _generation_error(exc: GenerationError) -> flask.Response:
        log.error("generation failed: %s", exc)
        return _error(f"generation failed: {exc}", 500)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> flask.Response:
        return _error(f"request body too large: the limit is {max_body_bytes} bytes", 413)

    @app.errorhandler(MethodNotAllowed)
    def _method_not_allowed(exc: MethodNotAllowed) -> flask.Response:
        allowed = sorted(m for m in (exc.valid_methods or []) if m != "HEAD")
        return _error(f"method {flask.request.method} is not allowed on {flask.request.path}; use "
                      f"{', '.join(allowed)}", 405, {"Allow": ", ".join(allowed)})

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> flask.Response:
        if exc.code == 404:
            routes = "; ".join(f"{'/'.join(m)} {p}" for p, m in ROUTES.items())
            return _error(f"no route {flask.request.path}; routes: {routes}", 404)
        return _error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> flask.Response:
        log.exception("unexpected error on %s %s", flask.request.method, flask.request.path)
        return _error(f"internal server error ({type(exc).__name__}); see the server log", 500)

    return app


def serve(coordinator: Any, host: str = "0.0.0.0", port: int = 5555, *, threads: int = 8,
          drain_timeout_s: float = 30.0, stop: Optional[threading.Event] = None, **create_app_kwargs) -> None:
    """Serve ``coordinator`` under waitress on ``host:port`` until SIGTERM or SIGINT (or ``stop`` is set).

    On the signal the listening socket closes, requests in progress may finish (up to ``drain_timeout_s``; new ones
    on open connections get 503), and the function returns; the caller then shuts the coordinator down so worker
    ranks exit. A second signal is not caught (the default action: the process ends); an ignored signal stays
    ignored. Signal handlers are only installed from the main thread; elsewhere use ``stop``.
    ``create_app_kwargs`` go to :func:`create_app`.
    """
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer, create_server

    app = create_app(coordinator, **create_app_kwargs)
    max_body = create_app_kwargs.get("max_body_bytes", 1 << 20)
    socket_map: dict = {}  # our own asyncore map: every listening socket, connection and the trigger
    try:
        server = create_server(
            app, map=socket_map, host=host, port=port, threads=threads, ident="nemotron",
            # Bodies a little over the limit reach the app (413 as JSON); huge ones are refused by waitress before it
            # buffers them (413 as text).
            max_request_body_size=max(4 * max_body, max_body + (1 << 20)),
            clear_untrusted_proxy_headers=True, expose_tracebacks=False, asyncore_use_poll=True,
        )
    except OSError as exc:  # typically: the port is taken
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    stop = stop if stop is not None else threading.Event()
    previous = {}

    def on_signal(signum, _frame):
        log.info("received %s: shutting the server down", signal.Signals(signum).name)
        stop.set()
        for sig, handler in previous.items():  # a second signal ends the process the usual way
            signal.signal(sig, handler)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN:  # e.g. SIGINT of a background job: whoever started us wants it ignored
                continue
            previous[sig] = handler
            signal.signal(sig, on_signal)

    dispatcher = server.task_dispatcher
    listeners = [obj for obj in socket_map.values() if isinstance(obj, BaseWSGIServer)]
    where = ", ".join(f"http://{'[%s]' % h if ':' in str(h) else h}:{p}"
                      for h, p in ((obj.effective_host, obj.effective_port) for obj in listeners))
    log.info("serving PUT /generate on %s (waitress, %d threads)", where, threads)

    def poll(timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=socket_map, use_poll=True, count=1)

    try:
        while not stop.is_set():
            poll(0.2)
        # Drain: no new connections; finish what is running (and flush its answer), refuse new work.
        app.extensions[_STATE]["draining"] = True
        for listener in listeners:  # the listening sockets only; the trigger still wakes the loop
            wasyncore.dispatcher.close(listener)
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and (dispatcher.active_count or dispatcher.queue):
            poll(0.05)
        flush_until = time.monotonic() + 5.0
        while time.monotonic() < flush_until and any(  # send the last answers
                getattr(channel, "total_outbufs_len", 0) for channel in list(socket_map.values())):
            poll(0.05)
    finally:
        dispatcher.shutdown(cancel_pending=True, timeout=1)
        for channel in list(socket_map.values()):  # open connections and the trigger
            try:
                channel.close()
            except Exception:
                pass
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)
    log.info("server stopped")
