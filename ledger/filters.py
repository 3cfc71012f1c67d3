"""Trigger filters: a JSON object whose fields must all match the body (dotted paths, `*`)."""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Any

from ledger.keys import body_value


@lru_cache(maxsize=1024)
def _pattern(text: str) -> re.Pattern[str]:
    # Only `*` is a wildcard: escape everything else fnmatch would treat specially.
    escaped = text.replace("[", "[[]").replace("?", "[?]")
    return re.compile(fnmatch.translate(escaped), re.DOTALL)


def _matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, str) and "*" in expected:
        return isinstance(actual, str) and _pattern(expected).match(actual) is not None
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    return bool(expected == actual)


def filter_matches(rules: dict[str, Any] | None, body: Any) -> bool:
    """True when every field of `rules` matches the body; no rules match everything."""
    if not rules:
        return True
    return all(_matches(expected, body_value(body, path)) for path, expected in rules.items())
