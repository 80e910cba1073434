"""The model card's `call_server.py`, verbatim (extracted from the card at test time), against our server.

The card asks for 1024 new tokens on port 1424. The tiny fixture allows 256 positions, so the server here loads a
copy of it whose model_config.yaml allows 2048 (same weights; RoPE has no learned length).
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = os.path.join(ROOT, "..", "shared", "seed", "nemotron-4-340b-base-model-card.md")
CARD_PORT = 1424  # hard-coded in the card's client


def card_client_source():
    if not os.path.exists(CARD):
        pytest.skip(f"model card not found at {CARD}")
    with open(CARD) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks and "def get_generation" in blocks[0], "the card's call_server.py block was not found"
    return blocks[0]


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.slow
def test_card_call_server_py_works_as_written(tmp_path):
    source = card_client_source()
    if not port_free(CARD_PORT):
        pytest.skip(f"port {CARD_PORT} (the card's) is in use")
    model = tmp_path / "tiny_long"
    shutil.copytree(os.path.join(FIXTURES, "tiny_tp1_torch_dist"), model)
    cfg = yaml.safe_load((model / "model_config.yaml").read_text())
    cfg["max_position_embeddings"] = cfg["encoder_seq_length"] = 2048
    (model / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "call_server.py").write_text(source)

    server = subprocess.Popen([sys.executable, "-m", "nemotron.eval", f"gpt_model_file={model}", "server=True",
                               "host=127.0.0.1", f"port={CARD_PORT}", "trainer.precision=32", "prompts=[]"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{CARD_PORT}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        client = subprocess.run([sys.executable, str(tmp_path / "call_server.py")], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "NO_PROXY": "*"})
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert client.returncode == 0, client.stderr[-2000:]
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    out = client.stdout
    assert out.startswith(prompt + "\n"), out[:200]  # the card prints the prompt, then the response minus it
    assert len(out) > len(prompt) + 1
    assert server.returncode == 0
