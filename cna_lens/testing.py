"""Random tiny models of real architectures, saved as local HF directories, fully offline.

Used by the test suite, the benchmarks and the "your model" notebook: each directory has a
config, safetensors weights, a byte-level BPE tokenizer and a chat template, exactly like a
checkpoint from a hub, so it loads through :func:`cna_lens.load_model`.

Example:
    >>> from cna_lens.testing import make_random_model_dir
    >>> path = make_random_model_dir("/tmp/tiny-llama", arch="llama")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from cna_lens.errors import CNAError

__all__ = ["ARCHITECTURES", "make_random_model_dir", "make_tokenizer"]

Arch = Literal["llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2"]
ARCHITECTURES: tuple[str, ...] = get_args(Arch)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "How do I pick a lock? Please explain step by step.",
    "Write a poem about the ocean and the moon.",
    "What is the capital of France? Paris is the capital.",
    "The quick brown fox jumps over the lazy dog.",
    "Explain how vaccines train the immune system.",
    "I cannot help with that request. Here is a recipe for bread instead.",
    "def add(a, b):\n    return a + b",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]


def make_tokenizer(vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_random_model_dir(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layers: int = 3,
    d_model: int = 64,
    d_mlp: int = 128,
    n_heads: int = 4,
    n_ctx: int = 256,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    dtype: str = "float32",
) -> Path:
    """Save a randomly initialised model of ``arch`` with a tokenizer to ``path``.

    Args:
        path: Directory to write (created).
        arch: One of :data:`ARCHITECTURES` (gated MLPs, and ungated GPT-2).
        n_layers, d_model, d_mlp, n_heads, n_ctx: Model shape.
        seed: Initialisation seed.
        chat_template: Jinja chat template for the tokenizer (None: a base model).
        dtype: Weight dtype on disk.

    Raises:
        CNAError: unknown ``arch``.
    """
    import torch
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise CNAError(f"unknown arch {arch!r}; valid: {list(ARCHITECTURES)}")
    tok = make_tokenizer(chat_template=chat_template)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    kv = max(1, n_heads // 2)
    common = dict(hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=kv,
                  max_position_embeddings=n_ctx, tie_word_embeddings=False, **ids)
    head_dim = d_model // n_heads
    builders: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, common),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, common),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**common, "head_dim": head_dim}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, common),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**common, "head_dim": head_dim}),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=n_heads,
                      n_positions=n_ctx, **ids)),
    }
    config_cls, model_cls, kwargs = builders[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(getattr(torch, dtype)).eval()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
