"""Damage that the 4-gram score cannot see: KL divergence from the unsteered model.

For harmless prompts, :class:`KLReference` generates the unsteered model's own greedy
continuation (``tokens`` new tokens, up to and including its end-of-sequence token) once, and
keeps the unsteered next-token distributions along it. :meth:`KLReference.measure` runs the
same sequences under a condition (teacher-forced: one forward pass per batch, no
generation) and returns ``KL(unsteered || steered)``

* at the **first generated token** (what heretic and refusal_direction report), and
* **averaged over the continuation's tokens** (first-token KL is known to miss damage that
  shows later in an answer),

per prompt and as means over prompts. An identity condition gives exactly 0. With
``start_layer`` the passes start at that decoder layer on a kept residual
(:class:`cna_lens.generation.forward.Scorer`), for conditions that change only the layers
above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cna_lens._validate import check_int
from cna_lens.errors import CNAError
from cna_lens.generation import Decoding, FastBackend, generate_many
from cna_lens.generation.decoding import eos_ids
from cna_lens.generation.forward import Scorer
from cna_lens.models.loading import TokenBatch, encode_prompt, validate_prompts

__all__ = ["KLReference", "KLResult"]


@dataclass(frozen=True)
class KLResult:
    """KL(unsteered || steered) of one condition on the reference prompts.

    Attributes:
        first: Mean over prompts of the first generated token's KL.
        mean: Mean over prompts of the KL averaged over each continuation's tokens.
        per_prompt_first, per_prompt_mean: The same per prompt (in prompt order).
        mass_first: Mean over prompts of the probability the steered model gives the token
            set asked for at the first position (e.g. refusal openings; None if not asked).
    """

    first: float
    mean: float
    per_prompt_first: tuple[float, ...]
    per_prompt_mean: tuple[float, ...]
    mass_first: float | None = None


class KLReference:
    """The unsteered model's distributions along its own continuations of ``prompts``.

    Args:
        backend: An open fast backend of the model.
        prompts: Harmless prompts.
        tokens: Continuation length N (new tokens at most; the EOS token counts when the
            answer ends sooner).
        batch_size: Sequences per pass.
        start_layer: Passes start at this decoder layer (see module docstring).
        prefix_reuse: Compute the prompts' shared prefix once (generation and scoring).

    Raises:
        CNAError: bad prompts or sizes.
    """

    def __init__(
        self,
        backend: FastBackend,
        prompts: Sequence[str],
        *,
        tokens: int = 16,
        batch_size: int = 16,
        start_layer: int = 0,
        prefix_reuse: bool = True,
    ):
        model = backend.bridge
        self.prompts = validate_prompts(prompts, "KL prompts")
        self.tokens = check_int("tokens", tokens, low=1)
        gens = generate_many(
            model,
            self.prompts,
            [None],
            decoding=Decoding(
                max_new_tokens=self.tokens, batch_size=batch_size, prefix_reuse=prefix_reuse
            ),
            backend=backend,
        )
        eos = eos_ids(model)
        continuations = []
        for ids in gens.token_ids[0]:
            ended = len(ids) < self.tokens and eos
            continuations.append(list(ids) + ([eos[0]] if ended else []))
        sequences, targets = [], []
        for prompt, cont in zip(self.prompts, continuations, strict=True):
            cont = cont[: self.tokens] or [eos[0] if eos else 0]
            sequences.append(encode_prompt(model, prompt) + cont[:-1])
            targets.append(len(cont))
        self.continuations = continuations
        self.scorer = Scorer(
            backend,
            sequences,
            keep=self.tokens,
            targets=targets,
            batch_size=batch_size,
            start_layer=start_layer,
            prefix_reuse=prefix_reuse,
        )
        self._reference: list[Tensor] = []
        self.scorer.run(None, lambda batch, lp: self._reference.append(lp))

    def measure(self, condition: Any, *, mass_ids: Sequence[int] | None = None) -> KLResult:
        """KL of ``condition`` against the unsteered model on the reference prompts.

        Args:
            condition: Any condition kind (None: 0 exactly).
            mass_ids: Also return the mean probability of these tokens at the first
                position (``mass_first``).

        Raises:
            CNAError: the condition does not fit the model or the scorer's start layer.
        """
        return self._measure(self.scorer, condition, mass_ids)

    def measure_model(self, backend: FastBackend, condition: Any = None) -> KLResult:
        """KL of another model (e.g. one a peer tool wrote: same tokenizer, same shapes of
        token ids) against this reference, on the same sequences.

        Raises:
            CNAError: the other model's vocabulary differs from the reference's.
        """
        other = Scorer(
            backend,
            self.scorer.sequences,
            keep=self.scorer.keep,
            targets=self.scorer.targets,
            batch_size=self.scorer.batch_size,
            prefix_reuse=bool(self.scorer.prefix),
        )
        if [b.indices for b in other.batches] != [b.indices for b in self.scorer.batches]:
            raise CNAError("the other model batches the sequences differently")
        vocab = int(backend.bridge.cfg.d_vocab)
        if vocab != int(self._reference[0].shape[-1]):
            raise CNAError(
                f"the other model has a vocabulary of {vocab}, the reference "
                f"{int(self._reference[0].shape[-1])}; KL needs the same tokens"
            )
        return self._measure(other, condition, None)

    def _measure(self, scorer: Scorer, condition: Any, mass_ids: Sequence[int] | None) -> KLResult:
        first = [0.0] * scorer.n
        mean = [0.0] * scorer.n
        masses = [0.0] * scorer.n
        ids = None if mass_ids is None else torch.tensor(list(mass_ids), dtype=torch.long)
        step = iter(range(len(scorer.batches)))

        def reduce(batch: TokenBatch, logprobs: Tensor) -> None:
            ref = self._reference[next(step)]
            kl = (ref.exp() * (ref - logprobs)).sum(-1).clamp_min(0.0)  # [batch, keep]
            mask = scorer.target_mask(batch)
            start = mask.float().argmax(-1)  # each row's first counted position
            rows = torch.arange(kl.shape[0])
            per_first = kl[rows, start]
            per_mean = (kl * mask).sum(-1) / mask.sum(-1)
            for r, i in enumerate(batch.indices):
                first[i], mean[i] = float(per_first[r]), float(per_mean[r])
            if ids is not None:
                p = logprobs[rows, start].exp()[:, ids.to(logprobs.device)].sum(-1)
                for r, i in enumerate(batch.indices):
                    masses[i] = float(p[r])

        scorer.run(condition, reduce)
        n = scorer.n
        return KLResult(
            first=sum(first) / n,
            mean=sum(mean) / n,
            per_prompt_first=tuple(first),
            per_prompt_mean=tuple(mean),
            mass_first=None if ids is None else sum(masses) / n,
        )
