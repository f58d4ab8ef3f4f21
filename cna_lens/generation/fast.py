"""Fast generation: the texts of :func:`cna_lens.generate`, without the bridge's overhead.

Evaluation sweeps generate the same prompts under many steering conditions, and on a real
model that dominates a run. :class:`FastGenerator` produces the *same token ids* as
``cna_lens.generate`` / ``cna_lens.steering.caa.caa_generate`` (greedy), faster, by:

* **A plain Hugging Face model.** The bridge wraps every module (hook points on each
  input and output); the generator builds one bare ``transformers`` model of the same
  class from the bridge's config (same ``attn_implementation``, eager for bridges), whose
  parameters *are* the bridge's tensors (shared, not copied: no extra memory, and the
  model in memory rather than the checkpoint on disk).
* **The same interventions, as plain PyTorch hooks.** Steering applies the very same op
  (:class:`cna_lens.steering.interventions.LayerOp` through ``steering._LayerHook``, positions
  included) in a forward *pre*-hook on each steered layer's down projection, whose input
  is ``blocks.{L}.mlp.hook_post``; CAA adds the very same ``alpha * vector`` in a forward
  hook on the decoder layer, whose output is ``blocks.{L}.hook_resid_post``. Hooks are
  added per batch and removed in ``finally``; the bridge is never hooked.
* **A lean greedy loop with the KV cache that drops finished rows.** Once a row has
  emitted EOS it is removed from the batch and the cache (``DynamicCache``
  rows), so the batch shrinks as answers end; HF ``generate`` keeps computing padding for
  them until the longest answer ends. Positions and attention masks are built exactly as
  ``generate`` builds them, and logits are computed for the last position only, as there.

Why the texts are identical, and where that rests on measurement: every op above is the
op the bridge path runs, on the same values, so each row's numbers are the same *provided
that a row's result does not depend on how many rows are in the batch*. Elementwise ops,
attention (batched per row) and softmax are row-independent; a CPU matrix product was
measured row-independent for 4 or more rows but not for 1-3 rows (other kernels). The loop
therefore never shrinks a batch below ``min_rows`` (default 4; a batch that starts
smaller is never shrunk), and shrinking is on by default on CPU only (GPU libraries pick
kernels by shape, so there it is opt-in: ``compact=True``). ``tests/test_fastgen.py``
asserts identical texts on several architectures; ``benchmarks/run.py --eval`` checks it
on real models.

A model whose generation config asks for logits processors under greedy decoding
(a repetition penalty, banned n-grams, a minimum length, ...) is generated with HF
``generate`` on the plain model instead of the loop (identical texts, less speed-up).

Example:
    >>> with FastGenerator(model) as gen:  # doctest: +SKIP
    ...     base = gen.generate(prompts, max_new_tokens=48)
    ...     ablated = gen.generate(prompts, Steering(circuit=circuit, multiplier=0.0))
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cna_lens.errors import CNAError
from cna_lens.models.loading import PromptList, _pad_id, tokenize_prompts
from cna_lens.steering.interventions import Steering

__all__ = ["Condition", "FastGenerator"]

logger = logging.getLogger(__name__)

_WRAPPER = "._original_component"

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


def _clean(name: str) -> str:
    return name.replace(_WRAPPER, "").removeprefix("_original_component.")


def _plain_model(bridge: Any) -> nn.Module:
    """A bare HF model of the bridge's class whose parameters are the bridge's tensors."""
    from transformers import AutoModelForCausalLM

    src = bridge.original_model
    config = copy.deepcopy(src.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    attn = getattr(src.config, "_attn_implementation", None) or "eager"
    dtype = next(src.parameters()).dtype
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    hf.generation_config = copy.deepcopy(src.generation_config)
    tensors = {_clean(n): p for n, p in src.named_parameters(remove_duplicate=False)}
    buffers = {_clean(n): b for n, b in src.named_buffers(remove_duplicate=False)}
    missing = []
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        if name not in tensors:
            missing.append(name)
            continue
        owner, _, attr = name.rpartition(".")
        hf.get_submodule(owner)._parameters[attr] = tensors[name]
    if missing:
        raise CNAError(
            f"could not map {len(missing)} weights of the plain model onto the "
            f"bridge (e.g. {missing[:3]}); use the obvious path (fast=False)"
        )
    for name, _ in list(hf.named_buffers(remove_duplicate=False)):
        if name in buffers:
            owner, _, attr = name.rpartition(".")
            hf.get_submodule(owner)._buffers[attr] = buffers[name]
    device = next(src.parameters()).device
    return hf.to(device).eval()


def _check_tokens(max_new_tokens: Any) -> int:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or (max_new_tokens < 1)
    ):
        raise CNAError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


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
    """Applies each condition's op to its own rows (elementwise ops, so a row's values are
    those of a batch of that condition alone); ``post`` hooks read a layer's output."""

    def __init__(self, groups: _Groups, ops: dict[int, Any], post: bool):
        self.groups = groups
        self.ops = ops
        self.post = post

    def _apply(self, act: Tensor) -> Tensor:
        parts = []
        for cond, (a, b) in enumerate(self.groups.bounds):
            if a == b:
                continue
            op = self.ops.get(cond)
            parts.append(act[a:b] if op is None else op(act[a:b], None))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        if not self.post:
            return (self._apply(args[0]), *args[1:])
        if isinstance(output, tuple):
            return (self._apply(output[0]), *output[1:])
        return self._apply(output)


@dataclass(frozen=True)
class Condition:
    """One steering condition of :meth:`FastGenerator.generate_many`.

    Attributes:
        steering: Circuit steering (any intervention, sign, positions), or None.
        caa_alpha: CAA strength (with the generator call's ``caa`` vectors; 0: none).
    """

    steering: Steering | None = None
    caa_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.steering is not None and not isinstance(self.steering, Steering):
            raise CNAError(
                f"steering must be a Steering or None, got {type(self.steering).__name__}"
            )
        a = self.caa_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise CNAError(f"caa_alpha must be a finite number, got {a!r}")


class FastGenerator:
    """Greedy generation with the texts of :func:`cna_lens.generate`, several times faster.

    Build one per sweep (it builds a plain HF model sharing the bridge's weights) and call
    :meth:`generate` per condition. See the module docstring for how and why it is exact.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        compact: Drop rows that have finished from the batch and the KV cache. Default:
            on for CPU models (measured row-independent there), off elsewhere.
        min_rows: Never shrink a batch below this many rows (matrix products of 1-3 rows
            use other kernels on CPU, with other rounding).

    Raises:
        CNAError: ``min_rows`` < 1, or the plain model's weights cannot be mapped.

    Example:
        >>> with FastGenerator(model) as gen:  # doctest: +SKIP
        ...     texts = gen.generate(prompts, Steering(circuit=c, multiplier=0.0))
    """

    def __init__(self, model: Any, *, compact: bool | None = None, min_rows: int = 4):
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
            raise CNAError(f"min_rows must be a positive integer, got {min_rows!r}")
        from cna_lens.steering.hooks import _eos_ids

        self.bridge = model
        self.hf: nn.Module | None = _plain_model(model)
        self.device = next(self.hf.parameters()).device
        self.compact = (self.device.type == "cpu") if compact is None else bool(compact)
        self.min_rows = min_rows
        self.eos = _eos_ids(model)
        self.pad = _pad_id(model)
        gen_cfg = self.hf.generation_config
        active = [k for k, ok in _NEUTRAL.items() if getattr(gen_cfg, k, None) not in ok]
        self.use_loop = not active
        if active:
            logger.info("generation config sets %s: using HF generate on the plain model", active)
        src = model.original_model
        self._names = {id(m): _clean(n) for n, m in src.named_modules()}
        self._modules = dict(self.hf.named_modules())

    # ---- context manager --------------------------------------------------------------
    def __enter__(self) -> FastGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the plain model (the bridge's weights it shares stay with the bridge)."""
        self.hf = None

    # ---- module lookup ----------------------------------------------------------------
    def _plain(self, bridge_module: nn.Module, what: str) -> nn.Module:
        name = self._names.get(id(bridge_module))
        if name is None or name not in self._modules:
            raise CNAError(
                f"{what}: no matching module in the plain model; use the obvious path (fast=False)"
            )
        return self._modules[name]

    def down_projection(self, layer: int) -> nn.Module:
        """The plain model's module behind ``blocks.{layer}.mlp.out`` (input = hook_post)."""
        from cna_lens.steering.bake import down_projection

        module, _ = down_projection(self.bridge, layer)
        return self._plain(module, f"layer {layer} down projection")

    def decoder_layer(self, layer: int) -> nn.Module:
        """The plain model's decoder layer ``layer`` (output = ``hook_resid_post``)."""
        try:
            block = self.bridge.blocks[layer].original_component
        except (AttributeError, IndexError, TypeError) as exc:
            raise CNAError(f"layer {layer}: the bridge has no block to map") from exc
        return self._plain(block, f"layer {layer} decoder block")

    # ---- generation -------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptList,
        steering: Steering | None = None,
        *,
        caa: Any | None = None,
        caa_alpha: float = 0.0,
        caa_layers: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy completions, equal to ``cna_lens.generate`` (and ``caa_generate``).

        Args:
            prompts: Prompt texts (chat-formatted like :func:`cna_lens.generate`).
            steering: Circuit steering (any intervention, sign and positions), or None.
            caa: :class:`cna_lens.steering.caa.CAAVectors` to add on the residual stream, or None.
            caa_alpha: CAA strength (0 adds nothing).
            caa_layers: Layers CAA steers (default: the middle layer).
            max_new_tokens: Tokens to generate at most.
            batch_size: Prompts per batch (as in :func:`cna_lens.generate`; the batches
                are the same, which identical texts need).

        Returns:
            The generated texts (new tokens, special tokens removed, stripped), in prompt
            order.

        Raises:
            CNAError: bad prompts, lengths, steering or CAA arguments, or a closed generator.
            CircuitMismatchError: the circuit belongs to another model.
        """
        return self.generate_many(
            prompts,
            [Condition(steering, caa_alpha)],
            caa=caa,
            caa_layers=caa_layers,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )[0]

    def generate_many(
        self,
        prompts: PromptList,
        conditions: Sequence[Condition],
        *,
        caa: Any | None = None,
        caa_layers: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        max_rows: int = 256,
    ) -> list[list[str]]:
        """The texts of every condition, each equal to its own :meth:`generate` call.

        Each batch of prompts runs once for several conditions side by side (its rows
        repeated per condition, each block steered its own way), so a decoding step reads
        the weights once for all of them; the batches themselves are those of
        :func:`cna_lens.generate`.

        Args:
            prompts: Prompt texts.
            conditions: The conditions (see :class:`Condition`).
            caa: CAA vectors for conditions with a non-zero ``caa_alpha``.
            caa_layers: Layers CAA steers (default: the middle layer).
            max_new_tokens: Tokens to generate at most.
            batch_size: Prompts per batch.
            max_rows: Rows of one forward pass at most (``batch_size`` x conditions run
                together); at least one condition always runs.

        Returns:
            Per condition, the texts in prompt order.

        Raises:
            CNAError: as :meth:`generate`, no conditions, or bad ``max_rows``.
        """
        ids = self.generate_many_token_ids(
            prompts,
            conditions,
            caa=caa,
            caa_layers=caa_layers,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_rows=max_rows,
        )
        tok = self.bridge.tokenizer
        return [[tok.decode(t, skip_special_tokens=True).strip() for t in rows] for rows in ids]

    def generate_token_ids(
        self,
        prompts: PromptList,
        steering: Steering | None = None,
        *,
        caa: Any | None = None,
        caa_alpha: float = 0.0,
        caa_layers: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
    ) -> list[list[int]]:
        """New token ids per prompt, up to and excluding EOS (see :meth:`generate`)."""
        return self.generate_many_token_ids(
            prompts,
            [Condition(steering, caa_alpha)],
            caa=caa,
            caa_layers=caa_layers,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )[0]

    def generate_many_token_ids(
        self,
        prompts: PromptList,
        conditions: Sequence[Condition],
        *,
        caa: Any | None = None,
        caa_layers: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        max_rows: int = 256,
    ) -> list[list[list[int]]]:
        """Per condition, the new token ids per prompt (see :meth:`generate_many`)."""
        if self.hf is None:
            raise CNAError("this FastGenerator is closed; make a new one")
        max_new_tokens = _check_tokens(max_new_tokens)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise CNAError(f"max_rows must be a positive integer, got {max_rows!r}")
        conds = list(conditions)
        if not conds:
            raise CNAError("no conditions to generate")
        for c in conds:
            if not isinstance(c, Condition):
                raise CNAError(f"conditions must be Condition values, got {type(c).__name__}")
            if c.steering is not None:
                c.steering.circuit.validate(self.bridge)
        caa_modules = self._caa_modules(caa, [c.caa_alpha for c in conds], caa_layers)
        batches = tokenize_prompts(
            self.bridge,
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=self.device,
        )
        n = sum(len(b.indices) for b in batches)
        results: list[list[list[int]]] = [[[] for _ in range(n)] for _ in conds]
        per_pass = max(1, max_rows // max(batch_size, 1))
        for batch in batches:
            for start in range(0, len(conds), per_pass):
                chunk = list(range(start, min(start + per_pass, len(conds))))
                rows = self._run_batch(
                    batch.input_ids,
                    batch.attention_mask,
                    [conds[i] for i in chunk],
                    caa,
                    caa_modules,
                    max_new_tokens,
                )
                width = len(batch.indices)
                for k, cond in enumerate(chunk):
                    for row, idx in enumerate(batch.indices):
                        results[cond][idx] = rows[k * width + row]
        return results

    def _caa_modules(
        self, caa: Any | None, alphas: list[float], layers: Sequence[int] | None
    ) -> dict[int, nn.Module]:
        """Decoder layers CAA steers (checked as :func:`cna_lens.steering.caa.caa_steer` does)."""
        from cna_lens.steering.caa import _check_layers, _resid_names

        if caa is None:
            if any(a != 0.0 for a in alphas):
                raise CNAError("a condition has caa_alpha != 0 but no caa vectors were given")
            return {}
        shape = (int(self.bridge.cfg.n_layers), int(self.bridge.cfg.d_model))
        if (caa.n_layers, caa.d_model) != shape:
            raise CNAError(
                f"CAA vectors are [{caa.n_layers}, {caa.d_model}] but the model has "
                f"n_layers={shape[0]}, d_model={shape[1]}"
            )
        chosen = _check_layers(layers, shape[0])
        _resid_names(self.bridge)
        return {layer: self.decoder_layer(layer) for layer in chosen}

    def _run_batch(
        self,
        input_ids: Tensor,
        mask: Tensor,
        conds: list[Condition],
        caa: Any | None,
        caa_modules: dict[int, nn.Module],
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Token ids of ``len(conds)`` copies of the batch, condition-major."""
        from cna_lens.steering.caa import _AddHook
        from cna_lens.steering.hooks import _LayerHook

        width = input_ids.shape[0]
        groups = _Groups([width] * len(conds))
        pre: dict[int, dict[int, Any]] = {}
        post: dict[int, dict[int, Any]] = {}
        for i, c in enumerate(conds):
            if c.steering is not None:
                for layer, op in c.steering.layer_ops().items():  # fresh per batch
                    pre.setdefault(layer, {})[i] = _LayerHook(op, c.steering.positions, None)
            if c.caa_alpha != 0.0:
                assert caa is not None  # checked by the caller before any forward pass
                for layer in caa_modules:
                    post.setdefault(layer, {})[i] = _AddHook(caa.vectors[layer], float(c.caa_alpha))
        handles = []
        try:
            for layer, ops in pre.items():
                hook = _GroupHook(groups, ops, post=False)
                handles.append(self.down_projection(layer).register_forward_pre_hook(hook))
            for layer, ops in post.items():
                hook = _GroupHook(groups, ops, post=True)
                handles.append(caa_modules[layer].register_forward_hook(hook))
            if len(conds) > 1:
                input_ids, mask = input_ids.repeat(len(conds), 1), mask.repeat(len(conds), 1)
            with torch.inference_mode():
                if self.use_loop:
                    return self._greedy(input_ids, mask, max_new_tokens, groups, len(conds))
                return self._hf_generate(input_ids, mask, max_new_tokens)
        finally:
            for h in handles:
                h.remove()

    def _hf_generate(self, input_ids: Tensor, mask: Tensor, max_new_tokens: int) -> list[list[int]]:
        assert self.hf is not None
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
            use_cache=True,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if self.eos:
            kwargs["eos_token_id"] = self.eos
        out = self.hf.generate(
            input_ids=input_ids,
            attention_mask=mask,  # type: ignore[operator]
            **kwargs,
        )
        return self._cut(out[:, input_ids.shape[1] :].tolist())

    def _cut(self, ids: list[list[int]]) -> list[list[int]]:
        eos = set(self.eos)
        return [
            toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))] for toks in ids
        ]

    def _greedy(
        self, input_ids: Tensor, mask: Tensor, max_new_tokens: int, groups: _Groups, n_groups: int
    ) -> list[list[int]]:
        """Greedy decoding as HF ``generate`` does it, dropping finished rows."""
        hf = self.hf
        assert hf is not None
        n = input_ids.shape[0]
        width = n // n_groups
        eos = torch.tensor(self.eos or [-1], device=self.device)
        # Position ids exactly as generate makes them from a left-padded mask.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = hf(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        live = torch.arange(n, device=self.device)  # original row of each batch row
        active = torch.ones(n, dtype=torch.bool, device=self.device)  # not yet finished
        last_pos = positions[:, -1:]
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
        return self._cut(torch.stack(produced, dim=1).tolist())

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
