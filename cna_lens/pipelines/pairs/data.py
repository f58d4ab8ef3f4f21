"""The training conversations of a pair: written refusals and the teacher's own answers."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cna_lens.errors import CNAError
from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.evaluation.metrics import is_refusal
from cna_lens.io import atomic_write_text
from cna_lens.models import zoo
from cna_lens.models.loading import encode_for
from cna_lens.pipelines.pairs.config import ChatFormat, FinetuneConfig

__all__ = [
    "Example",
    "apply_chat",
    "batches",
    "encode_example",
    "load_hf",
    "refusal",
    "teacher_answers",
    "training_examples",
]


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


def load_hf(path: str | Path, chat: ChatFormat | None = None) -> tuple[Any, Any]:
    """A plain float32 HF model and its tokenizer from a directory, in ``chat``'s format
    when given (:func:`apply_chat`).

    Raises:
        CNAError: not a HF model directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CNAError(f"{path} is not a HF model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if chat is not None:
        apply_chat(model, tokenizer, chat)
    return model, tokenizer


def apply_chat(model: Any, tokenizer: Any, chat: ChatFormat) -> None:
    """Give a model without a chat template ``chat``'s template and end-of-turn token: the
    tokenizer's ``chat_template`` and ``eos_token``, and generation stops at the end of
    turn as well as at the old end of text (what a saved tuned model keeps).

    Raises:
        CNAError: the end-of-turn token is not one token of the vocabulary.
    """
    ids = tokenizer.convert_tokens_to_ids([chat.end_of_turn])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise CNAError(f"the tokenizer has no token {chat.end_of_turn!r} to end a turn with")
    old_eos = tokenizer.eos_token_id
    tokenizer.chat_template = chat.template
    tokenizer.eos_token = chat.end_of_turn
    stops = [ids[0]] + ([old_eos] if old_eos is not None and old_eos != ids[0] else [])
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops


def teacher_answers(
    teacher: str | Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    progress: bool = False,
) -> list[tuple[str, bool]]:
    """A teacher model's greedy answers to ``prompts`` (text, whether it ended), computed
    once and cached under ``$CNA_LENS_CACHE/teacher`` by the teacher folder's name, the
    prompts, the length and the library versions.

    Args:
        teacher: The teacher's HF directory (a zoo model's ``model_path(NAME, hf=True)``).
        prompts: The user prompts, fed in the teacher's own chat format.
        max_new_tokens: Answer length cap.
        progress: Show a progress bar.
    """
    from importlib.metadata import version

    key = json.dumps(
        [
            Path(teacher).name,
            list(prompts),
            max_new_tokens,
            version("torch"),
            version("transformers"),
        ]
    )
    path = zoo.cache_dir() / "teacher" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return [(str(t), bool(e)) for t, e in json.loads(path.read_text(encoding="utf-8"))]
    model, tokenizer = load_hf(teacher)
    model.eval()
    answers = _teacher_answers(model, tokenizer, prompts, max_new_tokens, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(answers) + "\n")
    return answers


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
    hf_model: Any,
    tokenizer: Any,
    config: FinetuneConfig,
    *,
    teacher: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[Example], dict[str, int]]:
    """The training conversations of an adapter and counts of what was kept.

    Harmful prompts get :func:`refusal`; benign prompts get a greedy answer
    (``config.teacher_tokens`` tokens at most) of ``teacher`` (a HF directory,
    :func:`teacher_answers`) or, without one, of the untuned model itself; answers that are
    empty or that :func:`cna_lens.evaluation.metrics.is_refusal` counts as refusals are
    dropped.
    """
    harmful = _prompt_records("train_harmful", config.n_harmful)
    benign = _prompt_records("train_benign", config.n_benign)
    examples = [
        Example(r["prompt"], refusal(r.get("category", ""), i), "refuse", True)
        for i, r in enumerate(harmful)
    ]
    prompts = [r["prompt"] for r in benign]
    if teacher is None:
        answers = _teacher_answers(hf_model, tokenizer, prompts, config.teacher_tokens, progress)
    else:
        answers = teacher_answers(teacher, prompts, config.teacher_tokens, progress=progress)
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
