"""Discovery: every argument is checked before the first forward pass."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import cna_lens
import cna_lens.core.discovery
from cna_lens import CNAError
from cna_lens.core.discovery import DiscoveryConfig, discover_with


def _no_forward_pass(*args, **kwargs):
    raise AssertionError("a forward pass ran before the arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exclude_layers": "10"}, "exclude_layers must be a list of layer indices"),
        ({"exclude_layers": [1.7]}, r"exclude_layers has 1.7; valid layers are"),
        ({"exclude_layers": None}, "exclude_layers must be a list of layer indices"),
        ({"exclude_layers": 1}, "exclude_layers must be a list of layer indices"),
        ({"exclude_layers": [99]}, r"exclude_layers has 99"),
        ({"universal_threshold": "0.8"}, r"universal_threshold must be in \(0, 1\]"),
        ({"universal_threshold": 1.5}, r"universal_threshold must be in \(0, 1\]"),
        ({"universal_top_fraction": 0.0}, r"universal_top_fraction must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_fail_before_any_forward_pass(llama, prompts, kwargs, match, monkeypatch):
    pos, neg = prompts
    raw = inspect.unwrap(discover_with)  # the library's own checks, as users run it
    with pytest.raises(CNAError, match=match):
        raw(_no_forward_pass, llama, pos, neg, DiscoveryConfig(**{"top_k": 3, **kwargs}))
    # the keyword form of discover checks the same, before any forward pass
    monkeypatch.setattr(cna_lens.core.discovery, "activation_stats", _no_forward_pass)
    with pytest.raises(CNAError, match=match):
        cna_lens.discover(llama, pos, neg, **{"top_k": 3, **kwargs})


def test_numpy_sizes_are_accepted(llama, prompts):
    pos, neg = prompts
    by_k = cna_lens.discover(
        llama, pos, neg, top_k=np.int64(3), batch_size=np.int64(2), universal_filter=False
    )
    assert by_k == cna_lens.discover(llama, pos, neg, top_k=3, batch_size=2, universal_filter=False)
    by_fraction = cna_lens.discover(
        llama, pos, neg, fraction=np.float32(0.05), universal_filter=False
    )
    assert (
        by_fraction.labels
        == cna_lens.discover(
            llama, pos, neg, fraction=float(np.float32(0.05)), universal_filter=False
        ).labels
    )
