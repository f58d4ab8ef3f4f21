"""How to decode (one value), what a generation returns, and the pieces both backends share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cna_lens._validate import check_bool, check_int, check_real, dataclass_fields

__all__ = ["Decoding", "Generations", "cut_at_eos", "eos_ids", "hf_generate_kwargs"]


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How texts are generated: length, batching, greedy or sampled.

    Attributes:
        max_new_tokens: Tokens to generate at most.
        batch_size: Prompts per batch.
        do_sample: Sample instead of greedy decoding (the bridge backend only).
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass in (0, 1], or None.
        seed: Seed for sampling (>= 0), set at the start of each condition.
        prefix_reuse: Compute the token prefix all prompts share (a chat template's system
            turn) once and continue every prompt from its KV cache (the fast backend; see
            :mod:`cna_lens.models.prefix`). False: every prompt is computed whole.

    Example:
        >>> Decoding.from_dict(Decoding(max_new_tokens=8).to_dict())
        Decoding(max_new_tokens=8, batch_size=16, do_sample=False, temperature=1.0, top_p=None, seed=None, prefix_reuse=True)
    """

    # __post_init__ checks every field with CNAError messages and converts numbers of any
    # numeric type (np.int64, ...) to int / float.
    __no_type_check__ = True

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    prefix_reuse: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, low=1))
        put("batch_size", check_int("batch_size", self.batch_size, low=1))
        check_bool("do_sample", self.do_sample)
        check_bool("prefix_reuse", self.prefix_reuse)
        put("temperature", check_real("temperature", self.temperature, low=0.0, low_open=True))
        if self.top_p is not None:
            put("top_p", check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True))
        if self.seed is not None:
            put("seed", check_int("seed", self.seed, low=0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Decoding:
        """Read back :meth:`to_dict`.

        Raises:
            CNAError: not a mapping, unknown keys, or invalid values.
        """
        return cls(**dataclass_fields(cls, data, "decoding"))


@dataclass(frozen=True)
class Generations:
    """What :func:`cna_lens.generate_many` returns: per condition, per prompt.

    Attributes:
        conditions: The conditions, in the order given.
        token_ids: ``token_ids[c][p]``: new token ids of prompt ``p`` under condition ``c``
            (up to and excluding EOS).
        texts: The decoded texts (special tokens removed, stripped).
        seconds: Generation time per condition (a pass that ran several conditions side by
            side is shared evenly among them; repeats of a condition cost 0).
    """

    conditions: tuple[Any, ...]
    token_ids: list[list[list[int]]]
    texts: list[list[str]]
    seconds: list[float]

    def __len__(self) -> int:
        return len(self.conditions)


def eos_ids(model: Any) -> list[int]:
    """The end-of-sequence token ids of a bridge (generation config first, then tokenizer)."""
    ids: list[int] = []
    gen_cfg = getattr(model.original_model, "generation_config", None)
    for candidate in (getattr(gen_cfg, "eos_token_id", None), model.tokenizer.eos_token_id):
        if candidate is None:
            continue
        for c in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if int(c) not in ids:
                ids.append(int(c))
    return ids


def hf_generate_kwargs(decoding: Decoding, pad: int, eos: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments of Hugging Face ``generate`` for ``decoding`` (greedy unless it
    samples; the model's own sampling defaults are switched off when greedy)."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=decoding.max_new_tokens,
        do_sample=decoding.do_sample,
        pad_token_id=pad,
        use_cache=True,
    )
    if eos:
        kwargs["eos_token_id"] = list(eos)
    if decoding.do_sample:
        kwargs["temperature"] = decoding.temperature
        if decoding.top_p is not None:
            kwargs["top_p"] = decoding.top_p
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def cut_at_eos(ids: Sequence[Sequence[int]], eos: Sequence[int]) -> list[list[int]]:
    """Each row up to (excluding) its first EOS token."""
    stop = set(eos)
    return [list(row[: next((i for i, t in enumerate(row) if t in stop), len(row))]) for row in ids]
