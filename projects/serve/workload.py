"""What the load generator sends: the request mix over real text (embeddings, search, completions) and the
generation mix of prompt and output lengths (GEN_MIX, like vLLM's benchmark_serving), each request drawn
from a seeded rng so the same seed sends the same requests. loadtest.py schedules and measures them.

The text pool: WordNet glosses and example sentences (Debian wordnet-base) or tiny-shakespeare lines
($MLSYS_ASSETS/text/tinyshakespeare.txt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.env import assets_root

ROUTES = ("embeddings", "search", "completions")


def parse_mix(mix: str) -> dict[str, float]:
    out = {}
    for part in mix.split(","):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in ROUTES:
            raise ValueError(f"--mix: unknown route {name!r} (choose from {', '.join(ROUTES)})")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--mix: weight of {name} is not a number: {w!r}") from None
    total = sum(out.values())
    if total <= 0 or any(v < 0 for v in out.values()):
        raise ValueError("--mix: weights must be >= 0 and not all 0")
    return {k: v / total for k, v in out.items()}


def load_texts(corpus: str, n: int, seed: int = 0) -> list[str]:
    """n real sentences, shuffled: WordNet passages or tiny-shakespeare lines."""
    if corpus == "wordnet":
        from projects.serve.index import wordnet_passages  # (parses /usr/share/wordnet; FileNotFoundError)
        texts = [t for t, _ in wordnet_passages()]
    elif corpus == "shakespeare":
        f = assets_root() / "text" / "tinyshakespeare.txt"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found (set MLSYS_ASSETS, or use --corpus wordnet)")
        texts = [ln.strip() for ln in f.read_text().splitlines() if len(ln.split()) >= 4]
    else:
        raise ValueError(f"--corpus must be wordnet or shakespeare, got {corpus!r}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))[:n]
    return [texts[i] for i in idx]


@dataclass
class Workload:
    """Draws (route, path, json body) for each request from a text pool; uniform or Zipf popularity."""
    texts: list[str]
    mix: dict[str, float]
    zipf: float = 0.0
    texts_per_request: int = 1
    top_k: int = 10
    max_tokens: int = 16
    stream: bool = True
    _p: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.texts:
            raise ValueError("the workload needs at least one text")
        if self.zipf > 0:  # P(rank k) ~ 1/k^s over the pool (any s > 0, unlike numpy's zipf which needs s > 1)
            w = 1.0 / np.arange(1, len(self.texts) + 1) ** self.zipf
            self._p = w / w.sum()

    def text(self, rng: np.random.Generator) -> str:
        return self.texts[int(rng.choice(len(self.texts), p=self._p))]

    def request(self, rng: np.random.Generator) -> tuple[str, str, dict]:
        routes = list(self.mix)
        route = routes[int(rng.choice(len(routes), p=[self.mix[r] for r in routes]))]
        if route == "embeddings":
            n = self.texts_per_request
            body = {"input": self.text(rng) if n == 1 else [self.text(rng) for _ in range(n)]}
        elif route == "search":
            body = {"query": self.text(rng), "top_k": self.top_k}
        else:  # a story-like prompt: the first words of a sentence
            body = {"prompt": " ".join(self.text(rng).split()[:8]), "max_tokens": self.max_tokens,
                    "temperature": 0.0, "stream": self.stream}
        return route, f"/v1/{route}", body


# The generation load's fixed mix, (weight, fewest prompt words, most prompt words, max_tokens): a chat
# question answered at length, a paragraph with a shorter answer, a passage summarized or classified in a
# few words. ~1.3 SmolLM2 tokens per WordNet word, so prompts of ~10-160 tokens, 45 output tokens on average:
# small enough that a level of the serving bench's default preset holds tens of requests on one core.
GEN_MIX = ((0.5, 8, 24, 64), (0.3, 24, 64, 32), (0.2, 64, 120, 16))


def words_from(texts: list[str], start: int, n: int) -> str:
    """The first `n` words of the pool's texts read in order from `start` (wrapping around)."""
    words: list[str] = []
    i = start
    while len(words) < n:
        words += texts[i % len(texts)].split()
        i += 1
        if i - start > len(texts) and not words:
            raise ValueError("the text pool has no words")
    return " ".join(words[:n])


def system_prompt(texts: list[str], n_words: int) -> str:
    """A shared system prompt of `n_words` words: an instruction, then reference passages from the pool."""
    head = "You are a helpful assistant. Answer from the reference passages below.\n\nReference:"
    return f"{head} {words_from(texts, 0, max(0, n_words - len(head.split())))}"


@dataclass
class GenWorkload:
    """Streamed greedy completions from a fixed mix (GEN_MIX): each request draws its class by weight, its
    prompt length uniformly in the class's word range and its prompt from consecutive pool texts at a random
    start, after `system` + a blank line when a shared system prompt is given. Everything comes from the
    rng: the same seed gives the same requests. `max_tokens` is a ceiling: greedy decoding can stop at the
    end-of-text token first, so output lengths are read from each stream's usage chunk."""
    texts: list[str]
    mix: tuple = GEN_MIX
    system: str = ""

    def __post_init__(self):
        if not self.texts:
            raise ValueError("the workload needs at least one text")
        w = np.array([c[0] for c in self.mix], float)
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError("the mix needs weights >= 0, not all 0")
        self._p = w / w.sum()

    def request(self, rng: np.random.Generator) -> tuple[str, str, dict]:
        _, lo, hi, max_tokens = self.mix[int(rng.choice(len(self.mix), p=self._p))]
        prompt = words_from(self.texts, int(rng.integers(len(self.texts))), int(rng.integers(lo, hi + 1)))
        if self.system:
            prompt = f"{self.system}\n\n{prompt}"
        return "completions", "/v1/completions", {
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}

    def expected(self) -> tuple[float, float]:
        """(mean prompt words, mean max_tokens) of the mix, system prompt excluded."""
        return (float(sum(p * (c[1] + c[2]) / 2 for p, c in zip(self._p, self.mix))),
                float(sum(p * c[3] for p, c in zip(self._p, self.mix))))
