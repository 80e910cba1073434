"""Graph decode under pipeline parallelism with real processes (torchrun, gloo): the stage protocol of
`DecodeGraphs.run` (hidden states received into the bucket's static input, sent from its static output) run
uncaptured (capture=False) equals `forward_logits`, and the engine on that path equals the eager engine.

The captured graphs themselves need a GPU; what differs there is only replay instead of a direct call.
"""
import glob
import json
import os

import pytest
import torch

from conftest import run_torchrun_worker

HERE = os.path.dirname(os.path.abspath(__file__))


def run_worker(tmp_path, tp, pp):
    out = str(tmp_path / f"graphs-tp{tp}pp{pp}")
    run_torchrun_worker("graphs_pp_worker.py", (tp, pp, out), tp * pp)
    ranks = []
    for path in sorted(glob.glob(out + ".rank*.json")):
        with open(path) as f:
            ranks.append(json.load(f))
    assert len(ranks) == tp * pp
    return sorted(ranks, key=lambda r: r["rank"])


def check_layout(ranks):
    for r in ranks:
        steps = r["steps"]
        assert steps["steps"] == 8
        # Slots 0..2 hold the same keys/values on every stage (each stage writes its own layers' cache).
        assert steps["cache_k"] <= 1e-5 and steps["cache_v"] <= 1e-5, (r["rank"], steps)
        assert steps["cache_slots"] == 4  # 3 rows + the padding slot (3)
        assert r["engine"]["graph_cache_slots"] == 9  # 3 + 2 rows together: 8 slots (a power of two) + padding
        if r["last_stage"]:
            assert steps["worst_logits"] <= 1e-5, f"rank {r['rank']}: graph-path logits off by {steps['worst_logits']}"
            assert steps["shapes"][0] == [3, 512] and steps["shapes"][5] == [1, 512]
        else:
            assert steps["none_off_last"], f"rank {r['rank']}: a non-last stage got logits"
    eng = ranks[0]["engine"]
    # eager vs graph, and each of them alone vs with the other request in the same batches
    for a, b in (("eager", "graph"), ("eager", "eager_together"), ("graph", "graph_together")):
        for x, y in zip(eng[a], eng[b]):
            assert x["token_ids"] == y["token_ids"], (a, b)
            for g, e in zip(x["logprob"] or [], y["logprob"] or []):  # rows differ in length
                torch.testing.assert_close(torch.tensor(g), torch.tensor(e), atol=1e-5, rtol=1e-5)
    assert eng["eager"][1]["logprob"] is not None  # the sampled request did carry log-probs to rank 0


def test_pp2_graph_protocol_equals_eager(tmp_path):
    check_layout(run_worker(tmp_path, 1, 2))


@pytest.mark.slow
def test_tp2_pp2_graph_protocol_equals_eager(tmp_path):
    check_layout(run_worker(tmp_path, 2, 2))
