"""The peer exchange across real processes: TP ranks (torchrun, gloo) whose fused decode step pushes its row-parallel
parts into each other's shared (memory-mapped) buffers, each value with its flag, and waits until each other's words
arrived, with the kernels in Triton's interpreter. Its logits must equal `forward_logits` and the step with the TP
sums all-reduced through gloo.
The GPU path (symmetric memory over NVLink) is the same code; the TP benchmark checks it on H100s."""
import glob
import json
import os

import pytest

from conftest import run_torchrun_worker


def run(tmp_path, tp, pp):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed (pip install -e '.[test]' installs it on x86-64 Linux)")
    out = str(tmp_path / f"xch-{os.getpid()}-tp{tp}pp{pp}")
    run_torchrun_worker("exchange_ranks_worker.py", (tp, pp, out), tp * pp, timeout=400)
    ranks = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    assert len(ranks) == tp * pp
    return ranks


def check(ranks):
    for r in ranks:
        assert r["exchange_steps"] == 5, r  # every decode step went through the exchange ...
        assert r["epoch_after_all_reduce_path"] == 5, r  # ... and none of the all-reduce path's did
        last = 2 * r["layers"] - 1  # a step's sums are numbered 0 .. 2 x layers - 1; regions alternate
        assert r["flags"] == [5 * 1024 + last - 1, 5 * 1024 + last], r["flags"]  # the newest flag per region
        if r["last_stage"]:
            # <= 1e-5: within assert_close(atol=1e-5, rtol=1e-5) of forward_logits, as tests/test_graphs_pp.py
            assert r["worst_exchange"] <= 1e-5, f"exchange path off forward_logits by {r['worst_exchange']}"
            assert r["worst_all_reduce"] <= 1e-5, r
            assert r["exchange_vs_all_reduce"] <= 1e-5, r


def test_tp2_exchange_across_processes(tmp_path):
    check(run(tmp_path, 2, 1))


@pytest.mark.slow
def test_tp2_pp2_exchange_across_processes(tmp_path):
    """Each stage has its own TP group and exchange; the first stage's last sum is added up before the hop."""
    check(run(tmp_path, 2, 2))
