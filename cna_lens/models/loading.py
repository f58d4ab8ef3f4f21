"""Loading: boot a model into TransformerLens and turn prompts into left-padded token batches.

``load_model`` returns a :class:`transformer_lens.TransformerBridge` in its default
(HF-faithful) mode, from a hub name or a local HF directory. Whether a model is a chat
model is read from its tokenizer's chat template, never guessed from its name. Prompts
are formatted as a user turn plus the generation prompt when there is a template, and as
raw text otherwise, with never a doubled BOS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from cna_lens._validate import Integral, check_int
from cna_lens.errors import CNAError
from cna_lens.models.gguf import load_gguf, resolve_gguf

__all__ = [
    "PromptList",
    "TokenBatch",
    "encode_prompt",
    "encode_prompts",
    "format_prompt",
    "is_chat_model",
    "load_model",
    "mlp_hook_names",
    "model_fingerprint",
    "model_id",
    "model_source",
    "pad_batches",
    "pad_id",
    "portable_model_id",
    "prompt_set_hash",
    "tokenize_prompts",
    "validate_prompts",
]

logger = logging.getLogger(__name__)

MLP_HOOK = "blocks.{layer}.mlp.hook_post"

PromptList = Sequence[Any]
"""A sequence of prompt strings. Its entries are checked by :func:`validate_prompts`, which
names the offending entry (a runtime type checker would test only a sample of them)."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class _ModelInfo:
    """What cna_lens knows about a loaded model beyond the bridge itself."""

    model_id: str
    chat: bool | None
    source: str | None = None


# Per-model state lives here, keyed weakly by the model, never patched onto the model.
_MODEL_INFO: weakref.WeakKeyDictionary[Any, _ModelInfo] = weakref.WeakKeyDictionary()


def _set_model_info(
    model: Any, *, model_id: str, chat: bool | None, source: str | None = None
) -> None:
    _MODEL_INFO[model] = _ModelInfo(model_id=model_id, chat=chat, source=source)


def _model_info(model: Any) -> _ModelInfo | None:
    try:
        return _MODEL_INFO.get(model)
    except TypeError:  # not weak-referenceable
        return None


def _check_device(device: str | torch.device | None) -> None:
    if device is None or isinstance(device, torch.device):
        return
    if not isinstance(device, str):
        raise CNAError(f"device must be a string like 'cpu', 'cuda' or 'cuda:1', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise CNAError(
            f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', 'mps', ..."
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CNAError(f"device {device!r} asked for, but CUDA is not available here; use 'cpu'")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise CNAError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPES)} or a torch.dtype")


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    n_devices: int | None = None,
    chat: bool | None = None,
    **boot_kwargs: Any,
) -> Any:
    """Load a causal LM into a TransformerLens ``TransformerBridge`` (default, HF-faithful mode).

    Args:
        name_or_path: A hub model name (needs network access or a warm HF cache), a local
            HF directory (config, weights, tokenizer), a ``.gguf`` file, or a directory
            holding exactly one ``.gguf`` file (dequantised on load; needs the ``gguf``
            package). Local paths load fully offline.
        device: Where to put the model ("cpu", "cuda", ...). Default: CUDA if available.
            Mutually exclusive with ``device_map`` / ``n_devices``.
        dtype: torch dtype or one of "float32", "float16", "bfloat16" (default float32).
        device_map: HF-style device map (e.g. "auto") to shard a large model over GPUs.
        n_devices: Split the model over this many CUDA devices.
        chat: Force chat formatting on (True) or off (False). Default: on iff the tokenizer
            has a chat template.
        **boot_kwargs: Passed on to ``TransformerBridge.boot_transformers``.

    Returns:
        The booted bridge. ``model.cfg.n_layers`` / ``model.cfg.d_mlp`` give the neuron grid.

    Raises:
        CNAError: the path does not exist as a directory and is not a plausible hub name,
            or the model has no MLP ``hook_post`` at every layer.
    """
    from transformer_lens import TransformerBridge  # import time: 3 s, only when loading

    name, path, gguf_file = _source(name_or_path)
    if chat is not None and not isinstance(chat, bool):
        raise CNAError(f"chat must be True, False or None, got {chat!r}")
    _check_device(device)
    torch_dtype = _resolve_dtype(dtype)
    if device is not None and (device_map is not None or n_devices is not None):
        raise CNAError("pass either device or device_map/n_devices, not both")
    if device is None and device_map is None and n_devices is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = dict(boot_kwargs)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if n_devices is not None:
        kwargs["n_devices"] = n_devices
    if gguf_file is not None:
        if device_map is not None or n_devices is not None:
            raise CNAError(
                "device_map/n_devices are not supported for .gguf files; pass device, "
                "or convert the file with `cna-lens models path NAME --hf` first"
            )
        hf_model, tokenizer = load_gguf(gguf_file, dtype=torch_dtype)
        kwargs.update(hf_model=hf_model.to(device), tokenizer=tokenizer)
        name = str(gguf_file.parent)
    try:
        model = TransformerBridge.boot_transformers(
            name, device=device, dtype=torch_dtype, **kwargs
        )
    except CNAError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, ImportError, AssertionError) as exc:
        where = "directory" if path.exists() else "hub model (needs network or a warm HF cache)"
        raise CNAError(
            f"cannot load {name!r} as a {where} on device={device!r}: {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    mlp_hook_names(model)  # refuse models without MLP hook_post up front
    _set_model_info(
        model,
        model_id=portable_model_id(gguf_file or name_or_path),
        chat=chat,
        source=str(gguf_file) if gguf_file is not None else name,
    )
    return model


def _source(name_or_path: Any) -> tuple[str, Path, Path | None]:
    """(what to boot, the path it names, the GGUF file it names or None).

    Raises:
        CNAError: not a name, an empty one, a path that does not exist, or a directory that
            is neither a HF model nor a GGUF holder.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CNAError(
            f"name_or_path must be a hub model name or a directory, got "
            f"{type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name.strip():
        raise CNAError("model name is empty; give a hub model name or a local HF directory")
    path = Path(name).expanduser()
    gguf_file = resolve_gguf(path) if path.exists() else None
    if gguf_file is not None:
        name = str(gguf_file.resolve())
    elif path.exists():
        if not (path / "config.json").is_file():
            raise CNAError(
                f"{name!r} exists but is not a HF model directory (no config.json in it) nor a "
                ".gguf file; pass a directory written by save_pretrained, a .gguf file, or a "
                "hub model name"
            )
        name = str(path.resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf"):
        raise CNAError(f"model path {name!r} does not exist")
    return name, path, gguf_file


def portable_model_id(name_or_path: str | os.PathLike[str]) -> str:
    """A machine-independent name for a model: ``organism:KIND`` for the shipped organism,
    the file or directory name for a local path, the hub name otherwise (never an absolute
    path, so artifacts written on one machine do not leak its layout)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        return text
    resolved = path.resolve()
    organism_data = (Path(__file__).parents[1] / "organism" / "data").resolve()
    if resolved.parent == organism_data:
        return f"organism:{resolved.name}"
    return resolved.name


def model_source(model: Any) -> str | None:
    """Where the model was loaded from on this machine (a directory, a .gguf file or a hub
    name), for code that must reload it; None when unknown."""
    info = _model_info(model)
    return info.source if info is not None else None


def model_id(model: Any) -> str:
    """The model's portable id (see :func:`portable_model_id`), or its HF name_or_path."""
    info = _model_info(model)
    if info is not None and info.model_id:
        return info.model_id
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(model.cfg, "model_name", "unknown"))


def model_fingerprint(model: Any) -> str:
    """A short hash of the model's architecture (not its weights).

    Two checkpoints of one architecture (base and instruct) share a fingerprint, so a
    circuit can be carried between them; a different shape or family cannot.
    """
    cfg = model.cfg
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    arch = getattr(hf_cfg, "architectures", None) or [getattr(cfg, "architecture", None)]
    fields = {
        "architecture": str(arch[0] if arch else None),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_mlp": int(cfg.d_mlp),
        "n_heads": int(cfg.n_heads),
        "d_vocab": int(cfg.d_vocab),
    }
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def mlp_hook_names(model: Any) -> list[str]:
    """The ``blocks.{L}.mlp.hook_post`` names of every layer.

    Raises:
        CNAError: a layer has no MLP ``hook_post`` (e.g. an attention-only model).
    """
    names = [MLP_HOOK.format(layer=layer) for layer in range(model.cfg.n_layers)]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise CNAError(
            f"model has no MLP neuron hook at {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            "CNA needs blocks.{L}.mlp.hook_post (the input of the MLP down projection) at "
            "every layer"
        )
    return names


def validate_prompts(prompts: Any, what: str = "prompts") -> list[str]:
    """Return ``prompts`` as a list of strings, or raise naming the offending entry.

    Raises:
        CNAError: ``prompts`` is a bare string, is empty, or holds a non-string / blank entry
            or one that is not valid Unicode (a lone surrogate).
    """
    if isinstance(prompts, (str, bytes)):
        raise CNAError(f"{what} must be a sequence of strings, got a single string {prompts!r:.60}")
    try:
        items = list(prompts)
    except TypeError:
        raise CNAError(
            f"{what} must be a sequence of strings, got {type(prompts).__name__}"
        ) from None
    if not items:
        raise CNAError(f"{what} is empty; give at least one prompt")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise CNAError(f"{what}[{i}] is {type(p).__name__} ({p!r:.60}), expected str")
        if not p.strip():
            raise CNAError(f"{what}[{i}] is blank; every prompt needs some text")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CNAError(
                f"{what}[{i}] is not valid Unicode text (a lone surrogate "
                f"{p[exc.start]!r} at character {exc.start}); prompts must be "
                "encodable as UTF-8"
            ) from None
    return items


def prompt_set_hash(prompts: Sequence[str]) -> str:
    """sha256 (first 16 hex digits) of the prompt list, order included."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def is_chat_model(model: Any) -> bool:
    """True iff prompts are wrapped in the chat template (tokenizer has one, unless overridden)."""
    info = _model_info(model)
    if info is not None and info.chat is not None:
        return info.chat
    return bool(getattr(model.tokenizer, "chat_template", None))


def format_prompt(model: Any, prompt: str) -> str:
    """The text fed to the model: user turn + generation prompt for chat models, else raw."""
    return format_for(model.tokenizer, prompt, chat=is_chat_model(model))


def format_for(tokenizer: Any, prompt: str, *, chat: bool) -> str:
    """:func:`format_prompt` for a bare tokenizer: the chat user turn + generation prompt
    when ``chat``, else ``prompt`` unchanged.

    Raises:
        CNAError: ``chat`` but the tokenizer has no chat template.
    """
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise CNAError("chat formatting was forced on, but the tokenizer has no chat template")
    text: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return text


def encode_for(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """The token ids of ``prompt`` as the model is fed it (see :func:`format_for`): special
    tokens from the chat template, or the tokenizer's own without one; a doubled BOS is
    collapsed to one."""
    text = format_for(tokenizer, prompt, chat=chat)
    # The template writes its own special tokens (BOS included, where the model uses one).
    ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_prompt(model: Any, prompt: str) -> list[int]:
    """The token ids a bridge is fed for ``prompt`` (chat-formatted when it is a chat model)."""
    return encode_for(model.tokenizer, prompt, chat=is_chat_model(model))


@dataclass(frozen=True)
class TokenBatch:
    """Left-padded token ids of a batch of prompts; the last column is every prompt's last token."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch total"]
    indices: tuple[int, ...]
    """Positions of these prompts in the caller's prompt list."""
    prefix: tuple[int, ...] = ()
    """Token ids of a prefix every row shares, before ``input_ids``: computed once, its KV
    cache continued by each row (:mod:`cna_lens.models.prefix`). ``attention_mask`` then
    covers prefix + input ids."""


def pad_id(model: Any) -> int:
    """The token id left padding uses: pad, else EOS, else BOS, else 0."""
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_prompts(
    model: Any,
    prompts: PromptList,
    *,
    batch_size: Integral,
    max_new_tokens: Integral = 0,
    sort_by_length: bool = True,
    device: torch.device | str | None = None,
    what: str = "prompts",
) -> list[TokenBatch]:
    """Format, tokenize and left-pad prompts into batches.

    Args:
        model: A bridge from :func:`load_model`.
        prompts: The prompt texts (validated).
        batch_size: Prompts per batch (>= 1).
        max_new_tokens: Room to leave in the context for generation.
        sort_by_length: Group prompts of similar length to waste less compute on padding;
            ``TokenBatch.indices`` maps rows back to the caller's order.
        device: Where to put the tensors (default: the model's device).
        what: The prompt set's name in error messages (e.g. "positive prompts").

    Raises:
        CNAError: bad ``batch_size``, or a prompt (plus ``max_new_tokens``) longer than the
            model's context ``n_ctx``.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    encoded = encode_prompts(model, prompts, max_new_tokens=max_new_tokens, what=what)
    return pad_batches(
        encoded,
        batch_size=batch_size,
        pad=pad_id(model),
        device=model.cfg.device if device is None else device,
        sort_by_length=sort_by_length,
    )


def encode_prompts(
    model: Any, prompts: PromptList, *, max_new_tokens: Integral = 0, what: str = "prompts"
) -> list[list[int]]:
    """The token ids of each prompt as the model is fed it (validated).

    Raises:
        CNAError: a bad prompt, or one (plus ``max_new_tokens``) longer than the model's
            context ``n_ctx``.
    """
    prompts = validate_prompts(prompts, what)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
    encoded = [encode_prompt(model, p) for p in prompts]
    n_ctx = int(model.cfg.n_ctx)
    for i, seq in enumerate(encoded):
        if len(seq) + max_new_tokens > n_ctx:
            extra = f" + max_new_tokens={max_new_tokens}" if max_new_tokens else ""
            raise CNAError(
                f"{what}[{i}] is {len(seq)} tokens{extra}, longer than the model's context "
                f"n_ctx={n_ctx}; shorten it{' or lower max_new_tokens' if extra else ''}"
            )
    return encoded


def pad_batches(
    encoded: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad: int,
    device: torch.device | str = "cpu",
    sort_by_length: bool = True,
) -> list[TokenBatch]:
    """Left-padded batches of token id sequences (grouped by length unless told not to);
    ``TokenBatch.indices`` maps rows back to the caller's order."""
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoded[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        batches.append(TokenBatch(ids.to(device), mask.to(device), tuple(idx)))
    return batches
