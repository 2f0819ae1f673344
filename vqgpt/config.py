"""How settings work: frozen dataclasses with named presets and `--key value` / `--key=value` overrides.

Every stage describes itself with one frozen dataclass (vqgpt/settings.py). `parse_config` builds
an argparse parser from its fields (so `--help` lists every setting with its default), starts from
the chosen preset and applies only the flags the user actually gave; `config_to_dict` /
`config_from_dict` save and restore a config, checked field by field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from typing import Any, Sequence, TypeVar

from vqgpt.errors import ConfigError

C = TypeVar("C")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# every number a setting holds ends up in an int64 or fp32 tensor, a seed or a size: beyond these it overflows
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


def number_problem(value) -> str | None:
    """Why an int or float setting cannot be used (NaN, inf, beyond fp32 or int64), or None: the one range check."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        return "beyond the 64-bit integer range"
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        return "not a finite number" if not math.isfinite(value) else "beyond the float32 range (3.4e38)"
    return None


def _number_parser(number_type: type):
    def parse(text: str):
        value = number_type(text)   # a ValueError: argparse says "invalid int value: 'x'"
        problem = number_problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} is {problem}")
        return value
    parse.__name__ = number_type.__name__
    return parse


def _tuple_parser(item_type: type):
    parse_item = _number_parser(item_type) if item_type in (int, float) else item_type

    def parse(text: str) -> tuple:
        text = text.strip().strip("()[]")
        if not text:
            return ()
        try:
            return tuple(parse_item(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from err
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return parse


def _field_parser(annotation: Any):
    """argparse `type=` callable for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        return _tuple_parser(args[0] if args else str), "A,B,..."
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)][0]
        parse, metavar = _field_parser(inner)

        def parse_optional(text: str):
            return None if text.strip().lower() in ("none", "") else parse(text)
        return parse_optional, metavar
    if annotation is bool:
        return _parse_bool, "BOOL"
    if annotation in (int, float):
        return _number_parser(annotation), annotation.__name__.upper()
    if annotation is str:
        return annotation, "STR"
    raise TypeError(f"unsupported config field type {annotation!r}")


def flag_name(field_name: str) -> str:
    # a trailing underscore only dodges a Python keyword: field `from_` is the flag --from
    return "--" + field_name.rstrip("_").replace("_", "-")


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
    offered = [f for f in dataclasses.fields(cls) if f.name not in getattr(cls, "not_offered", ())]
    parser = _Parser(description=description, valid_keys=[*(["preset"] if presets else []), *(f.name for f in offered)],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:   # a stage without presets shows no empty choice list
        parser.add_argument("--preset", default=None, choices=sorted(presets),
                            help="named starting point; flags below override it (default: the dataclass defaults)")
    for f in offered:
        meta = f.metadata or {}
        parse, metavar = _field_parser(hints[f.name])
        if meta.get("positional"):   # a tuple of words, `shardify.py SRC DEST`
            parser.add_argument(f.name, nargs="+", metavar=meta.get("metavar", f.name.upper()), help=meta.get("help"))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        # a bare boolean flag (`--flip`) means true; `--flip false` / `--flip=false` still work
        extra = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        if meta.get("choices"):
            extra["choices"] = meta["choices"]
            metavar = "{" + ",".join(str(c) for c in meta["choices"]) + "}"
        parser.add_argument(flag_name(f.name), *meta.get("aliases", ()), dest=f.name, type=parse, metavar=metavar,
                            default=argparse.SUPPRESS,
                            help=meta.get("help", "") + _default_note(shown, meta.get("required", False)), **extra)
    return parser


def _default_note(shown, required: bool) -> str:
    if required:
        return " (required)"
    return "" if shown in ("", None) else f" (default: {shown})"   # an empty default: the help text says what it means


def parse_config(cls: type[C], presets: dict[str, C], argv: Sequence[str] | None = None,
                 description: str = "") -> C:
    """Preset (or defaults) + command-line overrides -> a validated config instance."""
    parser = build_parser(cls, presets, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    given_twice(parser, argv)
    args = vars(parser.parse_args(argv))
    # checked here rather than by argparse's required=True, which would hide a misspelt flag behind "required"
    missing = [flag_name(f.name) for f in dataclasses.fields(cls) if (f.metadata or {}).get("required")
               and f.name not in args and not (args.get("preset") and getattr(presets[args["preset"]], f.name))]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    empty = [flag_name(f.name) for f in dataclasses.fields(cls) if (f.metadata or {}).get("required")
             and isinstance(args.get(f.name), str) and not args[f.name].strip()]
    if empty:   # `--out ''` would be the working directory
        parser.error(f"{', '.join(empty)} must not be empty")
    preset = args.pop("preset", None)
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in args.items()}
    try:   # without a preset the defaults are not built first: they may lack a setting only the user can give
        cfg = dataclasses.replace(presets[preset], **args) if preset else cls(**args)
    except (TypeError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for name, source in getattr(cls, "follows_from", {}).items():
        if name in args and source in args:
            parser.exit(2, f"{parser.prog}: error: {flag_name(name)} follows from {flag_name(source)}; give one\n")
    # a flag whose setting this run does not use would be recorded in config.json and silently ignored
    for name, (other, value) in getattr(cls, "applies_only_with", {}).items():
        if name not in args:
            continue
        if callable(value):   # (what the run needs, in words; whether this run has it)
            if not value(cfg):
                parser.exit(2, f"{parser.prog}: error: {flag_name(name)} applies with {other} only; this run does "
                               "not use it\n")
        elif getattr(cfg, other) != value:
            parser.exit(2, f"{parser.prog}: error: {flag_name(name)} applies with {flag_name(other)} "
                           f"{str(value).lower()} only; this run has {str(getattr(cfg, other)).lower()}\n")
    defaults = field_defaults(cls)
    from_preset = {k for k, v in config_to_dict(presets[preset]).items() if v != defaults.get(k)} if preset else set()
    object.__setattr__(cfg, "_given", frozenset(args) | from_preset)
    return cfg


def given_twice(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse a setting given twice (`--lr 1e-3 ... --lr 3e-4`, or through an alias): argparse keeps the last."""
    seen: dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        action = parser._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is None or action.dest == "help":
            continue
        if action.dest in seen:
            parser.error(f"{token.split('=', 1)[0]} is given twice (also as {seen[action.dest]}); give it once")
        seen[action.dest] = token.split("=", 1)[0]


def given_settings(cfg: Any) -> frozenset[str]:
    """The settings the command line gave (a flag, or a preset's value other than the default), even where the
    value equals the default; for a config built in code, the settings that differ from the defaults."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return given
    defaults = field_defaults(type(cfg))
    return frozenset(k for k, v in config_to_dict(cfg).items() if v != defaults.get(k))


def config_to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def field_defaults(cls: type) -> dict:
    """Each setting's default as `config_to_dict` writes it (tuples as lists); required ones left out."""
    return {f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


# settings removed after they lost every measurement, with the value that meant "off": a saved config that
# holds that value loads as before; one that used the setting was trained by another network or loss
REMOVED_SETTINGS = {"rotation_trick": False, "ema_decay": 0.0, "fsq_levels": [], "chroma_gain": 1.0}
# a removed name the flags use again for something else: a saved `ema_decay` was the quantizer's EMA codebook,
# the weight EMA of --ema-decay is saved as weight_ema_decay
REMOVED_MEANING = {"ema_decay": " (the quantizer's EMA codebook)"}


def check_removed_settings(saved: dict, source: str) -> None:
    """Refuse a saved config made with a setting this version no longer has; ConfigError names it."""
    used = [f"{flag_name(k)} {saved[k]}{REMOVED_MEANING.get(k, '')}" for k, off in REMOVED_SETTINGS.items()
            if k in saved and saved[k] != off]
    if saved.get("quantizer") == "fsq":
        used.append("--quantizer fsq")
    if used:
        raise ConfigError(f"{source}: made with {', '.join(used)}, which this version of vqgpt no longer has "
                          "(removed 2026-12-07: no preset used it and it lost every measurement)")


def config_from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a config saved with `config_to_dict` (lists back to tuples, unknown keys rejected)."""
    check_removed_settings(data, "saved config")
    data = {k: v for k, v in data.items() if k not in REMOVED_SETTINGS}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; this version knows {sorted(known)}")
    values = {}
    for key, value in data.items():
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            value = tuple(value)
        if not _fits(value, hints[key]):   # a crafted or hand-edited file: one line, not a traceback later
            raise ConfigError(f"saved config: {key} holds {type(value).__name__} {str(value)[:40]!r}, "
                              f"expected {getattr(hints[key], '__name__', hints[key])}")
        problem = next(filter(None, map(number_problem, value if isinstance(value, tuple) else (value,))), None)
        if problem:
            raise ConfigError(f"saved config: {key} holds {str(value)[:40]}, {problem}")
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"saved config does not make a {cls.__name__}: {err}") from None


def _fits(value, annotation) -> bool:
    """Whether a value loaded from JSON has the type of a config field (ints pass for floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, tuple)
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else _fits(value, a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def subconfig(target_cls: type[C], source: Any, **overrides) -> C:
    """Build `target_cls` from the same-named fields of a flat stage config."""
    names = {f.name for f in dataclasses.fields(target_cls)}
    values = {k: v for k, v in dataclasses.asdict(source).items() if k in names}
    values.update(overrides)
    return target_cls(**values)


def format_config(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PROGRESS_MODES = ("auto", "true", "false")
PROGRESS_HELP = "auto: a bar on a terminal, a plain line now and then in a log file; true: a bar; false: nothing"


def check_precision(precision: str) -> None:
    """The one check of --precision, for every stage (the parser offers only these; this guards saved configs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def check_finite(cfg: Any) -> None:
    """NaN passes every `<` check: refuse NaN, inf and what overflows fp32 or int64 in any number setting of a config
    built in code (`--lr nan`, `--beta inf`; the parser and config_from_dict refuse them already)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        problem = next(filter(None, map(number_problem, values)), None)
        if problem:
            raise ValueError(f"{flag_name(f.name)} must be a finite number within range, got {value} ({problem})")


def check_not_negative(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag_name(name)} must not be negative, got {getattr(cfg, name)}")


def setting(text: str, default, aliases: tuple[str, ...] = (), **flag):
    """A setting with its --help text. flag: required=True (the parser insists), choices=(...),
    positional=True (words before the flags; a tuple field), metavar."""
    return dataclasses.field(default=default, metadata={"help": text, "aliases": aliases, **flag})


def subconfig_from_dict(target_cls: type[C], data: dict) -> C:
    """Build `target_cls` from the same-named entries of a saved flat config dict."""
    check_removed_settings(data, "saved config")
    names = {f.name for f in dataclasses.fields(target_cls)}
    return config_from_dict(target_cls, {k: v for k, v in data.items() if k in names})
