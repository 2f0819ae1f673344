"""Dataclass configs with named presets and `--key value` / `--key=value` overrides.

Every stage describes itself with one frozen dataclass. `parse_config` builds an argparse
parser from its fields (so `--help` lists every setting with its default), starts from the
chosen preset and applies only the flags the user actually gave.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Sequence, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting the user gave cannot be used; the message says which and why."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _tuple_parser(item_type: type):
    def parse(text: str) -> tuple:
        text = text.strip().strip("()[]")
        if not text:
            return ()
        try:
            return tuple(item_type(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from err
    return parse


def _field_parser(annotation: Any):
    """argparse `type=` callable for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        return _tuple_parser(args[0] if args else str), "A,B,..."
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)][0]
        parse, metavar = _field_parser(inner)

        def parse_optional(text: str):
            return None if text.strip().lower() in ("none", "") else parse(text)
        return parse_optional, metavar
    if annotation is bool:
        return _parse_bool, "BOOL"
    if annotation in (int, float, str):
        return annotation, annotation.__name__.upper()
    raise TypeError(f"unsupported config field type {annotation!r}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, valid_keys: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.valid_keys = list(valid_keys)

    def error(self, message: str):
        if "unrecognized arguments" in message:
            message += "\nvalid settings: " + " ".join(flag_name(k) for k in self.valid_keys)
        super().error(message)


def build_parser(cls: type, presets: dict[str, Any], description: str) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    parser = _Parser(description=description, valid_keys=["preset", *names],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(presets),
                        help="named starting point; flags below override it (default: the dataclass defaults)")
    for f in dataclasses.fields(cls):
        parse, metavar = _field_parser(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = (f.metadata or {}).get("help", "")
        if isinstance(default, tuple):
            shown = ",".join(str(v) for v in default)
        else:
            shown = default
        parser.add_argument(flag_name(f.name), dest=f.name, type=parse, metavar=metavar,
                            default=argparse.SUPPRESS, help=f"{doc} (default: {shown})".strip())
    return parser


def parse_config(cls: type[C], presets: dict[str, C], argv: Sequence[str] | None = None,
                 description: str = "") -> C:
    """Preset (or defaults) + command-line overrides -> a validated config instance."""
    parser = build_parser(cls, presets, description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    preset = args.pop("preset")
    base = presets[preset] if preset else cls()
    try:
        return dataclasses.replace(base, **args)
    except (TypeError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def config_to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a config saved with `config_to_dict` (lists back to tuples, unknown keys rejected)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; this version knows {sorted(known)}")
    values = {}
    for key, value in data.items():
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def subconfig(target_cls: type[C], source: Any, **overrides) -> C:
    """Build `target_cls` from the same-named fields of a flat stage config."""
    names = {f.name for f in dataclasses.fields(target_cls)}
    values = {k: v for k, v in dataclasses.asdict(source).items() if k in names}
    values.update(overrides)
    return target_cls(**values)


def format_config(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)
