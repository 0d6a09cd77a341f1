"""Reading options: a YAML/JSON config file (unknown keys are errors naming the key and its line), the
command line (one flag per option of TrainOptions, with its help), and mappings (sweeps); each value is
coerced to its option's type with an error naming the key.

    python -c "from rso_ray.config.parsing import parse_options; print(parse_options(['--rank', '8'])[0].rank)"
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .options import SCHEDULED, TrainOptions, flag

OPTION_FIELDS = {f.name: f for f in fields(TrainOptions)}
# Fault-injection options (hidden from --help): never logged as parameters, searched, or written to a config.
TEST_OPTIONS = tuple(name for name, f in OPTION_FIELDS.items() if f.metadata.get("suppress"))
_HINTS = get_type_hints(TrainOptions)


def _base_type(name: str) -> Any:
    """int for ``int | None``, list for ``list[str] | None``, ..."""
    tp = _HINTS[name]
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not list and args:
        tp = args[0]
    return list if get_origin(tp) is list else tp


def _convert(name: str, value: Any, *, source: str) -> Any:
    """Coerce a file or command-line value to the field's type, naming the key on failure."""
    tp = _base_type(name)
    if value is None:
        return None
    if name in SCHEDULED and isinstance(value, str) and ("," in value or "@" in value):
        return value.strip()  # a step schedule, checked by TrainOptions
    try:
        if tp is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                number = float(value)  # accepts 1e6 and 100_000
                if not number.is_integer():
                    raise TypeError
                return int(number)
            if not isinstance(value, int):
                raise TypeError
            return value
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "workers":
                return str(value)
            if isinstance(value, bool):  # YAML's true/false for an option written as a word (use_gpu: true)
                return "true" if value else "false"
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", str: "a string", list: "a list of names", bool: "true or false"}
        raise ValueError(f"{source}: expected {kind.get(tp, tp)}, got {value!r}") from None
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Keys and values of a YAML or JSON config file. An unknown key (the hidden test options included)
    and a key given twice are errors naming the key and its line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    raw, lines = _read_mapping(p)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping of option: value")
    known = sorted(set(OPTION_FIELDS) - set(TEST_OPTIONS))
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        where = f"{p}" + (f", line {lines[key]}" if key in lines else "")
        if name not in known:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
        if name in out:
            raise ValueError(f"{where}: {key!r} gives option {name} a second time ({flag(name)} and {name} are one option)")
        out[name] = _convert(name, value, source=f"{where}: {key}")
    return out


def _read_mapping(p: Path) -> tuple[Any, dict[str, int]]:
    """The file's top-level value and the line of each top-level key (YAML); a key twice is an error."""
    text = p.read_text()
    if p.suffix == ".json":
        def no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
            if seen:
                raise ValueError(f"{p}: key {seen[0]!r} is given twice")
            return dict(pairs)

        return json.loads(text, object_pairs_hook=no_twice), {}
    import yaml

    from .. import yaml_loader

    try:
        raw = yaml_loader.load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{p}: not valid YAML: {err}") from None
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value in lines:  # YAML keeps the last value of a repeated key without a word
                raise ValueError(f"{p}, line {k.start_mark.line + 1}: key {k.value!r} is given twice "
                                 f"(first on line {lines[k.value]})")
            lines[k.value] = k.start_mark.line + 1
    return raw, lines


def build_parser(prog: str = "python -m rso_ray.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pre-train a LLaMA model with RSO (or AdamW/GaLore) on Ray Train. Options override the "
        "--config file, which overrides the defaults (the model's recipe).",
        # Each option's help says its default in words (most defaults come from the model's recipe), so
        # no "(default: None)" is appended.
        formatter_class=argparse.HelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file of options (keys as below, with _ or -)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in fields(TrainOptions):
        meta = f.metadata
        help_text = meta.get("help", "")
        if f.default is not None and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if meta.get("suppress"):
            help_text = argparse.SUPPRESS
        bare = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}  # the flag alone means const
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=None, help=help_text, metavar=f.name.upper(), **bare)
    return parser


def parse_options(argv: list[str] | None = None, *, prog: str = "python -m rso_ray.train") -> tuple[TrainOptions, argparse.Namespace]:
    """The options from defaults < --config file < command line (the recipe not yet applied)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    for name in OPTION_FIELDS:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _convert(name, _parse_cli_scalar(raw), source=f"--{flag(name)}")
    return TrainOptions(**_init_from_defaults(values)), args


def _init_from_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """--init-from X without --model or --tokenizer: X's architecture (hf:X) and X's tokenizer."""
    if values.get("init_from"):
        values.setdefault("model", "hf:" + values["init_from"])
        values.setdefault("tokenizer", values["init_from"])
    return values


def _parse_cli_scalar(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw  # the const of a bare flag
    low = raw.lower()
    if low in ("inf", "infinity"):
        return math.inf
    if low in ("none", "null"):
        return None
    return raw


def options_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainOptions:
    """The options of a mapping (e.g. a sweep's base options plus a trial's values), keys with _ or -."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_FIELDS:
            raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(OPTION_FIELDS))}")
        out[name] = _convert(name, value, source=source)
    return TrainOptions(**_init_from_defaults(out))
