"""nginx in front of the replicas: its config rendered from nginx.conf.template for the replicas that are up,
checked with `nginx -t` before any reload."""
from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from projects.serve.cluster import ClusterConfig

TEMPLATE = Path(__file__).with_name("nginx.conf.template")


def render_nginx(cfg: ClusterConfig, run_dir: Path, servers: list[tuple[int, bool]]) -> str:
    """The nginx.conf for these replicas: [(port, up)]; replicas not up are listed `down` (nginx needs at
    least one server in an upstream, and keeping the list stable keeps least_conn's counters meaningful)."""
    if not servers:
        raise ValueError("nginx needs at least one replica in the upstream")
    lines = [f"        server 127.0.0.1:{port} max_fails={cfg.max_fails} fail_timeout={cfg.fail_timeout_s}s"
             + ("" if up else " down") + ";" for port, up in servers]
    values = {
        # started as root, the master (which opens the logs and the listening socket) hands the workers that
        # face clients to an unprivileged user; they write nothing to disk (see proxy_max_temp_file_size)
        "user_directive": worker_user_directive(),
        "worker_processes": str(cfg.worker_processes),
        "run_dir": str(run_dir),
        "host": cfg.host,
        "port": str(cfg.port),
        "upstream_servers": "\n".join(lines),
        "read_timeout_s": "60",
        "stream_read_timeout_s": "300",
        "next_upstream_tries": str(cfg.next_upstream_tries),
        "next_upstream_timeout_s": "30",
        # per client address, in a zone shared by nginx's workers (the zone is in the template)
        "inflight_limit": (f"limit_conn perclient {cfg.admitted(sum(up for _, up in servers))};"
                           if cfg.admitted(1) else "# no front-door limit (--max-inflight 0)"),
    }
    text = TEMPLATE.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in {TEMPLATE}: {text[text.index('{{'):][:40]}")
    return text


def worker_user_directive() -> str:
    """`user nobody <its group>;` when this process is root, else "" (workers stay the user who starts nginx)."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};"


def nginx_cmd(cfg: ClusterConfig, run_dir: Path, *extra: str) -> list[str]:
    return [cfg.nginx, "-p", str(run_dir), "-c", str(run_dir / "nginx.conf"), "-e",
            str(run_dir / "nginx-error.log"), *extra]


def nginx_test(cfg: ClusterConfig, run_dir: Path) -> None:
    """`nginx -t` on the rendered config; raises RuntimeError with nginx's own message."""
    r = subprocess.run(nginx_cmd(cfg, run_dir, "-t", "-q"), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nginx -t rejected {run_dir / 'nginx.conf'}: {r.stderr.strip()}")
