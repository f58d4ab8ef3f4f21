"""Training a pair's adapter (LoRA on every layer), merging it, and the merged models' cache."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
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
    FinetuneConfig,
    adapter_dir,
    get_pair,
)
from cna_lens.pipelines.pairs.data import Example, batches, training_examples

__all__ = ["file_sha", "load_hf", "merge_adapter", "pair_paths", "train_adapter", "optimise"]


def file_sha(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_hf(path: str | Path) -> tuple[Any, Any]:
    """A plain float32 HF model and its tokenizer from a directory.

    Raises:
        CNAError: not a HF model directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CNAError(f"{path} is not a HF model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise CNAError(
            f"the model has no {missing} layers to adapt; its linear layers include "
            f"{sorted(n for n in present if n.endswith('proj'))}"
        )


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
                loss = model(**batch).loss
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
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a LoRA refusal adapter on a HF model directory and save it to ``out``.

    Args:
        base: The untuned model's HF directory (e.g. ``zoo.model_path(NAME, hf=True)``).
        out: Folder for ``adapter_config.json``, ``adapter_model.safetensors`` and
            ``training.json`` (the config, data counts, per-step losses, seconds).
        config: Training settings (default :class:`FinetuneConfig`).
        base_name: What ``adapter_config.json`` names as the base (default: the folder name;
            never an absolute path).
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
        model, tokenizer = load_hf(base)
        model.eval()
        _check_targets(model, cfg.target_modules)  # before the minutes of teacher answers
        examples, counts = training_examples(model, tokenizer, cfg, progress=progress)
        peft_model = _lora(model, cfg)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        losses = optimise(
            peft_model, tokenizer, examples, cfg, params, progress=progress, on_step=on_step
        )
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out), safe_serialization=True)
        name = base_name or Path(base).name
        _clean_adapter_config(out / "adapter_config.json", name)
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        record = {
            "config": cfg.to_dict(),
            "base": name,
            "examples": counts,
            "steps": len(losses),
            "losses": losses,
            "trainable_parameters": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - t0, 1),
            "adapter_sha256": file_sha(out / ADAPTER_FILE),
            "versions": {k: version(k) for k in ("torch", "transformers", "peft")},
        }
        atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=1) + "\n")
        return record
    finally:
        torch.set_num_threads(old_threads)


def _clean_adapter_config(path: Path, base_name: str) -> None:
    """Name the base portably in peft's ``adapter_config.json`` (never a local path)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_name
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    model, tokenizer = load_hf(base)
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
    pair = get_pair(name)
    untuned = zoo.model_path(pair.base, hf=True)
    adapter = adapter_dir(name)
    stamp = file_sha(adapter / ADAPTER_FILE)[:10]
    tuned = zoo.cache_dir() / "pairs" / f"{name}-tuned-{stamp}"
    if not (tuned / "config.json").is_file():
        tuned.parent.mkdir(parents=True, exist_ok=True)
        merge_adapter(untuned, adapter, tuned)
    return untuned, tuned
