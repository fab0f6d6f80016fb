"""API keys and per-key rate limits for the /v1/* routes.

    python -m projects.serve.auth --name alice >> keys.txt      # prints the key once on stderr
    SERVE_API_KEYS_FILE=keys.txt make serve                      # or SERVE_API_KEYS=key1,key2

Keys are off unless configured: with no keys every route is open (`make serve` binds to loopback and says
so). With keys, every /v1/* request needs `Authorization: Bearer <key>`; anything else is a 401 in OpenAI's
error shape, sent before the body is read. /healthz, /readyz and /metrics stay open: probes and scrapers
carry no keys (keep the port they are on off the public network; docs/serve.md).

The file holds `sha256:<hex of the key's SHA-256> [name]` lines, never keys; it is re-read when it changes,
so deleting a line revokes that key without a restart. A presented key is hashed and compared with every
stored hash by `hmac.compare_digest` (no early exit), and keys never reach a log: the request carries the
key's name (or a hash prefix) on from here.

Rate limits are token buckets per key and per replica (behind nginx with N replicas a key gets up to N
times the limit): `rate_limit_rpm` requests and `rate_limit_tpm` tokens (prompt + completion, charged when
a request ends, so one request may overdraw; the next waits) per minute. Over a limit: 429 + Retry-After.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, keys: str = "", path: str = "", reload_s: float = 1.0):
        self._inline = [(digest(k), f"env:{digest(k)[:8]}") for k in (x.strip() for x in keys.split(",")) if k]
        self.path = Path(path) if path else None
        self._file: list[tuple[str, str]] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._reload_s = reload_s
        self._lock = threading.Lock()
        if self.path is not None:
            self._load()   # a missing or malformed file stops the replica at start, not at the first request

    @property
    def enabled(self) -> bool:
        return bool(self._inline) or self.path is not None

    def __len__(self) -> int:
        return len(self._inline) + len(self._file)

    def _load(self) -> None:
        try:
            st = self.path.stat()
            lines = self.path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"API key file {self.path}: {e.strerror}") from None
        out = []
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            h, _, name = line.partition(" ")
            if not (h.startswith("sha256:") and len(h) == 71 and all(c in "0123456789abcdef" for c in h[7:])):
                raise ValueError(f"API key file {self.path}:{n}: expected `sha256:<64 hex digits> [name]`")
            out.append((h[7:], name.strip() or f"key:{h[7:15]}"))
        self._file, self._mtime = out, st.st_mtime_ns

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self._reload_s:
            return
        with self._lock:
            self._checked = now
            try:
                if self.path.stat().st_mtime_ns != self._mtime:
                    self._load()
            except (OSError, ValueError):
                self._file = []   # a broken or deleted file admits no file key (fail closed) until fixed

    def check(self, authorization: bytes | None) -> str | None:
        """The key's name for a valid `Bearer <key>` header, else None."""
        self._maybe_reload()
        if not authorization:
            return None
        scheme, _, key = authorization.decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > 256:
            return None
        h = digest(key).encode()
        found = None
        for stored, name in self._inline + self._file:   # every entry, no early exit
            if hmac.compare_digest(h, stored.encode()) and found is None:
                found = name
        return found


@dataclass
class Bucket:
    level: float
    t: float


class RateLimiter:
    """Token buckets per key: `rpm` requests and `tpm` tokens a minute (0 = no limit)."""

    def __init__(self, rpm: int = 0, tpm: int = 0):
        self.rpm, self.tpm = rpm, tpm
        self._req: dict[str, Bucket] = {}
        self._tok: dict[str, Bucket] = {}

    def _level(self, buckets: dict[str, Bucket], key: str, per_min: int, now: float) -> Bucket:
        b = buckets.setdefault(key, Bucket(per_min, now))
        b.level = min(per_min, b.level + (now - b.t) * per_min / 60)
        b.t = now
        return b

    def admit(self, key: str, now: float | None = None) -> float:
        """0 when the request may go ahead (and takes one request), else seconds until it may."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        if self.tpm:
            b = self._level(self._tok, key, self.tpm, now)
            if b.level <= 0:
                wait = (1 - b.level) * 60 / self.tpm
        if self.rpm:
            b = self._level(self._req, key, self.rpm, now)
            if b.level < 1:
                wait = max(wait, (1 - b.level) * 60 / self.rpm)
            elif wait == 0:
                b.level -= 1
        return wait

    def charge(self, key: str, tokens: int, now: float | None = None) -> None:
        if self.tpm and tokens:
            self._level(self._tok, key, self.tpm, time.monotonic() if now is None else now).level -= tokens


def retry_after(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


@dataclass
class NewKey:
    name: str = ""
    """a name for the key (logs and metrics show it instead of the key)"""


def main(argv: list[str] | None = None) -> int:
    """A fresh key on stderr (shown once), its `sha256:` line for the key file on stdout."""
    from common import config
    args = config.parse(NewKey, argv, prog="python -m projects.serve.auth",
                        description="Make an API key: the key on stderr, the key file's line on stdout.")
    if any(c.isspace() or c == "#" for c in args.name):
        print("error: --name must not contain spaces or #", file=sys.stderr)
        return 2
    key = "sk-" + secrets.token_urlsafe(32)
    print(f"new API key (shown once; the server stores only its hash): {key}", file=sys.stderr)
    print(f"sha256:{digest(key)} {args.name}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
