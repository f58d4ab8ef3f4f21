"""Shared-prefix reuse: compute the tokens every prompt shares once, not once per prompt.

Chat prompts all start with the same template tokens (Qwen2.5's default system turn and
``<|im_start|>user\\n`` are 24 tokens of a typical 41-token request). :func:`shared_prefix`
finds the longest token prefix a set of sequences has in common; :func:`prefix_batches`
batches what follows it (left-padded, grouped by length), with an attention mask that
covers the prefix too; :func:`run_prefix` runs the prefix once through a Hugging Face model
(once per condition when a condition changes prompt positions) and returns its KV cache,
which :func:`expand` copies for every row of a batch. Each row
then sees exactly the tokens of its own unsplit sequence, at its own positions (the padding
between prefix and suffix is masked out), so the numbers are those of the unsplit passes up
to the float rounding of other matrix shapes.

Exactness: a row's prefix keys and values are computed by other matrix shapes than in the
unsplit pass (a prefix-only pass instead of the whole padded batch), and its attention over
prefix + suffix is one softmax over keys laid out differently, so the numbers agree up to
float rounding (about 1e-6 relative in float32), not bit for bit. Greedy tokens are then
the same except where two logits are that close; ``tests/models/test_prefix.py`` measures
both. The prefix pass runs at least :data:`PREFIX_ROWS` identical rows (on CPU, matrix
products of 1-3 rows use other kernels).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from cna_lens.models.loading import TokenBatch, pad_batches

__all__ = [
    "MIN_PREFIX",
    "PREFIX_ROWS",
    "expand",
    "positions",
    "prefix_batches",
    "rows_per_group",
    "run_prefix",
    "shared_prefix",
    "suffix_batches",
]

MIN_PREFIX = 8
"""Shorter shared prefixes are not worth a pass of their own."""

PREFIX_ROWS = 4
"""Rows the prefix pass runs with at least (see the module docstring)."""


def shared_prefix(sequences: Sequence[Sequence[int]], *, minimum: int = MIN_PREFIX) -> int:
    """The length of the longest token prefix all sequences share, leaving every sequence
    at least one token of its own; 0 when that is shorter than ``minimum`` (or for one
    sequence: nothing to share)."""
    if len(sequences) < 2:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    length = 0
    while length < n and all(s[length] == first[length] for s in sequences):
        length += 1
    return length if length >= minimum else 0


def suffix_batches(
    sequences: Sequence[Sequence[int]],
    prefix: int,
    *,
    batch_size: int,
    pad: int,
    device: torch.device | str,
) -> list[TokenBatch]:
    """Batches of what follows the first ``prefix`` tokens (left-padded, grouped by length),
    each carrying the prefix ids; ``attention_mask`` covers the prefix as well
    (``[batch, prefix + width]``)."""
    shared = tuple(int(t) for t in sequences[0][:prefix]) if prefix else ()
    batches = pad_batches(
        [s[prefix:] for s in sequences], batch_size=batch_size, pad=pad, device=device
    )
    if not shared:
        return batches
    out = []
    for b in batches:
        mask = b.attention_mask
        ones = mask.new_ones((mask.shape[0], prefix))
        out.append(TokenBatch(b.input_ids, torch.cat([ones, mask], dim=1), b.indices, shared))
    return out


def prefix_batches(
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad: int,
    device: torch.device | str,
    reuse: bool = True,
) -> list[TokenBatch]:
    """Batches of token id sequences: with ``reuse``, their shared prefix (when at least
    :data:`MIN_PREFIX` tokens) split off and carried by every batch; without, or without a
    shared prefix, plain left-padded batches (:func:`~cna_lens.models.loading.pad_batches`).
    Either way grouped by length, with ``indices`` in the caller's order."""
    prefix = shared_prefix(sequences) if reuse else 0
    return suffix_batches(sequences, prefix, batch_size=batch_size, pad=pad, device=device)


def positions(mask: Int[Tensor, "batch pos"], width: int) -> Int[Tensor, "batch width"]:
    """Position ids of the last ``width`` columns of a left-padded (or prefix, pad, suffix)
    attention mask, as Hugging Face ``generate`` makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -width:]


def rows_per_group(groups: int) -> int:
    """Identical rows per group (condition) in a prefix pass of ``groups`` groups, so that
    the pass has at least :data:`PREFIX_ROWS` rows."""
    return max(1, -(-PREFIX_ROWS // max(groups, 1)))


def run_prefix(
    model: Any, prefix_ids: Sequence[int], groups: int, device: torch.device | str
) -> Any:
    """The KV cache of ``prefix_ids`` through a Hugging Face model: one row per group.

    The pass runs :func:`rows_per_group` identical rows per group (group ``g``'s rows are
    ``g * r .. g * r + r - 1``, for hooks that treat groups differently), then keeps one row
    of each."""
    r = rows_per_group(groups)
    ids = torch.tensor([list(prefix_ids)] * (r * groups), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask, ids.shape[1]),
            use_cache=True,
            logits_to_keep=1,
        )
    cache = out.past_key_values
    if r > 1:
        cache.batch_select_indices(torch.arange(0, r * groups, r, device=device))
    return cache


def expand(cache: Any, repeats: int) -> Any:
    """A copy of ``cache`` with every row repeated ``repeats`` times (row-major), for a
    batch to continue (the copy grows; ``cache`` is left as it was)."""
    copied = copy.deepcopy(cache)
    if repeats > 1:
        copied.batch_repeat_interleave(repeats)
    return copied
