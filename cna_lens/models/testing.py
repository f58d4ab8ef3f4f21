"""Random tiny models of real architectures, saved as local HF directories, fully offline.

Used by the test suite, the benchmarks and the "your model" notebook: each directory has a
config, safetensors weights, a byte-level BPE tokenizer and a chat template, exactly like a
checkpoint from a hub, so it loads through :func:`cna_lens.load_model`.

A directory can also be written as a llama.cpp GGUF file (:func:`write_gguf`, float32, so
the round trip through ``transformers``' GGUF reader is exact), to test GGUF input offline.

Example:
    >>> from cna_lens.models.testing import make_random_model_dir, write_gguf
    >>> path = make_random_model_dir("/tmp/tiny-llama", arch="llama")  # doctest: +SKIP
    >>> write_gguf(path, "/tmp/tiny-llama.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

from cna_lens.errors import CNAError

__all__ = [
    "ARCHITECTURES",
    "GGUF_ARCHITECTURES",
    "make_random_model_dir",
    "make_tokenizer",
    "write_gguf",
]

Arch = Literal["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2"]
ARCHITECTURES: tuple[str, ...] = get_args(Arch)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SYSTEM_TEMPLATE = (
    "{{ bos_token }}<|user|>System: you are a careful assistant. Answer every question briefly, "
    "kindly and helpfully.<|end|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A chat template with a default system turn, as real chat models have: every prompt
shares its first 20+ tokens (the shared-prefix tests need such a prefix)."""

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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _builders(
    common: dict[str, Any], head_dim: int, ids: dict[str, Any]
) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """arch -> (config class, model class, config kwargs) for a random test model."""
    import transformers as tf

    d_model, d_mlp = common["hidden_size"], common["intermediate_size"]
    n_layers, n_heads = common["num_hidden_layers"], common["num_attention_heads"]
    n_ctx = common["max_position_embeddings"]
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, common),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, common),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**common, "head_dim": head_dim}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, common),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**common, "head_dim": head_dim}),
        # gemma-3-270m's family: sliding and full attention layers, q/k norms, post-norms.
        "gemma3": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            {
                **common,
                "head_dim": head_dim,
                "sliding_window": 16,
                "layer_types": [
                    "full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                    for i in range(n_layers)
                ],
            },
        ),
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(
                n_embd=d_model,
                n_inner=d_mlp,
                n_layer=n_layers,
                n_head=n_heads,
                n_positions=n_ctx,
                **ids,
            ),
        ),
    }


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

    if arch not in ARCHITECTURES:
        raise CNAError(f"unknown arch {arch!r}; valid: {list(ARCHITECTURES)}")
    tok = make_tokenizer(chat_template=chat_template)
    ids = dict(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vocab_size=len(tok),
    )
    kv = max(1, n_heads // 2)
    common = dict(
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=kv,
        max_position_embeddings=n_ctx,
        tie_word_embeddings=False,
        **ids,
    )
    config_cls, model_cls, kwargs = _builders(common, d_model // n_heads, ids)[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(getattr(torch, dtype)).eval()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2")
"""Architectures :func:`write_gguf` can write (llama.cpp names them like ``config.model_type``)."""


def _llama_cpp_permute(weight: Any, n_head: int) -> Any:
    """llama.cpp's reordering of Q/K rows for its rotary layout (``convert_hf_to_gguf.py``
    ``LlamaModel.permute``); ``transformers`` undoes it when it reads a llama GGUF."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# llama.cpp's names (``tokenizer.ggml.pre``) for the text splits a byte-level BPE tokenizer
# here can have: GPT-2's regex inside ByteLevel, or Qwen2's as a Split before it.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer_name(tok: Any) -> str:
    """llama.cpp's name for how ``tok`` splits text before BPE (as llama.cpp does, this is read
    from the tokenizer ``transformers`` loads, which may override tokenizer.json's split)."""
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT
        and parts[1].get("type") == "ByteLevel"
    ):
        return "qwen2"
    raise CNAError(
        f"write_gguf: no llama.cpp name for the pre-tokenizer {pre}; "
        "known: GPT-2's ByteLevel regex ('gpt-2'), Qwen2's split ('qwen2')"
    )


def write_gguf(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    chat_template: bool = True,
) -> Path:
    """Write a model directory from :func:`make_random_model_dir` as a float32 GGUF file.

    Follows llama.cpp's ``convert_hf_to_gguf.py``: tensor names ``token_embd``,
    ``blk.N.attn_q`` ... ``output``; Q/K rows permuted for llama (not for qwen2); the
    architecture's hyperparameters under ``{arch}.*``; a byte-level BPE tokenizer
    (``tokenizer.ggml.model = "gpt2"``) with its tokens, token types, merges and special ids.
    Weights are stored as F32, so ``transformers`` reads back exactly the original model.

    Args:
        hf_dir: A directory written by :func:`make_random_model_dir` (llama or qwen2).
        out_path: The ``.gguf`` file to write (its folder is created).
        chat_template: Store the tokenizer's chat template (False: a "base" model file).

    Returns:
        ``out_path`` as a Path.

    Raises:
        CNAError: the directory's architecture is not in :data:`GGUF_ARCHITECTURES`.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    src = Path(hf_dir)
    config = AutoConfig.from_pretrained(src)
    arch = config.model_type
    if arch not in GGUF_ARCHITECTURES:
        raise CNAError(
            f"write_gguf cannot write architecture {arch!r} (from {str(src)!r}); "
            f"supported: {list(GGUF_ARCHITECTURES)}"
        )
    tok = AutoTokenizer.from_pretrained(src)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(src.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // n_head)

    _write_tokenizer(writer, src, tok, config.vocab_size, chat_template)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    weights = load_file(str(src / "model.safetensors"))
    for hf_name, value in weights.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CNAError(f"write_gguf: no GGUF name for tensor {hf_name!r} of {arch!r}")
        value = value.astype(np.float32)
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            value = _llama_cpp_permute(value, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            value = _llama_cpp_permute(value, n_kv)
        writer.add_tensor(
            gguf_name, np.ascontiguousarray(value), raw_dtype=gguf.GGMLQuantizationType.F32
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_tokenizer(
    writer: Any, src: Path, tok: Any, vocab_size: int, chat_template: bool
) -> None:
    """The tokenizer as tokenizer.json defines it (the class AutoTokenizer picks may add
    tokens the model has no row for): every id in order, byte-level spelled; specials are
    CONTROL; llama.cpp pads a short vocabulary, so missing ids are UNUSED."""
    import gguf

    backend = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(backend["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in backend["added_tokens"]})
    special = {t["content"] for t in backend["added_tokens"] if t["special"]}
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, len(vocab)))]
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    )
    writer.add_bos_token_id(vocab[tok.bos_token])
    writer.add_eos_token_id(vocab[tok.eos_token])
    writer.add_pad_token_id(vocab[tok.pad_token])
    writer.add_add_bos_token(False)  # tokenizer.json has no post-processor that adds BOS
    if chat_template and tok.chat_template:
        writer.add_chat_template(tok.chat_template)
