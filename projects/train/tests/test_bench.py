"""The training bench's accounting: state bytes per rank against the ZeRO formulas (2 gloo processes, a small
model), FLOPs per image against an analytic count, the plan, the record's goals, the plots and bad flags.
The end-to-end smoke run of the bench (ResNet-50, both world sizes) is marked slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from projects.train import bench

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Runs under torchrun at world size 2: each strategy on a small model of 8 equal layers (so ZeRO-1's
# whole-parameter partition splits evenly), one step of SGD momentum and of AdamW, then
# bench_worker.state_bytes per rank.
STATE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from projects.train import parallelize
    from common.memory import tensor_bytes
    from projects.train.bench_worker import state_bytes

    dev = torch.device("cpu")
    parallelize.init_distributed(dev)
    out = {}
    for strategy, optimizer in [(s, o) for o in parallelize.OPTIMIZERS for s in parallelize.STRATEGIES]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])
        model = parallelize.parallelize(model, strategy, dev)
        opt = parallelize.build_optimizer(model, strategy, optimizer, 0.1, 0.9, 5e-4)
        loss = model(torch.randn(4, 64)).square().mean()
        in_step = tensor_bytes(model.parameters())  # after forward: zero2 holds them unsharded until backward
        loss.backward()
        opt.step()
        got = [None, None]
        dist.all_gather_object(got, {**state_bytes(model, opt), "in_step": in_step})
        out[f"{strategy} {optimizer}"] = got
    if dist.get_rank() == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.multiproc
def test_state_bytes_match_zero_formulas(tmp_path):
    script, out = tmp_path / "state.py", tmp_path / "state.json"
    script.write_text(STATE_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    psi = 8 * 64 * 64
    def held(m, strategy):  # zero2 keeps the gathered parameters through the step, as ZeRO-2's formula counts
        return (m["in_step"] if strategy == "zero2" else m["param_bytes"]) + m["grad_bytes"] + m["optim_bytes"]

    for key, ranks in got.items():
        strategy, optimizer = key.split()
        worst = max(held(m, strategy) for m in ranks)  # the fullest rank, as the bench reports it
        want = bench.zero_formula(strategy, 2, psi, optimizer)
        assert abs(worst / want - 1) <= 0.05, f"{key}: {worst} bytes vs formula {want}"
    ddp = max(held(m, "ddp") for m in got["ddp sgd"])
    assert max(held(m, "fsdp") for m in got["fsdp sgd"]) / ddp == pytest.approx(0.5, abs=1e-6)
    assert [m["in_step"] for m in got["zero2 sgd"]] == [4 * psi] * 2
    # ZeRO-1: params and grads whole, optimizer state split: SGD momentum keeps exactly one fp32 buffer per
    # parameter, AdamW two (plus a scalar step count per tensor)
    assert [m["optim_bytes"] for m in got["zero1 sgd"]] == [4 * psi // 2] * 2
    assert [m["optim_bytes"] // 100 for m in got["zero1 adamw"]] == [8 * psi // 2 // 100] * 2
    assert [m["grad_bytes"] for m in got["zero1 sgd"]] == [4 * psi] * 2
    ddp_adamw = max(held(m, "ddp") for m in got["ddp adamw"])
    assert max(held(m, "zero1") for m in got["zero1 adamw"]) / ddp_adamw == pytest.approx(0.75, abs=1e-3)
    # FSDP2 at rest: every tensor a 1/2 local shard
    for m in got["fsdp sgd"] + got["zero2 sgd"]:
        assert (m["param_bytes"], m["grad_bytes"], m["optim_bytes"]) == (2 * psi, 2 * psi, 2 * psi)


def test_zero_formula_ratios():
    # (P+G+K/N)/(P+G+K) with P=G=K=4 at N=2 is 10/12: ZeRO-1 cannot reach 0.75 with SGD momentum
    assert bench.zero_formula("zero1", 2, 1, "sgd") / bench.zero_formula("ddp", 2, 1, "sgd") == pytest.approx(10 / 12)
    assert bench.zero_formula("zero2", 2, 1, "sgd") / bench.zero_formula("ddp", 2, 1, "sgd") == pytest.approx(8 / 12)
    assert bench.zero_formula("fsdp", 4, 1, "sgd") / bench.zero_formula("ddp", 4, 1, "sgd") == pytest.approx(1 / 4)
    # AdamW's two moments (K=8): (4+4+8/2)/16 = 0.75 at N=2
    assert bench.zero_formula("zero1", 2, 1, "adamw") / bench.zero_formula("ddp", 2, 1, "adamw") == \
        pytest.approx(0.75)


def _analytic_forward_flops(model: nn.Module) -> int:
    """2 x MACs of every conv and linear, from their shapes (hooks record output sizes)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += 2 * out.numel() * k
        else:
            total += 2 * out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hs:
        h.remove()
    return total


def test_flops_per_image():
    from projects.train.model import resnet50_cifar

    torch.set_num_threads(1)
    f = bench.train_flops_per_image()
    assert f["forward"] == _analytic_forward_flops(resnet50_cifar(100))
    assert 2.55e9 < f["forward"] < 2.65e9  # the CIFAR stem: ~1.3 GMACs forward
    # backward = grad input + grad weight = 2 x forward, minus the first conv's grad input (its input is data)
    assert 2.9 < f["train"] / f["forward"] < 3.0
    assert f["params"] == sum(p.numel() for p in resnet50_cifar(100).parameters())


def test_plan_answers_every_goal():
    cfg = bench.default()
    p = bench.plan(cfg, "cpu", 0, bf16_fast=False, data_dir="/x")
    one, two = p[1], p[2]
    assert [r["kind"] for r in one[:2]] == ["baseline", "baseline"] and [r["threads"] for r in one[:2]] == [1, 2]
    assert all(r["precision"] == "fp32" and not r["compile"] for r in one + two)  # no bf16 hardware: fp32 only
    assert {r["strategy"] for r in two} == set(bench.STRATEGIES)
    adamw = [r for r in two if r.get("optimizer") == "adamw"]   # memory-only rows: nothing timed
    assert {r["strategy"] for r in adamw} == set(bench.STRATEGIES) and all(r["steps"] == 0 for r in adamw)
    assert any("nocomm" in r.get("variants", ()) and r["strategy"] == "ddp" for r in two)
    assert any("real" in r.get("variants", ()) for r in one)
    assert {r["strategy"] for r in one if r["kind"] == "strategy"} == set(bench.STRATEGIES)  # scaling refs
    fast = bench.plan(cfg, "cpu", 0, bf16_fast=True, data_dir="/x")[1]
    assert any(r["precision"] == "bf16" for r in fast)
    assert not any(r["compile"] for r in fast)          # inductor's CPU compile: --full only
    gpu = bench.plan(cfg, "cuda", 8, bf16_fast=True, data_dir="/x")
    assert sorted(gpu) == [1, 2, 4, 8] and gpu[8][0]["batch_size"] == 256
    assert any(r["precision"] == "bf16" and r["compile"] for r in gpu[1])


def _fake_result(name, world, strategy="ddp", kind="strategy", threads=1, variants=("sync",), step_s=4.0,
                 state=(100, 100, 100), ddp=None, nocomm_s=None, optimizer="sgd", steps=3):
    mem = {"param_bytes": state[0], "grad_bytes": state[1], "optim_bytes": state[2], "peak_bytes": 2**30,
           "rss_floor_bytes": 2**28, "param_bytes_in_step": state[0]}
    times = {v: [step_s] * steps for v in variants}
    if nocomm_s:
        times["nocomm"] = [nocomm_s] * 3
    run = {"name": name, "kind": kind, "strategy": strategy, "precision": "fp32", "channels_last": kind != "baseline",
           "compile": False, "threads": threads, "batch_size": 32, "variants": list(variants), "optimizer": optimizer,
           "ddp": ddp if ddp is not None else ({"static_graph": True} if strategy in ("ddp", "zero1") else {})}
    res = {"times": times, "first_step_s": step_s, "memory": mem, "profile": None}
    return {"run": run, "world": world, "device": "cpu", "device_name": None,
            "ranks": [{"rank": i, "result": res, "error": None} for i in range(world)]}


def _fake_results():
    return [
        _fake_result("baseline", 1, kind="baseline", step_s=4.0),
        _fake_result("baseline 2t", 1, kind="baseline", threads=2, step_s=1.6),
        _fake_result("ddp", 1, step_s=3.2),
        _fake_result("zero1", 1, "zero1", step_s=3.2),
        _fake_result("fsdp", 1, "fsdp", step_s=3.3),
        _fake_result("ddp", 2, variants=("sync", "nocomm"), step_s=3.5, nocomm_s=3.4, state=(400, 400, 400)),
        _fake_result("zero1", 2, "zero1", step_s=3.6, state=(400, 400, 200)),
        _fake_result("fsdp", 2, "fsdp", step_s=3.8, state=(200, 200, 200)),
        # memory-only AdamW rows (K = 8): nothing timed
        _fake_result("ddp adamw", 2, optimizer="adamw", steps=0, state=(400, 400, 800)),
        _fake_result("zero1 adamw", 2, "zero1", optimizer="adamw", steps=0, state=(400, 400, 400)),
        _fake_result("fsdp adamw", 2, "fsdp", optimizer="adamw", steps=0, state=(200, 200, 400)),
    ]


def test_record_goals_and_plots(tmp_path):
    flops = {"forward": 2.6e9, "train": 7.8e9, "params": 100.0}
    probe = {"bf16_fast": False, "sgemm_flops": 60e9, "bf16_gemm_flops": 1e9, "cpu_isa": ["avx2"]}
    cfg = bench.default()
    rows, goals, notes, extra = bench.analyze(_fake_results(), flops, probe, cfg, "cpu", fake_data=True)
    rec = bench.build_record(cfg, rows, goals, notes, extra, "cpu")
    assert rec["preset"] == "default"
    by = {g["name"]: g for g in rec["goals"]}
    assert {"ddp_scaling_efficiency", "best_speedup_vs_baseline", "fsdp_state_bytes_ratio",
            "zero1_state_bytes_ratio"} <= by.keys()
    assert by["ddp_scaling_efficiency"]["measured"] == pytest.approx(3.2 / 3.5)
    assert by["ddp_scaling_efficiency"]["met"]
    assert by["best_speedup_vs_baseline"]["measured"] == pytest.approx(4.0 / 3.2)  # ddp at ws1, per rank
    assert by["fsdp_state_bytes_ratio"]["measured"] == pytest.approx(0.5) and by["fsdp_state_bytes_ratio"]["met"]
    # ZeRO-1 against its bound: (4+4+4/2)/12 with SGD momentum, (4+4+8/2)/16 with AdamW
    assert by["zero1_state_bytes_ratio"]["measured"] == pytest.approx(1000 / 1200)
    assert by["zero1_state_bytes_ratio"]["met"] and "0.833" in by["zero1_state_bytes_ratio"]["note"]
    assert by["zero1_adamw_state_bytes_ratio"]["measured"] == pytest.approx(0.75)
    assert by["zero1_adamw_state_bytes_ratio"]["met"] and "K=8" in by["zero1_adamw_state_bytes_ratio"]["note"]
    assert by["zero_formula_max_error"]["measured"] == pytest.approx(0, abs=1e-9)
    assert "fsdp adamw" in by["zero_formula_max_error"]["note"]
    memory_only = [r for r in rows if r["optimizer"] == "adamw"]
    assert len(memory_only) == 3 and not any("images_per_s" in r for r in memory_only)
    ddp2 = next(r for r in rows if r["strategy"] == "ddp" and r["world"] == 2 and r["variant"] == "sync")
    assert ddp2["comm_share"] == pytest.approx(1 - 3.4 / 3.5)
    assert any("2 threads" in n and "beats" in n for n in notes)  # 32/1.6 > 64/3.5: said plainly
    for c in rec["columns"]:
        assert c in rec["units"]
    rec["provenance"]["machine"]["cpu_model"] = "test cpu"
    paths = bench.plot(rec, tmp_path)
    assert sorted(p.name for p in paths) == ["train_memory.png", "train_throughput.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize("argv, msg", [(["--nosuch"], "unrecognized arguments"),
                                       (["--full", "--preset", "smoke"], "contradicts"),
                                       (["--steps", "0"], ">= 1")])
def test_bad_flags_are_one_line_errors(argv, msg, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.multiproc
def test_smoke_run_writes_a_record(tmp_path):
    r = subprocess.run([sys.executable, "-m", "projects.train.bench", "--preset", "smoke", "--results-dir",
                        str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "train.json").read_text())
    assert rec["preset"] == "smoke"
    assert not [row for row in rec["rows"] if "error" in row]
    worlds = {(row["strategy"], row["world"], row["variant"]) for row in rec["rows"]}
    assert {("baseline", 1, "sync"), ("ddp", 1, "real"), ("ddp", 2, "nocomm"), ("fsdp", 2, "sync")} <= worlds
    fsdp = next(g for g in rec["goals"] if g["name"] == "fsdp_state_bytes_ratio")
    assert fsdp["measured"] == pytest.approx(0.5, abs=0.01)  # FSDP2 shards on dim 0 with padding
