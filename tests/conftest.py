import os
import sys

import pytest
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, HERE)  # test helpers (hf_reference) import as plain modules


def tiny_config():
    from nemotron.config import from_nemo_config
    with open(os.path.join(FIXTURES, "tiny_tp1_torch_dist", "model_config.yaml")) as f:
        return from_nemo_config(yaml.safe_load(f), padded_vocab_size=512)


def tiny_reference_state():
    from safetensors.torch import load_file
    return load_file(os.path.join(FIXTURES, "tiny_reference.safetensors"))


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
