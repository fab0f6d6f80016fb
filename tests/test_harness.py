"""The harness: timing helpers, memory, provenance, the record format and the bench runner's errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import record, report
from common import device, memory, provenance, timing
from common.env import REPO_ROOT


def test_percentile_hand_computed():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert timing.percentile(xs, 50) == 2.5
    assert timing.percentile(xs, 0) == 1.0 and timing.percentile(xs, 100) == 4.0
    assert timing.percentile(xs, 99) == pytest.approx(3.97)
    assert timing.percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy():
    xs = np.random.default_rng(0).lognormal(size=1001).tolist()
    for q in (1, 25, 50, 90, 99, 99.9):
        assert timing.percentile(xs, q) == pytest.approx(np.percentile(xs, q), rel=1e-12)


def test_percentile_errors():
    with pytest.raises(ValueError):
        timing.percentile([], 50)
    with pytest.raises(ValueError):
        timing.percentile([1.0], 101)


def test_timed_returns_the_median_and_the_last_output():
    calls = []
    t, out = timing.timed(lambda: calls.append(1) or len(calls), warmup=2, repeats=3)
    assert out == 5 and len(calls) == 5 and t >= 0
    with pytest.raises(ValueError):
        timing.timed(lambda: None, repeats=0)


def test_device_choice():
    cpu = torch.device("cpu")
    assert device.dist_backend(cpu) == "gloo"
    assert device.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert device.autocast_dtype(cpu, "fp32") is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        device.autocast_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        device.autocast_dtype(cpu, "int3")
    if not torch.cuda.is_available():
        assert device.get_device("auto").type == "cpu"


def test_peak_memory_sees_an_allocation():
    memory.reset_peak_memory("cpu")
    before = memory.peak_memory_bytes("cpu")
    x = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = memory.peak_memory_bytes("cpu")
    del x
    assert after - before >= 60 * 2**20
    assert memory.tensor_bytes([torch.zeros(10, dtype=torch.float32), None]) == 40


def test_provenance_is_true():
    p = provenance.provenance(["numpy"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout with commits")
    assert p["commit"] == head.stdout.strip()
    assert isinstance(p["dirty"], bool)
    assert p["torch"] == torch.__version__
    assert p["libs"]["numpy"] == np.__version__
    m = p["machine"]
    assert m["cpu_cores"] >= 1 and m["cpu_model"] and m["total_memory_bytes"] > 0
    assert m["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert "hostname" not in json.dumps(p).lower()
    import socket
    assert socket.gethostname() not in json.dumps(p)


def test_goal_met_and_record_roundtrip(tmp_path):
    assert record.goal("a", "x", 2.0, 1.5)["met"] is True
    assert record.goal("a", "x", 1.0, 1.5)["met"] is False
    assert record.goal("a", "x", 0.4, 0.5, "<=")["met"] is True
    assert record.goal("a", "x", None, 0.5)["met"] is False
    assert record.goal("a", "x", float("nan"), 0.5)["met"] is False
    with pytest.raises(ValueError, match="without a unit"):
        record.make_record("b", {}, [], [], units={}, columns=["tok_s"])
    rec = record.make_record("toy", {"n": 1}, [{"name": "a", "tok_s": 12.345}], [record.goal("g", "m", 3.0, 2.0)],
                             units={"name": "", "tok_s": "tokens/s"}, columns=["name", "tok_s"])
    path = record.write_record(rec, tmp_path)
    assert record.load_records(tmp_path)["toy"] == json.loads(path.read_text())
    table = report.render_table(rec)
    assert "| name | tok_s (tokens/s) |" in table and "| a | 12.3 |" in table
    commit = rec["provenance"]["commit"]
    assert commit is None or commit[:10] in table


def test_report_says_not_run_yet_instead_of_keeping_numbers():
    text = "x\n<!-- bench:nosuch -->\n| a | 1.23 |\n<!-- /bench -->\n"
    out = report.render_text(text, {})
    assert "1.23" not in out and "not run yet" in out


def test_fmt_is_stable():
    assert [report.fmt(v) for v in (1234.5, 123.4, 12.34, 1.234, 0.1234, 0.001234, 3, None, True)] == \
        ["1,234", "123", "12.3", "1.23", "0.123", "1.23e-03", "3", "—", "yes"]


def test_unknown_bench_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "nosuch"], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown bench 'nosuch'" in r.stderr and "Traceback" not in r.stderr


def test_dirty_means_source_changes_not_the_harness_outputs(tmp_path, monkeypatch):
    for f in ("src.py", "benchmarks/results/train.json", "docs/plot.png"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    assert provenance.git_info()["dirty"] is False
    (tmp_path / "benchmarks/results/train.json").write_text("1")   # the previous bench of one `make bench`
    (tmp_path / "docs/plot.png").write_text("1")
    assert provenance.git_info()["dirty"] is False
    (tmp_path / "src.py").write_text("1")
    assert provenance.git_info()["dirty"] is True
