"""Argument checks shared by every module: integers and real numbers of any numeric type.

NumPy scalars (``np.int64(3)``, ``np.float32(0.05)``) and other :mod:`numbers` types are
accepted; ``bool`` is not a number here. Each check returns a plain ``int`` / ``float`` and
raises :class:`~cna_lens.errors.CNAError` naming the argument and the valid range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

from cna_lens.errors import CNAError

__all__ = [
    "Integral",
    "Real",
    "check_bool",
    "check_layer_set",
    "check_layers",
    "check_choice",
    "check_int",
    "check_numbers",
    "check_real",
    "dataclass_fields",
]

Real: TypeAlias = float | numbers.Real
"""Annotation of a real-number argument: a float, or any numbers.Real such as np.float32
(checked and converted by :func:`check_real`)."""

Integral: TypeAlias = int | numbers.Integral
"""Annotation of an integer argument: an int, or any numbers.Integral such as np.int64
(checked and converted by :func:`check_int`)."""


def _range_text(
    low: float | int | None, high: float | int | None, low_open: bool, high_open: bool
) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _int_text(low: int | None, high: int | None) -> str:
    if high is None and low == 1:
        return "a positive integer"
    if high is None and low == 0:
        return "a non-negative integer"
    return "an integer" + _range_text(low, high, False, False)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` (any :class:`numbers.Integral` but bool) in ``[low, high]``.

    Raises:
        CNAError: not an integer, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CNAError(
            f"{name} must be {_int_text(low, high)}, got {value!r} ({type(value).__name__})"
        )
    result = int(value)
    if (low is not None and result < low) or (high is not None and result > high):
        raise CNAError(f"{name} must be {_int_text(low, high)}, got {result}")
    return result


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` (any :class:`numbers.Real` but bool) within the bounds.

    Raises:
        CNAError: not a real number, NaN or infinite, or out of range.
    """
    bounds = _range_text(low, high, low_open, high_open)
    what = (
        f"{name} must be{bounds} (a finite real number)"
        if bounds
        else (f"{name} must be finite (a real number)")
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CNAError(f"{what}, got {value!r} ({type(value).__name__})")
    try:
        result = float(value)
    except OverflowError:  # a huge int
        raise CNAError(f"{what}, got {value!r}") from None
    if not math.isfinite(result):
        raise CNAError(f"{what}, got {result!r}")
    if low is not None and (result <= low if low_open else result < low):
        raise CNAError(f"{what}, got {result!r}")
    if high is not None and (result >= high if high_open else result > high):
        raise CNAError(f"{what}, got {result!r}")
    return result


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        CNAError: otherwise (the message lists the choices).
    """
    valid = list(choices)
    if not isinstance(value, str) or value not in valid:
        raise CNAError(f"{name} must be one of {valid}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``.

    Raises:
        CNAError: otherwise.
    """
    if not isinstance(value, bool):
        raise CNAError(f"{name} must be True or False, got {value!r}")
    return value


def check_numbers(
    name: str,
    values: Any,
    *,
    rule: str = "finite numbers",
    ok: Callable[[float], bool] | None = None,
    ordered: bool = False,
    empty: bool = True,
) -> tuple[float, ...]:
    """A list of real numbers as floats: each finite (and ``ok``), optionally non-empty,
    distinct and ascending (``ordered``).

    Raises:
        CNAError: a value that is not a finite real number or breaks ``rule``, an empty
            list (unless ``empty``), or duplicates / a wrong order (with ``ordered``); the
            message repeats the list.
    """
    if isinstance(values, (str, bytes)):
        raise CNAError(f"{name} must be a list of {rule}, got {values!r}")
    vals = tuple(values)
    if not vals and not empty:
        raise CNAError(f"{name} is empty; give at least one value ({rule})")
    for v in vals:
        good = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))
        if not good or (ok is not None and not ok(float(v))):
            raise CNAError(f"{name} must be {rule}; got {v!r} in {list(vals)}")
    if ordered and len(set(vals)) != len(vals):
        raise CNAError(f"{name} has duplicates: {list(vals)}; give each value once")
    if ordered and list(vals) != sorted(vals):
        raise CNAError(f"{name} must be sorted ascending, got {list(vals)}")
    return tuple(float(v) for v in vals)


def check_layers(name: str, layers: Any, n_layers: int) -> tuple[int, ...]:
    """``layers`` as a tuple of layer indices in ``[0, n_layers)`` (a list/tuple/range of ints).

    Raises:
        CNAError: not a sequence (a bare int, a string, None), a non-integer entry, or an
            index out of range; the message names ``name``.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, range)):
        raise CNAError(
            f"{name} must be a list of layer indices (e.g. [0, 1]), got "
            f"{type(layers).__name__} {layers!r:.60}"
        )
    out = []
    for x in layers:
        if (
            isinstance(x, bool)
            or not isinstance(x, numbers.Integral)
            or not (0 <= int(x) < n_layers)
        ):
            raise CNAError(f"{name} has {x!r}; valid layers are 0..{n_layers - 1} (integers)")
        out.append(int(x))
    return tuple(out)


def check_layer_set(
    layers: Any, n_layers: int, *, what: str = "layers", hint: str = ""
) -> tuple[int, ...]:
    """The layers to act on: sorted, each once, at least one, all in ``[0, n_layers)``.

    Raises:
        CNAError: a bare int or string, an empty list, or a layer out of range.
    """
    if isinstance(layers, (int, str, bytes)):
        raise CNAError(f"{what} must be a list of layer indices, got {layers!r}")
    out = tuple(sorted({int(x) for x in layers}))
    if not out:
        raise CNAError(f"{what} is empty; give at least one layer in 0..{n_layers - 1}{hint}")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise CNAError(f"{what} {bad} out of range; valid layers are 0..{n_layers - 1}")
    return out


def dataclass_fields(
    cls: type, data: Any, what: str, *, required: bool = False, extra: Iterable[str] = ()
) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls`` (for every ``from_dict``).

    Args:
        cls: The dataclass.
        data: The JSON object read back.
        what: Its name in messages ("discovery config", ...).
        required: Every field without a default must be present.
        extra: Keys a ``to_dict`` adds (derived values) that are dropped here.

    Raises:
        CNAError: not a mapping, unknown keys (the message lists the valid ones), or (with
            ``required``) missing ones.
    """
    if not isinstance(data, Mapping):
        raise CNAError(f"a {what} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields) - set(extra))
    if unknown:
        raise CNAError(f"unknown {what} keys {unknown}; valid keys: {sorted(fields)}")
    if required:
        missing = [
            n
            for n, f in fields.items()
            if n not in data
            and f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise CNAError(f"{what} is missing keys {missing}")
    return {k: v for k, v in data.items() if k in fields}
