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
    >>> from cna_lens.pipelines import pairs  # doctest: +SKIP
    >>> untuned, tuned = pairs.pair_paths("smollm2-refusal")  # merged once, cached
    >>> model = cna_lens.load_model(tuned)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from cna_lens import _compat
from cna_lens.evaluation import Arm, evaluate, paper_metrics, summarize
from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.generation import Decoding
from cna_lens.models.loading import load_model
from cna_lens.pipelines.pairs.config import (
    LORA_TARGETS,
    PAIRS,
    FinetuneConfig,
    Pair,
    adapter_dir,
    get_pair,
    list_pairs,
)
from cna_lens.pipelines.pairs.data import Example, refusal, training_examples
from cna_lens.pipelines.pairs.train import merge_adapter, pair_paths, train_adapter

__all__ = [
    "LORA_TARGETS",
    "PAIRS",
    "Example",
    "FinetuneConfig",
    "Pair",
    "adapter_dir",
    "behaviour",
    "get_pair",
    "list_pairs",
    "merge_adapter",
    "pair_paths",
    "refusal",
    "train_adapter",
    "training_examples",
]


def behaviour(
    models: dict[str, str | Path],
    *,
    n_eval: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Unsteered behaviour of each model on the shipped held-out sets (one engine run each).

    Args:
        models: Label -> loadable path, e.g. ``{"untuned": u, "tuned": t}``.
        n_eval: Cap on each prompt set and on the capability questions (None: all).
        max_new_tokens: Generation length.
        batch_size: Prompts per generation batch.
        progress: Show progress bars.

    Returns:
        One row per model: harmful refusal, benign over-refusal, borderline refusal, benign
        output quality and capability accuracy.
    """

    def cap(items: list[Any]) -> list[Any]:
        return items if n_eval is None else items[:n_eval]

    capability = cap(prompt_sets.capability())
    sets = {
        name: cap(prompt_sets.prompts(source))
        for name, source in (
            ("harmful", "eval_harmful"),
            ("benign", "eval_benign"),
            ("borderline", "borderline"),
        )
    }
    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for label, path in tqdm(models.items(), desc="behaviour", disable=not progress):
        model = load_model(path, device="cpu")
        table = evaluate(
            model,
            sets,
            [Arm(None, {"method": "none", "strength": 1.0})],
            capability=capability,
            metrics=paper_metrics(),
            decoding=decoding,
        )
        rates = summarize(table).set_index("prompt_set")
        rows.append(
            {
                "model": label,
                "refusal_harmful": float(rates.at["harmful", "refusal_rate"]),
                "refusal_benign": float(rates.at["benign", "refusal_rate"]),
                "quality_benign": float(rates.at["benign", "quality"]),
                "refusal_borderline": float(rates.at["borderline", "refusal_rate"]),
                "capability": float(rates.at["capability", "accuracy"]),
            }
        )
        del model
    return pd.DataFrame(rows)


__getattr__ = _compat.forward(
    __name__, {"TrainConfig": "cna_lens.pipelines.pairs.config:FinetuneConfig"}
)
