"""The fast backend: the token ids of the bridge backend, without the bridge's overhead.

Evaluation sweeps generate the same prompts under many conditions, and on a real model that
dominates a run. :class:`FastBackend` produces the *same token ids* as the bridge backend
(greedy), faster, by:

* **A plain Hugging Face model.** The bridge wraps every module (hook points on each input
  and output); the backend builds one bare ``transformers`` model of the same class
  (:func:`cna_lens.models.hf.plain_model`, same ``attn_implementation``), whose parameters
  *are* the bridge's tensors (shared, not copied: no extra memory, and the model in memory
  rather than the checkpoint on disk).
* **The same operations, as plain PyTorch hooks.** A condition's :class:`HookOp` names a
  TransformerLens hook point; :func:`cna_lens.models.hf.hook_module` maps it to the HF
  module whose input (a forward *pre*-hook: ``blocks.{L}.mlp.hook_post`` is the input of
  the down projection) or output (a forward hook: ``blocks.{L}.hook_resid_post`` is the
  output of decoder layer ``L``) it is, and the very same function runs there, positions
  included (:class:`cna_lens.steering.hooks.PositionOp`). Any condition kind works without
  code here. Hooks are added per pass and removed in ``finally``; the bridge is never hooked.
* **Several conditions side by side.** A batch of prompts runs once for several
  conditions (its rows repeated per condition, each block of rows changed its own way), so
  a decoding step reads the weights once for all of them.
* **A lean greedy loop with the KV cache that drops finished rows.** Once a row has emitted
  EOS it is removed from the batch and the cache, so the batch shrinks as answers end; HF
  ``generate`` keeps computing padding for them until the longest answer ends. Positions
  and attention masks are built exactly as ``generate`` builds them, and logits are
  computed for the last position only, as there.

Why the ids are identical, and where that rests on measurement: every op above is the op
the bridge path runs, on the same values, so each row's numbers are the same *provided that
a row's result does not depend on how many rows are in the batch*. Elementwise ops,
attention (batched per row) and softmax are row-independent; a CPU matrix product was
measured row-independent for 4 or more rows but not for 1-3 rows (other kernels). The loop
therefore never shrinks a batch below ``min_rows`` (default 4; a batch that starts smaller
is never shrunk), and shrinking is on by default on CPU only (GPU libraries pick kernels by
shape, so there it is opt-in: ``compact=True``). ``tests/generation`` asserts identical ids
on several architectures; ``benchmarks/run.py --eval`` checks it on real models.

A model whose generation config asks for logits processors under greedy decoding (a
repetition penalty, banned n-grams, a minimum length, ...) is generated with HF ``generate``
on the plain model instead of the loop (identical ids, less speed-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cna_lens._validate import check_int
from cna_lens.errors import CNAError
from cna_lens.generation.decoding import Decoding, cut_at_eos, eos_ids, hf_generate_kwargs
from cna_lens.models.hf import hook_module, module_names, plain_model
from cna_lens.models.loading import PromptList, TokenBatch, encode_prompts, pad_id
from cna_lens.models.prefix import expand, positions, prefix_batches, rows_per_group, run_prefix
from cna_lens.steering.conditions import HookOp, condition_ops
from cna_lens.steering.hooks import Clock, PositionOp, needs_clock

__all__ = ["FastBackend"]

logger = logging.getLogger(__name__)

# Generation-config fields that add a logits processor under greedy decoding, with the
# values that add none. Anything else set falls back to HF generate on the plain model.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "num_beams": (None, 1),
}


class _Groups:
    """Row ranges of each condition in the current batch (updated when rows are dropped)."""

    def __init__(self, sizes: list[int]):
        self.set(sizes)

    def set(self, sizes: list[int]) -> None:
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        self.bounds = bounds


class _GroupHook:
    """Applies each condition's functions to its own rows (elementwise ops, so a row's
    values are those of a batch of that condition alone); ``post`` hooks read a module's
    output, the others its first input."""

    def __init__(
        self, groups: _Groups, fns: dict[int, list[Callable[[Tensor], Tensor]]], post: bool
    ):
        self.groups = groups
        self.fns = fns
        self.post = post

    def _apply(self, act: Tensor) -> Tensor:
        parts = []
        for cond, (a, b) in enumerate(self.groups.bounds):
            if a == b:
                continue
            part = act[a:b]
            for fn in self.fns.get(cond, ()):
                part = fn(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        if not self.post:
            return (self._apply(args[0]), *args[1:])
        if isinstance(output, tuple):
            return (self._apply(output[0]), *output[1:])
        return self._apply(output)


class FastBackend:
    """Greedy generation with the ids of the bridge backend, several times faster.

    Build one per evaluation (it builds a plain HF model sharing the bridge's weights) and
    call :meth:`run` per prompt set. See the module docstring for how and why it is exact.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        compact: Drop rows that have finished from the batch and the KV cache. Default:
            on for CPU models (measured row-independent there), off elsewhere.
        min_rows: Never shrink a batch below this many rows (matrix products of 1-3 rows
            use other kernels on CPU, with other rounding).
        max_rows: Rows of one forward pass at most (batch size x conditions side by side);
            at least one condition always runs.

    Raises:
        CNAError: ``min_rows`` or ``max_rows`` < 1, or the plain model's weights cannot be
            mapped.
    """

    name = "fast"

    def __init__(
        self, model: Any, *, compact: bool | None = None, min_rows: int = 4, max_rows: int = 256
    ):
        self.min_rows = check_int("min_rows", min_rows, low=1)
        self.max_rows = check_int("max_rows", max_rows, low=1)
        self.bridge = model
        self.hf: nn.Module | None = plain_model(model.original_model, share=True)
        self.device = next(self.hf.parameters()).device
        self.compact = (self.device.type == "cpu") if compact is None else bool(compact)
        self.eos = eos_ids(model)
        self.pad = pad_id(model)
        gen_cfg = self.hf.generation_config
        active = [k for k, ok in _NEUTRAL.items() if getattr(gen_cfg, k, None) not in ok]
        self.use_loop = not active
        if active:
            logger.info("generation config sets %s: using HF generate on the plain model", active)
        self._names = module_names(model)
        self._modules = dict(self.hf.named_modules())

    # ---- context manager --------------------------------------------------------------
    def __enter__(self) -> FastBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the plain model (the bridge's weights it shares stay with the bridge)."""
        self.hf = None

    def _model(self) -> nn.Module:
        if self.hf is None:
            raise CNAError("this fast backend is closed; make a new one")
        return self.hf

    # ---- module lookup ----------------------------------------------------------------
    def module_at(self, hook: str) -> tuple[nn.Module, bool]:
        """The plain model's module at a hook point, and whether the hook reads its output.

        Raises:
            CNAError: the hook point has no module in the plain model.
        """
        module, side = hook_module(self.bridge, hook)
        name = self._names.get(id(module))
        if name is None or name not in self._modules:
            raise CNAError(
                f"hook {hook!r}: no matching module in the plain model; use backend='bridge'"
            )
        return self._modules[name], side == "post"

    # ---- generation -------------------------------------------------------------------
    def prepare(self, prompts: PromptList, decoding: Decoding) -> list[TokenBatch]:
        """Batches of ``prompts``: with ``decoding.prefix_reuse`` (and the lean loop), the
        prefix they all share split off, to be computed once per condition."""
        encoded = encode_prompts(self.bridge, prompts, max_new_tokens=decoding.max_new_tokens)
        return prefix_batches(
            encoded,
            batch_size=decoding.batch_size,
            pad=self.pad,
            device=self.device,
            reuse=decoding.prefix_reuse and self.use_loop,
        )

    def run(
        self,
        batches: Sequence[TokenBatch],
        conditions: Sequence[Any],
        decoding: Decoding,
        on_pass: Callable[[int, int, float], None] | None = None,
    ) -> tuple[list[list[list[int]]], list[float]]:
        """Per condition, per prompt (in the caller's prompt order, through the batches'
        ``indices``), the new token ids; and each condition's share of the seconds.

        Batches that carry a shared prefix (:meth:`prepare`) continue from its KV cache,
        computed once per group of conditions side by side (one row per condition).
        ``on_pass(conditions, tokens, seconds)`` is called after every pass of one batch
        under a group of conditions side by side.

        Raises:
            CNAError: sampling asked for (the fast backend decodes greedily), a closed
                backend, or a condition that does not fit the model.
        """
        self._model()
        if decoding.do_sample:
            raise CNAError("the fast backend decodes greedily; use backend='bridge' to sample")
        ops = [condition_ops(self.bridge, c) for c in conditions]  # validated before any pass
        n = sum(len(b.indices) for b in batches)
        results: list[list[list[int]]] = [[[] for _ in range(n)] for _ in conditions]
        seconds = [0.0] * len(conditions)
        per_pass = max(1, self.max_rows // max(decoding.batch_size, 1))
        chunks = [
            list(range(start, min(start + per_pass, len(conditions))))
            for start in range(0, len(conditions), per_pass)
        ]
        prefixes: dict[int, Any] = {}  # chunk -> KV cache of the shared prefix
        for batch in batches:
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            for c, chunk in enumerate(chunks):
                began = time.perf_counter()
                chunk_ops = [ops[i] for i in chunk]
                cache = None
                if batch.prefix:
                    if c not in prefixes:
                        prefixes[c] = self._prefix(batch.prefix, chunk_ops)
                    cache = expand(prefixes[c], ids.shape[0])
                rows = self._run_batch(ids, mask, chunk_ops, decoding.max_new_tokens, cache)
                took = time.perf_counter() - began
                width = len(batch.indices)
                for k, cond in enumerate(chunk):
                    seconds[cond] += took / len(chunk)
                    for row, idx in enumerate(batch.indices):
                        results[cond][idx] = rows[k * width + row]
                if on_pass is not None:
                    on_pass(len(chunk), sum(map(len, rows)), took)
        return results, seconds

    @contextmanager
    def hooks(
        self, ops: Sequence[Sequence[HookOp]], groups: _Groups, clock: Clock
    ) -> Iterator[None]:
        """Condition ``i``'s operations on the rows of group ``i``, inside the block."""
        hf = self._model()
        by_module: dict[tuple[int, bool], tuple[nn.Module, dict[int, list[Any]]]] = {}
        for i, cond_ops in enumerate(ops):
            for op in cond_ops:
                module, post = self.module_at(op.hook)
                entry = by_module.setdefault((id(module), post), (module, {}))
                entry[1].setdefault(i, []).append(PositionOp(op, clock))
        with ExitStack() as stack:
            if any(needs_clock(o) for o in ops):
                stack.enter_context(clock.attach(hf))
            for (_, post), (module, fns) in by_module.items():
                hook = _GroupHook(groups, fns, post=post)
                handle = (
                    module.register_forward_hook(hook)
                    if post
                    else module.register_forward_pre_hook(hook)
                )
                stack.callback(handle.remove)
            yield

    def _prefix(self, prefix: Sequence[int], ops: list[list[HookOp]]) -> Any:
        """The KV cache of the shared prefix, one row per condition (each under its ops)."""
        groups = _Groups([rows_per_group(len(ops))] * len(ops))
        with self.hooks(ops, groups, Clock()):
            return run_prefix(self._model(), prefix, len(ops), self.device)

    def _run_batch(
        self,
        input_ids: Tensor,
        mask: Tensor,
        ops: list[list[Any]],
        max_new_tokens: int,
        cache: Any = None,
    ) -> list[list[int]]:
        """Token ids of ``len(ops)`` copies of the batch, condition-major (continuing
        ``cache``, the batch's prefix, when given)."""
        groups = _Groups([input_ids.shape[0]] * len(ops))
        # A fresh clock: with a prefix cache the first pass starts at the prefix length,
        # and the prompt is prefix + this batch's width.
        with self.hooks(ops, groups, Clock()):
            if len(ops) > 1:
                input_ids, mask = input_ids.repeat(len(ops), 1), mask.repeat(len(ops), 1)
            with torch.inference_mode():
                if self.use_loop:
                    return self._greedy(input_ids, mask, max_new_tokens, groups, len(ops), cache)
                return self._hf_generate(input_ids, mask, max_new_tokens)

    def _hf_generate(self, input_ids: Tensor, mask: Tensor, max_new_tokens: int) -> list[list[int]]:
        hf = self._model()
        greedy = Decoding(max_new_tokens=max_new_tokens)
        kwargs = hf_generate_kwargs(greedy, self.pad, self.eos)
        out = hf.generate(input_ids=input_ids, attention_mask=mask, **kwargs)  # type: ignore[operator]
        return cut_at_eos(out[:, input_ids.shape[1] :].tolist(), self.eos)

    def _greedy(
        self,
        input_ids: Tensor,
        mask: Tensor,
        max_new_tokens: int,
        groups: _Groups,
        n_groups: int,
        cache: Any = None,
    ) -> list[list[int]]:
        """Greedy decoding as HF ``generate`` does it, dropping finished rows (the first
        pass continues ``cache``, a shared prefix's, when given)."""
        hf = self._model()
        n = input_ids.shape[0]
        width = n // n_groups
        eos = torch.tensor(self.eos or [-1], device=self.device)
        # Position ids exactly as generate makes them from a left-padded mask (which, after
        # a shared prefix, covers the prefix too).
        pos = positions(mask, input_ids.shape[1])
        out = hf(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        live = torch.arange(n, device=self.device)  # original row of each batch row
        active = torch.ones(n, dtype=torch.bool, device=self.device)  # not yet finished
        last_pos = pos[:, -1:]
        pads = torch.full((n,), self.pad, dtype=torch.long, device=self.device)
        produced: list[Tensor] = []  # per step: token per original row (pad once finished)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].to(dtype=torch.float32).argmax(-1)
            step_tokens = pads.clone()
            step_tokens[live] = torch.where(active, nxt, pads[live])
            produced.append(step_tokens)
            active = active & ~torch.isin(nxt, eos)
            if step == max_new_tokens - 1 or not bool(active.any()):
                break
            keep = self._rows_to_keep(active)
            if keep is not None:
                cache.batch_select_indices(keep)
                live, active, nxt = live[keep], active[keep], nxt[keep]
                mask, last_pos = mask[keep], last_pos[keep]
                groups.set(torch.bincount(live // width, minlength=n_groups).tolist())
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            last_pos = last_pos + 1
            out = hf(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return cut_at_eos(torch.stack(produced, dim=1).tolist(), self.eos)

    def _rows_to_keep(self, active: Tensor) -> Tensor | None:
        """Indices of the rows to go on with (in batch order), or None to keep them all."""
        size = active.shape[0]
        if not self.compact or size <= self.min_rows:
            return None
        target = max(int(active.sum()), self.min_rows)
        if target >= size:
            return None
        # Unfinished rows first, then finished ones to fill up to min_rows.
        order = torch.argsort((~active).to(torch.int8), stable=True)
        return order[:target].sort().values
