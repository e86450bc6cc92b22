"""Command-line options made from a config's fields, and the config made back from them.

One option per leaf field of a :class:`~devft_edge.run_config.ConfigModel` (nested settings are
walked: ``train.lr`` is ``--lr``), with the field's docstring as help and its default shown, so a
field added to the run config is an option of every command that takes the config, with the same
name as its YAML key. Options are parsed as given (``default=SUPPRESS``): the config is built
from the class defaults, then a preset's values, then the options given, and validated once by
pydantic, whose errors name the option.

An optional nested config (``recipe.heal``) is switched by the option named after it (``--heal
off|bake|adapter`` sets its ``mode`` or turns it off), and its other fields take its name as a
prefix (``--heal-steps``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from devft_edge.errors import ConfigError

__all__ = ["ConfigOption", "add_config_options", "config_data", "config_options"]

OPTION_NAMES = {"train.steps": "local-steps", "train.batch_size": "batch", "train.seq_len": "seq"}
"""Where an option's name is not its field's (short names the CLI has always had)."""
SWITCH_FIELD = "mode"
"""The field of an optional nested config that its switch option sets (``--heal bake``)."""
OFF = "off"


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One command-line option and the config field it sets."""

    path: tuple[str, ...]
    """Field path in the config, e.g. ``("train", "lr")``."""
    flag: str
    """The option, e.g. ``--lr``."""
    annotation: Any
    default: Any
    help: str
    switch: bool = False
    """The option that turns its optional nested config on (with a mode) or ``off``."""

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string after a field) of a dataclass, as pydantic reads them."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _fields(cls: type) -> Iterator[tuple[str, Any, Any, str]]:
    """(name, annotation, default, doc) of each field of a pydantic model or a dataclass."""
    if issubclass(cls, BaseModel):
        for name, info in cls.model_fields.items():
            yield name, info.annotation, info.get_default(call_default_factory=True), info.description or ""
        return
    hints, docs = typing.get_type_hints(cls), _docstrings(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        yield f.name, hints[f.name], default, docs.get(f.name, "")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def _is_config(annotation: Any) -> bool:
    return inspect.isclass(annotation) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation))


def _walk(cls: type, path: tuple[str, ...], prefix: str) -> Iterator[ConfigOption]:
    for name, annotation, default, doc in _fields(cls):
        inner, optional = _unwrap_optional(annotation)
        here = (*path, name)
        if _is_config(inner):
            sub_prefix = f"{name}-" if optional else prefix
            for option in _walk(inner, here, sub_prefix):
                if optional and option.path[-1] == SWITCH_FIELD:
                    choices = (OFF, *get_args(option.annotation))
                    yield dataclasses.replace(
                        option, flag=f"--{name}", annotation=Literal[choices], default=OFF, help=doc, switch=True
                    )
                else:
                    yield option
            continue
        flag = "--" + OPTION_NAMES.get(".".join(here), prefix + name.replace("_", "-"))
        yield ConfigOption(here, flag, annotation, default, doc)


@cache
def config_options(cls: type) -> tuple[ConfigOption, ...]:
    """Every option of config class ``cls``, in field order; option names are unique."""
    options = tuple(_walk(cls, (), ""))
    flags = [o.flag for o in options]
    duplicated = sorted({f for f in flags if flags.count(f) > 1})
    if duplicated:
        raise AssertionError(f"{cls.__name__}: two fields make the same option: {', '.join(duplicated)}")
    return options


def _argparse_kwargs(option: ConfigOption) -> dict[str, Any]:
    inner, _ = _unwrap_optional(option.annotation)
    default = option.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "metavar": option.path[-1].upper()}
    if inner is bool:
        kwargs |= {"action": argparse.BooleanOptionalAction, "metavar": None}
    elif get_origin(inner) is Literal:
        kwargs |= {"choices": list(get_args(inner)), "metavar": None}
    elif inner in (int, float):
        kwargs["type"] = inner
    elif get_origin(inner) is tuple:
        kwargs["metavar"] = "A,B,..."
    first = option.help.split("\n\n")[0].replace("%", "%%").replace("``", "")
    kwargs["help"] = f"{first} (default: {OFF if default is None and option.switch else default})"
    return kwargs


def add_config_options(
    parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Add an option for every field of ``cls`` under the dotted paths in ``only`` (None: all), except
    those under ``skip``."""
    group = parser.add_argument_group(f"run configuration ({cls.__name__}; YAML keys are the field names)")
    for option in config_options(cls):
        if (only is None or _under(option.path, only)) and not _under(option.path, skip):
            group.add_argument(option.flag, **_argparse_kwargs(option))


def _under(path: tuple[str, ...], roots: tuple[str, ...]) -> bool:
    dotted = ".".join(path)
    return any(dotted == root or dotted.startswith(root + ".") for root in roots)


def _value(option: ConfigOption, text: Any) -> Any:
    inner, _ = _unwrap_optional(option.annotation)
    if get_origin(inner) is tuple and isinstance(text, str):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):  # None (an optional config that is off) or a built value
            child = {} if child is None else _as_data(child)
            data[key] = child
        data = child
    data[path[-1]] = value


def _as_data(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_data(args: argparse.Namespace, cls: type, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config data the options given in ``args`` describe, applied on top of ``base``.

    Raises:
        ConfigError: an optional config's option given while that config is off.
    """
    data = merge({}, base or {})
    options = config_options(cls)
    given = [o for o in options if hasattr(args, o.dest)]
    switches = [o for o in options if o.switch]
    for option in (o for o in given if o.switch):
        value = getattr(args, option.dest)
        _set(data, option.path[:-1] if value == OFF else option.path, None if value == OFF else value)
    for option in (o for o in given if not o.switch):
        for switch in switches:  # an optional config's other options need it on
            parent = switch.path[:-1]
            if option.path[: len(parent)] == parent and _get(data, parent) is None:
                raise ConfigError(f"{option.flag} needs {switch.flag} {'|'.join(get_args(switch.annotation)[1:])}")
        _set(data, option.path, _value(option, getattr(args, option.dest)))
    return data
