"""One config value coerced to its declared type, or a one-line error naming the key.

Shared by the run config's own fields and the hyperparameters methods declare, so both read
YAML, ``--set KEY=VALUE`` strings and search-space values the same way. Also
:func:`mask_credentials`, which every message naming a store URI goes through."""

from __future__ import annotations

import math
import re
from typing import Any

from kdray.core.errors import KdrayError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
        return value.lower() in TRUE_WORDS
    if isinstance(value, (bool, int)) and not isinstance(value, str):
        return bool(value)
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):  # inf / nan pass float() but break training an epoch later
        raise ValueError
    return number


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)):
        raise ValueError
    return str(value)


def _to_float_list(value: Any) -> list:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError
    return [_to_float(v) for v in value]


CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, list: _to_float_list}
TYPE_WORDS = {bool: "bool", int: "int", float: "a finite float", str: "str", list: "a list of finite floats"}


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null"))


def coerce_value(key: str, typ: type, optional: bool, value: Any, where: str = "config") -> Any:
    """``value`` as ``typ`` (None where ``optional``), or a KdrayError naming ``key``."""
    if is_empty(value):
        if optional:
            return None
        raise KdrayError(f"{where}: key {key!r} may not be empty")
    try:
        return CONVERTERS[typ](value)
    except (TypeError, ValueError, OverflowError):
        raise KdrayError(
            f"{where}: key {key!r} must be {TYPE_WORDS[typ]}{' or null' if optional else ''}, got {value!r}"
        ) from None


def mask_credentials(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``postgresql://user:***@host/db``): what kdray
    logs, tags or prints of a storage or tracking URL."""
    return re.sub(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/:@\s]*):[^@/\s]*@", r"\g<head>:***@", str(url))
