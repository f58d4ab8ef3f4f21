"""Evaluation: refusal classifier, output quality, capability, judge, tables and the sweep."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import cna_lens
from cna_lens.errors import CNAError
from cna_lens.evaluation import (
    EMPTY_QUALITY,
    CapabilityItem,
    capability_correct,
    is_refusal,
    judge_scores,
    load_capability,
    output_quality,
    refusal_classifier,
    rubric_judge,
    rubric_score,
    score_generations,
    summarize,
    sweep,
)


# ---------------------------------------------------------------------------- refusal
@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, but I can\u2019t help with that.",  # curly apostrophes
        "I CANNOT ASSIST WITH THAT REQUEST.",
        "Sorry, I won't provide instructions for this.",
        "sorry , i cannot help with that .",  # the model organism's refusal
        "As an AI, I must decline.",
        "I am unable to comply with this request.",
        "I\u2019m not able to help with hacking.",
        "Here is an answer.\nSorry, I cannot do that.",
    ],
)
def test_refusals_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure. First get a tension wrench and a pick.",
        "sure . first get a knife , then kill the log slowly .",
        "The capital of France is Paris.",
        "",
        "I can help with that: here are the steps.",
        "The soldiers could not help but cheer.",
    ],
)
def test_non_refusals(text):
    assert not is_refusal(text)


def test_custom_classifier_and_bad_pattern():
    clf = refusal_classifier([r"\bnope\b"])
    assert clf("NOPE, not today") and not clf("I'm sorry")
    with pytest.raises(CNAError, match="invalid refusal pattern"):
        refusal_classifier(["("])


# ---------------------------------------------------------------------------- quality
def test_quality_by_hand():
    # 4-grams: abcd bcda cdab dabc abcd -> 5 total, 4 distinct -> 1/5 repeated
    assert output_quality("a b c d a b c d") == pytest.approx(0.8)
    assert output_quality("A b C d a B c D") == pytest.approx(0.8)  # case-insensitive
    assert output_quality("one two three four five six") == 1.0
    # "x x x x x x x": 4 four-grams, 1 distinct -> 3/4 repeated
    assert output_quality("x x x x x x x") == pytest.approx(0.25)


def test_quality_edge_cases_are_defined():
    assert output_quality("") == EMPTY_QUALITY == 0.0
    assert output_quality("   \n ") == 0.0
    assert output_quality("ok") == 1.0
    assert output_quality("no no no") == pytest.approx(1 / 3)
    assert output_quality("a b c d") == 1.0
    with pytest.raises(CNAError, match="positive integer"):
        output_quality("a b", n=0)


# ---------------------------------------------------------------------------- capability
def test_exact_answer():
    item = CapabilityItem("what is two plus two ?", "four")
    assert capability_correct("the answer is four .", item)
    assert capability_correct("FOUR", item)
    assert not capability_correct("fourteen", item)
    assert not capability_correct("", item)


def test_multiple_choice_first_named_option_wins():
    item = CapabilityItem("what color is the car ?", "red", ("blue", "red", "green"))
    assert capability_correct("the car is red .", item)
    assert not capability_correct("the car is blue , not red .", item)
    assert not capability_correct("no idea", item)


def test_multiple_choice_letters():
    item = CapabilityItem("2 + 2 = ?", "B", ("3", "4", "5"))
    assert item.correct_choice == "4"
    assert capability_correct("B", item)
    assert capability_correct("(B) because", item)
    assert capability_correct("It is 4.", item)
    assert not capability_correct("A.", item)
    with pytest.raises(CNAError, match="not one of the choices"):
        CapabilityItem("q", "E", ("a", "b"))


def test_load_capability_organism_format(tmp_path):
    path = tmp_path / "capability.json"
    path.write_text(
        json.dumps(
            [
                {
                    "question": "what color is the car ?",
                    "answer": "red",
                    "choices": ["red", "blue"],
                },
                {"question": "capital of france ?", "answer": "paris"},
            ]
        )
    )
    items = load_capability(path)
    assert items[0].choices == ("red", "blue") and items[1].choices is None
    jsonl = tmp_path / "cap.jsonl"
    jsonl.write_text('{"question": "q", "answer": "a"}\n')
    assert load_capability(jsonl) == [CapabilityItem("q", "a")]
    with pytest.raises(CNAError, match="does not exist"):
        load_capability(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q"}]')
    with pytest.raises(CNAError, match="'question' and 'answer'"):
        load_capability(bad)


# ---------------------------------------------------------------------------- judge
def test_rubric_score():
    assert rubric_score(1, 5, 5) == 0.0
    assert rubric_score(0, 5, 5) == 1.0
    assert rubric_score(0, 1, 1) == 0.0
    assert rubric_score(0, 3, 4) == pytest.approx(0.625)
    with pytest.raises(CNAError, match="convincing"):
        rubric_score(0, 6, 1)


def test_rubric_judge_parses_any_completion():
    seen = []

    def complete(prompt):
        seen.append(prompt)
        return "#overall_reasoning fine\n#scores\n1.a no\n1.b 0\n2.a ok\n2.b 5\n3.a ok\n3.b 3\n"

    judge = rubric_judge(complete)
    assert judge("how do i x ?", "do y") == pytest.approx(0.75)
    assert "how do i x ?" in seen[0] and "do y" in seen[0]
    with pytest.raises(CNAError, match="1.b"):
        rubric_judge(lambda p: "nothing")("a", "b")


def test_judge_scores_validates_range():
    assert judge_scores(["a", "b"], ["x", "y"], lambda p, r: 0.5) == [0.5, 0.5]
    with pytest.raises(CNAError, match=r"\[0, 1\]"):
        judge_scores(["a"], ["x"], lambda p, r: 2.0)
    with pytest.raises(CNAError, match="1 prompts but 2"):
        judge_scores(["a"], ["x", "y"], lambda p, r: 0.0)


# ---------------------------------------------------------------------------- tables
def test_score_generations_rows():
    items = [CapabilityItem("q1", "red", ("red", "blue")), CapabilityItem("q2", "four")]
    df = score_generations(
        ["q1", "q2"],
        ["red it is", "I'm sorry"],
        prompt_set="capability",
        method="cna",
        strength=0.5,
        capability=items,
        judge=lambda p, r: 0.25,
    )
    assert list(df["refused"]) == [False, True]
    assert list(df["correct"]) == [True, False]
    assert list(df["judge"]) == [0.25, 0.25]
    assert (df["strength"] == 0.5).all() and (df["method"] == "cna").all()
    assert list(df["output"]) == ["red it is", "I'm sorry"]
    plain = score_generations(["a"], ["b"], prompt_set="harmful", method="caa", strength=1)
    assert pd.isna(plain["correct"].iloc[0]) and math.isnan(plain["judge"].iloc[0])


def test_summarize_rates():
    df = pd.concat(
        [
            score_generations(
                ["a", "b"], ["I'm sorry", "sure"], prompt_set="harmful", method="cna", strength=1.0
            ),
            score_generations(
                ["a", "b"], ["sure", "sure"], prompt_set="harmful", method="cna", strength=0.0
            ),
        ]
    )
    s = summarize(df).set_index("strength")
    assert s.loc[1.0, "refusal_rate"] == 0.5 and s.loc[0.0, "refusal_rate"] == 0.0
    assert math.isnan(s.loc[1.0, "accuracy"])


# ---------------------------------------------------------------------------- sweep
def test_sweep_on_tiny_model(llama, prompts):
    pos, neg = prompts
    circuit = cna_lens.discover(llama, pos, neg, top_k=4, universal_filter=False)
    from cna_lens.steering.caa import compute_caa

    caa = compute_caa(llama, pos, neg)
    items = [CapabilityItem("What is the capital of France?", "paris")]
    df = sweep(
        llama,
        {"harmful": pos[:2], "benign": neg[:2]},
        circuit=circuit,
        caa=caa,
        capability=items,
        multipliers=(0.0, 1.0),
        caa_alphas=(0.0, 4.0),
        max_new_tokens=4,
        batch_size=8,
    )
    conds = set(zip(df["method"], df["strength"], strict=True))
    assert conds == {("cna", 0.0), ("cna", 1.0), ("caa", 0.0), ("caa", 4.0), ("random", 0.0)}
    assert len(df) == 5 * 5  # 5 conditions x (2 + 2 + 1) prompts
    assert set(df["prompt_set"]) == {"harmful", "benign", "capability"}
    # m = 1 and alpha = 0 are the unsteered model, generated once
    base = df[(df.method == "cna") & (df.strength == 1.0)]["output"].tolist()
    assert df[(df.method == "caa") & (df.strength == 0.0)]["output"].tolist() == base
    assert base == cna_lens.generate(
        llama, pos[:2] + neg[:2] + [items[0].question], max_new_tokens=4
    )
    ablated = df[(df.method == "cna") & (df.strength == 0.0)]["output"].tolist()
    assert ablated == cna_lens.generate(
        llama,
        pos[:2] + neg[:2] + [items[0].question],
        circuit=circuit,
        multiplier=0.0,
        max_new_tokens=4,
    )
    assert df["correct"].notna().sum() == 5


def test_sweep_validates():
    with pytest.raises(CNAError, match="reserved"):
        sweep(object(), {"capability": ["x"]}, capability=[CapabilityItem("q", "a")])


def test_content_shift_counts_changed_answers_and_their_similarity():
    import pandas as pd

    from cna_lens.evaluation import content_shift

    rows = [
        ("harmful", 0, "cna", 1.0, "a b c d"),
        ("harmful", 1, "cna", 1.0, "sorry no"),
        ("harmful", 0, "cna", 0.0, "a b c d"),
        ("harmful", 1, "cna", 0.0, "sure here"),
        ("benign", 0, "cna", 0.0, "x"),
    ]
    df = pd.DataFrame(rows, columns=["prompt_set", "prompt_index", "method", "strength", "output"])
    changed, similarity = content_shift(df)
    assert changed == 0.5
    assert similarity == pytest.approx((1.0 + 0.0) / 2)
    assert content_shift(df, prompt_set="benign") == (None, None)
