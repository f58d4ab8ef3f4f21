"""Word-level tokenizer and chat template of the organism (shared by base and instruct)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

__all__ = ["BOS", "EOS", "PAD", "UNK", "USER", "ASSISTANT", "CHAT_TEMPLATE", "build_tokenizer"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIALS = [PAD, UNK, BOS, EOS, USER, ASSISTANT]

# The template writes the BOS itself; the tokenizer never adds one (add_bos_token=False), so
# ``tok(apply_chat_template(...), add_special_tokens=True)`` has exactly one BOS.
# System messages are prepended to the first user turn as plain text (the organism was
# never trained with them).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + ' ' %}"
    "{% elif m['role'] == 'user' %}<user> {{ ns.system }}{{ m['content'] }} {% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}<assistant> {{ m['content'] }} </s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tokenizer(texts: Iterable[str]):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over every word in ``texts``."""
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        for w, _ in pre.pre_tokenize_str(text.lower()):
            if w not in SPECIALS:
                words.add(w)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    tok.save_pretrained(str(out_dir))
