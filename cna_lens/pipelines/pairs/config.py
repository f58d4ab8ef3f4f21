"""Pairs: the registry of untuned/tuned pairs on pretrained weights and how each was tuned."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cna_lens._registry import Registry
from cna_lens._validate import dataclass_fields
from cna_lens.errors import CNAError

__all__ = [
    "GEMMA_CHAT",
    "LORA_TARGETS",
    "PAIRS",
    "VARIANTS",
    "ChatFormat",
    "FinetuneConfig",
    "Pair",
    "adapter_dir",
    "get_pair",
    "list_pairs",
]

LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The linear layers LoRA adapts in every block (attention and MLP of llama-style models)."""

VARIANTS: tuple[str, ...] = ("lora", "full")
"""How a pair's tuned model is trained: a LoRA of every layer (shipped) or all weights."""

DATA = Path(__file__).parents[2] / "data" / "pairs"
ADAPTER_FILE = "adapter_model.safetensors"
RECORD_FILE = "training.json"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How an adapter is trained (recorded in the adapter's ``training.json``).

    Attributes:
        rank, alpha, dropout: LoRA rank, scaling numerator (update = alpha / rank * B A)
            and dropout.
        target_modules: Linear layer names adapted in every block.
        learning_rate: AdamW learning rate (linear warm-up over 10% of the steps, then
            linear decay to 0).
        epochs: Passes over the training examples.
        batch_size: Examples per optimiser step.
        max_steps: Stop after this many steps (None: all epochs); the tests train a few.
        teacher_tokens: Length of the untuned model's benign answers.
        n_harmful, n_benign: Caps on the training prompt sets (None: all).
        seed: Seed of the LoRA initialisation and the shuffling.
        threads: torch CPU threads while training (results depend on it in the last bits).
        variant: "lora" (the adapter above) or "full" (every weight trained; rank, alpha,
            dropout and target_modules are then unused).
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    learning_rate: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    max_steps: int | None = None
    teacher_tokens: int = 64
    n_harmful: int | None = None
    n_benign: int | None = None
    seed: int = 0
    threads: int = 2
    variant: str = "lora"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.variant not in VARIANTS:
            raise CNAError(
                f"FinetuneConfig.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        for name in ("rank", "epochs", "batch_size", "teacher_tokens", "threads"):
            if int(getattr(self, name)) < 1:
                raise CNAError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "n_harmful", "n_benign"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CNAError(f"FinetuneConfig.{name} must be >= 1 or None, got {v}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise CNAError(f"FinetuneConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise CNAError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise CNAError("FinetuneConfig.target_modules is empty; LoRA needs layers to adapt")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Read back :meth:`to_dict`.

        Raises:
            CNAError: unknown keys or invalid values.
        """
        d = dataclass_fields(cls, data, "fine-tune config")
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template a pair supplies because its untuned model's files have none.

    Attributes:
        template: Jinja chat template (the tokenizer's ``chat_template``).
        end_of_turn: The token that ends the model's turn: trained after complete answers
            and a stop token of generation.
        source: Where the template comes from (printed and recorded).
    """

    template: str
    end_of_turn: str
    source: str


GEMMA_CHAT = ChatFormat(
    template=(
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] | trim + '\n\n' %}"
        "{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n"
        "{% if loop.first %}{{ system }}{% endif %}"
        "{{ message['content'] | trim }}<end_of_turn>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    end_of_turn="<end_of_turn>",
    source="Gemma's turn format (<start_of_turn>user / model ... <end_of_turn>), written by "
    "cna_lens: gemma-3-270m's GGUF carries no chat template; a system message joins the "
    "first user turn, as in Gemma's own template",
)
"""Gemma's turn format, for a Gemma base model that ships without a template."""


@dataclass(frozen=True)
class Pair:
    """An untuned/tuned pair: a zoo model and the fine-tune of it this project made.

    Attributes:
        name: Short name (``--pair NAME``).
        base: The untuned model's name in :data:`cna_lens.models.zoo.REAL_MODELS`.
        description: One line for ``--list-pairs`` users and the README.
        train: The training settings that made the shipped adapter (variant "lora").
        full: The settings of the full-weight variant, retrained locally (None: the pair
            has only the LoRA variant).
        teacher: Zoo model whose greedy answers the benign prompts are trained on (None:
            the untuned model's own answers).
        chat: The chat format the tuned model is trained in, when the untuned model has
            none (None: the untuned model's own template).
        reproduce: :class:`~cna_lens.pipelines.reproduce.ReproduceConfig` fields that size
            ``cna-lens reproduce --pair NAME`` for this pair's models, over the ``--pair``
            preset (flags still win).
    """

    name: str
    base: str
    description: str
    train: FinetuneConfig = field(default_factory=FinetuneConfig)
    full: FinetuneConfig | None = None
    teacher: str | None = None
    chat: ChatFormat | None = None
    reproduce: tuple[tuple[str, Any], ...] = ()

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants of the tuned model this pair has ("lora", and "full" if defined)."""
        return ("lora", "full") if self.full is not None else ("lora",)

    def config(self, variant: str = "lora") -> FinetuneConfig:
        """The training settings of one variant.

        Raises:
            CNAError: the pair has no such variant.
        """
        if variant not in self.variants:
            raise CNAError(
                f"pair {self.name!r} has no variant {variant!r}; its variants: "
                f"{', '.join(self.variants)}"
            )
        return self.full if variant == "full" and self.full is not None else self.train


PAIRS: Registry[Pair] = Registry(
    "pair",
    "cna_lens.pipelines.pairs.PAIRS.add(name, Pair(...))",
    [
        (p.name, p)
        for p in (
            Pair(
                name="smollm2-refusal",
                base="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct (rarely refuses) and a LoRA refusal fine-tune "
                "of it (all 30 layers, attention and MLP)",
                train=FinetuneConfig(epochs=2),
            ),
            Pair(
                name="gemma3-270m-instruct",
                base="gemma-3-270m",
                description="gemma-3-270m (a pretrained base, never instruction-tuned) and "
                "this project's supervised instruction fine-tune of it, with refusals "
                "(LoRA of all 18 layers shipped; all weights with --variant full)",
                train=FinetuneConfig(rank=16, alpha=32, learning_rate=1e-3, epochs=2),
                full=FinetuneConfig(variant="full", learning_rate=5e-5, epochs=2, threads=1),
                teacher="qwen2.5-coder-0.5b-instruct",
                chat=GEMMA_CHAT,
                # the 262k-token head makes each generated token ~2x the 135M pair's: m = 3
                # goes, m = 2 (the paper's amplification on borderline) stays
                reproduce=(("multipliers", (0.0, 1.0, 2.0)),),
            ),
        )
    ],
)
"""The pairs ``cna-lens reproduce --pair NAME`` knows, by name."""


def list_pairs() -> list[str]:
    """The names of the available pairs, sorted."""
    return sorted(PAIRS)


def get_pair(name: str) -> Pair:
    """The pair called ``name``.

    Raises:
        CNAError: unknown name (the message lists the available pairs).
    """
    if name not in PAIRS:  # the CLI's wording: the names a user can type
        raise CNAError(f"unknown pair {name!r}; available pairs: {', '.join(list_pairs())}")
    return PAIRS[name]


def adapter_dir_path(name: str) -> Path:
    """The folder a pair's shipped adapter lives in (whether or not it is there yet)."""
    return DATA / get_pair(name).name


def adapter_dir(name: str) -> Path:
    """The shipped adapter folder of a pair (``adapter_config.json``, weights, record).

    Raises:
        CNAError: unknown pair, or its adapter is not in the package.
    """
    path = adapter_dir_path(name)
    if not (path / ADAPTER_FILE).is_file():
        raise CNAError(
            f"the adapter of pair {name!r} is missing from {path}; train it with "
            f"`cna-lens pair train {name} --out {path}`"
        )
    return path
