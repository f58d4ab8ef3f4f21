"""The shipped English prompt sets, and a reader for prompt files in common formats.

Shipped sets (``cna_lens/data/prompts/<name>.json``, written for this project):

* ``discovery_harmful`` / ``discovery_benign``: topic-matched pairs for finding a circuit.
  Entry ``i`` of the benign set is a legitimate request on the same topic, in the same
  style and of about the same length, as harmful entry ``i``; both carry the same category
  (cyber, weapons, drugs, fraud, harassment, self_harm, privacy, disinformation, violence,
  theft, extremism, dangerous_chemistry).
* ``eval_harmful`` / ``eval_benign``: held-out sets for measuring a circuit's effect. They
  share no prompt (and no close paraphrase) with the discovery sets. The benign set spans
  everyday domains, with a ``sensitive`` category of benign questions on sensitive topics
  that show over-refusal.
* ``borderline``: dual-use requests a careful model might or might not refuse.
* ``capability``: four-choice questions in twelve subjects (read with :func:`capability`).
* ``train_harmful`` / ``train_benign``: prompts for fine-tuning the tuned model of a pair
  (:mod:`cna_lens.pipelines.pairs`); they share no prompt with any set above. The benign set mixes
  legitimate requests on the harmful set's twelve topics with everyday requests.

Harmful entries are requests only; no file holds harmful content.

:func:`read_prompts` reads a user's prompt file: ``.txt`` (one prompt per line), ``.json``
(a list of strings or of objects), ``.jsonl`` (one string or object per line) or ``.csv``
(with a header row), in UTF-8 (with or without a BOM) or UTF-16 with a BOM.

Example:
    >>> from cna_lens.evaluation import prompts as prompt_sets
    >>> harmful = prompt_sets.prompts("discovery_harmful")
    >>> benign = prompt_sets.prompts("discovery_benign")
    >>> len(harmful) == len(benign)
    True
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cna_lens.errors import CNAError
from cna_lens.evaluation.metrics import CapabilityItem, load_capability
from cna_lens.models.loading import validate_prompts

__all__ = [
    "split_by_category",
    "PROMPT_SETS",
    "PROMPT_COLUMNS",
    "capability",
    "check_overlap",
    "path",
    "prompts",
    "read_prompts",
    "records",
    "warn_overlap",
]

logger = logging.getLogger(__name__)

PROMPT_SETS: tuple[str, ...] = (
    "discovery_harmful",
    "discovery_benign",
    "eval_harmful",
    "eval_benign",
    "borderline",
    "capability",
    "train_harmful",
    "train_benign",
)
"""Names of the shipped sets, for :func:`path`, :func:`records` and :func:`prompts`."""

PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "goal", "behavior")
"""Column names (matched case-insensitively) that :func:`read_prompts` takes as the prompt
when no column is given: "prompt" (this package), "goal" (AdvBench, JailbreakBench),
"behavior" (HarmBench)."""

_DATA = Path(__file__).parents[1] / "data" / "prompts"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


# ----------------------------------------------------------------------------- shipped sets
def path(name: str) -> Path:
    """The JSON file of a shipped set.

    Raises:
        CNAError: ``name`` is not one of :data:`PROMPT_SETS`.
    """
    if name not in PROMPT_SETS:
        raise CNAError(f"unknown prompt set {name!r}; valid names: {', '.join(PROMPT_SETS)}")
    return _DATA / f"{name}.json"


def records(name: str) -> list[dict[str, Any]]:
    """The raw objects of a shipped set (``{"prompt", "category"}``, or for ``capability``
    ``{"question", "choices", "answer", "subject"}``).

    Raises:
        CNAError: unknown ``name``.
    """
    with path(name).open(encoding="utf-8") as f:
        data: list[dict[str, Any]] = json.load(f)
    return data


def prompts(name: str) -> list[str]:
    """The prompt texts of a shipped set, in file order.

    Raises:
        CNAError: unknown ``name``, or ``"capability"`` (read that with :func:`capability`).
    """
    if name == "capability":
        raise CNAError(
            "'capability' holds questions, not prompts; "
            "use cna_lens.evaluation.prompts.capability() to read it"
        )
    return read_prompts(path(name), column="prompt")


def capability() -> list[CapabilityItem]:
    """The shipped four-choice capability questions, as :class:`CapabilityItem` objects."""
    return load_capability(path("capability"))


# ----------------------------------------------------------------------------- file reader
def split_by_category(name: str) -> tuple[list[str], list[str]]:
    """A shipped prompt set split into two halves of disjoint categories: the *search*
    half (categories at even positions of the sorted category names) and the *held-out*
    half (the others), each in the set's order.

    A tuner searches on one half and reports on the other, so the reported prompts are
    not only unseen but on other topics (e.g. cyber, disinformation, extremism, harassment,
    self-harm and violence vs dangerous chemistry, drugs, fraud, privacy, theft and
    weapons for ``eval_harmful``).

    Raises:
        CNAError: unknown set, or a set without categories.
    """
    recs = records(name)
    if not recs or "category" not in recs[0]:
        raise CNAError(f"prompt set {name!r} has no categories to split by")
    categories = sorted({r["category"] for r in recs})
    search = set(categories[::2])
    first = [r["prompt"] for r in recs if r["category"] in search]
    second = [r["prompt"] for r in recs if r["category"] not in search]
    return first, second


def read_prompts(path: str | os.PathLike[str], *, column: str | None = None) -> list[str]:
    """Prompts from a file, by suffix.

    * ``.txt`` (and any other suffix): one prompt per line; blank lines are skipped and
      the other lines kept exactly (no stripping).
    * ``.json``: a list of strings, or a list of objects whose ``column`` field is the prompt.
    * ``.jsonl`` / ``.ndjson``: one JSON string or object per line (blank lines skipped).
    * ``.csv``: a header row, then one row per prompt (quoted commas and line breaks allowed).

    For objects and CSV rows, ``column=None`` picks the one column whose name is in
    :data:`PROMPT_COLUMNS` (case-insensitive; "prompt", "goal", "behavior") and logs which;
    when none or several match, ``column`` must be given.

    Args:
        path: the prompt file.
        column: the field (JSON objects) or header name (CSV) holding the prompt.

    Returns:
        The prompts, each a non-blank string.

    Raises:
        CNAError: the file is missing, is a directory, cannot be read, is not UTF-8 (or
            UTF-16 with a BOM), does not parse, lacks the column, yields no prompts, or has
            an entry that is not a non-blank string or holds a NUL or lone surrogate.
    """
    p = Path(path)
    where = str(p)
    if p.is_dir():
        raise CNAError(f"prompt file {where!r} is a directory, expected a file")
    if not p.is_file():
        raise CNAError(f"prompt file {where!r} does not exist")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CNAError(f"cannot read prompt file {where!r}: {exc}") from exc
    text = _decode(raw, where)
    suffix = p.suffix.lower()
    if suffix == ".json":
        items = _from_json(text, where, column)
    elif suffix in (".jsonl", ".ndjson"):
        items = _from_jsonl(text, where, column)
    elif suffix == ".csv":
        items = _from_csv(text, where, column)
    else:
        items = [line for line in _LINE_BREAK.split(text) if line.strip()]
    for i, prompt in enumerate(items):  # before validate_prompts: name the exact character
        if not isinstance(prompt, str):
            continue  # validate_prompts names the entry
        if "\x00" in prompt:
            raise CNAError(
                f"{where}[{i}] contains a NUL character ({prompt!r:.60}); "
                f"prompts must be plain text"
            )
        bad = _SURROGATE.search(prompt)
        if bad:
            raise CNAError(
                f"{where}[{i}] contains a lone surrogate U+{ord(bad.group()):04X} "
                f"({prompt!r:.60}); prompts must be valid Unicode text"
            )
    return validate_prompts(items, where)


def _decode(raw: bytes, where: str) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # consumes the BOM
    elif raw.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CNAError(
            f"{where}: cannot decode as {encoding} ({exc.reason} at byte {exc.start}); "
            f"expected UTF-8 (or UTF-16 with a BOM)"
        ) from None


def _from_json(text: str, where: str, column: str | None) -> list[Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise CNAError(
            f"{where}: not valid JSON ({exc}); expected a list of strings "
            f"or of objects with a prompt field"
        ) from None
    if not isinstance(data, list):
        raise CNAError(
            f"{where}: expected a JSON list of strings (or of objects with a "
            f"prompt field), got {type(data).__name__}"
        )
    return _column_values(data, where, column)


def _from_jsonl(text: str, where: str, column: str | None) -> list[Any]:
    data = []
    for number, line in enumerate(_LINE_BREAK.split(text), 1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except (ValueError, RecursionError) as exc:
            raise CNAError(
                f"{where}: line {number} is not valid JSON ({exc}); expected one "
                f"string or object per line"
            ) from None
    return _column_values(data, where, column)


def _column_values(data: list[Any], where: str, column: str | None) -> list[Any]:
    """The prompts of a parsed JSON list: the entries, or their ``column`` when objects."""
    if not any(isinstance(entry, Mapping) for entry in data):
        return data  # strings (validate_prompts names any other entry)
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise CNAError(
                f"{where}[{i}] is {type(entry).__name__} ({entry!r:.60}), expected "
                f"an object like the other entries"
            )
    if column is None:
        names = list(dict.fromkeys(key for entry in data for key in entry))
        column = _pick_column(names, where)
    for i, entry in enumerate(data):
        if column not in entry:
            raise CNAError(
                f"{where}[{i}] has no field {column!r}; its fields are {sorted(map(str, entry))}"
            )
    return [entry[column] for entry in data]


def _pick_column(names: Sequence[str], where: str) -> str:
    matches = [n for n in names if n.strip().lower() in PROMPT_COLUMNS]
    if len(matches) == 1:
        logger.info("%s: reading prompts from column %r", where, matches[0])
        return matches[0]
    hint = ""
    if {m.strip().lower() for m in matches} == {"goal", "behavior"}:
        hint = " (JailbreakBench files hold the request in 'Goal', its short name in 'Behavior')"
    found = f"several candidates {matches}" if matches else "none of " + "/".join(PROMPT_COLUMNS)
    raise CNAError(
        f"{where}: cannot tell which column holds the prompt ({found}); "
        f"available columns: {list(names)}; pass column= "
        f"(--prompt-column on the command line){hint}"
    )


def _from_csv(text: str, where: str, column: str | None) -> list[Any]:
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if any(row)]
    except csv.Error as exc:
        raise CNAError(f"{where}: not a readable CSV file ({exc})") from None
    if not rows:
        raise CNAError(f"{where} is empty; expected a header row and one row per prompt")
    header, body = rows[0], rows[1:]
    if column is None:
        column = _pick_column(header, where)
    stripped = [name.strip() for name in header]
    if column in header:
        index = header.index(column)
    elif column.strip() in stripped:
        index = stripped.index(column.strip())
    else:
        raise CNAError(f"{where}: no column {column!r}; available columns: {header}")
    values = []
    for number, row in enumerate(body, 2):
        if index >= len(row):
            raise CNAError(
                f"{where}: row {number} has {len(row)} fields, too few for column "
                f"{column!r} (field {index + 1} of the header's {len(header)})"
            )
        values.append(row[index])
    return values


# ----------------------------------------------------------------------------- overlap
def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def check_overlap(discovery: Sequence[str], evaluation: Sequence[str]) -> int:
    """How many evaluation prompts also occur among the discovery prompts.

    Prompts are compared after lower-casing and collapsing whitespace.
    """
    seen = {_normalise(p) for p in discovery}
    return sum(_normalise(p) in seen for p in evaluation)


def warn_overlap(discovery: Sequence[str], evaluation: Sequence[str]) -> int:
    """:func:`check_overlap`, logging a warning when the count is not zero.

    Returns:
        The number of evaluation prompts that also occur among the discovery prompts.
    """
    count = check_overlap(discovery, evaluation)
    if count:
        logger.warning(
            "%d of %d evaluation prompts also occur among the %d discovery prompts; "
            "evaluation on them is not held out",
            count,
            len(evaluation),
            len(discovery),
        )
    return count
