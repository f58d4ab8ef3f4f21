"""cna_lens performance benchmark: ratios measured side by side in one run.

    python benchmarks/run.py [--quick] --json OUT.json [--threads N] [--device cpu|cuda]

Every number is a ratio of two things measured in the same process, in interleaved rounds
(A, B, C; B, C, A; ...), reduced with the median of the per-round ratios, so slow drifts of
a shared machine hit both sides alike. On CPU the clock is the process's CPU time
(``time.process_time``; run single-threaded by default), which other tenants of a shared
machine barely disturb; wall times are recorded beside it (``--clock wall`` to rank by
them; CUDA runs use wall time). What is measured (targets from issue 5):

* ``discovery_vs_forward`` — ``cna_lens.discover`` on 100 + 100 prompts (tokenization,
  cached forward passes, float64 statistics, top-k; universal filter off) / a bare
  ``transformers`` forward (``AutoModelForCausalLM`` loaded from the same directory, no
  bridge) over the same left-padded batches, pre-tokenized. Target <= 1.10.
  ``discovery_vs_forward_body`` divides by the HF forward without the LM head instead;
  ``bridge_forward_vs_forward`` is the TransformerLens bridge's own forward (no hooks) over
  the bare HF forward, the floor for anything that reads TransformerLens hook points.
* ``discovery_vs_naive`` — speed-up of ``discover`` over the reference code's method
  (written below): one prompt per forward, activations copied to CPU per prompt, a Python
  loop with ``.item()`` over every neuron, a Python sort. Both on the same prompts; the
  top-k of both is compared too.
* ``memory_1024_vs_64`` — peak resident memory during discovery of 1024 prompts / of 64,
  each in a fresh process (import, load, warm up on 64 prompts, then discover while a
  thread samples the RSS every 1 ms). Target <= 1.1. The growth above the warmed-up
  baseline is reported in MB alongside, since the whole-process peak includes torch and
  the model; ``--quick`` measures on a smaller model (4 x 128 x 512).
* ``aa_unsteered_vs_unsteered`` — the A/A pair: unsteered generation timed twice as if it
  were two things. It must read 1.00 +- 0.03, or the steered and baked ratios are not
  reported (the machine was too noisy). Every ratio's min-max over rounds is in the JSON.
* ``steered_vs_unsteered_tokens`` — tokens/s of ``generate_token_ids`` with a circuit of
  0.5% of the neurons ablated by hooks / without a circuit; batch 16, 64 new tokens,
  greedy, KV cache. Target >= 0.95.
* ``baked_vs_unsteered_tokens`` — the same with the circuit baked into the weights
  (``cna_lens.steering.bake.bake``) instead of hooks. Target >= 0.98.
* ``eval_batched_vs_sequential`` — 100 prompts x 64 new tokens with ``batch_size=16`` vs
  ``batch_size=1``: speed-up.

``--eval`` runs instead only the evaluation-sweep benchmark: 5 CNA strengths (0, 0.5, 1,
1.5, 2) x (harmful + benign), ``--eval-prompts`` prompts per set (default 100),
``--eval-tokens`` new tokens (default 48), batch 16, done the obvious way (one steered
``cna_lens.generate`` per condition through the bridge) and the fast way
(``cna_lens.generate_many(..., backend="fast")``, its backend built inside the timed call), on the organism and on
every ``--eval-model`` (default: SmolLM2-135M-Instruct when installed). The circuit is
discovered (0.1%, 1% on the organism) on 32 + 32 prompts. Keys: ``eval_fast_vs_obvious``
(the CPU-clock speed-up on the largest model measured), ``eval_texts_identical`` (every
fast text equals its obvious text, every model).

The model is a random Llama (8 layers, d_model 256, d_mlp 1024) made offline with
``cna_lens.models.testing``; discovery is also timed on the model organism when it is installed.
``--quick`` uses fewer prompts, tokens and rounds (the JSON records every size used).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MODEL_SHAPE = dict(n_layers=8, d_model=256, d_mlp=1024, n_heads=8, n_ctx=512)
SMALL_SHAPE = dict(n_layers=4, d_model=128, d_mlp=512, n_heads=4, n_ctx=512)
AA_TOLERANCE = 0.03  # an A/A ratio further from 1 means the machine was too noisy to report
TARGETS = {
    "discovery_vs_forward": ("<=", 1.10),
    "memory_1024_vs_64": ("<=", 1.10),
    "aa_unsteered_vs_unsteered": ("~", 1.0),
    "steered_vs_unsteered_tokens": (">=", 0.95),
    "baked_vs_unsteered_tokens": (">=", 0.98),
}

_WORDS = (
    "how do i pick a lock the ocean moon write poem explain vaccines capital of france "
    "quick brown fox code numbers please step by step tell me about history river city "
    "build a small house garden music teach child safely recipe bread why sky blue"
).split()


def make_prompts(n: int, seed: int) -> list[str]:
    """Deterministic synthetic prompts of 5-30 words."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "?"
        for _ in range(n)
    ]


CLOCK = {"name": "wall"}
WALL: dict[str, list[float]] = {}


def _time(fn) -> tuple[float, float]:
    """(chosen-clock seconds, wall seconds) of one call."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    w, c = time.perf_counter() - w, time.process_time() - c
    return (c if CLOCK["name"] == "cpu" else w), w


def interleaved(fns: dict[str, Any], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Time each function once per round, in turn, the order rotating between rounds (after
    one warm-up call each).

    Returns the chosen clock's times; wall times are kept in ``WALL`` for the record.
    """
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate: no side always first
            t, w = _time(fns[k])
            times[k].append(t)
            WALL.setdefault(k, []).append(w)
    return times


def wall_of(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: med(WALL[k][-len(v) :]) for k, v in times.items()}


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] (same round)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- discovery ------------------------------------------------------------------------------


def bench_discovery(
    model: Any,
    hf: Any,
    pos: list[str],
    neg: list[str],
    rounds: int,
    batch_size: int = 32,
    with_bridge: bool = True,
) -> dict[str, Any]:
    import cna_lens as cl

    batches = cl.tokenize_prompts(model, pos, batch_size=batch_size) + cl.tokenize_prompts(
        model, neg, batch_size=batch_size
    )

    def hf_forward():
        with torch.inference_mode():
            for b in batches:
                hf(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def hf_body():
        with torch.inference_mode():
            for b in batches:
                hf.model(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def discovery():
        cl.discover(model, pos, neg, universal_filter=False, batch_size=batch_size)

    def bridge_forward():
        with torch.inference_mode():
            for b in batches:
                model(b.input_ids, attention_mask=b.attention_mask, return_type=None)

    fns = {"discovery": discovery, "hf_forward": hf_forward, "hf_body": hf_body}
    if with_bridge:
        fns["bridge_forward"] = bridge_forward
    times = interleaved(fns, rounds)
    out = {
        "discovery_vs_forward": ratio(times, "discovery", "hf_forward"),
        "discovery_vs_forward_body": ratio(times, "discovery", "hf_body"),
        "seconds": {k: med(v) for k, v in times.items()},
        "wall_seconds": wall_of(times),
        "n_prompts": len(pos) + len(neg),
        "batch_size": batch_size,
        "padded_tokens": int(sum(b.input_ids.numel() for b in batches)),
        "rounds": rounds,
    }
    if with_bridge:
        out["bridge_forward_vs_forward"] = ratio(times, "bridge_forward", "hf_forward")
        out["discovery_vs_bridge_forward"] = ratio(times, "discovery", "bridge_forward")
    return out


# ---- the naive reference method -------------------------------------------------------------


def naive_discovery(model: Any, pos: list[str], neg: list[str], k: int) -> list[tuple[int, int]]:
    """What the public reference code does: batch 1, per-neuron Python loop, Python sort."""
    import cna_lens as cl
    from cna_lens.models.loading import mlp_hook_names

    names = mlp_hook_names(model)
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)

    def mean_acts(prompts: list[str]) -> list[list[float]]:
        sums = [[0.0] * d_mlp for _ in range(n_layers)]
        for p in prompts:
            tokens = cl.tokenize_prompts(model, [p], batch_size=1)[0].input_ids
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens, names_filter=names)
            for layer, name in enumerate(names):
                acts = cache[name][0, -1].cpu()
                row = sums[layer]
                for j in range(d_mlp):
                    row[j] += acts[j].item()
        return [[s / len(prompts) for s in row] for row in sums]

    mp, mn = mean_acts(pos), mean_acts(neg)
    scored = []
    for layer in range(n_layers):
        for j in range(d_mlp):
            d = mp[layer][j] - mn[layer][j]
            scored.append((abs(d), layer, j, d))
    scored.sort(key=lambda x: x[0], reverse=True)
    return [(layer, j) for _, layer, j, _ in scored[:k]]


def bench_naive(model: Any, pos: list[str], neg: list[str], rounds: int) -> dict[str, Any]:
    import cna_lens as cl

    k = max(1, round(0.001 * model.cfg.n_layers * model.cfg.d_mlp))
    out: dict[str, Any] = {}

    def cna():
        out["cna"] = cl.discover(model, pos, neg, top_k=k, universal_filter=False).pairs

    def naive():
        out["naive"] = set(naive_discovery(model, pos, neg, k))

    times = interleaved({"naive": naive, "cna": cna}, rounds)
    return {
        "discovery_vs_naive": ratio(times, "naive", "cna"),
        "seconds": {kk: med(v) for kk, v in times.items()},
        "wall_seconds": wall_of(times),
        "n_prompts": len(pos) + len(neg),
        "top_k": k,
        "top_k_overlap": len(out["cna"] & out["naive"]) / k,
        "rounds": rounds,
    }


# ---- memory (one fresh process per size) ----------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(model_dir: str, n_prompts: int, threads: int) -> dict[str, Any]:
    """Run in a fresh process: load, warm up, then discovery on ``n_prompts`` prompts."""
    torch.set_num_threads(threads)
    import cna_lens as cl

    model = cl.load_model(model_dir, device="cpu")
    warm = make_prompts(64, seed=7)  # full batches of 32, so allocator pools are warm
    cl.discover(model, warm[:32], warm[32:], universal_filter=False)
    gc.collect()
    baseline = _rss_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    prompts = make_prompts(n_prompts, seed=11)
    half = n_prompts // 2
    t = time.perf_counter()
    cl.discover(model, prompts[:half], prompts[half:], universal_filter=False)
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak_sampled = max(peak[0], _rss_bytes())
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "n_prompts": n_prompts,
        "baseline_mb": baseline / 2**20,
        "peak_mb": peak_sampled / 2**20,
        "process_high_water_mb": high_water / 2**20,
        "growth_mb": (peak_sampled - baseline) / 2**20,
        "seconds": seconds,
    }


def bench_memory(model_dir: Path, threads: int, sizes=(64, 1024)) -> dict[str, Any]:
    res = {}
    for n in sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-worker",
                str(n),
                "--model-dir",
                str(model_dir),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker ({n} prompts) failed:\n{proc.stderr[-3000:]}")
        res[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, big = res[sizes[0]], res[sizes[1]]
    return {
        "memory_1024_vs_64": big["peak_mb"] / small["peak_mb"],
        "memory_growth_mb": {str(n): r["growth_mb"] for n, r in res.items()},
        "peak_mb": {str(n): r["peak_mb"] for n, r in res.items()},
        "baseline_mb": {str(n): r["baseline_mb"] for n, r in res.items()},
        "seconds": {str(n): r["seconds"] for n, r in res.items()},
    }


# ---- generation ------------------------------------------------------------------------------


def _circuit(model: Any, fraction: float, seed: int = 0):
    import cna_lens as cl

    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    k = max(1, round(fraction * n_layers * d_mlp))
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_layers * d_mlp, generator=g)[:k].tolist()
    return cl.Circuit(
        tuple(cl.Neuron(i // d_mlp, i % d_mlp, 1.0) for i in flat), n_layers, d_mlp
    ).for_model(model)


def bench_steering(
    model: Any, prompts: list[str], new_tokens: int, rounds: int, fraction: float = 0.005
) -> dict[str, Any]:
    import unique_tokens

    import cna_lens as cl
    from cna_lens.steering.bake import bake

    circuit = _circuit(model, fraction)
    kw = dict(max_new_tokens=new_tokens, batch_size=len(prompts))
    out: dict[str, Any] = {}

    def unsteered():
        out["unsteered"] = cl.generate_token_ids(model, prompts, **kw)

    def unsteered_again():  # the A/A pair: the same computation timed as if it were another
        out["unsteered_again"] = cl.generate_token_ids(model, prompts, **kw)

    def steered():
        out["steered"] = cl.generate_token_ids(
            model, prompts, circuit=circuit, multiplier=0.0, **kw
        )

    def baked():
        with bake(model, circuit, 0.0):
            out["baked"] = cl.generate_token_ids(model, prompts, **kw)

    fns = {"unsteered": unsteered, "unsteered_again": unsteered_again}
    times = interleaved({**fns, "steered": steered, "baked": baked}, rounds)
    steps = {k: max(len(t) for t in v) for k, v in out.items()}
    # Same number of decode steps on each side, or tokens/s would not compare like with like.
    work = {k: len(prompts) * s for k, s in steps.items()}
    rate = {k: [work[k] / t for t in times[k]] for k in times}

    def spread(num: str) -> dict[str, Any]:
        return unique_tokens.ratio(rate, num, "unsteered")  # median, min, max per round

    aa = spread("unsteered_again")
    return {
        "aa_unsteered_vs_unsteered": aa["median"],
        "aa_ok": abs(aa["median"] - 1.0) <= AA_TOLERANCE,
        "spread": {k: spread(k) for k in ("unsteered_again", "steered", "baked")},
        "steered_vs_unsteered_tokens": statistics.median(
            s / u for s, u in zip(rate["steered"], rate["unsteered"], strict=True)
        ),
        "baked_vs_unsteered_tokens": statistics.median(
            b / u for b, u in zip(rate["baked"], rate["unsteered"], strict=True)
        ),
        "tokens_per_s": {k: med(v) for k, v in rate.items()},
        "wall_seconds": wall_of(times),
        "decode_steps": steps,
        "baked_equals_steered": out["baked"] == out["steered"],
        "steering_changed_output": out["steered"] != out["unsteered"],
        "circuit_neurons": len(circuit),
        "circuit_fraction": len(circuit) / (model.cfg.n_layers * model.cfg.d_mlp),
        "batch": len(prompts),
        "new_tokens": new_tokens,
        "rounds": rounds,
    }


def bench_eval(
    model: Any, prompts: list[str], new_tokens: int, batch_size: int = 16
) -> dict[str, Any]:
    import cna_lens as cl

    out: dict[str, Any] = {}

    def batched():
        out["batched"] = cl.generate_token_ids(
            model, prompts, max_new_tokens=new_tokens, batch_size=batch_size
        )

    def sequential():
        out["sequential"] = cl.generate_token_ids(
            model, prompts, max_new_tokens=new_tokens, batch_size=1
        )

    times = interleaved({"batched": batched, "sequential": sequential}, 1, warmup=False)
    same = sum(a == b for a, b in zip(out["batched"], out["sequential"], strict=True))
    return {
        "eval_batched_vs_sequential": ratio(times, "sequential", "batched"),
        "seconds": {k: med(v) for k, v in times.items()},
        "wall_seconds": wall_of(times),
        "n_prompts": len(prompts),
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "identical_outputs": same,
    }


# ---- evaluation sweep: obvious vs fast -------------------------------------------------------

EVAL_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)


def bench_eval_sweep(
    model: Any,
    sets: dict[str, list[str]],
    circuit: Any,
    new_tokens: int,
    rounds: int,
    batch_size: int = 16,
) -> dict[str, Any]:
    import cna_lens as cl

    prompts = [p for ps in sets.values() for p in ps]
    steerings = [cl.Steering(circuit=circuit, multiplier=m) for m in EVAL_STRENGTHS]
    kw = dict(max_new_tokens=new_tokens, batch_size=batch_size)
    out: dict[str, Any] = {}

    def obvious():
        out["obvious"] = [cl.generate(model, prompts, steering=s, **kw) for s in steerings]

    def fast():
        out["fast"] = cl.generate_many(model, prompts, steerings, backend="fast", **kw).texts

    def fast_single():
        with cl.open_backend(model, "fast") as gen:
            out["fast_single"] = [
                cl.generate(model, prompts, steering=s, backend=gen, **kw) for s in steerings
            ]

    fns = {"obvious": obvious, "fast": fast, "fast_single": fast_single}
    times = interleaved(fns, rounds, warmup=False)
    wall = {k: WALL[k][-rounds:] for k in fns}
    same = {
        k: [
            sum(a == b for a, b in zip(x, y, strict=True))
            for x, y in zip(out["obvious"], out[k], strict=True)
        ]
        for k in ("fast", "fast_single")
    }
    return {
        "fast_vs_obvious": ratio(times, "obvious", "fast"),
        "fast_vs_obvious_wall": statistics.median(
            a / b for a, b in zip(wall["obvious"], wall["fast"], strict=True)
        ),
        "single_condition_fast_vs_obvious": ratio(times, "obvious", "fast_single"),
        "seconds": {k: med(v) for k, v in times.items()},
        "wall_seconds": {k: med(v) for k, v in wall.items()},
        "texts_identical": all(n == len(prompts) for n in same["fast"] + same["fast_single"]),
        "identical_per_condition": same,
        "changed_by_steering": sum(
            a != b for a, b in zip(out["obvious"][0], out["obvious"][2], strict=True)
        ),
        "tokens_generated": sum(
            len(model.tokenizer(t)["input_ids"]) for texts in out["obvious"] for t in texts
        ),
        "strengths": list(EVAL_STRENGTHS),
        "n_prompts": {k: len(v) for k, v in sets.items()},
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "circuit_neurons": len(circuit),
        "rounds": rounds,
    }


def _eval_targets(extra: list[str]) -> list[tuple[str, Path, bool]]:
    """(label, directory, is_organism) of the models to measure."""
    targets = []
    org = _organism_dir()
    if org is not None:
        targets.append(("organism:instruct", org, True))
    if extra:
        names = extra
    else:
        from cna_lens.models import zoo as zoo

        names = ["zoo:smollm2-135m-instruct"] if zoo.is_installed("smollm2-135m-instruct") else []
    for name in names:
        if name.startswith("zoo:"):
            from cna_lens.models import zoo as zoo

            targets.append((name, zoo.model_path(name[4:], hf=True), False))
        else:
            targets.append((Path(name).name, Path(name), False))
    return targets


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    import cna_lens as cl

    dtype = getattr(torch, args.dtype)
    details: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for label, path, is_organism in _eval_targets(args.eval_model):
        model = cl.load_model(path, device=args.device, dtype=dtype)
        if is_organism:
            from cna_lens import organism as src
        else:
            from cna_lens.evaluation import prompts as src
        sets = {
            "harmful": src.prompts("eval_harmful")[: args.eval_prompts],
            "benign": src.prompts("eval_benign")[: args.eval_prompts],
        }
        circuit = cl.discover(
            model,
            src.prompts("discovery_harmful")[:32],
            src.prompts("discovery_benign")[:32],
            fraction=0.01 if is_organism else 0.001,
            universal_filter=False,
        )
        details[label] = bench_eval_sweep(model, sets, circuit, args.eval_tokens, args.eval_rounds)
        sizes[label] = sum(p.numel() for p in model.original_model.parameters())
        details[label]["parameters"] = sizes[label]
        d = details[label]
        print(
            f"  {label}: fast/obvious {d['fast_vs_obvious']:.2f}x cpu, "
            f"{d['fast_vs_obvious_wall']:.2f}x wall (one condition per call: "
            f"{d['single_condition_fast_vs_obvious']:.2f}x); identical texts: "
            f"{d['texts_identical']}; seconds {d['seconds']}"
        )
        del model
        gc.collect()
    if not details:
        raise SystemExit("--eval: no model to measure (organism not installed, no --eval-model)")
    largest = max(sizes, key=lambda k: sizes[k])
    return {
        "eval_fast_vs_obvious": details[largest]["fast_vs_obvious"],
        "eval_fast_vs_obvious_wall": details[largest]["fast_vs_obvious_wall"],
        "eval_texts_identical": all(d["texts_identical"] for d in details.values()),
        "eval_model": largest,
        "details": {"eval_sweep": details},
    }


# ---- driver ---------------------------------------------------------------------------------


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    """The real-model ratios, at sizes a 2-core CPU finishes in about 30 minutes.

    The shared-prefix ratios of ``benchmarks/unique_tokens.py`` (A/A check, discovery vs the
    bare HF body, vs the paper's naive loop, a 5-condition sweep with and without reuse);
    generation of 8 English prompts x 16 tokens unsteered, hook-steered and baked (a random
    0.1% circuit, m = 0); peak memory of discovery at 32 vs 128 prompts in fresh processes.
    """
    import transformers
    import unique_tokens

    import cna_lens as cl
    from cna_lens.evaluation import prompts as prompt_sets
    from cna_lens.models import zoo
    from cna_lens.models.loading import portable_model_id

    started, load_before = time.perf_counter(), os.getloadavg()
    CLOCK["name"] = "cpu"
    path = Path(zoo.resolve(args.real))
    dtype = getattr(torch, args.dtype)
    model = cl.load_model(path, device=args.device, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device)
    hf.eval()
    details: dict[str, Any] = {}
    details["unique_tokens"] = unique_tokens.bench(model, hf, rounds=args.real_rounds)
    for line in unique_tokens.report(details["unique_tokens"]):
        print(line)
    del hf
    gen_prompts = prompt_sets.prompts("eval_benign")[:8]
    details["steering"] = bench_steering(model, gen_prompts, 16, rounds=2, fraction=0.001)
    del model
    gc.collect()
    details["memory"] = bench_memory(path, args.threads, sizes=(32, 128))
    ut = details["unique_tokens"]
    results: dict[str, Any] = {"model": portable_model_id(path), "aa_ok": ut["aa_ok"]}
    if ut["aa_ok"]:
        for key in (
            "aa_body_vs_body",
            "discovery_vs_body",
            "discovery_whole_vs_body",
            "naive_vs_discovery",
            "sweep_whole_vs_reuse",
        ):
            results[key] = ut[key]["median"]
        results["steered_vs_unsteered_tokens"] = details["steering"]["steered_vs_unsteered_tokens"]
        results["baked_vs_unsteered_tokens"] = details["steering"]["baked_vs_unsteered_tokens"]
    results["memory_128_vs_32"] = details["memory"]["memory_1024_vs_64"]
    results["peak_mb"] = details["memory"]["peak_mb"]
    for key, value in results.items():
        print(f"{key:<30} {_fmt(value)}")
    return {
        "real": results,
        "details": details,
        "meta": {
            "mode": "real",
            "threads": args.threads,
            "clock": "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cna_lens": cl.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "wall_seconds": time.perf_counter() - started,
        },
    }


def _organism_dir() -> Path | None:
    try:
        from cna_lens import organism

        return organism.path("instruct")
    except (ImportError, FileNotFoundError, AttributeError, ValueError):
        return None


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, < 2 minutes on 2 cores")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared CPU more "
        "threads oversubscribe the cores and make timings erratic)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what to time: process CPU time (default on CPU: robust to other "
        "tenants of a shared machine) or wall time (default on CUDA)",
    )
    ap.add_argument(
        "--eval",
        action="store_true",
        help="only the evaluation-sweep benchmark (obvious vs fast generation)",
    )
    ap.add_argument("--eval-prompts", type=int, default=100, help="--eval: prompts per set")
    ap.add_argument("--eval-tokens", type=int, default=48, help="--eval: new tokens")
    ap.add_argument("--eval-rounds", type=int, default=1, help="--eval: interleaved rounds")
    ap.add_argument(
        "--eval-model",
        action="append",
        default=[],
        help="--eval: a model directory or zoo:NAME to measure besides the "
        "organism (repeatable; default zoo:smollm2-135m-instruct if installed)",
    )
    ap.add_argument(
        "--real",
        nargs="?",
        const="zoo:qwen2.5-coder-0.5b-instruct:hf",
        default=None,
        metavar="MODEL",
        help="only the real-model benchmark (discovery / bare HF forward, steered and baked / "
        "unsteered tokens/s, peak memory) on MODEL (default zoo:qwen2.5-coder-0.5b-instruct:hf)",
    )
    ap.add_argument(
        "--real-rounds", type=int, default=3, help="--real: interleaved rounds of discovery"
    )
    ap.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(args.model_dir, args.memory_worker, args.threads)))
        return {}

    import transformers

    import cna_lens as cl
    from cna_lens.models.testing import make_random_model_dir

    torch.set_num_threads(args.threads)
    CLOCK["name"] = args.clock or ("cpu" if args.device == "cpu" else "wall")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.real:
        report = run_real(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=_fmt))
        return report
    if args.eval:
        started, load_before = time.perf_counter(), os.getloadavg()
        report = run_eval(args)
        report["meta"] = {
            "mode": "eval",
            "threads": args.threads,
            "clock": CLOCK["name"],
            "device": args.device,
            "dtype": args.dtype,
            "eval_prompts": args.eval_prompts,
            "eval_tokens": args.eval_tokens,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cna_lens": cl.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "wall_seconds": time.perf_counter() - started,
        }
        print(
            f"eval_fast_vs_obvious {report['eval_fast_vs_obvious']:.3f} "
            f"({report['eval_model']}), eval_texts_identical {report['eval_texts_identical']}"
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=_fmt))
        return report
    q = args.quick
    sizes = dict(
        discovery_prompts=50 if q else 100,
        discovery_rounds=3 if q else 5,
        naive_prompts=16 if q else 100,
        naive_rounds=1 if q else 3,
        gen_tokens=32 if q else 64,
        gen_rounds=2 if q else 5,
        eval_prompts=16 if q else 100,
        eval_tokens=32 if q else 64,
        memory_sizes=(64, 1024),
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cna-bench-"))
    model_dir = make_random_model_dir(
        tmp / "llama", arch="llama", seed=0, **MODEL_SHAPE, dtype="float32"
    )
    small_dir = make_random_model_dir(tmp / "llama-small", arch="llama", seed=0, **SMALL_SHAPE)
    dtype = getattr(torch, args.dtype)
    model = cl.load_model(model_dir, device=args.device, dtype=dtype)
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        .to(args.device)
        .eval()
    )

    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    n = sizes["discovery_prompts"]
    pos, neg = make_prompts(n, seed=1), make_prompts(n, seed=2)
    details["discovery"] = bench_discovery(
        model, hf, pos, neg, sizes["discovery_rounds"], with_bridge=not q
    )
    results["discovery_vs_forward"] = details["discovery"]["discovery_vs_forward"]
    m = sizes["naive_prompts"] // 2
    details["naive"] = bench_naive(model, pos[:m], neg[:m], sizes["naive_rounds"])
    results["discovery_vs_naive"] = details["naive"]["discovery_vs_naive"]
    gen_prompts = make_prompts(16, seed=3)
    details["steering"] = bench_steering(
        model, gen_prompts, sizes["gen_tokens"], sizes["gen_rounds"]
    )
    results["aa_unsteered_vs_unsteered"] = details["steering"]["aa_unsteered_vs_unsteered"]
    if details["steering"]["aa_ok"]:
        for key in ("steered_vs_unsteered_tokens", "baked_vs_unsteered_tokens"):
            results[key] = details["steering"][key]
    else:
        print(
            "A/A unsteered/unsteered generation outside 1.00 +- 0.03: the machine is too noisy; "
            "steered and baked ratios not reported (see details)"
        )
    details["eval"] = bench_eval(
        model, make_prompts(sizes["eval_prompts"], seed=4), sizes["eval_tokens"]
    )
    results["eval_batched_vs_sequential"] = details["eval"]["eval_batched_vs_sequential"]
    del model, hf
    gc.collect()
    mem_dir = small_dir if q else model_dir
    details["memory"] = bench_memory(mem_dir, args.threads, sizes["memory_sizes"])
    details["memory"]["model"] = SMALL_SHAPE if q else MODEL_SHAPE
    results["memory_1024_vs_64"] = details["memory"]["memory_1024_vs_64"]

    org = _organism_dir()
    if org is not None:
        from cna_lens import organism

        omodel = cl.load_model(org, device=args.device, dtype=dtype)
        ohf = (
            transformers.AutoModelForCausalLM.from_pretrained(org, dtype=dtype)
            .to(args.device)
            .eval()
        )
        opos = organism.prompts("discovery_harmful")
        oneg = organism.prompts("discovery_benign")
        details["organism_discovery"] = bench_discovery(
            omodel, ohf, opos, oneg, sizes["discovery_rounds"], with_bridge=True
        )
        results["organism_discovery_vs_forward"] = details["organism_discovery"][
            "discovery_vs_forward"
        ]
        del omodel, ohf
    else:
        details["organism_discovery"] = "skipped: cna_lens.organism is not installed/trained"

    meta = {
        "mode": "quick" if q else "full",
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "model": MODEL_SHAPE,
        "threads": args.threads,
        "clock": CLOCK["name"],
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cna_lens": cl.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
    }
    report = {
        **results,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "details": details,
        "meta": meta,
    }

    print(
        f"\ncna_lens benchmark ({meta['mode']}, {args.device}, {args.threads} thread(s), "
        f"{CLOCK['name']} clock, "
        f"load {load_before[0]:.2f} -> {meta['loadavg_after'][0]:.2f}, "
        f"{meta['wall_seconds']:.0f} s)"
    )
    print(f"{'metric':34s} {'ratio':>8s}  {'target':>8s}  met")
    for key, value in results.items():
        op, target = TARGETS.get(key, (None, None))
        met = (
            ""
            if op is None
            else (
                "yes"
                if (
                    abs(value - target) <= AA_TOLERANCE
                    if op == "~"
                    else (value <= target if op == "<=" else value >= target)
                )
                else "NO"
            )
        )
        print(f"{key:34s} {value:8.3f}  {'' if op is None else f'{op} {target}':>8s}  {met}")
    st = details["steering"]
    print(f"  discovery s: {details['discovery']['seconds']}")
    print(
        f"  naive s: {details['naive']['seconds']} (top-k overlap "
        f"{details['naive']['top_k_overlap']:.2f})"
    )
    print(f"  tokens/s: {st['tokens_per_s']}; baked == steered: {st['baked_equals_steered']}")
    print(
        "  generation ratio spreads (min-max over rounds): "
        + ", ".join(f"{k} {v['min']:.3f}-{v['max']:.3f}" for k, v in st["spread"].items())
    )
    print(
        f"  memory peak MB: {details['memory']['peak_mb']}, growth MB: "
        f"{details['memory']['memory_growth_mb']}"
    )
    print(f"  eval s: {details['eval']['seconds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=_fmt))
    return report


if __name__ == "__main__":
    main()
