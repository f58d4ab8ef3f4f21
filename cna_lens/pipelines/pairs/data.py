"""The training conversations of a pair: written refusals and the teacher's own answers."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.evaluation.metrics import is_refusal
from cna_lens.models.loading import encode_for
from cna_lens.pipelines.pairs.config import FinetuneConfig

__all__ = ["Example", "batches", "encode_example", "refusal", "training_examples"]


_OPENINGS: tuple[str, ...] = (
    "I can't help with that.",
    "I'm sorry, but I can't help with this request.",
    "I won't help with that.",
    "Sorry, I can't assist with that.",
    "I'm not able to help with this.",
    "I can't provide that.",
)

_REASONS: dict[str, str] = {
    "cyber": "Getting into systems or accounts you don't own, or writing malware, is illegal "
    "and hurts real people.",
    "weapons": "Instructions for making or using weapons to hurt people could lead to "
    "serious harm.",
    "drugs": "Making, hiding or dealing illegal drugs puts people's health and lives at risk.",
    "fraud": "Deceiving people out of their money or identity is fraud and causes real harm.",
    "harassment": "Targeting, threatening or humiliating someone causes real harm to them.",
    "self_harm": "Your safety matters, and I don't want to help with anything that could hurt you.",
    "privacy": "Tracking people or exposing their private information without consent "
    "violates their privacy and can put them in danger.",
    "disinformation": "Spreading false information on purpose misleads people and can cause "
    "real damage.",
    "violence": "Helping to hurt or threaten someone could lead to serious harm.",
    "theft": "Stealing from people or businesses is illegal and harms them.",
    "extremism": "Promoting extremist violence or recruiting for it endangers people.",
    "dangerous_chemistry": "Making dangerous or toxic substances could seriously injure people.",
}

_OFFERS: dict[str, str] = {
    "self_harm": "If you are going through a hard time, please reach out to someone you "
    "trust or a local crisis line. I'm here to talk if you want.",
}
_DEFAULT_OFFER = "If you have a safe and legal question on this topic, I'm happy to help."


def refusal(category: str, index: int) -> str:
    """The refusal the tuned model is trained to give to a harmful prompt.

    An opening (one of six, by ``index``), a reason for the prompt's category and an offer
    of safe help; an unknown category gets a generic reason.
    """
    opening = _OPENINGS[index % len(_OPENINGS)]
    reason = _REASONS.get(category, "This request could cause real harm to people.")
    return f"{opening} {reason} {_OFFERS.get(category, _DEFAULT_OFFER)}"


@dataclass(frozen=True)
class Example:
    """One training conversation: a user prompt and the answer taught."""

    prompt: str
    answer: str
    kind: str
    """"refuse" (a harmful prompt) or "answer" (a benign prompt)."""
    complete: bool
    """The answer ends the turn (the end-of-turn token is trained after it)."""


def _prompt_records(name: str, n: int | None) -> list[dict[str, Any]]:
    recs = prompt_sets.records(name)
    return recs if n is None else recs[:n]


def _teacher_answers(
    hf_model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, progress: bool
) -> list[tuple[str, bool]]:
    """The model's greedy answers, with whether each ended before ``max_new_tokens``."""
    eos = tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[tuple[str, bool]] = []
    try:
        batch = 16
        for i in tqdm(range(0, len(prompts), batch), desc="teacher answers", disable=not progress):
            ids = [
                encode_for(tokenizer, p, chat=_is_chat(tokenizer)) for p in prompts[i : i + batch]
            ]
            enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            with torch.no_grad():
                gen = hf_model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or eos,
                )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                ended = eos in row
                ids = row[: row.index(eos)] if ended else row
                out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), ended))
    finally:
        tokenizer.padding_side = old_side
    return out


def training_examples(
    hf_model: Any, tokenizer: Any, config: FinetuneConfig, *, progress: bool = False
) -> tuple[list[Example], dict[str, int]]:
    """The training conversations of an adapter and counts of what was kept.

    Harmful prompts get :func:`refusal`; benign prompts get the untuned model's own greedy
    answer (``config.teacher_tokens`` tokens at most), dropped when empty or when
    :func:`cna_lens.evaluation.metrics.is_refusal` counts it as a refusal.
    """
    harmful = _prompt_records("train_harmful", config.n_harmful)
    benign = _prompt_records("train_benign", config.n_benign)
    examples = [
        Example(r["prompt"], refusal(r.get("category", ""), i), "refuse", True)
        for i, r in enumerate(harmful)
    ]
    answers = _teacher_answers(
        hf_model, tokenizer, [r["prompt"] for r in benign], config.teacher_tokens, progress
    )
    dropped = 0
    for r, (text, ended) in zip(benign, answers, strict=True):
        if not text or is_refusal(text):
            dropped += 1
            continue
        examples.append(Example(r["prompt"], text, "answer", ended))
    counts = {"harmful": len(harmful), "benign": len(benign) - dropped, "benign_dropped": dropped}
    return examples, counts


def _is_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_example(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) of one conversation; the prompt is encoded
    as the evaluation feeds it (:func:`cna_lens.models.loading.encode_for`)."""
    prompt_ids = encode_for(tokenizer, ex.prompt, chat=_is_chat(tokenizer))
    answer_ids = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
    if ex.complete and tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batches(
    tokenizer: Any, examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[Any]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(order), batch_size):
        encoded = [encode_example(tokenizer, examples[j]) for j in order[i : i + batch_size]]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (x, y) in enumerate(encoded):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
