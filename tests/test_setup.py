"""The README's promise: `make test` and `make bench` set up everything they need themselves. Checked on
make's dry run (the set-up steps are prerequisites, in order) and on scripts/setup.sh with stub system
tools (what it does as root and as a user, and that a second run does nothing)."""
import os
import shutil
import subprocess

import pytest

from common.env import SETUP_HINT, REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def dry_run(target: str) -> list[str]:
    """Every recipe line `make TARGET` would run on a fresh clone (-B: as if nothing were built yet)."""
    r = subprocess.run(["make", "-n", "-B", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def first(lines: list[str], needle: str) -> int:
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert hits, f"{needle!r} not in the dry run:\n" + "\n".join(lines)
    return hits[0]


@pytest.mark.parametrize("target, work", [("test", "-m pytest"), ("bench", "-m benchmarks.run all")])
def test_make_sets_up_before_it_runs(target, work):
    lines = dry_run(target)
    venv, install = first(lines, "-m venv .venv"), first(lines, "pip install -q -c constraints.txt")
    setup, run = first(lines, "bash scripts/setup.sh"), first(lines, work)
    assert venv < install < setup < run
    if target == "bench":   # the bench index is part of the bench's set-up
        assert "--bench-index" in lines[setup]


def test_ci_runs_the_readme_command_and_nothing_else():
    steps = [line.strip() for line in (REPO_ROOT / ".ci/run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    commands = [s for s in steps if not s.startswith(("set ", "cd ", "rc=", "if ", "fi", "echo ", "exit "))]
    assert commands == ["make test"], commands
    assert "make test" in (REPO_ROOT / "README.md").read_text()


@pytest.fixture
def stubs(tmp_path):
    """A PATH with stub dpkg-query / id / apt-get / service, a venv folder for the rebuild marker and a cache
    holding a stand-in GGUF (so nothing is ever downloaded)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    gguf = tmp_path / "cache" / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.touch()

    def make(name: str, body: str):
        (bin_ / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_ / name).chmod(0o755)

    def run(*, installed: bool, uid: int, rebuilt: bool = False) -> subprocess.CompletedProcess:
        make("dpkg-query", "printf 'install ok installed'" if installed else "exit 1")
        make("id", f"echo {uid}")
        make("apt-get", f"echo apt-get \"$@\" >> {tmp_path}/apt.log")
        make("service", "exit 0")  # never stop a real system service
        venv = tmp_path / "venv"
        venv.mkdir(exist_ok=True)
        if rebuilt:
            (venv / ".just-installed").touch()
        env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "VENV": str(venv),
               "MLSYS_CACHE": str(tmp_path / "cache")}
        return subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    return run


def test_setup_as_a_user_names_the_one_command_and_carries_on(stubs):
    r = stubs(installed=False, uid=1000)
    assert r.returncode == 0, r.stderr
    hint = [line for line in r.stderr.splitlines() if SETUP_HINT in line]
    assert len(hint) == 1 and "nginx" in hint[0], r.stderr
    assert "nothing to do" not in r.stdout     # something is missing: it must not claim otherwise


def test_setup_twice_does_nothing_the_second_time(stubs, tmp_path):
    r = stubs(installed=True, uid=0, rebuilt=True)
    assert r.returncode == 0 and "set-up: done (.venv)" in r.stdout, r.stdout + r.stderr
    r = stubs(installed=True, uid=0)
    assert r.stdout.strip().splitlines() == [
        "set-up: nothing to do (.venv, C++ kernels, Debian packages, SmolLM2 GGUF present)"], r.stdout + r.stderr
    assert not (tmp_path / "apt.log").exists()   # nothing installed when everything is there


def test_setup_as_root_installs_what_is_missing(stubs, tmp_path):
    r = stubs(installed=False, uid=0)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "apt.log").read_text()
    assert "update" in log and "install" in log and "nginx" in log and "wordnet-base" in log
    assert "set-up: done (Debian packages, SmolLM2 GGUF)" not in r.stdout   # the GGUF was there
    assert "set-up: done (Debian packages)" in r.stdout
