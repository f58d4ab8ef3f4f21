"""Work in proportion to unique tokens: the real-model ratios of shared-prefix reuse.

Run through ``python benchmarks/run.py --real [MODEL]`` (default the real
Qwen2.5-Coder-0.5B-Instruct with its chat template; 1 thread, CPU clock). Every ratio is a
median over interleaved rounds of two things timed in the same round, reported with its
spread (min-max of the per-round ratios). Nothing else is reported unless the explicit A/A
pair (the same computation timed twice as if it were two) reads 1.00 +- 0.03.

* ``aa_body_vs_body`` — the A/A pair: the bare HF body forward, twice.
* ``discovery_vs_body`` — ``cna_lens.discover`` (prefix reuse, the default) on 100 + 100
  prompts / the bare batched HF forward of the model body without the LM head over all
  their tokens (pre-tokenized, left-padded, grouped by length). Target <= 0.5.
* ``discovery_whole_vs_body`` — the same with ``prefix_reuse=False`` (what 0.2.0 did).
* ``naive_vs_discovery`` — the paper's algorithm as its code runs it (batch 1, a forward
  pre-hook on every layer's down projection of a plain HF model, a per-neuron Python loop
  over the activations) / ``discover``: speed-up. Target >= 5. Both top-k lists compared.
* ``sweep_whole_vs_reuse`` — a 5-condition steered sweep (a 0.1% circuit at m = 0, 0.5, 1.5,
  2, 3; ``positions="all"``) of 50 + 50 prompts x 32 tokens with the fast backend, reuse off
  / on: speed-up. Target >= 1.3. The token ids of both are compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

AA_TOLERANCE = 0.03


def _clock() -> float:
    return time.process_time()


def interleave(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each function per round, the order rotating between rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = _clock()
            fns[k]()
            times[k].append(_clock() - start)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """Median and spread over rounds of ``num / den`` (the same round)."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "rounds": per_round,
    }


def naive_discovery(hf: Any, encoded: list[list[int]], n_pos: int, k: int) -> list[tuple[int, int]]:
    """The paper code's algorithm: one prompt per forward pass, a pre-hook on each layer's
    down projection keeping the last token's input, a Python loop over every neuron, a
    Python sort of all of them."""
    layers = hf.model.layers
    n_layers, d_mlp = len(layers), int(hf.config.intermediate_size)
    captured: list[Any] = [None] * n_layers

    def hook(layer: int) -> Callable[..., None]:
        def fn(module: Any, args: tuple[Any, ...]) -> None:
            captured[layer] = args[0][0, -1].detach().cpu()

        return fn

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    sums = [[[0.0] * d_mlp for _ in range(n_layers)] for _ in range(2)]
    try:
        for i, ids in enumerate(encoded):
            with torch.no_grad():
                hf(input_ids=torch.tensor([ids]))
            side = sums[0 if i < n_pos else 1]
            for layer in range(n_layers):
                row, acts = side[layer], captured[layer]
                for j in range(d_mlp):
                    row[j] += acts[j].item()
    finally:
        for h in handles:
            h.remove()
    n_neg = len(encoded) - n_pos
    scored = []
    for layer in range(n_layers):
        for j in range(d_mlp):
            d = sums[0][layer][j] / n_pos - sums[1][layer][j] / n_neg
            scored.append((abs(d), layer, j))
    scored.sort(key=lambda x: x[0], reverse=True)
    return [(layer, j) for _, layer, j in scored[:k]]


def bench(
    model: Any, hf: Any, rounds: int = 3, naive_rounds: int = 1, sweep_rounds: int = 1
) -> dict[str, Any]:
    """The ratios above on ``model`` (a bridge) and ``hf`` (the same weights as a plain
    ``AutoModelForCausalLM``)."""
    import cna_lens as cl
    from cna_lens.evaluation import prompts as prompt_sets
    from cna_lens.models.loading import encode_prompts
    from cna_lens.models.prefix import shared_prefix

    pos = prompt_sets.prompts("discovery_harmful")[:100]
    neg = prompt_sets.prompts("discovery_benign")[:100]
    batches = cl.tokenize_prompts(model, pos, batch_size=32) + cl.tokenize_prompts(
        model, neg, batch_size=32
    )
    encoded = encode_prompts(model, pos + neg)
    out: dict[str, Any] = {
        "prompts": len(encoded),
        "mean_tokens": sum(map(len, encoded)) / len(encoded),
        "shared_prefix_tokens": shared_prefix(encoded),
        "padded_tokens": int(sum(b.input_ids.numel() for b in batches)),
    }
    kept: dict[str, Any] = {}

    def body() -> None:
        with torch.inference_mode():
            for b in batches:
                hf.model(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def discovery() -> None:
        kept["reuse"] = cl.discover(model, pos, neg, universal_filter=False)

    def discovery_whole() -> None:
        kept["whole"] = cl.discover(model, pos, neg, universal_filter=False, prefix_reuse=False)

    discovery()  # warm-up (first-call allocations), untimed
    times = interleave(
        {"body": body, "body_again": body, "discovery": discovery, "whole": discovery_whole},
        rounds,
    )
    aa = ratio(times, "body_again", "body")
    out["aa_body_vs_body"] = aa
    out["aa_ok"] = abs(aa["median"] - 1.0) <= AA_TOLERANCE
    out["discovery_vs_body"] = ratio(times, "discovery", "body")
    out["discovery_whole_vs_body"] = ratio(times, "whole", "body")
    out["discovery_seconds"] = {k: statistics.median(v) for k, v in times.items()}
    out["same_circuit"] = kept["reuse"].labels == kept["whole"].labels

    k = len(kept["reuse"])

    def naive() -> None:
        kept["naive"] = naive_discovery(hf, encoded, len(pos), k)

    times = interleave({"naive": naive, "discovery": discovery}, naive_rounds)
    out["naive_vs_discovery"] = ratio(times, "naive", "discovery")
    out["naive_seconds"] = {k2: statistics.median(v) for k2, v in times.items()}
    out["naive_top_k_overlap"] = len(set(kept["naive"]) & set(kept["reuse"].pairs)) / k

    sweep_prompts = (
        prompt_sets.prompts("eval_harmful")[:50] + prompt_sets.prompts("eval_benign")[:50]
    )
    steerings = [
        cl.Steering(circuit=kept["reuse"], multiplier=m) for m in (0.0, 0.5, 1.5, 2.0, 3.0)
    ]

    def sweep(reuse: bool) -> Callable[[], None]:
        def fn() -> None:
            kept[f"sweep_{reuse}"] = cl.generate_many(
                model,
                sweep_prompts,
                steerings,
                backend="fast",
                max_new_tokens=32,
                batch_size=16,
                prefix_reuse=reuse,
            ).token_ids

        return fn

    times = interleave({"whole": sweep(False), "reuse": sweep(True)}, sweep_rounds)
    out["sweep_whole_vs_reuse"] = ratio(times, "whole", "reuse")
    out["sweep_seconds"] = {k2: statistics.median(v) for k2, v in times.items()}
    whole_ids, reuse_ids = kept["sweep_False"], kept["sweep_True"]
    pairs = [
        (a, b)
        for cw, cr in zip(whole_ids, reuse_ids, strict=True)
        for a, b in zip(cw, cr, strict=True)
    ]
    out["sweep_identical_ids"] = sum(a == b for a, b in pairs)
    out["sweep_answers"] = len(pairs)
    return out


def report(res: dict[str, Any]) -> list[str]:
    """Printable lines: the A/A check first; the ratios only when it passed."""
    aa = res["aa_body_vs_body"]
    lines = [
        f"A/A body/body            {aa['median']:.3f} (spread {aa['min']:.3f}-{aa['max']:.3f}; "
        f"must be 1.00 +- {AA_TOLERANCE})"
    ]
    if not res["aa_ok"]:
        lines.append("A/A outside tolerance: the machine is too noisy; no other ratio reported")
        return lines
    for key, target in (
        ("discovery_vs_body", "<= 0.5"),
        ("discovery_whole_vs_body", "(0.2.0)"),
        ("naive_vs_discovery", ">= 5"),
        ("sweep_whole_vs_reuse", ">= 1.3"),
    ):
        r = res[key]
        lines.append(
            f"{key:<24} {r['median']:.3f} (spread {r['min']:.3f}-{r['max']:.3f}, "
            f"{len(r['rounds'])} rounds)  target {target}"
        )
    lines.append(
        f"same circuit with/without reuse: {res['same_circuit']}; naive top-k overlap "
        f"{res['naive_top_k_overlap']:.3f}; sweep ids identical {res['sweep_identical_ids']}/"
        f"{res['sweep_answers']}; shared prefix {res['shared_prefix_tokens']} of "
        f"{res['mean_tokens']:.1f} tokens"
    )
    return lines
