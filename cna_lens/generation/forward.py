"""Forward scoring: log-probabilities at the last positions of fixed sequences, under conditions.

KL divergence and the refusal proxy need no generation, only a forward pass of known token
sequences (a prompt, or a prompt and a reference continuation) under each condition.
:class:`Scorer` batches the sequences once (left-padded, grouped by length) and runs them
through the fast backend's plain model with each condition's hook operations.

**Cheap passes by construction.** A search tries hundreds of conditions that all change
only the last layers. With ``start_layer=L`` the scorer runs the unsteered model once, keeps
the residual stream at the input of decoder layer ``L`` for every batch, and from then on
each condition runs only layers ``L`` and up (the layers below are replaced by pass-throughs
and the kept residual is fed in): the same numbers as a full pass (checked on the first
batch when the scorer is built), at a fraction of the cost. A condition that changes a layer
below ``L`` is refused.

**The shared prefix once per condition.** Chat-formatted sequences share their first tokens
(the template's system turn). With ``prefix_reuse`` (default) the scorer runs that prefix
once per condition, through every layer under the condition's hooks (a few rows, cheap), and
every batch continues a copy of its KV cache (:mod:`cna_lens.models.prefix`); with
``start_layer`` the suffix tokens then run only the upper layers, as above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from cna_lens._validate import check_bool, check_int
from cna_lens.errors import CNAError
from cna_lens.generation.fast import FastBackend, _GroupHook, _Groups
from cna_lens.models.hf import module_names
from cna_lens.models.loading import TokenBatch, pad_id
from cna_lens.models.prefix import expand, positions, prefix_batches, rows_per_group, run_prefix
from cna_lens.steering.conditions import HookOp, condition_ops
from cna_lens.steering.hooks import Clock, PositionOp

__all__ = ["Scorer", "hook_layer"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> int:
    """The decoder layer a hook point belongs to (-1 for points before the first block,
    e.g. the embedding)."""
    m = _BLOCK.match(hook)
    return int(m.group(1)) if m else -1


class _PassThrough(nn.Module):
    """A decoder layer skipped: its input comes out unchanged (the scorer replaces the
    residual at the first layer it runs anyway)."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class Scorer:
    """Log-probabilities at the last ``keep`` positions of token sequences, per condition.

    Args:
        backend: An open fast backend (its plain model runs the passes).
        sequences: Token ids of each sequence (already formatted, e.g. chat prompts).
        keep: Positions scored at the end of each sequence (row ``i`` uses the last
            ``targets[i]`` of them).
        targets: Positions that count per sequence (default: ``keep`` each).
        batch_size: Sequences per pass.
        start_layer: Run only decoder layers from this one up, on the residual kept from an
            unsteered pass (0: full passes).
        prefix_reuse: Compute the token prefix all sequences share once per condition and
            continue every batch from its KV cache (:mod:`cna_lens.models.prefix`).

    Raises:
        CNAError: bad sizes, or an architecture whose partial pass does not reproduce the
            full pass (then use ``start_layer=0``).
    """

    def __init__(
        self,
        backend: FastBackend,
        sequences: Sequence[Sequence[int]],
        *,
        keep: int,
        targets: Sequence[int] | None = None,
        batch_size: int = 16,
        start_layer: int = 0,
        prefix_reuse: bool = True,
    ):
        self.backend = backend
        self.keep = check_int("keep", keep, low=1)
        n_layers = int(backend.bridge.cfg.n_layers)
        self.start_layer = check_int("start_layer", start_layer, low=0, high=n_layers - 1)
        self.sequences = [list(s) for s in sequences]
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.n = len(sequences)
        if not self.n:
            raise CNAError("no sequences to score")
        self.targets = [self.keep] * self.n if targets is None else [int(t) for t in targets]
        if len(self.targets) != self.n or any(not 1 <= t <= self.keep for t in self.targets):
            raise CNAError(f"targets must be one count in [1, keep={keep}] per sequence")
        self.batches: list[TokenBatch] = prefix_batches(
            sequences,
            batch_size=check_int("batch_size", batch_size, low=1),
            pad=pad_id(backend.bridge),
            device=backend.device,
            reuse=check_bool("prefix_reuse", prefix_reuse),
        )
        self.prefix: tuple[int, ...] = self.batches[0].prefix
        self._layers = self._decoder_layers()
        self._residual: list[Tensor] = []
        if self.start_layer > 0:
            self._keep_residual()

    # ---- layers -----------------------------------------------------------------------
    def _decoder_layers(self) -> list[tuple[nn.ModuleList, int]]:
        """(its ModuleList in the plain model, index) of every decoder layer."""
        names = module_names(self.backend.bridge)
        modules = dict(self.backend._model().named_modules())
        out = []
        for block in self.backend.bridge.blocks:
            name = names.get(id(block.original_component), "")
            parent, _, index = name.rpartition(".")
            if parent not in modules or not index.isdigit():
                raise CNAError(f"cannot find decoder layer {name!r} in the plain model")
            out.append((modules[parent], int(index)))
        return out

    def _layer(self, i: int) -> nn.Module:
        parent, index = self._layers[i]
        return parent[index]

    @contextmanager
    def _from_layer(self, residual: Tensor) -> Iterator[None]:
        """Skip the layers below ``start_layer`` and feed ``residual`` into it."""
        saved = [
            (parent, index, parent[index]) for parent, index in self._layers[: self.start_layer]
        ]

        def feed(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (residual, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": residual}

        handle = self._layer(self.start_layer).register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for parent, index, _ in saved:
                parent[index] = _PassThrough()
            yield
        finally:
            handle.remove()
            for parent, index, layer in saved:
                parent[index] = layer

    def _keep_residual(self) -> None:
        """One unsteered pass per batch, keeping the residual at ``start_layer``'s input;
        then check that a partial pass gives the full pass's logits on the first batch."""
        kept: list[Tensor] = []

        def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kept.append((args[0] if args else kwargs["hidden_states"]).detach())

        layer = self._layer(self.start_layer)
        prefix = self._prefix_cache() if self.prefix else None
        full = None
        for i, batch in enumerate(self.batches):
            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                logits = self._logits(batch, prefix)
            finally:
                handle.remove()
            full = logits if i == 0 else full
        self._residual = kept
        assert full is not None
        with self._from_layer(self._residual[0]):
            partial = self._logits(self.batches[0], prefix)
        if not torch.equal(partial, full):
            raise CNAError(
                f"a pass from layer {self.start_layer} does not reproduce the full pass on this "
                "architecture; score with start_layer=0"
            )

    # ---- passes -----------------------------------------------------------------------
    def _prefix_cache(self) -> Any:
        """The shared prefix's KV cache under the hooks in place (one row), through every
        layer (a condition that starts at ``start_layer`` changes it there and up)."""
        return run_prefix(self.backend._model(), self.prefix, 1, self.backend.device)

    def _logits(self, batch: TokenBatch, prefix: Any = None) -> Tensor:
        """Logits at the last ``keep`` positions (continuing a copy of the ``prefix`` cache,
        when the batch carries a shared prefix)."""
        ids, mask = batch.input_ids, batch.attention_mask
        cache = expand(prefix, ids.shape[0]) if batch.prefix else None
        with torch.inference_mode():
            out = self.backend._model()(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions(mask, ids.shape[1]),
                past_key_values=cache,
                use_cache=cache is not None,
                logits_to_keep=self.keep,
            )
        return out.logits.to(torch.float32)

    def _check(self, ops: Sequence[HookOp]) -> None:
        if self.start_layer == 0:
            return  # the whole model runs: the embedding's hook points too
        low = [op.hook for op in ops if hook_layer(op.hook) < self.start_layer]
        if low:
            raise CNAError(
                f"the condition changes {low[:2]}, below layer {self.start_layer} where this "
                "scorer starts; build the scorer with a lower start_layer"
            )

    def run(
        self,
        condition: Any,
        fn: Callable[[TokenBatch, Float[Tensor, "batch keep vocab"]], None],
    ) -> None:
        """Call ``fn(batch, log_probs)`` for every batch under ``condition``
        (``log_probs``: float32 log-softmax at the last ``keep`` positions)."""
        ops = condition_ops(self.backend.bridge, condition)
        self._check(ops)
        clock, groups = Clock(), _Groups([0])
        with ExitStack() as stack:
            for op in ops:
                module, post = self.backend.module_at(op.hook)
                hook = _GroupHook(groups, {0: [PositionOp(op, clock)]}, post=post)
                handle = (
                    module.register_forward_hook(hook)
                    if post
                    else module.register_forward_pre_hook(hook)
                )
                stack.callback(handle.remove)
            prefix = None
            if self.prefix:  # once per condition, all layers, under its hooks
                groups.set([rows_per_group(1)])
                prefix = self._prefix_cache()
            for i, batch in enumerate(self.batches):
                groups.set([len(batch.indices)])  # one condition: every row
                if self.start_layer > 0:
                    with self._from_layer(self._residual[i]):
                        logits = self._logits(batch, prefix)
                else:
                    logits = self._logits(batch, prefix)
                fn(batch, torch.log_softmax(logits, dim=-1))

    def target_mask(self, batch: TokenBatch) -> Tensor:
        """``[batch, keep]`` True where a row's position counts (its last ``targets[i]``)."""
        counts = torch.tensor([self.targets[i] for i in batch.indices], device=self.backend.device)
        cols = torch.arange(self.keep, device=self.backend.device)
        return cols[None, :] >= (self.keep - counts)[:, None]
