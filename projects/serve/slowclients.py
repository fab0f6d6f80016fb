"""Slow clients: connections that trickle a request body a byte at a time (a slowloris on the body), the load
bench_hardening runs beside normal clients to show that they cost only their own share, and are cut.

    python -m projects.serve.slowclients --url http://127.0.0.1:8000 --connections 200 --seconds 30

Each connection sends a POST's headers (a Content-Length it never reaches) and then one byte every
1 / rate_bps seconds: never a stalled read, so a read timeout (uvicorn's, nginx's client_body_timeout) never
fires. When the server answers or closes, the connection is counted and a new one takes its place at the next
tick, so `connections` stay open as an attacker would keep them. The summary (JSON on stdout, or --out) gives
what the server did with them: answers by status, seconds from connect to answer, and how many were held past
`held_limit_s` with no answer.
"""
from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlparse

from common import config
from common.files import write_atomic
from common.timing import percentile


@dataclass
class SlowConfig:
    url: str = "http://127.0.0.1:8000"
    """the service (nginx's front door, or a replica)"""
    connections: int = 200
    """connections kept open, each trickling a body"""
    rate_bps: float = 1.0
    """bytes per second each connection sends"""
    seconds: float = 30.0
    """how long to keep them up"""
    source: str = "127.0.0.2"
    """local address they connect from: a client address of their own (nginx's front door counts per
    address); any 127.x address works on loopback"""
    path: str = "/v1/embeddings"
    """the route the bodies are posted to"""
    content_length: int = 4096
    """the Content-Length announced (at rate_bps it is never reached within a server's body deadline)"""
    held_limit_s: float = 15.0
    """a connection open this long with no answer counts as held (the summary's `held_past_limit`)"""
    out: str = ""
    """write the summary JSON here (default: stdout)"""


async def run(cfg: SlowConfig) -> dict:
    u = urlparse(cfg.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    head = (f"POST {cfg.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {cfg.content_length}\r\n\r\n{{").encode()
    period = 1.0 / cfg.rate_bps
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + cfg.seconds
    status: Counter = Counter()
    answer_s: dict[str, list[float]] = {}
    close_s: list[float] = []        # from the answer to the server closing the connection
    open_at_end: list[float] = []    # ages of the connections still unanswered at the end
    errors: Counter = Counter()
    not_closed = [0]                 # answered, but still open at the end

    async def one(i: int) -> None:
        await asyncio.sleep(i * period / cfg.connections)   # spread the first connects over one period
        while loop.time() < end:
            opened = loop.time()
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(cfg.source, 0))
            except OSError as e:
                errors[type(e).__name__] += 1
                await asyncio.sleep(period)
                continue
            read = asyncio.ensure_future(reader.read(65536))
            try:
                writer.write(head)
                data = None
                while loop.time() < end:
                    done, _ = await asyncio.wait({read}, timeout=period)
                    if done:
                        data = read.result()
                        break
                    writer.write(b"a")
                if data is None:
                    open_at_end.append(loop.time() - opened)
                    continue
                got = loop.time()
                code = data[9:12].decode() if data.startswith(b"HTTP/1.") else "closed"
                status[code] += 1
                answer_s.setdefault(code, []).append(got - opened)
                if code != "closed":   # after an answer the server should close: how soon
                    try:
                        await asyncio.wait_for(reader.read(), timeout=max(0.1, end - loop.time()))
                        close_s.append(loop.time() - got)
                    except asyncio.TimeoutError:
                        not_closed[0] += 1
            except OSError as e:
                errors[type(e).__name__] += 1
            finally:
                read.cancel()
                writer.close()
            await asyncio.sleep(max(0.0, opened + period - loop.time()))   # at most one connect per tick

    await asyncio.gather(*(one(i) for i in range(cfg.connections)))
    pct = lambda xs, q: percentile(xs, q) if xs else None  # noqa: E731
    return {"connections": cfg.connections, "rate_bps": cfg.rate_bps, "seconds": cfg.seconds, "path": cfg.path,
            "source": cfg.source, "answered": dict(status), "errors": dict(errors),
            "answer_s": {k: {"n": len(v), "p50": pct(v, 50), "max": max(v)} for k, v in answer_s.items()},
            "closed_after_answer_s": {"n": len(close_s), "p50": pct(close_s, 50),
                                      "max": max(close_s) if close_s else None},
            "answered_not_closed": not_closed[0],
            "open_at_end": len(open_at_end),
            "held_past_limit": sum(a > cfg.held_limit_s for a in open_at_end)
            + sum(x > cfg.held_limit_s for v in answer_s.values() for x in v),
            "held_limit_s": cfg.held_limit_s}


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(SlowConfig, argv, prog="python -m projects.serve.slowclients",
                       description=__doc__.splitlines()[0])
    summary = json.dumps(asyncio.run(run(cfg)), indent=1)
    if cfg.out:
        write_atomic(cfg.out, summary)
    else:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
