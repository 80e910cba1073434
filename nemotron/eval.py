"""`python -m nemotron.eval`: NeMo's megatron_gpt_eval.py command line (Hydra, same keys), on our engine.

Every rank loads its shard of the model. Rank 0 completes `prompts` and prints the responses between NeMo's star
lines; with `server=True` it then serves `PUT /generate` while every other rank follows its commands.

    python -m nemotron.eval                                   # the embedded demo model, on CPU or one GPU
    python -m nemotron.eval gpt_model_file=/model server=True port=1424 trainer.precision=bf16 \\
        tensor_model_parallel_size=8 pipeline_model_parallel_size=2 trainer.devices=8 trainer.num_nodes=2
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("nemotron")

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
STARS = "***************************"
#: `inference.*` keys of ours that configure the engine rather than the CLI's request
ENGINE_KEYS = ("max_batch_size", "prefill_chunk_tokens")


class UsageError(ValueError):
    """A configuration the CLI refuses; printed as one line."""


def check_supported(cfg: DictConfig) -> None:
    """Keys NeMo has that we accept but do not implement fail loudly instead of being ignored."""
    if cfg.get("checkpoint_dir") or cfg.get("checkpoint_name") or cfg.get("hparams_file"):
        raise UsageError("checkpoint_dir/checkpoint_name/hparams_file (PTL training checkpoints) are not supported; "
                         "pass gpt_model_file=<.nemo file, NeMo directory or Hugging Face directory>")
    if cfg.get("web_server"):
        raise UsageError("web_server=True (NeMo's Gradio UI) is not implemented; use server=True and PUT /generate")
    if cfg.get("chat"):
        raise UsageError("chat=True (NeMo's Gradio chat UI) is not implemented")
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel not in ("auto", "gpu", "cuda", "cpu"):
        raise UsageError(f"unsupported trainer.accelerator: {accel!r} (use auto, gpu or cpu)")
    if cfg.get("warm_up") not in (None, True, False):
        raise UsageError(f"warm_up must be true, false or null (null: when decode runs through CUDA graphs), "
                         f"got {cfg.warm_up!r}")
    for key, low in (("max_batch_size", 1), ("prefill_chunk_tokens", 0)):
        value = cfg.inference.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"inference.{key} must be an integer >= {low}, got {value!r}")


def load_prompts(cfg: DictConfig) -> list:
    prompts = list(cfg.get("prompts") or [])
    path = cfg.get("prompts_jsonl")
    if path:
        try:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    prompts.append(item["prompt"] if isinstance(item, dict) else item)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"prompts_jsonl {path}: cannot read prompts ({type(exc).__name__}: {exc})") from None
    return prompts


class _EarlyServer:
    """Rank 0's HTTP server, listening from the start: /health answers 503 until every rank has loaded its shard
    and the warm-up (if any) has run.

    The server runs in a thread. The main thread owns SIGTERM/SIGINT: a signal while loading exits at once (the
    other ranks notice rank 0 is gone); after that it drains the server, and the caller shuts the ranks down.
    """

    def __init__(self, cfg: DictConfig, model_name: str):
        import signal
        import threading

        from nemotron.server import serve
        self.coordinator = None
        self.stop = threading.Event()
        self.failed: list = []

        def run_server():
            try:
                serve(self, host=str(cfg.get("host", "0.0.0.0")), port=int(cfg.port),
                      threads=int(cfg.get("server_threads", 8)), stop=self.stop, ready=lambda: self.ready,
                      api_key=cfg.get("server_api_key") or os.environ.get("NEMOTRON_API_KEY") or None,
                      max_body_bytes=int(cfg.get("max_body_bytes", 1 << 20)),
                      log_prompts=bool(cfg.get("log_prompts", False)), model_name=model_name)
            except Exception as exc:  # e.g. the port is taken: the main thread reports it
                self.failed.append(exc)
            finally:
                self.stop.set()

        def on_signal(signum, _frame):
            if self.coordinator is None:
                print(f"[nemotron] {signal.Signals(signum).name} while loading: exiting", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            log.info("received %s: shutting the server down", signal.Signals(signum).name)
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, on_signal)
        self.thread = threading.Thread(target=run_server, name="http", daemon=True)
        self.thread.start()
        self.thread.join(timeout=1.0)  # a taken port fails within this: report it before a long load
        if self.failed:
            raise self.failed[0]

    @property
    def ready(self) -> bool:
        return self.coordinator is not None

    def __getattr__(self, name):  # the server sees the real coordinator once it is attached
        return getattr(self.coordinator, name)

    def generate(self, req):
        return self.coordinator.generate(req)

    def serve_until_stopped(self, coordinator) -> None:
        self.coordinator = coordinator
        # Wait in slices: Python runs signal handlers only in the main thread, when it executes bytecode. A SIGTERM
        # delivered to another thread (CUDA starts many) would never wake an untimed wait.
        while not self.stop.wait(0.5):
            pass
        self.thread.join()
        if self.failed:
            raise self.failed[0]


def control_timeout_s() -> float:
    """NEMOTRON_CONTROL_TIMEOUT_S (default 120): how long an idle follower waits on the gloo control group."""
    timeout = os.environ.get("NEMOTRON_CONTROL_TIMEOUT_S", "120")
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UsageError(f"NEMOTRON_CONTROL_TIMEOUT_S={timeout!r}: expected a positive number of seconds")
    return seconds


def check_environment() -> float:
    """The NEMOTRON_* switches, before anything is loaded: a typo is one line of error, not a traceback after
    minutes of loading. Returns the control timeout."""
    from nemotron.engine.engine import cuda_graphs_switch, overlap_switch
    from nemotron.engine.graphs import step_tune_mode
    from nemotron.engine.kernels import matmul_mode, pdl_mode
    from nemotron.parallel.peer_allreduce import peer_switches
    for check in (cuda_graphs_switch, overlap_switch, matmul_mode, pdl_mode, step_tune_mode, peer_switches):
        check()
    return control_timeout_s()


def run(cfg: DictConfig) -> int:
    import torch

    from nemotron.checkpoint.loader import load_model
    from nemotron.config import dtype_from_precision
    from nemotron.engine.engine import Engine
    from nemotron.engine.lockstep import Coordinator, follow
    from nemotron.engine.request import request_from_inference_config
    from nemotron.parallel.runtime import detect_launch, init_runtime

    check_supported(cfg)
    control_timeout = check_environment()
    tp = max(1, int(cfg.tensor_model_parallel_size))
    pp = max(1, int(cfg.pipeline_model_parallel_size))
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator={accel} but no CUDA device is available (use trainer.accelerator=cpu)")
    dtype = dtype_from_precision(cfg.trainer.precision)
    path = cfg.gpt_model_file or DEMO_MODEL
    web = None
    if cfg.server and detect_launch().rank == 0:
        web = _EarlyServer(cfg, os.path.basename(path.rstrip("/")))
    # Idle followers wait on the gloo control group with this timeout; rank 0's heartbeats (a quarter of it, at
    # most 5 s apart) keep the wait from ever expiring while the server has no traffic.
    runtime = init_runtime(tp, pp, int(cfg.trainer.devices), int(cfg.trainer.num_nodes), cpu=accel == "cpu",
                           control_timeout_s=control_timeout)
    ps = runtime.ps
    if ps.rank == 0 and int(cfg.get("pipeline_model_parallel_split_rank", -1)) >= 0:
        log.info("pipeline_model_parallel_split_rank=%s has no effect on decoder-only models",
                 cfg.pipeline_model_parallel_split_rank)

    if not cfg.gpt_model_file and ps.rank == 0:
        log.info("gpt_model_file not set: using the embedded demo model (%s)", path)
    started = time.perf_counter()
    loaded = load_model(path, ps, dtype=dtype, device=ps.device,
                        progress=ps.rank == 0 and bool(cfg.trainer.get("enable_progress_bar", True)))
    if ps.rank == 0:
        log.info("loaded %s (%s, %s) on %d rank(s) in %.1f s", path, loaded.format, str(dtype).replace("torch.", ""),
                 ps.world_size, time.perf_counter() - started)
    engine = Engine(loaded.model, loaded.tokenizer, max_slots=int(cfg.inference.get("max_batch_size", 128)),
                    prefill_chunk=int(cfg.inference.get("prefill_chunk_tokens", 512)))
    runtime.start_heartbeats()
    runtime.barrier()  # every rank has its shard: only now may rank 0 report healthy

    if ps.rank != 0:
        follow(engine, runtime.control)
        runtime.close()
        return 0

    coordinator = Coordinator(engine, runtime.control, heartbeat_s=min(5.0, control_timeout / 4))
    try:
        prompts = load_prompts(cfg)
        if prompts:
            inference = {k: v for k, v in OmegaConf.to_container(cfg.inference).items() if k not in ENGINE_KEYS}
            request = request_from_inference_config(inference, prompts)
            response = coordinator.generate(request)
            print(STARS)
            print(response)
            print(STARS, flush=True)
            if cfg.get("results_file"):
                with open(cfg.results_file, "w") as f:
                    json.dump([response], f, indent=1)
        elif not cfg.server:
            raise UsageError("Expected at least one prompt (set prompts=[...] or prompts_jsonl=...)")
        if web is not None:
            if web.failed:
                raise web.failed[0]
            wanted = cfg.get("warm_up")  # null: warm up where there is something to warm (CUDA graphs)
            if (engine.graphs is not None) if wanted is None else wanted:
                warm_up(coordinator, engine)
            web.serve_until_stopped(coordinator)
    finally:
        coordinator.shutdown()
        runtime.close()
    return 0


def warm_up(coordinator, engine) -> None:
    """Before /health says ok: one short request per decode batch bucket (`Engine.warm_up_requests`), so the first
    requests of each size do not wait for compiles, kernel timing and graph capture. A failed one (e.g. no memory
    for the largest batch) is logged, not fatal: the server still serves what fits."""
    from nemotron.engine.lockstep import GenerationError
    from nemotron.engine.request import RequestError
    started = time.perf_counter()
    requests = engine.warm_up_requests()
    for req in requests:
        try:
            coordinator.generate(req)
        except (GenerationError, RequestError) as exc:
            log.warning("warm-up with %d rows failed: %s", len(req.sentences), exc)
    log.info("warm-up: %d requests (%s rows) in %.1f s", len(requests),
             ", ".join(str(len(r.sentences)) for r in requests), time.perf_counter() - started)


def _expected_errors():
    from nemotron.checkpoint.shards import CheckpointError
    from nemotron.config import ConfigError
    from nemotron.engine.lockstep import GenerationError
    from nemotron.engine.request import RequestError
    from nemotron.parallel.state import ParallelConfigError
    from nemotron.tokenizer import TokenizerError
    return (UsageError, CheckpointError, ConfigError, GenerationError, RequestError, ParallelConfigError,
            TokenizerError, OSError)


def _quiet_dependencies() -> None:
    """Our log lines at INFO; megatron-core's and torch's chatter (and their warnings) only at WARNING."""
    import warnings
    for module in ("megatron", "torch", "lightning_fabric", "pytorch_lightning", "transformer_engine"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|TypedStorage).*")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[nemotron %(asctime)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger().setLevel(logging.WARNING)


@hydra.main(config_path="configs", config_name="megatron_gpt_inference", version_base=None)
def main(cfg: DictConfig) -> None:
    _quiet_dependencies()
    try:
        code = run(cfg)
    except _expected_errors() as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"error: {message}", file=sys.stderr, flush=True)
        code = 2
    sys.stdout.flush()
    # Worker threads (heartbeats, waitress) must not keep a finished process alive.
    os._exit(code)


if __name__ == "__main__":
    main()
