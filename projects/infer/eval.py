"""Perplexity on WikiText-2 (raw, test split), for this model or any callable that returns logits.

    python -m projects.infer.eval --model stories260k [--max-length 512 --stride 256] [--max-tokens 0]

Data: online, `datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]` (4,358 lines,
blank lines as ""); offline (MLSYS_OFFLINE=1, or `datasets` missing / hub unreachable) the same lines from
`$MLSYS_ASSETS/text/wikitext-2-raw/wiki.test.raw.reconstructed`, the official 4,358-line layout with LF
endings (the plain `wiki.test.raw` there has CRLF endings and the blank lines dropped, which changes the
joined text, so it is not used). Either way the text is `"\\n\\n".join(lines)`, as in both protocols below.

Two protocols, both in nats over the tokens predicted:

1. `perplexity_sliding` -- Hugging Face's documented fixed-length protocol (docs "Perplexity of fixed-length
   models"): windows of `max_length` tokens starting every `stride` tokens; in each window only the tokens
   not scored by an earlier window are scored (the first window scores all but its first token), each with
   up to `max_length - 1` tokens of left context; the last window ends at the end of the text. No token is
   scored twice; with stride < max_length every token but the very first is scored, with stride ==
   max_length (non-overlapping windows that keep the tail) each window's first token has no context and is
   not scored, as in HF. (HF's snippet subtracts one token per window from its count for the label shift,
   which is right for non-overlapping windows but one too few for overlapping ones; we count exactly.)
   Token-level ppl = exp(total NLL / tokens scored); word-level ppl = exp(total NLL / words), words being
   the whitespace-separated words of the evaluated text (241,211 for the whole test split), so it does not
   depend on the tokenizer.
2. `perplexity_chunks` -- the GPTQ/AWQ papers' protocol: the token stream cut into non-overlapping chunks of
   `seqlen` tokens, the tail shorter than `seqlen` dropped, each chunk scored on its own (seqlen - 1 tokens
   each), ppl = exp(mean over chunks of the chunk's mean NLL), as in GPTQ's `llama_eval`.

`model_fn(ids (1, T)) -> logits (1, T, V)`; `logits_fn(model)` adapts our Transformer (no KV cache) or a
transformers model (`.logits`), so one code path scores both.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.env import assets_root, offline


def wikitext2_test_lines() -> list[str]:
    """The 4,358 lines of WikiText-2 raw test as the `datasets` loader gives them ("" for blank lines)."""
    if not offline():
        try:
            from datasets import load_dataset
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        except (ImportError, OSError, ConnectionError) as e:
            print(f"wikitext-2 from the hub unavailable ({type(e).__name__}); using the offline copy",
                  file=sys.stderr)
    path = assets_root() / "text" / "wikitext-2-raw" / "wiki.test.raw.reconstructed"
    if not path.is_file():
        raise ValueError(f"offline WikiText-2 not found at {path} (set MLSYS_ASSETS)")
    # the datasets loader keeps each line's "\n" and turns blank (" ") lines into ""
    return [ln if ln.strip() else "" for ln in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def wikitext2_test_text() -> str:
    return "\n\n".join(wikitext2_test_lines())


def logits_fn(model):
    """A callable ids (1, T) -> fp32 logits (1, T, V) for our Transformer or a transformers model."""
    def fn(ids):
        out = model(ids)
        return (out.logits if hasattr(out, "logits") else out).float()
    return fn


def _nll_sum(model_fn, ids: torch.Tensor, n_score: int) -> float:
    """Summed NLL of the last n_score tokens of ids (1, T), each predicted from the tokens before it."""
    logits = model_fn(ids)[0, -n_score - 1:-1]                                   # (n_score, V)
    return F.cross_entropy(logits.float(), ids[0, -n_score:], reduction="sum").item()


@torch.no_grad()
def perplexity_sliding(model_fn, ids: torch.Tensor, max_length: int, stride: int, n_words: int | None = None,
                       progress: bool = True) -> dict:
    """HF's sliding-window protocol over ids (N,) or (1, N). Returns ppl, word_ppl, nll, tokens, windows."""
    ids = ids.reshape(1, -1)
    N = ids.shape[1]
    if not 0 < stride <= max_length or N < 2:
        raise ValueError(f"need 0 < stride <= max_length and >= 2 tokens (stride={stride}, "
                         f"max_length={max_length}, tokens={N})")
    nll, scored, prev_end, windows = 0.0, 0, 0, 0
    starts = range(0, N, stride)
    for begin in tqdm(starts, desc="ppl sliding", disable=not progress, leave=False):
        end = min(begin + max_length, N)
        n_score = end - max(prev_end, begin + 1)        # new tokens; a window's first token has no context
        if n_score > 0:
            nll += _nll_sum(model_fn, ids[:, begin:end], n_score)
            scored += n_score
            windows += 1
        prev_end = end
        if end == N:
            break
    out = {"ppl": math.exp(nll / scored), "nll": nll, "tokens": scored, "windows": windows}
    out["word_ppl"] = math.exp(nll / n_words) if n_words else None
    return out


@torch.no_grad()
def perplexity_chunks(model_fn, ids: torch.Tensor, seqlen: int, progress: bool = True) -> dict:
    """GPTQ/AWQ protocol: non-overlapping chunks of seqlen tokens, tail dropped, mean of chunk means."""
    ids = ids.reshape(1, -1)
    n = ids.shape[1] // seqlen
    if n == 0 or seqlen < 2:
        raise ValueError(f"need at least one chunk of seqlen={seqlen} >= 2 tokens, have {ids.shape[1]}")
    means = []
    for i in tqdm(range(n), desc="ppl chunks", disable=not progress, leave=False):
        means.append(_nll_sum(model_fn, ids[:, i * seqlen:(i + 1) * seqlen], seqlen - 1) / (seqlen - 1))
    return {"ppl": math.exp(sum(means) / n), "chunks": n, "tokens": n * (seqlen - 1)}


def wikitext2_ids(tok, max_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """Token ids of the joined test text (optionally the first max_tokens) and the word count they cover."""
    text = wikitext2_test_text()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens and ids.numel() > max_tokens:
        ids = ids[:max_tokens]
        text = tok.decode(ids)
    return ids, len(text.split())


@dataclass
class EvalConfig:
    model: str = "stories260k"
    """stories260k, smollm2-135m, a HF folder or hub name"""
    max_length: int = 512
    """sliding window length (tokens)"""
    stride: int = 256
    """sliding window stride (tokens)"""
    max_tokens: int = 0
    """evaluate only the first N tokens (0 = all)"""
    device: str = "auto"
    """auto, cpu, cuda"""
    dtype: str = "fp32"
    """fp32 or bf16"""


def main(argv=None) -> int:
    from common.device import autocast_dtype, get_device
    from common import config
    from projects.infer.weights import load
    cfg = config.parse(EvalConfig, argv, prog="python -m projects.infer.eval", description=__doc__.splitlines()[0])
    try:
        device = get_device(cfg.device)
        model, tok = load(cfg.model, device, autocast_dtype(device, cfg.dtype) or torch.float32)
        max_length = min(cfg.max_length, model.args.max_seq_len)
        ids, words = wikitext2_ids(tok, cfg.max_tokens)
        fn = logits_fn(model)
        s = perplexity_sliding(fn, ids.to(device), max_length, min(cfg.stride, max_length), words)
        c = perplexity_chunks(fn, ids.to(device), max_length)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model} {cfg.dtype}: sliding(max_length={max_length}, stride={cfg.stride}) token ppl "
          f"{s['ppl']:.3f}, word ppl {s['word_ppl']:.3f} over {s['tokens']} tokens / {words} words; "
          f"chunks(seqlen={max_length}) ppl {c['ppl']:.3f} over {c['chunks']} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
