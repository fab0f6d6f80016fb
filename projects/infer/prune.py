"""Structured pruning of the plain Llama model, from outside: fewer layers, KV groups, query heads, MLP channels
and hidden (embedding) channels, giving a smaller plain `Transformer` (smaller ModelArgs, real smaller matmuls).

    from projects.infer.prune import calibration_stats, importance, plan_pruning, prune, target_sizes
    stats = calibration_stats(model, calib_ids)                   # one pass with hooks (no weights changed)
    scores = importance(model, stats, "activation")               # or "magnitude", "wanda"
    plan = plan_pruning(model.args, scores, **target_sizes(model.args, mlp_keep=0.75, drop_layers=2))
    small = prune(model, plan)                                    # a plain Transformer, kept rows/columns copied
    save_hf(small, "out/", base_config, tok)                      # model.py: a HF folder; load("out/") reads it

Importance (Minitron, Muralidharan et al. 2024, scored on calibration activations, never on WikiText-2 test):
- query head h of a layer: mean |activation| of its attention output (the head's slice of wo's input);
  a KV group: the sum over the query heads that share it;
- MLP channel c: mean |silu(w1 x) * w3 x|_c (the SwiGLU product, w2's input);
- hidden channel j: mean |x_j| of every RMSNorm's output (attention_norm and ffn_norm of every layer and the
  final norm), summed: the residual stream is shared, so one set of channels is kept for the whole model;
- layer: `cosine` = 1 - mean cos(block input, block output) over tokens (how much the block changes the
  residual stream: ShortGPT's block influence; one pass), or `loss` = the calibration loss increase when the
  block is skipped (one pass per layer).
One-shot baselines without activations' magnitudes: `magnitude` (L2 norm of the weights a unit owns: a
channel's rows and columns, a head's q rows and wo columns, a layer's whole weight norm) and `wanda` (Sun et
al. 2023, weight x input-activation norm, |W_ij| * ||X_j||_2, summed over the weights a unit owns; layers by
the cosine score, as Wanda has no depth criterion).

Shapes the model can express (ModelArgs): every layer has the same n_heads, n_kv_heads, intermediate_size and
dim, and head_dim is fixed. So per layer the top-k units by score are kept with k the same in every layer;
GQA is pruned consistently: whole KV groups are kept or dropped (their k/v rows and all their query heads),
and within each kept group the same number of query heads (n_heads / n_kv_heads) is kept, group-major, so
query head i still reads KV group i // rep. The model code is untouched: `prune` builds a new Transformer and
copies the kept rows/columns into it (the RMSNorms then normalise over the kept hidden channels only).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from projects.infer.model import ModelArgs, Transformer, rope_inv_freq

METHODS = ("activation", "magnitude", "wanda")
LAYER_METRICS = ("cosine", "loss")


# ---------------------------------------------------------------- calibration statistics
@torch.no_grad()
def calibration_stats(model: Transformer, ids: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per-channel sums over calibration ids (n, T), fp32: `{i}.attn_in` / `{i}.mlp_in` (attention_norm /
    ffn_norm outputs, (dim,)), `{i}.wo_in` ((n_heads*head_dim,)), `{i}.w2_in` ((intermediate,)), `final`
    (the final norm's output); each as `..._abs` (sum |x|) and `..._sq` (sum x^2); `{i}.cos` the summed
    cosine between block input and output; `tokens` the count."""
    st: dict[str, torch.Tensor] = {}

    def add(key, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        for suffix, v in (("_abs", x.abs().sum(0)), ("_sq", x.pow(2).sum(0))):
            st[key + suffix] = st[key + suffix] + v if key + suffix in st else v

    hooks = []
    for i, blk in enumerate(model.layers):
        hooks += [blk.attention_norm.register_forward_hook(lambda m, a, y, i=i: add(f"{i}.attn_in", y)),
                  blk.ffn_norm.register_forward_hook(lambda m, a, y, i=i: add(f"{i}.mlp_in", y)),
                  blk.attention.wo.register_forward_pre_hook(lambda m, a, i=i: add(f"{i}.wo_in", a[0])),
                  blk.feed_forward.w2.register_forward_pre_hook(lambda m, a, i=i: add(f"{i}.w2_in", a[0]))]

        def cos(m, a, y, i=i):
            c = F.cosine_similarity(a[0].float(), y.float(), dim=-1).sum()
            st[f"{i}.cos"] = st.get(f"{i}.cos", 0) + c
        hooks.append(blk.register_forward_hook(cos))
    hooks.append(model.norm.register_forward_hook(lambda m, a, y: add("final", y)))
    try:
        for s in range(0, ids.shape[0], batch):
            model(ids[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    st["tokens"] = torch.tensor(float(ids.numel()))
    return st


@torch.no_grad()
def layer_skip_loss(model: Transformer, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(n_layers,) calibration next-token loss with each block skipped, minus the full model's."""
    def loss():
        tot = 0.0
        for s in range(0, ids.shape[0], batch):
            x = ids[s:s + batch]
            tot += F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        return tot
    layers = model.layers
    base = loss()
    out = []
    try:
        for i in range(len(layers)):
            model.layers = nn.ModuleList(b for j, b in enumerate(layers) if j != i)
            out.append(loss() - base)
    finally:
        model.layers = layers
    return torch.tensor(out) / (ids.shape[0] * (ids.shape[1] - 1))


# ---------------------------------------------------------------- importance scores
@dataclass
class Scores:
    heads: torch.Tensor    # (L, n_heads)
    mlp: torch.Tensor      # (L, intermediate_size)
    hidden: torch.Tensor   # (dim,)
    layers: torch.Tensor   # (L,) higher = more important


def _rows(idx, base: int, hd: int) -> torch.Tensor:
    """Row indices of heads `idx` (each hd rows) starting at row `base` of a fused projection."""
    return torch.cat([torch.arange(base + j * hd, base + (j + 1) * hd) for j in idx]) if len(idx) else \
        torch.empty(0, dtype=torch.long)


def importance(model: Transformer, stats: dict[str, torch.Tensor] | None, method: str = "activation",
               layer_scores: torch.Tensor | None = None) -> Scores:
    """Scores per head, MLP channel, hidden channel and layer (see the module doc). `layer_scores` overrides
    the layer ranking (e.g. layer_skip_loss); otherwise cosine from the stats (magnitude: weight norms)."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose {', '.join(METHODS)}")
    a = model.args
    L, nh, hd = a.n_layers, a.n_heads, a.head_dim
    n = float(stats["tokens"]) if stats is not None else 1.0
    if stats is None and method != "magnitude":
        raise ValueError(f"{method} importance needs calibration_stats")
    heads, mlp = torch.zeros(L, nh), torch.zeros(L, a.intermediate_size)
    hidden = torch.zeros(a.dim)
    layers = torch.zeros(L)
    for i, blk in enumerate(model.layers):
        wqkv, wo = blk.attention.wqkv.weight.detach().float(), blk.attention.wo.weight.detach().float()
        w1, w3, w2 = (blk.feed_forward.w1.weight.detach().float(), blk.feed_forward.w3.weight.detach().float(),
                      blk.feed_forward.w2.weight.detach().float())
        wq = wqkv[:nh * hd]
        if method == "activation":
            heads[i] = stats[f"{i}.wo_in_abs"].view(nh, hd).mean(1) / n
            mlp[i] = stats[f"{i}.w2_in_abs"] / n
            hidden += (stats[f"{i}.attn_in_abs"] + stats[f"{i}.mlp_in_abs"]) / n
        elif method == "magnitude":
            heads[i] = (wq.pow(2).view(nh, hd, -1).sum((1, 2)) + wo.pow(2).view(a.dim, nh, hd).sum((0, 2))).sqrt()
            mlp[i] = (w1.pow(2).sum(1) + w3.pow(2).sum(1) + w2.pow(2).sum(0)).sqrt()
            hidden += wqkv.pow(2).sum(0) + w1.pow(2).sum(0) + w3.pow(2).sum(0) + wo.pow(2).sum(1) + w2.pow(2).sum(1)
            layers[i] = sum(w.pow(2).sum() for w in (wqkv, wo, w1, w3, w2)).sqrt()
        else:  # wanda: |W_ij| * ||X_j||_2 summed over the weights a unit owns
            xa, xm = stats[f"{i}.attn_in_sq"].sqrt(), stats[f"{i}.mlp_in_sq"].sqrt()
            xo, x2 = stats[f"{i}.wo_in_sq"].sqrt(), stats[f"{i}.w2_in_sq"].sqrt()
            heads[i] = ((wq.abs() * xa).sum(1).view(nh, hd).sum(1) +
                        (wo.abs() * xo).sum(0).view(nh, hd).sum(1))
            mlp[i] = (w2.abs() * x2).sum(0) + ((w1.abs() + w3.abs()) * xm).sum(1)
            hidden += ((wqkv.abs() * xa).sum(0) + ((w1.abs() + w3.abs()) * xm).sum(0) +
                       (wo.abs() * xo).sum(1) + (w2.abs() * x2).sum(1))
        if method != "magnitude":
            layers[i] = 1 - stats[f"{i}.cos"] / n          # block influence: how much the block moves x
    if method == "activation":
        hidden += stats["final_abs"] / n
    elif method == "magnitude":
        hidden = (hidden + model.tok_embeddings.weight.detach().float().pow(2).sum(0)).sqrt()
    if layer_scores is not None:
        layers = layer_scores.float()
    return Scores(heads, mlp, hidden, layers)


# ---------------------------------------------------------------- the plan: which units stay
@dataclass
class PrunePlan:
    args: ModelArgs                 # the pruned model's sizes
    layers: list[int]               # kept layers (original indices, in order)
    hidden: list[int]               # kept hidden channels (sorted)
    kv_groups: list[list[int]]      # per kept layer: kept KV groups (sorted)
    heads: list[list[int]]          # per kept layer: kept query heads, group-major (rep per kept group)
    mlp: list[list[int]]            # per kept layer: kept MLP channels (sorted)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "args": dataclasses.asdict(self.args)})

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        d = json.loads(text)
        return cls(**{**d, "args": ModelArgs(**d["args"])})


def _round(x: float, multiple: int, hi: int) -> int:
    return min(hi, max(multiple, int(round(x / multiple)) * multiple))


def target_sizes(args: ModelArgs, mlp_keep: float = 1.0, dim_keep: float = 1.0, n_heads: int = 0,
                 n_kv_heads: int = 0, drop_layers: int = 0, multiple: int = 32) -> dict[str, int]:
    """Sizes for plan_pruning from keep ratios: widths rounded to `multiple` (the block formats' 32-column
    blocks and the int4 kernels' tiles); heads 0 = keep."""
    ffn = args.intermediate_size if mlp_keep >= 1 else _round(args.intermediate_size * mlp_keep, multiple,
                                                               args.intermediate_size)
    dim = args.dim if dim_keep >= 1 else _round(args.dim * dim_keep, multiple, args.dim)
    return {"dim": dim, "intermediate_size": ffn, "n_heads": n_heads or args.n_heads,
            "n_kv_heads": n_kv_heads or args.n_kv_heads, "n_layers": args.n_layers - drop_layers}


def plan_pruning(args: ModelArgs, scores: Scores, dim: int | None = None, intermediate_size: int | None = None,
                 n_heads: int | None = None, n_kv_heads: int | None = None, n_layers: int | None = None) -> PrunePlan:
    """Keep the top-scoring units to the given sizes (None = keep all of that kind)."""
    dim, ffn = dim or args.dim, intermediate_size or args.intermediate_size
    nh, nkv, nl = n_heads or args.n_heads, n_kv_heads or args.n_kv_heads, n_layers or args.n_layers
    rep0 = args.n_heads // args.n_kv_heads
    if not (0 < nkv <= args.n_kv_heads and nh % nkv == 0 and 0 < nh // nkv <= rep0):
        raise ValueError(f"n_heads={nh}, n_kv_heads={nkv} is not expressible from {args.n_heads}/{args.n_kv_heads}: "
                         f"KV groups are kept whole, with the same number (<= {rep0}) of query heads each")
    if not (0 < dim <= args.dim and 0 < ffn <= args.intermediate_size and 0 < nl <= args.n_layers):
        raise ValueError(f"sizes dim={dim}, intermediate_size={ffn}, n_layers={nl} must be in (0, original]")
    rep = nh // nkv

    def top(x: torch.Tensor, k: int) -> list[int]:
        # stable: ties keep the lower index, so a plan that keeps everything is the identity
        return sorted(torch.argsort(-x, stable=True)[:k].tolist())

    layers = top(scores.layers, nl)
    kv, heads, mlp = [], [], []
    for i in layers:
        h = scores.heads[i]
        groups = top(h.view(args.n_kv_heads, rep0).sum(1), nkv)
        kv.append(groups)
        heads.append([g * rep0 + j for g in groups for j in top(h[g * rep0:(g + 1) * rep0], rep)])
        mlp.append(top(scores.mlp[i], ffn))
    new = dataclasses.replace(args, dim=dim, n_layers=nl, n_heads=nh, n_kv_heads=nkv, intermediate_size=ffn)
    return PrunePlan(new, layers, top(scores.hidden, dim), kv, heads, mlp)


@torch.no_grad()
def prune(model: Transformer, plan: PrunePlan) -> Transformer:
    """A new plain Transformer of plan.args with the kept rows/columns copied (same dtype and device)."""
    a, hd = model.args, model.args.head_dim
    w = model.norm.weight
    hid = torch.tensor(plan.hidden, device=w.device)
    sd = {"tok_embeddings.weight": model.tok_embeddings.weight[:, hid], "norm.weight": model.norm.weight[hid]}
    if not a.tie_embeddings:
        sd["output.weight"] = model.output.weight[:, hid]
    for new_i, (i, kv, heads, ch) in enumerate(zip(plan.layers, plan.kv_groups, plan.heads, plan.mlp)):
        blk, p = model.layers[i], f"layers.{new_i}."
        q = _rows(heads, 0, hd)
        qkv = torch.cat([q, _rows(kv, a.n_heads * hd, hd), _rows(kv, (a.n_heads + a.n_kv_heads) * hd, hd)])
        ch = torch.tensor(ch)
        sd[p + "attention.wqkv.weight"] = blk.attention.wqkv.weight[qkv.to(w.device)][:, hid]
        sd[p + "attention.wo.weight"] = blk.attention.wo.weight[hid][:, q.to(w.device)]
        sd[p + "feed_forward.w1.weight"] = blk.feed_forward.w1.weight[ch.to(w.device)][:, hid]
        sd[p + "feed_forward.w3.weight"] = blk.feed_forward.w3.weight[ch.to(w.device)][:, hid]
        sd[p + "feed_forward.w2.weight"] = blk.feed_forward.w2.weight[hid][:, ch.to(w.device)]
        sd[p + "attention_norm.weight"] = blk.attention_norm.weight[hid]
        sd[p + "ffn_norm.weight"] = blk.ffn_norm.weight[hid]
    with torch.device("meta"):
        small = Transformer(plan.args)
    small.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False, assign=True)
    if plan.args.tie_embeddings:
        small.output.weight = small.tok_embeddings.weight
    missing = [n for n, t in small.named_parameters() if t.is_meta]
    if missing:
        raise ValueError(f"pruned model lacks {missing[:3]}")
    small.inv_freq = rope_inv_freq(plan.args).to(w.device)
    return small.eval()


def identity_plan(args: ModelArgs) -> PrunePlan:
    """The plan that keeps everything (prune(model, identity_plan(args)) computes what model computes)."""
    L = args.n_layers
    return PrunePlan(args, list(range(L)), list(range(args.dim)), [list(range(args.n_kv_heads))] * L,
                     [list(range(args.n_heads))] * L, [list(range(args.intermediate_size))] * L)


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters: per block (linears + norms), embedding (and untied head), total."""
    a = args
    block = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim \
        + 3 * a.dim * a.intermediate_size + 2 * a.dim
    emb = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    return {"non_embedding": a.n_layers * block + a.dim, "embedding": emb,
            "total": a.n_layers * block + a.dim + emb}
