"""The bridge backend: the reference path every faster path is tested against.

Each condition is installed on the TransformerBridge through its hook points
(:func:`cna_lens.steering.hooks.hooked`), and Hugging Face ``generate`` runs on the bridge's
model batch by batch (left-padded, KV-cached; greedy, or sampled with the decoding's seed set
at the start of each condition). Slow but obvious: the same hooks a user's ``steer``
context adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cna_lens import _model_state
from cna_lens.generation.decoding import Decoding, cut_at_eos, eos_ids, hf_generate_kwargs
from cna_lens.models.loading import PromptList, TokenBatch, pad_id, tokenize_prompts
from cna_lens.steering.hooks import hooked

__all__ = ["BridgeBackend"]


class BridgeBackend:
    """Generate under each condition with HF ``generate`` on the hooked bridge."""

    name = "bridge"

    def __init__(self, model: Any):
        self.bridge = model
        self.eos = eos_ids(model)
        self.pad = pad_id(model)

    def __enter__(self) -> BridgeBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (kept for the backend interface)."""

    def prepare(self, prompts: PromptList, decoding: Decoding) -> list[TokenBatch]:
        """Left-padded batches of whole prompts (the reference path reuses no prefix)."""
        return tokenize_prompts(
            self.bridge,
            prompts,
            batch_size=decoding.batch_size,
            max_new_tokens=decoding.max_new_tokens,
        )

    def run(
        self,
        batches: Sequence[TokenBatch],
        conditions: Sequence[Any],
        decoding: Decoding,
        on_pass: Callable[[int, int, float], None] | None = None,
    ) -> tuple[list[list[list[int]]], list[float]]:
        """Per condition, per prompt (in the caller's prompt order, through the batches'
        ``indices``), the new token ids; and the seconds each condition took.

        ``on_pass(conditions, tokens, seconds)`` is called after every batch.
        """
        n = sum(len(b.indices) for b in batches)
        kwargs = hf_generate_kwargs(decoding, self.pad, self.eos)
        results: list[list[list[int]]] = []
        seconds: list[float] = []
        for condition in conditions:
            began = time.perf_counter()
            ids: list[list[int]] = [[] for _ in range(n)]
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
            with _model_state.hold(self.bridge, "generate"), hooked(self.bridge, condition):
                for batch in batches:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = self.bridge.original_model.generate(
                            input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask,
                            **kwargs,
                        )
                    rows = cut_at_eos(out[:, batch.input_ids.shape[1] :].tolist(), self.eos)
                    for row, idx in zip(rows, batch.indices, strict=True):
                        ids[idx] = row
                    if on_pass is not None:
                        on_pass(1, sum(map(len, rows)), time.perf_counter() - start)
            results.append(ids)
            seconds.append(time.perf_counter() - began)
        return results, seconds
