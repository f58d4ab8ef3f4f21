"""Generation: one entry point over conditions, with a reference and a fast backend.

:func:`generate_many` runs prompts under several conditions and returns token ids, texts and
seconds per condition (:class:`Generations`); :func:`generate` is the one-condition form.
``backend="bridge"`` is the reference (HF ``generate`` on the hooked TransformerBridge);
``backend="fast"`` gives the same token ids several times faster (a plain HF model sharing
the bridge's weights, conditions side by side, finished rows dropped).

Imports: models, core and steering.
"""

from cna_lens.generation.api import (
    BACKENDS,
    Backend,
    generate,
    generate_many,
    generate_token_ids,
    open_backend,
    resolve_condition,
)
from cna_lens.generation.bridge import BridgeBackend
from cna_lens.generation.decoding import Decoding, Generations
from cna_lens.generation.fast import FastBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BridgeBackend",
    "Decoding",
    "FastBackend",
    "Generations",
    "generate",
    "generate_many",
    "generate_token_ids",
    "open_backend",
    "resolve_condition",
]
