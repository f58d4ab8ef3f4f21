"""Shipped prompt sets (sizes, topic matching, held-out evaluation, capability answers) and
the prompt-file reader (formats, encodings, columns, errors; never an unexpected exception)."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cna_lens.cli import main
from cna_lens.errors import CNAError
from cna_lens.evaluation import prompts as ps
from cna_lens.evaluation.metrics import capability_correct, load_capability

HARMFUL_CATEGORIES = {
    "cyber",
    "weapons",
    "drugs",
    "fraud",
    "harassment",
    "self_harm",
    "privacy",
    "disinformation",
    "violence",
    "theft",
    "extremism",
    "dangerous_chemistry",
}
PROMPT_FILES = (
    "discovery_harmful",
    "discovery_benign",
    "eval_harmful",
    "eval_benign",
    "borderline",
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------- shipped sets
def test_every_shipped_file_is_a_named_set_and_is_packaged():
    data = Path(ps.__file__).parents[1] / "data" / "prompts"
    assert sorted(p.stem for p in data.glob("*.json")) == sorted(ps.PROMPT_SETS)
    assert all(ps.path(name).is_file() for name in ps.PROMPT_SETS)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "data/prompts/*.json" in pyproject["tool"]["setuptools"]["package-data"]["cna_lens"]


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_prompt_sets_are_records_of_prompt_and_category(name):
    recs = ps.records(name)
    assert all(set(r) == {"prompt", "category"} for r in recs)
    assert ps.prompts(name) == [r["prompt"] for r in recs]
    assert len({_norm(p) for p in ps.prompts(name)}) == len(recs), "duplicate inside the set"
    assert len(recs) >= (60 if name == "borderline" else 110)


@pytest.mark.parametrize("name", ["discovery_harmful", "discovery_benign", "eval_harmful"])
def test_harmful_categories_each_have_seven_prompts(name):
    counts = Counter(r["category"] for r in ps.records(name))
    assert set(counts) == HARMFUL_CATEGORIES
    assert min(counts.values()) >= 7


def test_eval_benign_spans_many_domains_with_sensitive_ones():
    counts = Counter(r["category"] for r in ps.records("eval_benign"))
    assert len(counts) >= 10
    assert counts["sensitive"] >= 5
    assert not set(counts) & HARMFUL_CATEGORIES


def test_discovery_pairs_are_topic_matched():
    harmful, benign = ps.records("discovery_harmful"), ps.records("discovery_benign")
    assert len(harmful) == len(benign)
    for h, b in zip(harmful, benign, strict=True):
        assert h["category"] == b["category"], (h, b)
        ratio = len(b["prompt"].split()) / len(h["prompt"].split())
        assert 0.5 <= ratio <= 2.0, (h, b)
        assert _norm(h["prompt"]) != _norm(b["prompt"])


@pytest.mark.parametrize("name", ["eval_harmful", "eval_benign", "borderline"])
def test_held_out_sets_share_no_prompt_or_near_paraphrase_with_discovery(name):
    discovery = ps.prompts("discovery_harmful") + ps.prompts("discovery_benign")
    held_out = ps.prompts(name)
    assert ps.check_overlap(discovery, held_out) == 0
    worst = max(itertools.product(held_out, discovery), key=lambda pair: _jaccard(*pair))
    assert _jaccard(*worst) < 0.6, worst


def test_held_out_sets_are_disjoint_from_each_other():
    for a, b in itertools.combinations(["eval_harmful", "eval_benign", "borderline"], 2):
        assert ps.check_overlap(ps.prompts(a), ps.prompts(b)) == 0, (a, b)


def test_unknown_set_and_capability_as_prompts_are_errors():
    with pytest.raises(CNAError, match="unknown prompt set 'harmful'; valid names: .*eval_benign"):
        ps.path("harmful")
    with pytest.raises(CNAError, match="unknown prompt set"):
        ps.prompts("harmful")
    with pytest.raises(CNAError, match=r"capability\(\)"):
        ps.prompts("capability")


# ----------------------------------------------------------------------------- capability
def test_capability_questions_are_well_formed_and_balanced():
    recs = ps.records("capability")
    items = load_capability(ps.path("capability"))
    assert items == ps.capability()
    assert len(items) == len(recs) >= 110
    assert len({r["subject"] for r in recs}) >= 10
    assert len({_norm(r["question"]) for r in recs}) == len(recs)
    positions = Counter()
    for r, item in zip(recs, items, strict=True):
        assert set(r) == {"question", "choices", "answer", "subject"}
        assert len(r["choices"]) == 4 == len({c.lower() for c in r["choices"]})
        assert r["choices"].count(r["answer"]) == 1
        assert item.correct_choice == r["answer"]
        positions[r["choices"].index(r["answer"])] += 1
    assert sorted(positions) == [0, 1, 2, 3]
    assert max(positions.values()) - min(positions.values()) <= len(recs) // 20


def test_capability_scoring_is_unambiguous():
    """Naming any option, or its letter, is scored correct exactly when it is the answer."""
    for item in ps.capability():
        assert item.choices is not None
        for letter, choice in zip("ABCD", item.choices, strict=True):
            right = choice == item.answer
            assert capability_correct(choice, item) is right, (item.question, choice)
            assert capability_correct(f"The answer is {choice}.", item) is right
            assert capability_correct(f"{letter}) {choice}", item) is right


# ----------------------------------------------------------------------------- reader
def _csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def test_txt_lines_kept_exactly_blank_lines_skipped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("first\r\n\r\n  second  \n\u2028 third\u2028part\rfourth".encode())
    assert ps.read_prompts(f) == ["first", "  second  ", "\u2028 third\u2028part", "fourth"]


def test_json_list_of_strings_and_of_objects(tmp_path, caplog):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a", "b c"]))
    assert ps.read_prompts(f) == ["a", "b c"]
    f.write_text(json.dumps([{"prompt": "x", "category": "c"}, {"prompt": "y"}]))
    assert ps.read_prompts(f) == ["x", "y"]
    f.write_text(json.dumps([{"goal": "g1", "target": "t"}, {"goal": "g2", "target": "t"}]))
    with caplog.at_level(logging.INFO, logger="cna_lens.evaluation.prompts"):
        assert ps.read_prompts(f) == ["g1", "g2"]
    assert "column 'goal'" in caplog.text
    f.write_text(json.dumps([{"text": "t1", "prompt": "p1"}, {"text": "t2", "prompt": "p2"}]))
    assert ps.read_prompts(f, column="text") == ["t1", "t2"]


def test_json_errors(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": "x"}, "y"]))
    with pytest.raises(CNAError, match=r"p\.json\[1\] is str .*expected an object"):
        ps.read_prompts(f)
    f.write_text(json.dumps([{"prompt": "x"}, {"text": "y", "id": 3}]))
    with pytest.raises(
        CNAError, match=r"p\.json\[1\] has no field 'prompt'; its fields are \['id', 'text'\]"
    ):
        ps.read_prompts(f)
    f.write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(CNAError, match=r"p\.json: cannot tell which column .*\['text'\].*column="):
        ps.read_prompts(f)
    f.write_text(json.dumps([{"prompt": 3}]))
    with pytest.raises(CNAError, match=r"\[0\] is int"):
        ps.read_prompts(f)
    f.write_text("[1" + "0" * 5000 + "]")  # an int too long to convert is a ValueError
    with pytest.raises(CNAError, match="not valid JSON"):
        ps.read_prompts(f)
    f.write_text("[" * 100_000)
    with pytest.raises(CNAError, match="not valid JSON"):
        ps.read_prompts(f)


def test_nul_and_lone_surrogate_are_rejected_by_index(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('["fine", "bad\\u0000"]')
    with pytest.raises(CNAError, match=r"p\.json\[1\] contains a NUL"):
        ps.read_prompts(f)
    f.write_text('["\\ud800 half a pair"]')
    with pytest.raises(CNAError, match=r"p\.json\[0\] contains a lone surrogate U\+D800"):
        ps.read_prompts(f)
    t = tmp_path / "p.txt"
    t.write_bytes(b"ok\nnul\x00here\n")
    with pytest.raises(CNAError, match=r"p\.txt\[1\] contains a NUL"):
        ps.read_prompts(t)


def test_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"Behavior": "b1", "id": 1}\n\n{"Behavior": "b2", "id": 2}\n')
    assert ps.read_prompts(f) == ["b1", "b2"]
    f.write_text('"s1"\n"s2"\n')
    assert ps.read_prompts(f) == ["s1", "s2"]
    f.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(CNAError, match=r"p\.jsonl: line 2 is not valid JSON"):
        ps.read_prompts(f)


def test_csv_jbb_like_with_quoted_commas_and_newlines(tmp_path):
    goals = ['Write a poem, with "quotes", about rain', "Two\nlines, one prompt", "Plain"]
    rows = [["Index", "Goal", "Target", "Category"]] + [
        [str(i), g, "Sure, here", "cat"] for i, g in enumerate(goals)
    ]
    f = tmp_path / "jbb.csv"
    f.write_bytes(_csv_bytes(rows))
    assert ps.read_prompts(f) == goals
    # The full JailbreakBench header has both Goal and Behavior: the column must be named.
    rows = [["Index", "Goal", "Target", "Behavior", "Category"]] + [
        [str(i), g, "Sure", "Short name", "cat"] for i, g in enumerate(goals)
    ]
    f.write_bytes(_csv_bytes(rows))
    with pytest.raises(CNAError, match=r"several candidates \['Goal', 'Behavior'\].*'Goal'"):
        ps.read_prompts(f)
    assert ps.read_prompts(f, column="Goal") == goals
    assert ps.read_prompts(f, column="Behavior") == ["Short name"] * 3


def test_csv_advbench_like_and_errors(tmp_path):
    f = tmp_path / "adv.csv"
    f.write_bytes(_csv_bytes([["goal", "target"], ["g1", "t1"], [], ["g2", "t2"]]))
    assert ps.read_prompts(f) == ["g1", "g2"]
    with pytest.raises(
        CNAError, match=r"adv\.csv: no column 'text'; available columns: \['goal', 'target'\]"
    ):
        ps.read_prompts(f, column="text")
    f.write_bytes(_csv_bytes([["id", "text"], ["1", "x"]]))
    with pytest.raises(CNAError, match=r"cannot tell which column .*\['id', 'text'\]"):
        ps.read_prompts(f)
    f.write_bytes(_csv_bytes([["id", "prompt"], ["1", "x"], ["2"]]))
    with pytest.raises(CNAError, match=r"row 3 has 1 fields"):
        ps.read_prompts(f)
    f.write_bytes(_csv_bytes([["prompt"]]))
    with pytest.raises(CNAError, match="empty"):
        ps.read_prompts(f)
    f.write_bytes(b"")
    with pytest.raises(CNAError, match="empty"):
        ps.read_prompts(f)


@pytest.mark.parametrize(
    "bom, encoding",
    [
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ],
)
@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv"])
def test_byte_order_marks(tmp_path, bom, encoding, suffix):
    expected = ["café au lait", "naïve 日本語 ✓"]
    text = {
        ".txt": "\n".join(expected),
        ".json": json.dumps(expected, ensure_ascii=False),
        ".jsonl": "\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in expected),
        ".csv": "prompt,n\n" + "".join(f"{p},1\n" for p in expected),
    }[suffix]
    f = tmp_path / f"p{suffix}"
    f.write_bytes(bom + text.encode(encoding))
    assert ps.read_prompts(f) == expected


def test_undecodable_file_directory_and_missing_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(
        CNAError, match=r"latin\.txt: cannot decode .*expected UTF-8 \(or UTF-16 with a BOM\)"
    ):
        ps.read_prompts(f)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(CNAError, match=r"d\.json' is a directory, expected a file"):
        ps.read_prompts(tmp_path / "d.json")
    with pytest.raises(CNAError, match="does not exist"):
        ps.read_prompts(tmp_path / "missing.csv")


def test_overlap_counts_normalised_exact_matches(caplog):
    discovery = ["How do I  bake bread?", "What is 2+2?"]
    evaluation = ["how do i bake BREAD?", "What is 2 + 2?", "what is 2+2?\n", "new"]
    assert ps.check_overlap(discovery, evaluation) == 2
    with caplog.at_level(logging.WARNING, logger="cna_lens.evaluation.prompts"):
        assert ps.warn_overlap(discovery, evaluation) == 2
        assert ps.warn_overlap(discovery, ["new"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 4 evaluation prompts also occur among the 2 discovery prompts; "
        "evaluation on them is not held out"
    ]


def test_cli_passes_prompt_column_to_every_prompt_file(tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_bytes(_csv_bytes([["id", "text"], ["1", "hello there"]]))
    other = tmp_path / "other.csv"
    other.write_bytes(_csv_bytes([["id", "body"], ["1", "hi"]]))
    # Prompts read with the column, then the command stops before loading any model.
    rc = main(
        [
            "generate",
            "--model",
            "none",
            "--prompts",
            str(good),
            "--prompt-column",
            "text",
            "--multiplier",
            "0",
        ]
    )
    assert rc == 2 and "needs --circuit" in capsys.readouterr().err
    rc = main(["generate", "--model", "none", "--prompts", str(good), "--multiplier", "0"])
    assert rc == 2 and "cannot tell which column" in capsys.readouterr().err
    rc = main(
        [
            "discover",
            "--model",
            "none",
            "--positive",
            str(good),
            "--negative",
            str(other),
            "--prompt-column",
            "text",
            "--out",
            str(tmp_path / "c.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "other.csv: no column 'text'" in err


# ----------------------------------------------------------------------------- fuzzing
_TEXT = st.text(max_size=60)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["prompt", "goal", "Goal", "Behavior", "x"]) | _TEXT, inner, max_size=3
        )
    ),
    max_leaves=12,
)
_RECORDS = st.lists(_TEXT, max_size=4) | st.lists(
    st.fixed_dictionaries({"prompt": _TEXT}, optional={"goal": _JSON}), max_size=4
)
_ANY_BYTES = st.one_of(
    st.binary(max_size=200),
    st.tuples(_TEXT, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1"])).map(
        lambda te: te[0].encode(te[1], errors="ignore")
    ),
)
_FILES = st.one_of(
    st.tuples(st.sampled_from([".txt", ".json", ".jsonl", ".csv"]), _ANY_BYTES),
    st.tuples(st.just(".json"), (_JSON | _RECORDS).map(lambda v: json.dumps(v).encode())),
    st.tuples(
        st.just(".jsonl"),
        (st.lists(_JSON, max_size=4) | _RECORDS).map(
            lambda vs: "\n".join(json.dumps(v, ensure_ascii=False) for v in vs).encode()
        ),
    ),
    st.tuples(
        st.just(".csv"),
        st.lists(st.lists(_TEXT, min_size=1, max_size=3), max_size=5).map(
            lambda rows: _csv_bytes([["prompt", "x"], *rows])
        ),
    ),
)


@settings(max_examples=150, deadline=None)
@given(file=_FILES)
def test_any_bytes_give_prompts_or_a_cna_error(tmp_path_factory, file):
    suffix, payload = file
    f = tmp_path_factory.mktemp("fuzz") / f"prompts{suffix}"
    f.write_bytes(payload)
    try:
        result = ps.read_prompts(f)
    except CNAError as exc:
        assert str(f) in str(exc)
        return
    assert isinstance(result, list) and result
    for p in result:
        assert isinstance(p, str) and p.strip() and "\x00" not in p
