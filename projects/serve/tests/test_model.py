"""The plain-transformers MiniLM (mean pooling + L2 norm) against sentence-transformers on the same folder."""
from __future__ import annotations

import numpy as np
import pytest

from projects.serve.tests.conftest import SENTENCES


@pytest.mark.slow
def test_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    ref = st.SentenceTransformer(str(embedder.dir), device="cpu").encode(SENTENCES[:20], normalize_embeddings=True)
    ours = embedder.encode(SENTENCES[:20])
    assert ours.shape == (20, 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batched_equals_alone(embedder):
    texts = SENTENCES[:8] + ["a much longer text " * 40]
    batched = embedder.encode(texts)
    alone = np.stack([embedder.encode([t])[0] for t in texts])
    assert (batched * alone).sum(1).min() >= 0.9999


def test_version_names_model_and_weights(embedder):
    assert embedder.version.startswith("sentence-transformers/all-MiniLM-L6-v2@")
    assert len(embedder.weights_sha256) == 64


def test_length_buckets_cut_where_padding_costs_more_than_a_forward():
    from projects.serve.model import length_buckets
    lens = [30, 5, 6, 5, 31, 7, 120]
    runs = length_buckets(lens, forward_cost=8)
    assert sorted(i for r in runs for i in r) == list(range(len(lens)))   # every text exactly once
    assert [[lens[i] for i in r] for r in runs] == [[5, 5, 6, 7], [30, 31], [120]]
    assert length_buckets([], 8) == [] and length_buckets([9] * 5, 0) == [[0, 1, 2, 3, 4]]


def test_mixed_lengths_match_unpadded_and_count_tokens(embedder):
    texts = ["cat", "a much longer text about cats and dogs " * 5, "dog", "a text of medium length here"]
    vecs, counts = embedder.encode_counted(texts)
    alone = np.stack([embedder.encode([t])[0] for t in texts])
    assert (vecs * alone).sum(1).min() >= 0.9999
    assert counts == [len(x) for x in embedder.tokenizer(texts)["input_ids"]]


def test_worker_process_embeds_the_same_and_reports_its_death(embedder):
    import os
    import signal

    from projects.serve.model import EmbedderProcess, WorkerDied
    proc = EmbedderProcess(offline=True)
    try:
        assert proc.pid != os.getpid() and proc.version == embedder.version and proc.dim == embedder.dim
        texts = SENTENCES[:5] + ["a much longer text " * 30]
        (vecs, counts), (ref, ref_counts) = proc.encode_counted(texts), embedder.encode_counted(texts)
        assert counts == ref_counts and (vecs * ref).sum(1).min() >= 0.9999
        assert proc.count_tokens_many(texts[:2]) == ref_counts[:2]
        os.kill(proc.pid, signal.SIGKILL)
        proc._proc.join(10)
        with pytest.raises(WorkerDied, match="exited"):
            proc.encode(["after the kill"])
    finally:
        proc.close()


def test_worker_process_load_error_is_raised_in_the_parent():
    from projects.serve.model import EmbedderProcess
    with pytest.raises(ValueError, match="offline mode only has"):
        EmbedderProcess("someone/another-model", offline=True)
