"""The real Prometheus tools the monitoring tests run, and the metric names a PromQL expression reads.

``prometheus`` and ``promtool`` come from Debian's ``prometheus`` package (``.ci/run``
installs it). Where they are missing the tests skip, except on CI (``CI=true``), where
that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_TOOLS = ("prometheus", "promtool")

# PromQL words that are not metric names: binary operators, modifiers, aggregations, special numbers.
PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "inf",
        "nan",
    }
)
# Keywords followed by a parenthesised list of label names, not of expressions.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_TOKEN = re.compile(
    r"""
    \s+
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<identifier>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<punctuation>[(){}\[\],])
    | (?P<operator>[-+*/%^=!<>~@])
    """,
    re.VERBOSE,
)
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def require_prometheus() -> None:
    """Skip (fail on CI) unless ``prometheus`` and ``promtool`` are on the PATH."""
    missing = [tool for tool in PROMETHEUS_TOOLS if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not found; install Debian's prometheus package (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    require_prometheus()
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60)


def tokens(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` of each PromQL token; strings and durations are tokens of their own."""
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position:]!r}")
        if match.lastgroup is not None:
            found.append((match.lastgroup, match.group()))
        position = match.end()
    return found


def _skip_group(found: list[tuple[str, str]], start: int) -> int:
    """The index after the bracket group that opens at ``start``."""
    opening = found[start][1]
    depth = 0
    for index in range(start, len(found)):
        text = found[index][1]
        if found[index][0] == "punctuation" and text == opening:
            depth += 1
        elif found[index][0] == "punctuation" and text == _CLOSING[opening]:
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError(f"unbalanced {opening!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects.

    A name is an identifier that is not a function call (followed by ``(``), not a keyword,
    and not inside label matchers ``{...}``, a range ``[...]`` or a label list such as
    ``by (...)``. Selectors by ``{__name__=...}`` alone are not seen.
    """
    found = tokens(expr)
    names, index = set(), 0
    while index < len(found):
        kind, text = found[index]
        following = found[index + 1][1] if index + 1 < len(found) else ""
        if kind == "punctuation" and text in "{[":
            index = _skip_group(found, index)
            continue
        if kind == "identifier" and text.lower() in LABEL_LIST_KEYWORDS and following == "(":
            index = _skip_group(found, index + 1)
            continue
        if kind == "identifier" and following != "(" and text.lower() not in PROMQL_KEYWORDS:
            names.add(text)
        index += 1
    return names
