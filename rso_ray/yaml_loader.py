"""YAML for config and sweep files: PyYAML's safe loader without YAML 1.1's base-60 numbers.

YAML 1.1 reads ``2:8`` as the sexagesimal integer 128 (and ``1:30.5`` as a float), so ``workers: 2:8``
silently asked for 128 workers. YAML 1.2 dropped base 60; so do we: such scalars stay strings. Exponents
without a sign (``1e3``) are floats, as in YAML 1.2.

    python -c "from rso_ray.yaml_loader import load; print(load('workers: 2:8'))"
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class Loader(yaml.SafeLoader):
    """SafeLoader whose int and float resolvers have no sexagesimal forms."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    """The document in ``text`` (raises yaml.YAMLError on bad YAML)."""
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: no arbitrary objects
