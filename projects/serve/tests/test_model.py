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


def test_pack_rows_fill_rows_first_fit_and_never_split_a_text():
    from projects.serve.model import pack_rows
    lens = [30, 5, 6, 5, 31, 7, 120, 40]
    rows = pack_rows(lens, row_tokens=64)
    assert sorted(i for r in rows for i in r) == list(range(len(lens)))     # every text exactly once
    assert [[lens[i] for i in r] for r in rows] == [[120], [40, 31, 30, 7, 6, 5], [5]]  # cap = longest
    lens = [30, 31, 9, 2]
    assert [[lens[i] for i in r] for r in pack_rows(lens, 64)] == [[31, 30, 2], [9]]
    assert pack_rows([], 64) == [] and pack_rows([3], 64) == [[0]]


def test_packed_texts_match_unpadded_and_count_tokens(embedder):
    # several texts share a row (block-diagonal mask, positions restarting per text), one row padded:
    # each vector must be what the text gives alone, in fp32 to float rounding
    texts = ["cat", "a much longer text about cats and dogs " * 5, "dog", "a text of medium length here",
             "birds", "the quick brown fox jumps over the lazy dog"]
    vecs, counts = embedder.encode_counted(texts)
    alone = np.stack([embedder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(vecs, alone, atol=2e-5)
    padded, padded_counts = embedder.encode_counted(texts, pack=False)   # one text per row, the bench's baseline
    np.testing.assert_allclose(padded, alone, atol=2e-5)
    assert padded_counts == counts
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
