"""`scripts/benchmark.py --fit`: the 340B TP8 x PP2 extrapolation fitted from two runs' JSON, through the real CLI."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "benchmark.py")


def run_json(path, tp, gpu="NVIDIA H200"):
    # costs made as bytes / tp + overhead: per layer 1.6 / tp + 0.08 ms, fixed 2.0 / tp + 0.1 ms
    result = {"tp": tp, "date": "2026-11-28", "env": {"gpu": gpu},
              "slope": {"per_layer_ms": 1.6 / tp + 0.08, "fixed_ms": 2.0 / tp + 0.1}}
    path.write_text(json.dumps(result))
    return str(path)


def fit(*paths):
    return subprocess.run([sys.executable, SCRIPT, "--fit", *paths], capture_output=True, text=True, timeout=120)


def test_fit_recovers_the_overheads_and_extrapolates(tmp_path):
    out = fit(run_json(tmp_path / "tp4.json", 4), run_json(tmp_path / "tp1.json", 1))
    assert out.returncode == 0, out.stderr
    assert "1.6000 / tp + 0.0800 -> TP8 1.6000 / 8 + 0.0800 = 0.2800 ms" in out.stdout
    assert "2.0000 / tp + 0.1000 -> TP8 2.0000 / 8 + 0.1000 = 0.3500 ms" in out.stdout
    # 96 x 0.28 + 0.35 + 0.05 (stage hop) = 27.28 ms
    assert "= 27.28 ms -> 36.7 tok/s" in out.stdout


def test_fit_refuses_runs_from_different_cards(tmp_path):
    out = fit(run_json(tmp_path / "a.json", 4), run_json(tmp_path / "b.json", 1, gpu="NVIDIA H100 80GB HBM3"))
    assert out.returncode != 0
    assert "same card" in out.stderr


def test_fit_names_a_file_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for second in (str(bad), str(tmp_path / "missing.json")):
        out = fit(run_json(tmp_path / "a.json", 4), second)
        assert out.returncode != 0
        assert "cannot read" in out.stderr and "Traceback" not in out.stderr
