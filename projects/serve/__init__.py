"""Project 3: a FastAPI service for embeddings, FAISS search and streamed generation, with a hand-written
dynamic batcher, an LRU(+Redis) embedding cache, bounded queues and Prometheus metrics. See docs/serve.md."""
