"""Training a pair's adapter (LoRA on every layer), merging it, and the merged models' cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cna_lens.errors import CNAError
from cna_lens.io import atomic_write_text
from cna_lens.models import zoo
from cna_lens.pipelines.pairs.config import (
    ADAPTER_FILE,
    RECORD_FILE,
    ChatFormat,
    FinetuneConfig,
    adapter_dir,
    adapter_dir_path,
    get_pair,
)
from cna_lens.pipelines.pairs.data import Example, batches, load_hf, training_examples

__all__ = [
    "answer_loss",
    "file_sha",
    "full_dir",
    "load_hf",
    "merge_adapter",
    "optimise",
    "pair_paths",
    "train_adapter",
    "train_pair",
]


def file_sha(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise CNAError(
            f"the model has no {missing} layers to adapt; its linear layers include "
            f"{sorted(n for n in present if n.endswith('proj'))}"
        )


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels other than -100).

    The same number as the HF model's own ``loss``, but the LM head runs only at the
    positions that predict an answer token: with a 262k-token vocabulary (Gemma) the head
    over every prompt position would cost more than the rest of the model.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = core.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(core.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def optimise(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: FinetuneConfig,
    params: list[torch.nn.Parameter],
    *,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW over ``params`` with linear warm-up (10% of the steps) and linear decay,
    gradient clipping at 1, shuffled batches (seeded); returns the loss of every step."""
    optimiser = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    total = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = max(1, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc="train", disable=not progress) as bar:
        while len(losses) < total:
            for batch in batches(tokenizer, examples, cfg.batch_size, rng):
                if len(losses) >= total:
                    break
                loss = answer_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimiser.step()
                scheduler.step()
                optimiser.zero_grad(set_to_none=True)
                losses.append(round(float(loss.detach()), 5))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(len(losses), losses[-1])
    model.eval()
    return losses


def _lora(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_adapter(
    base: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    base_name: str | None = None,
    teacher: str | Path | None = None,
    chat: ChatFormat | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a HF model directory to refuse (and answer benign prompts) and save it.

    Args:
        base: The untuned model's HF directory (e.g. ``zoo.model_path(NAME, hf=True)``).
        out: Output folder. Variant "lora": ``adapter_config.json`` and
            ``adapter_model.safetensors``; variant "full": the whole tuned model (weights,
            config, tokenizer). Both: ``training.json`` (the config, data counts, per-step
            losses, seconds).
        config: Training settings (default :class:`FinetuneConfig`).
        base_name: What the record (and ``adapter_config.json``) names as the base
            (default: the folder name; never an absolute path).
        teacher: HF directory of the model whose answers the benign prompts are trained on
            (None: the untuned model's own).
        chat: Chat format to train in, for an untuned model without a template.
        progress: Show progress bars.
        on_step: Called with (step, loss) after every optimiser step.

    Returns:
        The training record (what ``training.json`` holds).

    Raises:
        CNAError: bad settings, or ``base`` is not a model directory.
    """
    cfg = config or FinetuneConfig()
    t0 = time.perf_counter()
    out = Path(out)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer = load_hf(base, chat)
        model.eval()
        if cfg.variant == "lora":
            _check_targets(model, cfg.target_modules)  # before the minutes of teacher answers
        examples, counts = training_examples(
            model, tokenizer, cfg, teacher=teacher, progress=progress
        )
        t_data = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        trained = _lora(model, cfg) if cfg.variant == "lora" else model
        params = [p for p in trained.parameters() if p.requires_grad]
        losses = optimise(
            trained, tokenizer, examples, cfg, params, progress=progress, on_step=on_step
        )
        name = base_name or Path(base).name
        weights = _save(trained, tokenizer, cfg, out, name)
        record = {
            "config": cfg.to_dict(),
            "base": name,
            **({"teacher": Path(teacher).name} if teacher else {}),
            **({"chat_template": chat.source} if chat else {}),
            "examples": counts,
            "steps": len(losses),
            "losses": losses,
            "trainable_parameters": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - t0, 1),
            "seconds_data": round(t_data, 1),
            f"{'adapter' if cfg.variant == 'lora' else 'weights'}_sha256": file_sha(weights),
            "versions": {k: version(k) for k in ("torch", "transformers", "peft")},
        }
        atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=1) + "\n")
        return record
    finally:
        torch.set_num_threads(old_threads)


def _save(model: Any, tokenizer: Any, cfg: FinetuneConfig, out: Path, base_name: str) -> Path:
    """Write the trained adapter (lora) or model (full) into ``out``; returns the weights file."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if cfg.variant == "full":
        tokenizer.save_pretrained(str(out))
        return out / "model.safetensors"
    _clean_adapter_config(out / "adapter_config.json", base_name)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    (out / ADAPTER_FILE).chmod(0o644)  # shipped package data: readable by every user
    return out / ADAPTER_FILE


def _clean_adapter_config(path: Path, base_name: str) -> None:
    """Name the base portably in peft's ``adapter_config.json`` (never a local path)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_name
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def merge_adapter(
    base: str | Path, adapter: str | Path, out: str | Path, chat: ChatFormat | None = None
) -> Path:
    """Write ``base`` + LoRA ``adapter`` (merged into the weights) as a HF directory, in
    ``chat``'s format when given (the format the adapter was trained in).

    Written into a temporary folder and renamed, so an interrupted merge leaves nothing
    half-written at ``out``.

    Raises:
        CNAError: ``base`` or ``adapter`` is not a model / adapter folder.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CNAError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    model, tokenizer = load_hf(base, chat)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(out)
    # one temporary folder per process: two runs merging the same pair at once never
    # write into each other's files
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def full_dir(name: str) -> Path:
    """Where ``cna-lens pair train NAME --variant full`` writes the full-weight tuned model
    (in the cache: full weights never ship)."""
    return zoo.cache_dir() / "pairs" / f"{get_pair(name).name}-full"


def pair_paths(name: str, variant: str = "lora") -> tuple[Path, Path]:
    """The untuned and tuned HF directories of a pair (converted / merged once, cached).

    Args:
        name: The pair.
        variant: "lora" (the shipped adapter, merged) or "full" (the full-weight fine-tune,
            trained locally by ``cna-lens pair train NAME --variant full``).

    Raises:
        CNAError: unknown pair or variant, the base model's package is not installed (the
            message gives the ``pip install`` command), or the full variant is not trained.
    """
    pair = get_pair(name)
    pair.config(variant)  # an unknown variant fails before any conversion
    untuned = zoo.model_path(pair.base, hf=True)
    if variant == "full":
        tuned = full_dir(name)
        if not (tuned / "config.json").is_file():
            raise CNAError(
                f"the full-weight variant of pair {name!r} is not trained on this machine "
                f"(looked in {tuned}); train it with `cna-lens pair train {name} --variant full`"
            )
        return untuned, tuned
    adapter = adapter_dir(name)
    stamp = file_sha(adapter / ADAPTER_FILE)[:10]
    tuned = zoo.cache_dir() / "pairs" / f"{name}-tuned-{stamp}"
    if not (tuned / "config.json").is_file():
        tuned.parent.mkdir(parents=True, exist_ok=True)
        merge_adapter(untuned, adapter, tuned, pair.chat)
    return untuned, tuned


def train_pair(
    name: str,
    variant: str = "lora",
    *,
    out: str | Path | None = None,
    max_steps: int | None = None,
    progress: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Retrain one variant of a pair as it was made (its settings, teacher and chat format).

    Args:
        name: The pair.
        variant: "lora" or "full".
        out: Output folder (default: the shipped adapter folder for "lora", the cache's
            :func:`full_dir` for "full").
        max_steps: Stop after this many steps (a smoke run).
        progress: Show progress bars.

    Returns:
        The output folder and the training record.
    """
    pair = get_pair(name)
    cfg = pair.config(variant)
    if max_steps is not None:
        cfg = replace(cfg, max_steps=max_steps)
    default = adapter_dir_path(name) if variant == "lora" else full_dir(name)
    target = Path(out) if out is not None else default
    teacher = zoo.model_path(pair.teacher, hf=True) if pair.teacher else None
    record = train_adapter(
        zoo.model_path(pair.base, hf=True),
        target,
        cfg,
        base_name=f"zoo:{pair.base}",
        teacher=teacher,
        chat=pair.chat,
        progress=progress,
    )
    return target, record
