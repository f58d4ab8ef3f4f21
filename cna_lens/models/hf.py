"""Bridge -> plain Hugging Face: one mapper from a bridge's modules and weights to a bare model.

The TransformerBridge wraps every HF module (``..._original_component``) to add hook points.
Three things need the bare model back: fast generation (a plain model that *shares* the
bridge's tensors, so it is the model in memory at no extra cost), export of a steered model
(a plain model with *copies* of the weights, so scaling them leaves the bridge alone), and
GGUF loading (a model rebuilt without transformers' GGUF quantisation marker). All three go
through :func:`plain_model`; :func:`hook_module` maps a TransformerLens hook name to the HF
module whose input (``"pre"``) or output (``"post"``) it is, and :func:`module_names` maps
a bridge's HF modules to their names in a plain copy.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cna_lens.errors import CNAError

__all__ = ["clean_name", "hook_module", "module_names", "plain_model"]

_WRAPPER = "._original_component"


def clean_name(name: str) -> str:
    """A bridge's module or parameter name with the wrapper levels removed (the HF name)."""
    return name.replace(_WRAPPER, "").removeprefix("_original_component.")


def plain_model(
    source: nn.Module, *, share: bool, attn_implementation: str | None = None
) -> nn.Module:
    """A bare ``transformers`` model of ``source``'s class and config, with its weights.

    Args:
        source: A HF ``PreTrainedModel``: a bridge's ``original_model`` (wrapped modules are
            unwrapped by name) or any plain model.
        share: True: the new model's parameters and buffers *are* ``source``'s tensors (no
            copy; changing one changes both). False: copies (the new model is independent).
        attn_implementation: Attention of the new model (default: ``source``'s, eager when
            unset).

    Returns:
        The model in eval mode, on ``source``'s device, in its dtype, with its generation
        config. A GGUF quantisation marker in the config is dropped (the weights are plain
        tensors after dequantisation).

    Raises:
        CNAError: a parameter of the new model has no counterpart in ``source``.
    """
    from transformers import AutoModelForCausalLM

    config: Any = copy.deepcopy(getattr(source, "config"))  # noqa: B009 - an nn.Module attribute
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    attn = attn_implementation or getattr(config, "_attn_implementation", None) or "eager"
    first = next(source.parameters())
    # Built on the meta device (no allocation, no random init: 0.03 s instead of 7 s for a
    # 0.5B model), then every parameter and buffer is the source's tensor or a copy of it.
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=first.dtype, attn_implementation=attn)
    if getattr(source, "generation_config", None) is not None:
        hf.generation_config = copy.deepcopy(source.generation_config)
    tensors = {clean_name(n): p for n, p in source.named_parameters(remove_duplicate=False)}
    buffers = {clean_name(n): b for n, b in source.named_buffers(remove_duplicate=False)}
    missing = [n for n, _ in hf.named_parameters(remove_duplicate=False) if n not in tensors]
    missing += [n for n, _ in hf.named_buffers(remove_duplicate=False) if n not in buffers]
    if missing:
        raise CNAError(
            f"could not map {len(missing)} weights of the plain model onto the source model "
            f"(e.g. {missing[:3]})"
        )
    copies: dict[int, Any] = {}  # tied weights stay tied in a copy

    def take(t: Tensor, param: bool) -> Any:
        if share:
            return t
        if id(t) not in copies:
            clone = t.detach().clone()
            copies[id(t)] = nn.Parameter(clone, requires_grad=t.requires_grad) if param else clone
        return copies[id(t)]

    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        hf.get_submodule(owner)._parameters[attr] = take(tensors[name], True)
    for name, _ in list(hf.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        hf.get_submodule(owner)._buffers[attr] = take(buffers[name], False)
    return hf.to(first.device).eval()


def module_names(bridge: Any) -> dict[int, str]:
    """``id(module) -> HF name`` of every module inside ``bridge.original_model``."""
    return {id(m): clean_name(n) for n, m in bridge.original_model.named_modules()}


def hook_module(bridge: Any, hook: str) -> tuple[nn.Module, Literal["pre", "post"]]:
    """The HF module (inside the bridge) at a hook point, and which side of it the hook is.

    ``blocks.3.mlp.hook_post`` is the input of layer 3's down projection (``"pre"``),
    ``blocks.3.hook_resid_post`` the output of decoder layer 3 (``"post"``), and so on for
    every hook point that sits on a module's input or output (``hook_in`` / ``hook_out`` of
    a bridge component, directly or through an alias).

    Raises:
        CNAError: the hook name is unknown, or the hook point is inside a module (e.g.
            attention patterns) rather than on a module's input or output.
    """
    point = bridge.hook_dict.get(hook)
    if point is None:
        raise CNAError(f"the model has no hook point {hook!r}")
    canonical = str(getattr(point, "name", "") or hook)
    owner, _, side = canonical.rpartition(".")
    if side not in ("hook_in", "hook_out"):
        raise CNAError(
            f"hook {hook!r} ({canonical}) is inside a module, not on its input or output; "
            "it cannot be mapped onto a plain model"
        )
    try:
        component = bridge.get_submodule(owner)
        module = component.original_component
    except (AttributeError, KeyError) as exc:
        raise CNAError(f"hook {hook!r}: no module behind {owner!r} in the bridge") from exc
    return module, "pre" if side == "hook_in" else "post"
