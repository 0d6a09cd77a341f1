"""A run's configuration in two stages: the options the user gives (``TrainOptions``: defaults < a YAML/JSON
file < the command line, ``None`` meaning "the recipe decides") and the config a run uses (``RunConfig``),
resolved from them once against the model's recipe, with the core's MethodConfig as its method section.

    python -m rso_ray.train --model llama-1b --print-config
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import TrainOptions
from .parsing import (
    OPTION_FIELDS,
    TEST_OPTIONS,
    build_parser,
    load_config_file,
    options_from_dict,
    parse_options,
)
from .recipes import RECIPES, recipe_for
from .resolved import RunConfig, resolve

__all__ = ["OPTION_FIELDS", "RECIPES", "TEST_OPTIONS", "RunConfig", "TrainOptions", "build_parser", "config_from_dict",
           "load_config_file", "options_from_dict", "parse_config", "parse_options", "recipe_for", "resolve"]


def parse_config(argv: list[str] | None = None, *, prog: str = "python -m rso_ray.train") -> tuple[RunConfig, argparse.Namespace]:
    """The RunConfig of a command line (defaults < --config file < flags, then the recipe)."""
    options, args = parse_options(argv, prog=prog)
    return resolve(options), args


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """The RunConfig of a mapping of options (keys with _ or -), e.g. a sweep's base plus a trial's values."""
    return resolve(options_from_dict(values, source=source))
