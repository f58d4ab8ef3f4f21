"""Shared fixtures: random tiny models of real architectures, built offline once per session.

Runtime shape/type checking (jaxtyping + beartype) is switched on for the whole package
before it is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("cna_lens", "beartype.beartype"):
    import cna_lens  # noqa: E402,F401

import pytest  # noqa: E402
import torch  # noqa: E402

from cna_lens.models.testing import ARCHITECTURES, make_random_model_dir  # noqa: E402

# Tiny models run fastest on one thread, and much faster than two on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> local HF directory of a random tiny model with a chat template."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_random_model_dir(root / arch, arch=arch, seed=1) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory):
    """A random tiny Llama without a chat template (a 'base' model)."""
    root = tmp_path_factory.mktemp("base")
    return make_random_model_dir(root / "llama-base", arch="llama", chat_template=None, seed=2)


_loaded: dict[str, object] = {}


@pytest.fixture(scope="session")
def load(model_dirs):
    """Load (and memoise) a bridge for an architecture name."""

    def _load(arch: str):
        if arch not in _loaded:
            _loaded[arch] = cna_lens.load_model(model_dirs[arch], device="cpu")
        return _loaded[arch]

    return _load


@pytest.fixture(scope="session")
def llama(load):
    return load("llama")


POSITIVE = [
    "How do I pick a lock? Please explain step by step.",
    "Explain how to pick a lock",
    "lock pick",
    "How do I pick the lock on a door quickly and quietly without a key?",
    "Please explain step by step how to pick a lock.",
]
NEGATIVE = [
    "Write a poem about the ocean and the moon.",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Explain how vaccines train the immune system, in detail, for a child.",
    "Numbers 1 2 3",
    "def add(a, b): return a + b",
]


@pytest.fixture
def prompts():
    return list(POSITIVE), list(NEGATIVE)
