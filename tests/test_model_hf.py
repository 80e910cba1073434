"""Our model against Hugging Face transformers' NemotronForCausalLM on the same random weights (fp32)."""
import pytest
import torch

from nemotron.config import ModelConfig
from nemotron.model import Batch, NemotronModel

from hf_reference import hf_model, random_mcore_state

SHAPES = {
    # GQA, kv_channels != hidden/heads (Minitron-style), partial rotary, padded vocab
    "gqa_minitron_style": ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                                      num_query_groups=2, kv_channels=32, padded_vocab_size=384,
                                      max_position_embeddings=128, rotary_percentage=0.5),
    # MHA, full rotary
    "mha_full_rotary": ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                                   num_query_groups=6, kv_channels=8, padded_vocab_size=256,
                                   max_position_embeddings=128, rotary_percentage=1.0, rotary_base=500.0),
    # single KV group (MQA), odd-ish sizes
    "mqa": ModelConfig(num_layers=2, hidden_size=40, ffn_hidden_size=72, num_attention_heads=5,
                       num_query_groups=1, kv_channels=12, padded_vocab_size=128,
                       max_position_embeddings=64, rotary_percentage=0.5),
}


def build_pair(cfg, seed=0):
    state = random_mcore_state(cfg, seed)
    ours = NemotronModel(cfg).eval()
    ours.load_state_dict(state)
    return ours, hf_model(cfg, state)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_hf(shape):
    cfg = SHAPES[shape]
    ours, ref = build_pair(cfg)
    ids = torch.randint(0, cfg.padded_vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours.logits(ours(ids))
        want = ref(ids).logits
    rel = (got - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_decode_matches_full_recompute(shape):
    """Prefill a prompt into the KV cache, then decode one token at a time: logits equal the no-cache forward."""
    cfg = SHAPES[shape]
    ours, _ = build_pair(cfg, seed=3)
    ids = torch.randint(0, cfg.padded_vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours.logits(ours(ids))
        cache = ours.new_cache(num_slots=4, max_seq=32)
        slots = torch.tensor([3, 1])
        pos = torch.arange(5).expand(2, 5)
        steps = [ours.logits(ours(ids[:, :5], Batch(pos, slots, kv_len=5, from_start=True), cache))]
        for t in range(5, 12):
            batch = Batch(torch.full((2, 1), t), slots, kv_len=t + 1, from_start=False)
            steps.append(ours.logits(ours(ids[:, t:t + 1], batch, cache)))
    stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
