import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, HERE)  # test helpers (hf_reference) import as plain modules
ROOT = os.path.dirname(HERE)


# The payload of the Nemotron-4-340B model card's client (call_server.py), as the card calls it.
CARD_PAYLOAD = {
    "sentences": ["Write a poem on NVIDIA in the style of Shakespeare"],
    "tokens_to_generate": 1024,
    "temperature": 1.0,
    "add_BOS": False,
    "top_k": 0,
    "top_p": 1.0,
    "greedy": True,
    "all_probs": False,
    "repetition_penalty": 1.0,
    "min_tokens_to_generate": 1,
    "end_strings": ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"],
}


def card_payload(prompt: str, tokens: int) -> dict:
    """The card's `get_generation(prompt, greedy=True, add_BOS=False, token_to_gen=tokens, min_tokens=1, temp=1.0,
    top_p=1.0, top_k=0, repetition=1.0)` request body."""
    return dict(CARD_PAYLOAD, sentences=[prompt], tokens_to_generate=int(tokens),
                end_strings=list(CARD_PAYLOAD["end_strings"]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun_worker(worker: str, args, nproc: int, timeout: float = 240) -> None:
    """tests/<worker> under torchrun with nproc real processes (gloo); on a timeout torchrun *and* its workers are
    killed. Fails the test with the end of stderr unless every rank exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           os.path.join(HERE, worker), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]


def run_in_triton_interpreter(code: str, marker: str, timeout: float = 300) -> None:
    """Python `code` in a subprocess with TRITON_INTERPRET=1 (Triton kernels run on CPU); it must print `marker`."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed (pip install -e '.[test]' installs it on x86-64 Linux)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert marker in proc.stdout, proc.stdout + proc.stderr[-4000:]


def tiny_config():
    from nemotron.config import from_nemo_config
    with open(os.path.join(FIXTURES, "tiny_tp1_torch_dist", "model_config.yaml")) as f:
        return from_nemo_config(yaml.safe_load(f), padded_vocab_size=512)


def tiny_reference_state():
    from safetensors.torch import load_file
    return load_file(os.path.join(FIXTURES, "tiny_reference.safetensors"))


def run_worker(main) -> None:
    """A torchrun worker's entry: run `main`, then leave as `python -m nemotron.eval` does, with os._exit rather
    than interpreter teardown, which destroys the process groups' gloo threads while a peer that already left
    closes its sockets (seen: "terminate called" on a rank)."""
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_model_on_ranks(tp: int, pp: int):
    """A torchrun worker's start on CPU: (runtime with gloo groups, this rank's shard of the tiny model filled with
    the reference weights, in eval mode)."""
    from nemotron.checkpoint.shards import fill_from_full_state
    from nemotron.model import NemotronModel
    from nemotron.parallel.runtime import init_runtime
    runtime = init_runtime(tp, pp, devices=tp * pp, num_nodes=1, cpu=True)
    model = NemotronModel(tiny_config(), runtime.ps).eval()
    fill_from_full_state(model, tiny_reference_state())
    return runtime, model


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_state():
    return tiny_reference_state()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nemotron.tokenizer import Tokenizer
    return Tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg, tiny_state):
    from nemotron.model import NemotronModel
    model = NemotronModel(tiny_cfg).eval()
    model.load_state_dict(tiny_state)
    return model
