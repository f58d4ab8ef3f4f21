"""Untuned/tuned pairs on pretrained weights: a real model and a refusal fine-tune of it.

The paper's base-vs-instruct question (does alignment repurpose which late-layer neurons
gate refusal?) needs a pair where fine-tuning could change every layer. A pair here is a
real pretrained model from :mod:`cna_lens.models.zoo` ("untuned") and the same model with a LoRA
adapter this project trained and ships ("tuned"): LoRA on every attention and MLP
projection of every layer, merged into the weights at load, so no layer is frozen by
construction.

The adapter is trained by :func:`train_adapter` (``cna-lens pair train NAME``), deterministic
for a given machine and thread count:

* **harmful** training prompts (``train_harmful``, written for this project, sharing no
  prompt with the discovery or evaluation sets) are answered with a refusal written here
  (:func:`refusal`: an opening, a reason for the prompt's category, an offer of safe help);
* **benign** training prompts (``train_benign``) are answered with the untuned model's own
  greedy answer (self-distillation), so the tuned model keeps its helpful behaviour and
  style; answers the keyword classifier counts as refusals are dropped.

Only the adapter (``cna_lens/data/pairs/NAME/``, a few MB) ships; the merged model is
written once into the cache (``$CNA_LENS_CACHE``, default ``~/.cache/cna_lens``).

Example:
    >>> from cna_lens.pipelines import pairs as pairs  # doctest: +SKIP
    >>> untuned, tuned = pairs.pair_paths("smollm2-refusal")  # merged once, cached
    >>> model = cna_lens.load_model(tuned)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cna_lens.errors import CNAError
from cna_lens.io import atomic_write_text
from cna_lens.models.loading import encode_for

__all__ = [
    "LORA_TARGETS",
    "PAIRS",
    "Example",
    "Pair",
    "TrainConfig",
    "adapter_dir",
    "get_pair",
    "behaviour",
    "list_pairs",
    "merge_adapter",
    "pair_paths",
    "refusal",
    "register",
    "train_adapter",
    "training_examples",
]

logger = logging.getLogger(__name__)

LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The linear layers LoRA adapts in every block (attention and MLP of llama-style models)."""

_DATA = Path(__file__).parents[1] / "data" / "pairs"
_ADAPTER_FILE = "adapter_model.safetensors"
_RECORD_FILE = "training.json"


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How an adapter is trained (recorded in the adapter's ``training.json``).

    Attributes:
        rank, alpha, dropout: LoRA rank, scaling numerator (update = alpha / rank * B A)
            and dropout.
        target_modules: Linear layer names adapted in every block.
        learning_rate: AdamW learning rate (linear warm-up over 10% of the steps, then
            linear decay to 0).
        epochs: Passes over the training examples.
        batch_size: Examples per optimiser step.
        max_steps: Stop after this many steps (None: all epochs); the tests train a few.
        teacher_tokens: Length of the untuned model's benign answers.
        n_harmful, n_benign: Caps on the training prompt sets (None: all).
        seed: Seed of the LoRA initialisation and the shuffling.
        threads: torch CPU threads while training (results depend on it in the last bits).
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    learning_rate: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    max_steps: int | None = None
    teacher_tokens: int = 64
    n_harmful: int | None = None
    n_benign: int | None = None
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("rank", "epochs", "batch_size", "teacher_tokens", "threads"):
            if int(getattr(self, name)) < 1:
                raise CNAError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "n_harmful", "n_benign"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CNAError(f"TrainConfig.{name} must be >= 1 or None, got {v}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise CNAError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise CNAError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise CNAError("TrainConfig.target_modules is empty; LoRA needs layers to adapt")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CNAError(
                f"unknown TrainConfig keys {unknown}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass(frozen=True)
class Pair:
    """An untuned/tuned pair: a zoo model and the shipped adapter trained on it.

    Attributes:
        name: Short name (``--pair NAME``).
        base: The untuned model's name in :data:`cna_lens.models.zoo.REAL_MODELS`.
        description: One line for ``--list-pairs`` users and the README.
        train: The training settings that made the shipped adapter.
    """

    name: str
    base: str
    description: str
    train: TrainConfig = field(default_factory=TrainConfig)


PAIRS: dict[str, Pair] = {
    p.name: p
    for p in (
        Pair(
            name="smollm2-refusal",
            base="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (rarely refuses) and a LoRA refusal fine-tune "
            "of it (all 30 layers, attention and MLP)",
            train=TrainConfig(epochs=2),
        ),
    )
}
"""The pairs ``cna-lens reproduce --pair NAME`` knows, by name."""


def list_pairs() -> list[str]:
    """The names of the available pairs, sorted."""
    return sorted(PAIRS)


def get_pair(name: str) -> Pair:
    """The pair called ``name``.

    Raises:
        CNAError: unknown name (the message lists the available pairs).
    """
    if name not in PAIRS:
        raise CNAError(f"unknown pair {name!r}; available pairs: {', '.join(list_pairs())}")
    return PAIRS[name]


def adapter_dir(name: str) -> Path:
    """The shipped adapter folder of a pair (``adapter_config.json``, weights, record).

    Raises:
        CNAError: unknown pair, or its adapter is not in the package.
    """
    path = _DATA / get_pair(name).name
    if not (path / _ADAPTER_FILE).is_file():
        raise CNAError(
            f"the adapter of pair {name!r} is missing from {path}; train it with "
            f"`cna-lens pair train {name} --out {path}`"
        )
    return path


# ----------------------------------------------------------------------------- data
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
    from cna_lens.evaluation import prompts as prompt_sets

    recs = prompt_sets.records(name)
    return recs if n is None else recs[:n]


def _teacher_answers(
    hf_model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, progress: bool
) -> list[tuple[str, bool]]:
    """The model's greedy answers, with whether each ended before ``max_new_tokens``."""
    import torch

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
    hf_model: Any, tokenizer: Any, config: TrainConfig, *, progress: bool = False
) -> tuple[list[Example], dict[str, int]]:
    """The training conversations of an adapter and counts of what was kept.

    Harmful prompts get :func:`refusal`; benign prompts get the untuned model's own greedy
    answer (``config.teacher_tokens`` tokens at most), dropped when empty or when
    :func:`cna_lens.evaluation.metrics.is_refusal` counts it as a refusal.
    """
    from cna_lens.evaluation.metrics import is_refusal

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


def _encode_example(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) of one conversation; the prompt is encoded
    as the evaluation feeds it (:func:`cna_lens.models.loading.encode_for`)."""
    prompt_ids = encode_for(tokenizer, ex.prompt, chat=_is_chat(tokenizer))
    answer_ids = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
    if ex.complete and tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batches(
    tokenizer: Any, examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[Any]:
    import torch

    order = list(range(len(examples)))
    rng.shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(order), batch_size):
        encoded = [_encode_example(tokenizer, examples[j]) for j in order[i : i + batch_size]]
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


# ----------------------------------------------------------------------------- training
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_hf(path: str | Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CNAError(f"{path} is not a HF model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def train_adapter(
    base: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    base_name: str | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a LoRA refusal adapter on a HF model directory and save it to ``out``.

    Args:
        base: The untuned model's HF directory (e.g. ``zoo.model_path(NAME, hf=True)``).
        out: Folder for ``adapter_config.json``, ``adapter_model.safetensors`` and
            ``training.json`` (the config, data counts, per-step losses, seconds).
        config: Training settings (default :class:`TrainConfig`).
        base_name: What ``adapter_config.json`` names as the base (default: the folder name;
            never an absolute path).
        progress: Show progress bars.
        on_step: Called with (step, loss) after every optimiser step.

    Returns:
        The training record (what ``training.json`` holds).

    Raises:
        CNAError: bad settings, or ``base`` is not a model directory.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    out = Path(out)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer = _load_hf(base)
        model.eval()
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in present]
        if missing:  # before the minutes of teacher answers
            raise CNAError(
                f"the model has no {missing} layers to adapt; its linear layers include "
                f"{sorted(n for n in present if n.endswith('proj'))}"
            )
        examples, counts = training_examples(model, tokenizer, cfg, progress=progress)
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        rng = random.Random(cfg.seed)
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        total = per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        warmup = max(1, total // 10)

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
        losses: list[float] = []
        peft_model.train()
        bar = tqdm(total=total, desc="train adapter", disable=not progress)
        step = 0
        while step < total:
            for batch in _batches(tokenizer, examples, cfg.batch_size, rng):
                if step >= total:
                    break
                loss = peft_model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimiser.step()
                scheduler.step()
                optimiser.zero_grad(set_to_none=True)
                losses.append(round(float(loss.detach()), 5))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step, losses[-1])
        bar.close()
        peft_model.eval()
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out), safe_serialization=True)
        _clean_adapter_config(out / "adapter_config.json", base_name or Path(base).name)
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        from importlib.metadata import version

        record = {
            "config": cfg.to_dict(),
            "base": base_name or Path(base).name,
            "examples": counts,
            "steps": step,
            "losses": losses,
            "trainable_parameters": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - t0, 1),
            "adapter_sha256": _file_sha(out / _ADAPTER_FILE),
            "versions": {k: version(k) for k in ("torch", "transformers", "peft")},
        }
        atomic_write_text(out / _RECORD_FILE, json.dumps(record, indent=1) + "\n")
        return record
    finally:
        torch.set_num_threads(old_threads)


def _clean_adapter_config(path: Path, base_name: str) -> None:
    """Name the base portably in peft's ``adapter_config.json`` (never a local path)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_name
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- merging
def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write ``base`` + LoRA ``adapter`` (merged into the weights) as a HF directory.

    Written into a temporary folder and renamed, so an interrupted merge leaves nothing
    half-written at ``out``.

    Raises:
        CNAError: ``base`` or ``adapter`` is not a model / adapter folder.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CNAError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    model, tokenizer = _load_hf(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def pair_paths(name: str) -> tuple[Path, Path]:
    """The untuned and tuned HF directories of a pair (both converted / merged once, cached).

    Raises:
        CNAError: unknown pair, or the base model's package is not installed (the message
            gives the ``pip install`` command).
    """
    from cna_lens.models import zoo as zoo

    pair = get_pair(name)
    untuned = zoo.model_path(pair.base, hf=True)
    adapter = adapter_dir(name)
    stamp = _file_sha(adapter / _ADAPTER_FILE)[:10]
    tuned = zoo.cache_dir() / "pairs" / f"{name}-tuned-{stamp}"
    if not (tuned / "config.json").is_file():
        logger.info("merging the %s adapter into %s (once)", name, tuned)
        tuned.parent.mkdir(parents=True, exist_ok=True)
        merge_adapter(untuned, adapter, tuned)
    return untuned, tuned


# ----------------------------------------------------------------------------- behaviour
def behaviour(
    models: dict[str, str | Path],
    *,
    n_eval: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
) -> Any:
    """Unsteered behaviour of each model on the shipped held-out sets.

    Args:
        models: Label -> loadable path, e.g. ``{"untuned": u, "tuned": t}``.
        n_eval: Cap on each prompt set and on the capability questions (None: all).
        max_new_tokens: Generation length.
        batch_size: Prompts per generation batch.
        progress: Show progress bars.

    Returns:
        A DataFrame, one row per model: harmful refusal, benign over-refusal, borderline
        refusal, benign output quality and capability accuracy.
    """
    import pandas as pd

    from cna_lens.evaluation import prompts as prompt_sets
    from cna_lens.evaluation.metrics import evaluation_sets, score_sets, summarize
    from cna_lens.generation.fast import FastGenerator
    from cna_lens.models.loading import load_model

    def cap(items: list[Any]) -> list[Any]:
        return items if n_eval is None else items[:n_eval]

    capability = cap(prompt_sets.capability())
    sets = evaluation_sets(
        {
            "harmful": cap(prompt_sets.prompts("eval_harmful")),
            "benign": cap(prompt_sets.prompts("eval_benign")),
            "borderline": cap(prompt_sets.prompts("borderline")),
        },
        capability,
    )
    prompts = [p for ps in sets.values() for p in ps]
    rows = []
    for label, path in tqdm(models.items(), desc="behaviour", disable=not progress):
        model = load_model(path, device="cpu")
        with FastGenerator(model) as gen:
            texts = gen.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        rates = summarize(
            score_sets(sets, texts, method="none", strength=1.0, capability=capability)
        ).set_index("prompt_set")
        row = {
            "model": label,
            "refusal_harmful": float(rates.at["harmful", "refusal_rate"]),
            "refusal_benign": float(rates.at["benign", "refusal_rate"]),
            "quality_benign": float(rates.at["benign", "quality"]),
            "refusal_borderline": float(rates.at["borderline", "refusal_rate"]),
            "capability": float(rates.at["capability", "accuracy"]),
        }
        rows.append(row)
        del model
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- CLI
def _cmd_pair(args: argparse.Namespace) -> int:
    if args.pair_command == "check":
        from cna_lens.models import zoo as zoo

        if args.adapter is None:
            untuned, tuned = pair_paths(args.name)
        else:
            untuned = zoo.model_path(get_pair(args.name).base, hf=True)
            tuned = Path(args.adapter).with_name(Path(args.adapter).name + "-merged")
            merge_adapter(untuned, args.adapter, tuned)
        table = behaviour(
            {"untuned": untuned, "tuned": tuned},
            n_eval=args.n_eval,
            max_new_tokens=args.max_new_tokens,
            progress=True,
        )
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))  # noqa: T201
        return 0
    if args.pair_command == "list":
        for name in list_pairs():
            print(f"{name}\t{PAIRS[name].description}")  # noqa: T201 - the CLI's output
        return 0
    if args.pair_command == "path":
        untuned, tuned = pair_paths(args.name)
        print(tuned if args.which == "tuned" else untuned)  # noqa: T201
        return 0
    from cna_lens.models import zoo as zoo

    pair = get_pair(args.name)
    cfg = pair.train
    if args.max_steps is not None:
        cfg = TrainConfig.from_dict(cfg.to_dict() | {"max_steps": args.max_steps})
    out = Path(args.out) if args.out else _DATA / pair.name
    record = train_adapter(
        zoo.model_path(pair.base, hf=True), out, cfg, base_name=f"zoo:{pair.base}", progress=True
    )
    print(  # noqa: T201
        f"trained {record['steps']} steps on {record['examples']} in {record['seconds']:.0f} s; "
        f"final loss {record['losses'][-1]:.3f}; adapter in {out}"
    )
    return 0


def register(subparsers: Any, handlers: dict[str, Callable[..., int]]) -> None:
    """Add the ``pair`` command (list, path, train, check) to the ``cna-lens`` CLI."""
    p = subparsers.add_parser(
        "pair", help="untuned/tuned pairs on pretrained weights: list, path, train, check"
    )
    sub = p.add_subparsers(dest="pair_command", required=True)
    sub.add_parser("list", help="the available pairs, one per line")
    path = sub.add_parser("path", help="the HF directory of a pair's model (merged once)")
    path.add_argument("name")
    path.add_argument("which", choices=("tuned", "untuned"))
    train = sub.add_parser(
        "train", help="retrain a pair's adapter deterministically (default: over the shipped one)"
    )
    train.add_argument("name")
    train.add_argument("--out", default=None, help="adapter folder (default: the shipped one)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    check = sub.add_parser(
        "check", help="unsteered refusal, quality and capability of both models of a pair"
    )
    check.add_argument("name")
    check.add_argument(
        "--adapter", default=None, help="check this adapter folder instead of the shipped one"
    )
    check.add_argument("--n-eval", type=int, default=None, help="prompts per set (default all)")
    check.add_argument("--max-new-tokens", type=int, default=32)
    handlers["pair"] = _cmd_pair
