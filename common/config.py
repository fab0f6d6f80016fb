"""One way from a typed dataclass to command-line flags, environment variables and a child process's argv.

A config is a plain `@dataclass`: each field has a type (int, float, str, bool, or a `Literal[...]` of
choices), a default, and a docstring on the line below it, which is its help text:

    @dataclass
    class Config:
        steps: int = 100
        \"\"\"optimizer steps\"\"\"

Presets are plain functions returning a config. `parse(Config, argv, presets={"smoke": smoke})` starts from
`--preset NAME` (or the preset named "default", else the dataclass's defaults; `--full` is `--preset full`),
and every flag given explicitly wins over the preset. A config validates itself in `__post_init__`
(ValueError). A bad flag or value prints one line and exits 2, as argparse does, without the usage block.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import typing
from collections.abc import Callable, Mapping


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _kind(cls, name: str):
    """(python type, choices or None) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if hint not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{name}: unsupported config type {hint!r}")
    return hint, None


def _value(cls, name: str, raw: str):
    """A field's value from its string form (flags and environment variables share this)."""
    typ, choices = _kind(cls, name)
    if typ is bool:
        low = raw.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{raw!r} is not a boolean")
        return low in ("1", "true", "yes", "on")
    v = typ(raw)
    if choices and v not in choices:
        raise ValueError(f"{raw!r} is not one of {', '.join(map(str, choices))}")
    return v


def check_choices(cfg) -> None:
    """ValueError naming the field when a Literal-typed field holds a value outside its choices (for configs
    built in code; flags and variables are checked as they are read)."""
    for f in dataclasses.fields(cfg):
        _, choices = _kind(type(cfg), f.name)
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, choices))}, "
                             f"got {getattr(cfg, f.name)!r}")


class UsageError(Exception):
    """A bad command line or a setting that cannot work here: the entry point prints it on one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"error: {message}\n")


def parse(cls, argv: list[str] | None = None, *, prog: str | None = None, description: str | None = None,
          presets: Mapping[str, Callable[[], object]] | None = None, commands: tuple[str, ...] = ()):
    """The config from `argv` (sys.argv[1:] if None); with `commands`, (command, config)."""
    presets = dict(presets or {})
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if commands:
        p.add_argument("command", choices=commands)
    if presets:
        p.add_argument("--preset", choices=sorted(presets), default=None,
                       help="start from this preset; flags given explicitly win over it")
        if "full" in presets:
            p.add_argument("--full", action="store_true", help="the same as --preset full")
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name == "preset" and presets:
            continue  # set by the preset functions themselves
        typ, choices = _kind(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_ = (docs.get(f.name) or "").replace("%", "%%")  # argparse %-formats help
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, type=typ, choices=choices, default=None, help=help_)
    ns = vars(p.parse_args(argv))
    cmd = ns.pop("command", None)
    name = ns.pop("preset", None)
    if ns.pop("full", False):
        if name not in (None, "full"):
            p.error(f"--full contradicts --preset {name}")
        name = "full"
    base = presets[name]() if name else presets["default"]() if "default" in presets else None
    explicit = {k: v for k, v in ns.items() if v is not None}
    try:
        cfg = dataclasses.replace(base, **explicit) if base is not None else cls(**explicit)
    except ValueError as e:  # __post_init__ refused the combination
        p.error(str(e))
    return (cmd, cfg) if commands else cfg


def to_argv(cfg) -> list[str]:
    """Flags that rebuild `cfg` in a child process (only the fields that differ from the defaults)."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return out


def to_env(cfg, prefix: str) -> dict[str, str]:
    """PREFIX_FIELD=value for every field: how a config crosses into a process that reads `from_env`."""
    return {f"{prefix}{f.name.upper()}": (str(int(v)) if isinstance(v, bool) else str(v))
            for f in dataclasses.fields(cfg) for v in [getattr(cfg, f.name)]}


def from_env(cls, prefix: str, env: Mapping[str, str] | None = None, **overrides):
    """The config from PREFIX_FIELD variables (others keep their defaults). An unknown PREFIX_ name or a bad
    value is a one-line ValueError naming the variable."""
    env = os.environ if env is None else env
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in env if k.startswith(prefix) and k[len(prefix):].lower() not in names)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    kw = dict(overrides)
    for name in names - kw.keys():
        raw = env.get(f"{prefix}{name.upper()}")
        if raw is None:
            continue
        try:
            kw[name] = _value(cls, name, raw)
        except ValueError:
            typ, choices = _kind(cls, name)
            want = f"one of {', '.join(map(str, choices))}" if choices else f"a valid {typ.__name__}"
            raise ValueError(f"{prefix}{name.upper()}={raw!r} is not {want}") from None
    return cls(**kw)
