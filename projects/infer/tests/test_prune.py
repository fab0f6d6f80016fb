"""Pruning and distillation: an identity plan is the original model, one pruned head changes only its own
contribution, a resumed distillation repeats the uninterrupted loss curve, a pruned model round-trips through a
HF folder (ours and transformers read it), and the fused KL equals the plain formula with its gradient."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from common.env import assets_root
from projects.infer import prune as P
from projects.infer.distill import DistillConfig, DistillData, distill, kd_loss
from projects.infer.model import ModelArgs, Transformer
from projects.infer.weights import load, save_hf
from projects.infer.quantize import calibration_ids

STORIES = assets_root() / "lm" / "stories260K"


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K asset not found at {STORIES} (set MLSYS_ASSETS)")
    model, tok = load("stories260k")
    calib = calibration_ids(tok, 8, 128)
    return model, tok, calib, P.calibration_stats(model, calib)


def test_nothing_pruned_gives_the_original_logits(stories):
    model, _, calib, stats = stories
    ref = model(calib[:2])
    assert torch.allclose(P.prune(model, P.identity_plan(model.args))(calib[:2]), ref, atol=1e-5, rtol=0)
    for method in P.METHODS:   # full sizes from any scores keep everything, in order
        plan = P.plan_pruning(model.args, P.importance(model, stats, method))
        assert plan == P.identity_plan(model.args)
        assert torch.allclose(P.prune(model, plan)(calib[:2]), ref, atol=1e-5, rtol=0)


def _capture(model, layer=0):
    """Layer `layer`'s wqkv output (q|k|v), wo input (per-head attention outputs) and wo output."""
    got = {}
    att = model.layers[layer].attention
    hs = [att.wqkv.register_forward_hook(lambda m, a, y: got.__setitem__("qkv", y)),
          att.wo.register_forward_hook(lambda m, a, y: got.update(heads=a[0], out=y))]
    return got, hs


def _mha():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, vocab_size=64,
                              intermediate_size=48, max_seq_len=64)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m, torch.randint(0, 64, (2, 16))


@pytest.mark.parametrize("kind", ["gqa-kv-group", "mha-head"])
def test_pruning_one_head_changes_only_its_contribution(stories, kind):
    if kind == "gqa-kv-group":   # stories260K: 8 query heads over 4 KV heads; one KV head (and its 2 queries) goes
        model, _, calib, stats = stories
        x = calib[:2]
        scores = P.importance(model, stats, "activation")
    else:                        # plain multi-head attention: one head is one KV head
        model, x = _mha()
        scores = P.importance(model, None, "magnitude")
    a = model.args
    rep = a.n_heads // a.n_kv_heads
    plan = P.plan_pruning(a, scores, n_heads=a.n_heads - rep, n_kv_heads=a.n_kv_heads - 1)
    small = P.prune(model, plan)
    assert small.args == dataclasses.replace(a, n_heads=a.n_heads - rep, n_kv_heads=a.n_kv_heads - 1)
    (gone,) = set(range(a.n_kv_heads)) - set(plan.kv_groups[0])
    kept = plan.heads[0]
    assert kept == [h for h in range(a.n_heads) if h // rep != gone]

    got, hooks = _capture(model)
    new, hooks2 = _capture(small)
    with torch.no_grad():
        model(x), small(x)
    for h in hooks + hooks2:
        h.remove()
    hd, B, T = a.head_dim, *x.shape
    heads = got["heads"].view(B, T, a.n_heads, hd)
    # the other heads' attention outputs are unchanged, head for head
    assert torch.allclose(new["heads"].view(B, T, -1, hd), heads[:, :, kept], atol=1e-5, rtol=0)
    # K and V of the other groups are unchanged
    q, kv = a.n_heads * hd, a.n_kv_heads * hd
    for base, nbase in ((q, (a.n_heads - rep) * hd), (q + kv, (a.n_heads - rep) * hd + (a.n_kv_heads - 1) * hd)):
        old = got["qkv"][..., base:base + kv].view(B, T, a.n_kv_heads, hd)[:, :, plan.kv_groups[0]]
        assert torch.allclose(new["qkv"][..., nbase:nbase + (a.n_kv_heads - 1) * hd].view(B, T, -1, hd), old,
                              atol=1e-5, rtol=0)
    # the layer's attention output loses exactly the removed heads' share of wo
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in range(a.n_heads) if h not in kept])
    wo = model.layers[0].attention.wo.weight
    expect = got["out"] - got["heads"][..., cols] @ wo[:, cols].t()
    assert torch.allclose(new["out"], expect, atol=1e-5, rtol=1e-4)


def test_sizes_the_model_cannot_express_are_refused(stories):
    model, _, _, stats = stories
    s = P.importance(model, stats, "activation")
    with pytest.raises(ValueError, match="not expressible"):
        P.plan_pruning(model.args, s, n_heads=7)                 # 7 query heads over 4 KV groups
    plan = P.plan_pruning(model.args, s, **P.target_sizes(model.args, mlp_keep=0.5, drop_layers=2))
    assert (plan.args.intermediate_size, plan.args.n_layers) == (96, 3) and len(plan.layers) == 3


def test_pruned_model_saves_and_loads_as_a_hf_folder(stories, tmp_path):
    model, tok, calib, stats = stories
    plan = P.plan_pruning(model.args, P.importance(model, stats, "activation"),
                          **P.target_sizes(model.args, mlp_keep=0.75, dim_keep=0.75, n_heads=4, drop_layers=1,
                                           multiple=8))
    small = P.prune(model, plan)
    base = json.loads((STORIES / "config.json").read_text())
    save_hf(small, tmp_path / "pruned", base, tok, {"pruning.json": plan.to_json()})
    again, tok2 = load(str(tmp_path / "pruned"))
    assert again.args == small.args
    assert torch.equal(again(calib[:2]), small(calib[:2]))
    assert P.PrunePlan.from_json((tmp_path / "pruned" / "pruning.json").read_text()) == plan
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(calib[:2]).logits, small(calib[:2]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_kl_equals_the_plain_formula_and_its_gradient(T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 37, 300, generator=g, requires_grad=True)
    t = torch.randn(3, 37, 300, generator=g) * 2
    loss = kd_loss(s, t, T, chunk=16)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = F.kl_div(F.log_softmax(s.flatten(0, 1) / T, -1), F.log_softmax(t.flatten(0, 1) / T, -1),
                   log_target=True, reduction="batchmean") * T * T
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(grad, s.grad, atol=1e-8, rtol=1e-4)


def test_distillation_resumes_to_the_same_loss_curve(stories, tmp_path):
    model, tok, _, stats = stories
    plan = P.plan_pruning(model.args, P.importance(model, stats, "activation"),
                          **P.target_sizes(model.args, mlp_keep=0.5, multiple=8))
    data = DistillData(tok, "tinyshakespeare:1,wikitext2-valid:1", 64)
    cfg = DistillConfig(tokens=6 * 2 * 64, batch=2, seq_len=64, lr=1e-3, bf16="off", ckpt_every=2)
    whole = P.prune(model, plan)
    ref = distill(whole, model, data, cfg, tmp_path / "whole", progress=False)
    first = P.prune(model, plan)
    part = distill(first, model, data, cfg, tmp_path / "cut", stop_at=3, progress=False)   # "killed" after step 3
    assert len(part["losses"]) == 3
    resumed = P.prune(model, plan)                                                          # a new process's model
    rest = distill(resumed, model, data, cfg, tmp_path / "cut", progress=False)
    assert rest["resumed_from"] == 3 and len(rest["losses"]) == 6
    assert rest["losses"] == ref["losses"]
    for (n, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert ref["losses"][-1] < ref["losses"][0]
    with pytest.raises(ValueError, match="another run"):
        distill(P.prune(model, plan), model, data, dataclasses.replace(cfg, lr=2e-3), tmp_path / "cut", progress=False)
