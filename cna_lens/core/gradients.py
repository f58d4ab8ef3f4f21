"""Attribution patching: which neurons move a target's log-probability, from one backward pass.

:func:`neuron_gradients` runs prompts through the model (its plain Hugging Face modules,
sharing the bridge's weights) with a zero added to every ``blocks.{L}.mlp.hook_post``
activation (the down projection's input) at the last prompt token, and back-propagates the
log-probability mass of ``token_ids`` at the next position (e.g. the model's refusal
openings): the gradient with respect to each neuron's last-token activation, averaged over
prompts, one backward pass per batch (the weights' gradients are not computed).

:func:`attribution_patching_score` turns it into a neuron score: ``|delta * gradient|``,
the first-order estimate of how much patching a neuron from the positive set's mean to the
negative set's mean changes the target (attribution patching, Nanda 2023; Syed et al. 2023).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from cna_lens._validate import check_int
from cna_lens.core.attribution import Attribution
from cna_lens.core.scores import Score
from cna_lens.errors import CNAError
from cna_lens.models.hf import hook_module, module_names, plain_model
from cna_lens.models.loading import mlp_hook_names, tokenize_prompts, validate_prompts

__all__ = ["attribution_patching_score", "neuron_gradients", "target_log_mass"]


def target_log_mass(
    logits: Float[Tensor, "batch vocab"], token_ids: Sequence[int]
) -> Float[Tensor, " batch"]:
    """``log sum_t p(t)`` over ``token_ids`` of each row's next-token distribution."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)
    return torch.logsumexp(logprobs[:, ids], dim=-1)


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def neuron_gradients(
    model: Any,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean over prompts of d log(mass of ``token_ids`` at the first answer token) / d a_j,
    for every MLP neuron's activation a_j at the last prompt token (float64, CPU).

    Raises:
        CNAError: bad prompts, no target tokens, or a token outside the vocabulary.
    """
    prompts = validate_prompts(prompts)
    if not token_ids:
        raise CNAError("token_ids is empty; give the tokens whose probability to follow")
    vocab = int(model.cfg.d_vocab)
    bad = [t for t in token_ids if not 0 <= int(t) < vocab]
    if bad:
        raise CNAError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    names = mlp_hook_names(model)
    total = torch.zeros(len(names), int(model.cfg.d_mlp), dtype=torch.float64)
    batches = tokenize_prompts(
        model, prompts, batch_size=check_int("batch_size", batch_size, low=1)
    )
    plain = plain_model(model.original_model, share=True)
    modules, ids = dict(plain.named_modules()), module_names(model)
    targets = [modules[ids[id(hook_module(model, name)[0])]] for name in names]
    with _frozen(model):
        for batch in batches:
            total += _batch_gradients(plain, targets, batch, token_ids)
    return total / len(prompts)


def _batch_gradients(
    plain: Any, targets: list[Any], batch: Any, token_ids: Sequence[int]
) -> Tensor:
    """Gradients of one batch through ``plain`` (the bridge's weights, no wrappers), with a
    zero leaf added to each down projection's input at the last position; logits are
    computed for the last position only."""
    zeros: list[Tensor] = []

    def add_zero(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        act = args[0]
        z = torch.zeros_like(act[:, -1]).requires_grad_(True)
        zeros.append(z)
        return (act + torch.cat([torch.zeros_like(act[:, :-1]), z[:, None]], dim=1), *args[1:])

    handles = []
    try:
        for target in targets:
            handles.append(target.register_forward_pre_hook(add_zero))
        ids, mask = batch.input_ids, batch.attention_mask
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.enable_grad():
            out = plain(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            )
            target_log_mass(out.logits[:, -1], token_ids).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert all(z.grad is not None for z in zeros)  # every layer feeds the target
    return torch.stack([z.grad.sum(0) for z in zeros if z.grad is not None]).to(torch.float64).cpu()


def attribution_patching_score(gradients: Float[Tensor, "n_layers d_mlp"]) -> Score:
    """A neuron score ``|delta * gradient|`` for :func:`cna_lens.register_score`.

    Raises (when called):
        CNAError: the gradients' grid differs from the attribution's.
    """
    grads = gradients.to(torch.float64)

    def atp(attribution: Attribution) -> Tensor:
        if tuple(grads.shape) != attribution.shape:
            raise CNAError(
                f"gradients are {list(grads.shape)} but the attribution is "
                f"{list(attribution.shape)}"
            )
        return (attribution.delta.to(torch.float64).cpu() * grads).abs()

    atp.__name__ = "atp"
    return atp
