"""common.config: flags from a typed dataclass (docstrings as help), presets with explicit flags winning,
one-line errors, the child's argv and the environment round trip."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Literal

import pytest

from common import config, env


@dataclass
class Demo:
    steps: int = 10
    """optimizer steps (50% more on CUDA)"""
    lr: float = 0.1
    """peak learning rate"""
    mode: Literal["fast", "exact"] = "fast"
    """how to run"""
    compile: bool = False
    """torch.compile the step"""
    name: str = "run"
    """what to call it"""
    preset: Literal["default", "full"] = "default"
    """set by the presets"""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")


def full() -> Demo:
    return Demo(steps=100, lr=0.05, preset="full")


PRESETS = {"default": Demo, "full": full}


def parse(*argv):
    return config.parse(Demo, list(argv), prog="demo", presets=PRESETS)


def test_flags_types_and_docstrings_as_help(capsys):
    cfg = parse("--steps", "3", "--lr", "0.5", "--mode", "exact", "--compile", "--name", "x")
    assert cfg == Demo(steps=3, lr=0.5, mode="exact", compile=True, name="x")
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "optimizer steps (50% more on CUDA)" in " ".join(out.split())   # a % in help does not crash
    assert "--no-compile" in out and "--preset {default,full}" in out and "--full" in out


def test_preset_then_explicit_flags_win():
    assert parse("--preset", "full") == full()
    assert parse("--full", "--lr", "0.2") == dataclasses.replace(full(), lr=0.2)   # the flag beats the preset
    assert parse("--lr", "0.2", "--full").lr == 0.2                                  # whatever the order
    assert parse() == Demo()


@pytest.mark.parametrize("argv, says", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--steps", "many"], "invalid int value"),
    (["--mode", "slow"], "invalid choice"),
    (["--steps", "0"], "--steps must be >= 1"),              # __post_init__, on one line
    (["--preset", "default", "--full"], "--full contradicts --preset default"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_commands():
    cmd, cfg = config.parse(Demo, ["up", "--steps", "2"], commands=("up", "down"))
    assert (cmd, cfg.steps) == ("up", 2)


def test_to_argv_rebuilds_the_config():
    cfg = Demo(steps=7, mode="exact", compile=True, name="a b")
    argv = config.to_argv(cfg)
    assert "--lr" not in argv                       # defaults are not repeated
    assert config.parse(Demo, argv) == cfg
    assert config.to_argv(dataclasses.replace(cfg, compile=False)).count("--compile") == 0


def test_environment_round_trip_and_refusals():
    cfg = Demo(steps=7, lr=0.25, mode="exact", compile=True)
    assert config.from_env(Demo, "DEMO_", config.to_env(cfg, "DEMO_")) == cfg
    assert config.from_env(Demo, "DEMO_", {"DEMO_COMPILE": "yes"}).compile is True
    with pytest.raises(ValueError, match="unknown setting.*DEMO_STPES"):
        config.from_env(Demo, "DEMO_", {"DEMO_STPES": "3"})
    with pytest.raises(ValueError, match="DEMO_MODE='slow' is not one of fast, exact"):
        config.from_env(Demo, "DEMO_", {"DEMO_MODE": "slow"})
    with pytest.raises(ValueError, match="DEMO_COMPILE='maybe'"):
        config.from_env(Demo, "DEMO_", {"DEMO_COMPILE": "maybe"})


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                       ("false", False)])
def test_offline_has_one_reading(monkeypatch, value, on):
    """HF_HUB_OFFLINE=true used to make infer offline and serve online: both read common.env.offline now."""
    monkeypatch.delenv("MLSYS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert env.offline() is on
    from projects.infer import weights as infer_weights
    from projects.serve import model as serve_model
    assert infer_weights.offline() is on and serve_model.env_offline() is on


@pytest.mark.parametrize("module", [
    "projects.train.train", "projects.train.bench", "projects.infer.generate", "projects.infer.eval",
    "projects.infer.bench", "projects.infer.bench_quant", "projects.infer.bench_compress", "projects.infer.distill",
    "projects.serve.cluster", "projects.serve.index",
    "projects.serve.loadtest", "projects.serve.bench"])
def test_every_entry_point_parses_with_common_config(module, capsys):
    def status(argv):   # main() returns its exit status, or parse() exits with it
        try:
            return importlib.import_module(module).main(argv)
        except SystemExit as e:
            return e.code
    assert status(["--help"]) == 0 and "--" in capsys.readouterr().out
    assert status(["--no-such-flag"] if module != "projects.serve.cluster" else ["up", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --no-such-flag") and len(err.splitlines()) == 1
