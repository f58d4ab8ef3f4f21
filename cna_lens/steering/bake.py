"""Baking: fold a steering multiplier into the weights, so steering costs nothing at inference.

Steering scales circuit neuron ``j`` of layer ``L`` by ``m`` at ``blocks.{L}.mlp.hook_post``,
the input of the MLP down projection. For a constant ``m`` at every position that is the
same as scaling input column ``j`` of the down projection's weight (``W_down[:, j]`` for an
``nn.Linear`` of shape ``[d_model, d_mlp]``; row ``j`` for GPT-2's ``Conv1D`` of shape
``[d_mlp, d_model]``): ``W (s * a) = (W diag(s)) a``. The bias of the down projection is
added after the product, so it is untouched and the identity is exact for both layer kinds
(up to float rounding of the two products).

Three ways to use it:

* :func:`bake` — a context manager: the weights are scaled on entry and the exact original
  values (bit for bit, saved copies of the touched columns, never a division) are written
  back on exit, exception or not. Inside it, plain ``model(...)`` or
  ``model.original_model.generate(...)`` runs steered without any hook.
* :func:`bake_` — the same, in place, returning a :class:`BakedWeights` handle whose
  ``restore()`` undoes it (for long-lived steered models).
* :func:`export_steered` — write a standard Hugging Face directory (config, safetensors,
  tokenizer, generation config) of the steered model that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads without cna_lens; its logits
  equal the hook-steered logits. :func:`steered_hf_model` returns that model in memory.

Only ``positions="all"`` steering can be baked (weights do not know positions). Note that
under :func:`bake` a hook or cache at ``hook_post`` reads the *unscaled* activations; the
scaling happens inside the down projection, so ``hook_mlp_out`` and the residual stream
are steered.

Models come from :func:`cna_lens.load_model`, which passes ``dtype``, ``device_map`` and
``n_devices`` through to TransformerLens: baking scales each layer's weight on whatever
device and in whatever dtype it lives (bf16/fp16 included), so sharded models bake too.

Example:
    >>> with bake(model, circuit, 0.0):  # doctest: +SKIP
    ...     ids = generate_token_ids(model, prompts)  # ablated, no hooks
    >>> export_steered(model, circuit, 0.0, "out/ablated")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cna_lens import _model_state
from cna_lens._validate import Real
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.models.hf import hook_module, module_names, plain_model
from cna_lens.models.loading import MLP_HOOK, load_model
from cna_lens.steering.hooks import check_model
from cna_lens.steering.interventions import (
    Steering,
    as_steering,
    check_fits_dtype,
    model_dtype,
)

__all__ = ["BakedWeights", "bake", "bake_", "down_projection", "export_steered", "steered_hf_model"]

logger = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(module, Conv1D)


def down_projection(model: Any, layer: int) -> tuple[nn.Module, int]:
    """The HF down-projection module of ``layer`` and the weight axis that indexes neurons.

    The module is the one behind ``blocks.{layer}.mlp.out`` (whose ``hook_in`` is
    ``blocks.{layer}.mlp.hook_post``). The axis is 1 for ``nn.Linear`` (weight
    ``[d_model, d_mlp]``) and 0 for GPT-2's ``Conv1D`` (weight ``[d_mlp, d_model]``).

    Raises:
        CNAError: the layer has no such module (e.g. a fused or MoE MLP), or its weight is
            not a floating-point matrix with a ``d_mlp`` axis.
    """
    try:
        module, _ = hook_module(model, MLP_HOOK.format(layer=layer))
    except CNAError as exc:
        raise CNAError(
            f"layer {layer}: cannot find the MLP down projection (blocks.{layer}.mlp.out); "
            "baking needs a model whose hook_post feeds a single linear down projection"
        ) from exc
    weight = getattr(module, "weight", None)
    d_mlp = int(model.cfg.d_mlp)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise CNAError(
            f"layer {layer}: the down projection {type(module).__name__} has no floating-point "
            "2-D weight (quantised or fused layers cannot be baked); steer with hooks instead"
        )
    if _is_conv1d(module):
        axis = 0
    elif isinstance(module, nn.Linear):
        axis = 1
    elif weight.shape[1] == d_mlp and weight.shape[0] != d_mlp:
        axis = 1
    elif weight.shape[0] == d_mlp and weight.shape[1] != d_mlp:
        axis = 0
    else:
        raise CNAError(
            f"layer {layer}: cannot tell which axis of the {type(module).__name__} weight "
            f"{tuple(weight.shape)} indexes the d_mlp={d_mlp} neurons"
        )
    if weight.shape[axis] != d_mlp:
        raise CNAError(
            f"layer {layer}: down projection weight {tuple(weight.shape)} has no d_mlp={d_mlp} "
            f"axis where expected (axis {axis})"
        )
    return module, axis


def _weight_of(module: nn.Module) -> Tensor:
    """The weight of a module from :func:`down_projection` (which checked it is a Tensor)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


@dataclass(frozen=True)
class _Patch:
    weight: Tensor
    axis: int
    index: Tensor
    original: Tensor


@dataclass
class BakedWeights:
    """A record of baked columns; :meth:`restore` writes the saved originals back.

    Attributes:
        steering: What was baked (circuit, multipliers, sign selection).
    """

    steering: Steering
    _patches: list[_Patch] = field(default_factory=list, repr=False)
    _restored: bool = field(default=False, repr=False)
    _stack: list[BakedWeights] | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)
    _thread: int | None = field(default=None, repr=False)

    @property
    def restored(self) -> bool:
        return self._restored

    def _overlaps(self, other: BakedWeights) -> bool:
        for p in self._patches:
            for q in other._patches:
                if (
                    p.weight is q.weight
                    and p.axis == q.axis
                    and bool(torch.isin(p.index, q.index).any())
                ):
                    return True
        return False

    def restore(self) -> None:
        """Write the original weight columns back, bit for bit (idempotent).

        Patches are undone in reverse order. Bakes that share neurons must be restored in
        reverse order of baking (the later bake saved the earlier one's scaled columns as its
        "original"); restoring the earlier one first is refused rather than leaving the
        weights changed for good. Bakes of disjoint neurons may be restored in any order.

        Raises:
            CNAError: a later bake of some of the same neurons is still active.
        """
        if self._restored:
            return
        stack = self._stack if self._stack is not None else []
        later = stack[stack.index(self) + 1 :] if self in stack else []
        blocking = [h for h in later if not h._restored and h._overlaps(self)]
        if blocking:
            raise CNAError(
                f"cannot restore this bake ({len(self.steering.circuit)} neurons) before a later bake "
                f"of some of the same neurons ({blocking[-1].steering.circuit.labels[:3]}...) is "
                "restored: bakes that share neurons must be restored in reverse order"
            )
        with torch.no_grad():
            for p in reversed(self._patches):
                p.weight.index_copy_(p.axis, p.index, p.original)
        self._restored = True
        if self in stack:
            stack.remove(self)
        if self._model is not None:
            _model_state.release(self._model, self._thread)
            self._model = None


# The active bakes of each model, in baking order (nothing is patched onto the model).
_BAKES: weakref.WeakKeyDictionary[Any, list[BakedWeights]] = weakref.WeakKeyDictionary()


def _scale_weight(weight: Tensor, axis: int, scale: Tensor, patches: list[_Patch]) -> None:
    """Scale the neurons of ``weight`` (along ``axis``) whose ``scale`` is not 1, recording them."""
    index_cpu = (scale != 1.0).nonzero().flatten()
    if index_cpu.numel() == 0:
        return
    index = index_cpu.to(weight.device)
    with torch.no_grad():
        original = weight.index_select(axis, index)  # a copy
        factors = scale[index_cpu].to(device=weight.device, dtype=weight.dtype)
        shape = [1, 1]
        shape[axis] = -1
        scaled = original * factors.view(shape)
        if not bool(torch.isfinite(scaled).all()):
            limit = torch.finfo(weight.dtype).max
            raise CNAError(
                f"multiplier {float(scale[index_cpu].abs().max()):g} makes baked weights "
                f"overflow the model's dtype {weight.dtype} (largest finite value {limit:g}); "
                "choose a smaller multiplier"
            )
        patches.append(_Patch(weight, axis, index, original))
        weight.index_copy_(axis, index, scaled)


def bake_(
    model: Any,
    circuit: Circuit | Steering,
    multiplier: Real | None = None,
    *,
    negative_multiplier: Real | None = None,
) -> BakedWeights:
    """Scale the circuit's down-projection columns in place; undo with ``.restore()``.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        circuit: The neurons to scale; validated against ``model``. Or a
            :class:`~cna_lens.Steering` with a bakeable intervention (only ``"scale"``:
            see :data:`cna_lens.steering.interventions.BAKEABLE`), any sign selection, and
            ``positions="all"``.
        multiplier: 0 ablates (default), 1 is the unchanged model, > 1 amplifies.
        negative_multiplier: Separate factor for neurons with delta < 0 (default: same).

    Returns:
        A :class:`BakedWeights` handle holding copies of the touched columns.

    The model counts as in use by this thread until ``restore()``: steering or baking it
    from another thread meanwhile raises :class:`CNAError` (see :func:`cna_lens.steer`).

    Raises:
        CNAError: not a circuit, a non-finite multiplier or one whose baked weights would
            overflow the model's dtype, an intervention that does not fold into weights
            (e.g. ``"mean"``), a layer whose down projection cannot be baked, or the model is
            in use by another thread.
        CircuitMismatchError: the circuit was made for another model.
    """
    check_model(model)
    steering = as_steering(circuit, multiplier, negative_multiplier)
    steering.circuit.validate(model)
    check_fits_dtype(steering, model_dtype(model))
    scales = steering.scale_vectors()  # refuses interventions and positions that do not bake
    # Resolve every layer before touching any weight, so a failure changes nothing.
    targets = {layer: down_projection(model, layer) for layer in sorted(scales)}
    _model_state.acquire(model, "a baking context")
    handle = BakedWeights(steering)
    try:
        for layer, (module, axis) in targets.items():
            _scale_weight(_weight_of(module), axis, scales[layer], handle._patches)
    except BaseException:
        handle.restore()
        _model_state.release(model)
        raise
    handle._model, handle._thread = model, threading.get_ident()
    handle._stack = _BAKES.setdefault(model, [])
    handle._stack.append(handle)
    return handle


@contextmanager
def bake(
    model: Any,
    circuit: Circuit | Steering,
    multiplier: Real | None = None,
    *,
    negative_multiplier: Real | None = None,
) -> Iterator[BakedWeights]:
    """Run the model with the circuit baked into its weights inside the ``with`` block.

    Equivalent to ``steer(model, circuit, multiplier, positions="all")`` but without hooks.
    The exact original weights are restored on exit, also after an exception.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        circuit: The neurons to scale; validated against ``model``. Or a
            :class:`~cna_lens.Steering` with a bakeable intervention (see :func:`bake_`).
        multiplier: 0 ablates (default), 1 is the unchanged model, > 1 amplifies.
        negative_multiplier: Separate factor for neurons with delta < 0 (default: same).

    Raises:
        CNAError: non-finite multiplier, an intervention that does not fold into weights
            (e.g. ``"mean"``), or a layer whose down projection cannot be baked.
        CircuitMismatchError: the circuit was made for another model.

    Example:
        >>> with bake(model, circuit, 0.0):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    handle = bake_(model, circuit, multiplier, negative_multiplier=negative_multiplier)
    try:
        yield handle
    finally:
        handle.restore()


# ---- a plain Hugging Face copy ------------------------------------------------------------


def steered_hf_model(
    model_or_dir: Any,
    circuit: Circuit | Steering,
    multiplier: Real | None = None,
    *,
    negative_multiplier: Real | None = None,
) -> Any:
    """A plain ``transformers`` model (no bridge, no hooks) with the circuit baked in.

    The copy holds the bridge's *current* weights (copied, so the bridge is untouched): it
    is the model in memory, not merely the checkpoint on disk. From a directory, the bridge
    is loaded first (to validate the circuit and locate each layer's down projection).

    Args:
        model_or_dir: A bridge from :func:`cna_lens.load_model`, or a local HF directory.
        circuit: The neurons to scale, or a bakeable :class:`~cna_lens.Steering`;
            validated against the model.
        multiplier: 0 ablates (default), 1 is the unchanged model, > 1 amplifies.
        negative_multiplier: Separate factor for neurons with delta < 0 (default: same).

    Returns:
        A ``PreTrainedModel`` on the bridge's device, in its dtype, in eval mode.

    Raises:
        CNAError: bad multiplier, an unbakeable steering or layer, or weights that cannot
            be mapped.
        CircuitMismatchError: the circuit was made for another model.
    """
    steering = as_steering(circuit, multiplier, negative_multiplier)
    if isinstance(model_or_dir, (str, os.PathLike)):
        bridge = load_model(model_or_dir, device="cpu", dtype=_disk_dtype(model_or_dir))
    else:
        bridge = model_or_dir
    check_model(bridge)
    steering.circuit.validate(bridge)
    check_fits_dtype(steering, model_dtype(bridge))
    scales = steering.scale_vectors()
    hf = plain_model(bridge.original_model, share=False)
    names, hf_modules = module_names(bridge), dict(hf.named_modules())
    patches: list[_Patch] = []
    for layer, scale in sorted(scales.items()):
        module, axis = down_projection(bridge, layer)
        name = names[id(module)]
        if name not in hf_modules:
            raise CNAError(f"layer {layer}: down projection {name!r} not found in the HF copy")
        _scale_weight(_weight_of(hf_modules[name]), axis, scale, patches)
    return hf


def _disk_dtype(path: str | os.PathLike[str]) -> torch.dtype:
    cfg = (
        json.loads((Path(path).expanduser() / "config.json").read_text())
        if (Path(path).expanduser() / "config.json").is_file()
        else {}
    )
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def export_steered(
    model_or_dir: Any,
    circuit: Circuit | Steering,
    multiplier: Real | None,
    out_dir: str | os.PathLike[str],
    *,
    negative_multiplier: Real | None = None,
) -> Path:
    """Write the steered model as a standard Hugging Face directory.

    The directory holds ``config.json``, safetensors weights, the generation config, the
    tokenizer files and ``cna_steering.json`` (the circuit and multipliers, for the record;
    ``transformers`` ignores it). ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it
    without cna_lens, and its logits equal hook-steered logits of the original model.

    Args:
        model_or_dir: A bridge from :func:`cna_lens.load_model`, or a local HF directory.
        circuit: The neurons to scale, or a bakeable :class:`~cna_lens.Steering` (then
            ``multiplier`` is None); validated against the model.
        multiplier: 0 ablates, 1 is the unchanged model, > 1 amplifies.
        out_dir: Where to write. Written atomically: the export goes to a temporary
            directory beside it, which then replaces ``out_dir`` as a whole (the old
            directory is kept until the new one is complete). An existing ``out_dir`` must
            be empty or a previous export (holding ``cna_steering.json``).
        negative_multiplier: Separate factor for neurons with delta < 0 (default: same).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        CNAError: bad multiplier, an unbakeable layer, ``out_dir`` is an existing file or a
            non-empty directory that is not a previous export, or the write failed (nothing
            is changed then).
        CircuitMismatchError: the circuit was made for another model.

    Example:
        >>> export_steered("models/llama", circuit, 0.0, "models/llama-ablated")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("models/llama-ablated")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CNAError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "cna_steering.json").is_file():
        raise CNAError(
            f"out_dir {str(out)!r} is not empty and is not a previous export (no "
            "cna_steering.json in it); it would be replaced as a whole, so choose a "
            "new or empty directory"
        )
    steering = as_steering(circuit, multiplier, negative_multiplier)
    hf = steered_hf_model(model_or_dir, steering)
    if isinstance(model_or_dir, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(Path(model_or_dir).expanduser()))
    else:
        tokenizer = model_or_dir.tokenizer
    record = steering.to_dict()

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cna_steering.json").write_text(json.dumps(record, indent=1))

    _replace_dir_atomically(out, write)
    logger.info(
        "wrote steered model (%d neurons, m=%s) to %s",
        len(steering.circuit),
        steering.multiplier,
        out,
    )
    return out


def _replace_dir_atomically(out: Path, write: Any) -> None:
    """Run ``write(tmp)`` on a fresh directory beside ``out``, then swap it in for ``out``.

    The old ``out`` is renamed aside, the new one renamed into place, and only then is the
    old one deleted; on any failure the temporary directory is removed and ``out`` is left
    as it was.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise CNAError(f"cannot write to {str(out)!r}: {exc.strerror or exc}") from exc
    old: Path | None = None
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
                old = None
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CNAError(f"cannot write to {str(out)!r}: {exc.strerror or exc}") from exc
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
