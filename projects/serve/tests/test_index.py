"""FAISS index: exact top-k against NumPy, persistence, manifest checks, ANN measurement, WordNet corpus."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.env import missing
from projects.serve.index import (IndexMismatch, SearchIndex, ann_benchmark, check_manifest, load_index,
                                  make_faiss_index, recall_at_k, save_index, wordnet_passages, WORDNET_DIR)


def unit(rng, n, d=384):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_is_numpy_brute_force():
    rng = np.random.default_rng(0)
    xb, xq = unit(rng, 500), unit(rng, 20)
    idx = SearchIndex(make_faiss_index(xb, "flat"), [str(i) for i in range(500)], ["s"] * 500, {})
    scores, ids = idx.search(xq, 10)
    sims = xq @ xb.T                                     # (20, 500)
    ref = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ref, 1), rtol=1e-5, atol=1e-5)


def test_saved_index_reloads_with_same_answers(tmp_path, small_index, embedder):
    q = embedder.encode(["a pet cat", "the moon", "coffee"])
    before = small_index.search(q, 5)
    save_index(small_index, tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"index.faiss", "docs.jsonl", "manifest.json"}
    loaded = load_index(tmp_path / "idx", embedder)
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded.texts == small_index.texts and loaded.manifest["count"] == len(small_index.texts)
    m = loaded.manifest
    assert m["dim"] == 384 and m["embedding_weights_sha256"] == embedder.weights_sha256 and m["files"]


def test_manifest_of_another_model_is_refused(tmp_path, small_index, embedder):
    save_index(small_index, tmp_path / "idx")
    mf = tmp_path / "idx" / "manifest.json"
    m = json.loads(mf.read_text())
    m["embedding_weights_sha256"] = "0" * 64
    m["embedding_version"] = "someone/else@000"
    mf.write_text(json.dumps(m))
    with pytest.raises(IndexMismatch, match="rebuild"):
        load_index(tmp_path / "idx", embedder)
    with pytest.raises(IndexMismatch):
        check_manifest({**m, "embedding_weights_sha256": embedder.weights_sha256, "dim": 768}, embedder)


def test_corrupt_or_missing_index_is_refused(tmp_path, small_index, embedder):
    save_index(small_index, tmp_path / "idx")
    with open(tmp_path / "idx" / "docs.jsonl", "a") as f:
        f.write('{"id": 999, "text": "x", "source": "y"}\n')
    with pytest.raises(IndexMismatch, match="sha256"):
        load_index(tmp_path / "idx", embedder)
    with pytest.raises(IndexMismatch, match="no index"):
        load_index(tmp_path / "nowhere", embedder)


def test_ann_benchmark_measures_recall_and_speed():
    rng = np.random.default_rng(1)
    xb, xq = unit(rng, 3000, 32), unit(rng, 100, 32)
    idx = SearchIndex(make_faiss_index(xb, "hnsw", hnsw_m=16, ef_construction=64, ef_search=16),
                      ["t"] * 3000, ["s"] * 3000, {"hnsw": {"efSearch": 16}})
    res = ann_benchmark(idx, xq, ef_search=[8, 256], n_single=20)
    low, high = res["ann"]
    assert 0 <= low["recall_at_10"] <= high["recall_at_10"] <= 1 and high["recall_at_10"] >= 0.95
    assert res["exact"]["qps_single"] > 0 and high["qps_single"] > 0
    assert res["ann_recall_at_10"] >= 0.95 and idx.index.hnsw.efSearch == 16  # restored
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]]), 3) == pytest.approx(2 / 3)


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").exists(), reason=missing("WordNet (wordnet-base)"))
def test_wordnet_corpus_has_100k_passages():
    p = wordnet_passages()
    glosses = sum(s.endswith(":gloss") for _, s in p)
    assert len(p) >= 100_000 and glosses > 100_000 and len(p) - glosses > 40_000
    assert all(t and "|" not in t for t, _ in p[:1000])
    assert p[0][0].startswith("entity: ")


def test_encode_corpus_with_several_encoders_keeps_input_order(embedder):
    from projects.serve.index import encode_corpus
    from projects.serve.tests.conftest import SENTENCES
    one = encode_corpus(embedder, SENTENCES, batch_size=8, progress=False)
    two = encode_corpus([embedder, embedder], SENTENCES, batch_size=8, progress=False)  # (batches interleave)
    assert (one * two).sum(1).min() >= 0.9999
    assert (one[:3] * embedder.encode(SENTENCES[:3])).sum(1).min() >= 0.9999   # row i is text i


def test_saving_over_a_served_index_never_leaves_no_index(tmp_path, small_index):
    """A replica (re)loading while the index is rebuilt finds the old index or the new one, never nothing:
    the new folder is swapped in with one atomic exchange, not two renames with a gap between them."""
    import threading
    from projects.serve.index import save_index
    out = tmp_path / "index"
    save_index(small_index, out)
    missing, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if not (out / "manifest.json").exists():
                missing.append(1)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            save_index(small_index, out)
    finally:
        stop.set()
        t.join()
    assert not missing, f"no index at {out} {len(missing)} times during 30 swaps"
    assert not list(tmp_path.glob(".index*"))            # nothing left beside it
