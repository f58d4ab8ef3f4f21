"""CNA against abliteration and CAA on one real model, one protocol, side by side.

    python benchmarks/peers.py --model zoo:qwen2.5-coder-0.5b-instruct:hf --out DIR
        [--tune-budget 15 | --no-tune] [--heretic-trials 50] [--heretic-minutes 130] [--no-heretic]

Every method sees the same prompts (the shipped sets, split by category as ``cna-lens tune``
splits them: discovery sets to find circuits/directions, *search* prompts to choose
hyperparameters, *held-out* prompts for the table), and every row is scored by the same
code: refusal and over-refusal by cna_lens's classifier on greedy answers of 32 tokens,
KL divergence from the unsteered model on harmless held-out prompts (first token, and mean
over 16 tokens of the unsteered model's own continuation), the 4-gram quality score and
accuracy on capability questions.

Rows:

* **CNA 0.1%** (the paper's rule), **CNA top_k=1600** (the paper code's fixed size), both
  scale at m = 0, and **CNA tuned**: the point ``cna-lens tune`` recommends (its own search
  and held-out confirmation; the wall time is the whole tune run).
* **CAA** at the middle layer (the paper's baseline), strength chosen on the search prompts.
* **Directional ablation** (``cna_lens.DirectionalAblation``: the difference-of-means
  direction of one layer projected out of every residual write), layer chosen on the
  search prompts.
  Both choices: the candidate with the lowest first-token refusal proxy among those whose
  search KL is within the tuned CNA point's search KL (the tuner's KL); none within it,
  the lowest KL.
* **heretic** (``heretic-llm``, AGPL; run as a program in its own venv, never imported):
  ``benchmarks/heretic_peer.py`` configures it with local copies of the same discovery and
  search prompts, float32, ``--heretic-trials`` trials; its Pareto trial with the fewest
  refusals (heretic's own numbers) is saved and scored here like every other row.

Stages are cached in ``--out`` (the tune run, the baselines' search, heretic's record), so
an interrupted benchmark resumes. A failing or missing heretic leaves a row that says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import heretic_peer  # noqa: E402

CAA_ALPHAS = (-0.5, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0)
EVAL_TOKENS = 32
N_CAPABILITY = 40


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


def tune_stage(model: str, out: Path, budget: float) -> dict[str, Any]:
    """The tuner's run (reused when ``out/tune/tune.json`` exists); a tuner that fails
    (e.g. a budget that cannot fit its setup and confirmation) gives ``{"error": why}`` and
    the other rows still run."""
    from cna_lens.errors import CNAError
    from cna_lens.pipelines.tune import TuneConfig, tune

    summary = out / "tune" / "tune.json"
    if not summary.is_file():
        began = time.perf_counter()
        try:
            tune(
                TuneConfig(model=model, out=str(out / "tune"), budget_minutes=budget),
                progress=True,
            )
        except CNAError as e:
            print(f"CNA tuned: no row ({e})")
            return {"error": f"cna-lens tune failed: {e}"}
        record = json.loads(summary.read_text())
        record["wall_seconds"] = time.perf_counter() - began
        _json(summary, record)
    return json.loads(summary.read_text())


def _choose(rows: list[dict[str, Any]], kl_limit: float) -> dict[str, Any]:
    within = [r for r in rows if r["kl"] <= kl_limit]
    if within:
        return min(within, key=lambda r: (r["proxy"], r["kl"]))
    return min(rows, key=lambda r: r["kl"])


def baseline_search(
    model: Any,
    prompts: Any,
    vectors: Any,
    kl_limit: float | None,
    out: Path,
    reference: Any,
    layers: list[int] | None = None,
    alphas: tuple[float, ...] = CAA_ALPHAS,
    vectors_seconds: float = 0.0,
) -> dict[str, Any]:
    """CAA strengths and ablation layers (``vectors``: :func:`cna_lens.compute_caa` of the
    discovery sets) scored on the search prompts; the chosen ones. ``kl_limit`` None (no
    tune run): the search KL of ``reference`` (CNA top_k=1600)."""
    import cna_lens as cl
    from cna_lens.evaluation.kl import KLReference
    from cna_lens.evaluation.proxy import RefusalProxy
    from cna_lens.generation import FastBackend

    path = out / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows: dict[str, list[dict[str, Any]]] = {"caa": [], "ablation": []}
    seconds = {"caa": vectors_seconds, "ablation": vectors_seconds}
    with FastBackend(model) as backend:
        began = time.perf_counter()
        proxy = RefusalProxy(backend, prompts.search_harmful, prompts.search_harmless)
        kl = KLReference(backend, prompts.search_harmless, tokens=16)
        shared = time.perf_counter() - began
        if kl_limit is None:
            kl_limit = kl.measure(reference).mean
        candidates: list[tuple[str, Any, dict[str, Any]]] = [
            ("caa", cl.CAA(vectors, a), {"alpha": a}) for a in alphas
        ]
        candidates += [
            ("ablation", cl.DirectionalAblation(vectors, layer), {"layer": layer})
            for layer in (layers if layers is not None else range(int(model.cfg.n_layers)))
        ]
        for kind, condition, params in candidates:
            t = time.perf_counter()
            measured = kl.measure(condition)
            rows[kind].append({**params, "proxy": proxy.score(condition), "kl": measured.mean})
            seconds[kind] += time.perf_counter() - t
            print(f"  search {kind} {params}: {rows[kind][-1]}", flush=True)
        proxy_baseline = proxy.score(None)
    record = {
        "kl_limit": kl_limit,
        "rows": rows,
        "chosen": {k: _choose(v, kl_limit) for k, v in rows.items()},
        "seconds": {k: v + shared for k, v in seconds.items()},
        "proxy_baseline": proxy_baseline,
    }
    _json(path, record)
    return record


def heretic_stage(
    model: Any, model_dir: Path, prompts: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """heretic's record, or ``{"error": why}``."""
    if args.no_heretic:
        return {"error": "not run (--no-heretic)"}
    system = _default_system_prompt(model)
    try:
        return heretic_peer.heretic_stage(
            model_dir,
            Path(args.out) / "heretic",
            {
                "good_prompts": prompts.discovery_benign,
                "bad_prompts": prompts.discovery_harmful,
                "good_evaluation_prompts": prompts.search_harmless,
                "bad_evaluation_prompts": prompts.search_harmful,
            },
            trials_n=args.heretic_trials,
            startup=min(15, args.heretic_trials - 1),
            max_tokens=EVAL_TOKENS,
            batch_size=40,
            system_prompt=system,
            timeout=args.heretic_minutes * 60,
        )
    except (heretic_peer.HereticError, OSError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _default_system_prompt(model: Any) -> str | None:
    """The system turn the model's chat template adds by itself (heretic must see the same
    prompts), or None."""
    tok = model.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True
    )
    marker = "<|im_start|>system\n"
    if marker in text:
        return text.split(marker, 1)[1].split("<|im_end|>", 1)[0]
    return None


def _rates(table: Any) -> dict[str, dict[str, dict[str, float]]]:
    from cna_lens.evaluation.engine import summarize

    s = summarize(table, by=["row"]).set_index(["row", "prompt_set"])
    result: dict[str, dict[str, dict[str, float]]] = {}
    for (row, pset), r in s.iterrows():
        result.setdefault(str(row), {})[str(pset)] = r.to_dict()
    return result


def _row(name: str, r: dict[str, dict[str, float]], kl: Any) -> dict[str, Any]:
    return {
        "row": name,
        "refusal": r["harmful"]["refusal_rate"],
        "over_refusal": r["benign"]["refusal_rate"],
        "quality": (r["harmful"]["quality"] + r["benign"]["quality"]) / 2,
        "capability": r["capability"]["accuracy"],
        "kl_first": kl.first,
        "kl": kl.mean,
    }


def evaluate_rows(
    model: Any, prompts: Any, arms: list[Any], heretic: dict[str, Any], out: Path
) -> list[dict[str, Any]]:
    """Every row scored on the held-out prompts by the same code. Rows already scored (in
    ``out/rows.json``) are kept, so heretic's row can be added when its run finishes."""
    import cna_lens as cl
    from cna_lens.evaluation import prompts as prompt_sets
    from cna_lens.evaluation.engine import evaluate
    from cna_lens.evaluation.kl import KLReference
    from cna_lens.evaluation.metrics import paper_metrics
    from cna_lens.generation import Decoding, FastBackend

    cache = out / "rows.json"
    done: dict[str, dict[str, Any]] = (
        {r["row"]: r for r in json.loads(cache.read_text())} if cache.is_file() else {}
    )
    todo = [a for a in arms if a.tags["row"] not in done]
    want_heretic = "model" in heretic and "heretic" not in done
    if not todo and not want_heretic:
        return list(done.values())
    capability = prompt_sets.capability()[:N_CAPABILITY]
    sets = {"harmful": prompts.heldout_harmful, "benign": prompts.heldout_harmless}
    decoding = Decoding(max_new_tokens=EVAL_TOKENS, batch_size=16)

    def score(m: Any, backend: Any, rows: list[Any], label: str) -> Any:
        return evaluate(
            m,
            sets,
            rows,
            metrics=paper_metrics(),
            capability=capability,
            decoding=decoding,
            backend=backend,
            progress=True,
            texts=out / f"texts_{label}.jsonl",
        )

    with FastBackend(model) as backend:
        kl = KLReference(backend, prompts.heldout_harmless, tokens=16)
        if todo:
            by_row = _rates(score(model, backend, todo, "cna_lens"))
            for a in todo:
                name = a.tags["row"]
                done[name] = _row(name, by_row[name], kl.measure(a.condition))
            _json(cache, list(done.values()))
        if want_heretic:
            other = cl.load_model(heretic["model"], device="cpu")
            with FastBackend(other) as hb:
                r = _rates(
                    score(other, hb, [cl.evaluation.Arm(None, {"row": "heretic"})], "heretic")
                )
                done["heretic"] = _row("heretic", r["heretic"], kl.measure_model(hb))
            del other
            _json(cache, list(done.values()))
    return list(done.values())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import torch

    import cna_lens as cl
    from cna_lens.core.discovery import circuit_from_attribution
    from cna_lens.models.loading import portable_model_id
    from cna_lens.models.names import resolve_model
    from cna_lens.pipelines.tune import TuneConfig
    from cna_lens.pipelines.tune.config import load_tune_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:qwen2.5-coder-0.5b-instruct:hf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tune-budget", type=float, default=15.0, help="minutes of cna-lens tune")
    ap.add_argument("--heretic-trials", type=int, default=50)
    ap.add_argument("--heretic-minutes", type=float, default=130.0, help="heretic's time limit")
    ap.add_argument("--no-heretic", action="store_true")
    ap.add_argument(
        "--caa-alphas",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        default=CAA_ALPHAS,
        help="CAA strengths the search tries (default " + ",".join(map(str, CAA_ALPHAS)) + ")",
    )
    ap.add_argument(
        "--ablation-layers",
        type=lambda text: [int(x) for x in text.split(",")],
        default=None,
        help="layers whose direction the ablation search tries, e.g. 8,10,12 (default all)",
    )
    ap.add_argument(
        "--no-tune",
        action="store_true",
        help="skip cna-lens tune (no tuned row; the baselines' KL limit is then the search "
        "KL of CNA top_k=1600)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tuned = {} if args.no_tune else tune_stage(args.model, out, args.tune_budget)
    tune_error = tuned.pop("error", None)
    rec = tuned.get("recommended")
    model_dir = Path(resolve_model(args.model))
    model = cl.load_model(model_dir, device="cpu")
    prompts = load_tune_prompts(TuneConfig(model=args.model))
    began = time.perf_counter()
    found = cl.discover_full(model, prompts.discovery_harmful, prompts.discovery_benign)
    discover_seconds = time.perf_counter() - began
    n_total = int(model.cfg.n_layers) * int(model.cfg.d_mlp)
    top1600 = circuit_from_attribution(
        found.attribution,
        top_k=1600,
        universal=found.universal,
        provenance=found.circuit.provenance,
    )
    kl_limit: float | None = None
    if tuned:
        front = {t["number"]: t for t in tuned["front"]}
        kl_limit = front[rec["trial"]]["kl"] if rec else min(t["kl"] for t in tuned["front"])
    began = time.perf_counter()
    vectors = cl.compute_caa(model, prompts.discovery_harmful, prompts.discovery_benign)
    vectors_seconds = time.perf_counter() - began
    base = baseline_search(
        model,
        prompts,
        vectors,
        kl_limit,
        out,
        cl.Steering(circuit=top1600, multiplier=0.0),
        args.ablation_layers,
        args.caa_alphas,
        vectors_seconds,
    )
    kl_limit = base["kl_limit"]
    heretic = heretic_stage(model, model_dir, prompts, args)
    arms = [
        cl.evaluation.Arm(None, {"row": "unsteered"}),
        cl.evaluation.Arm(cl.Steering(circuit=found.circuit, multiplier=0.0), {"row": "CNA 0.1%"}),
        cl.evaluation.Arm(
            cl.Steering(circuit=top1600, multiplier=0.0),
            {"row": "CNA top_k=1600"},
        ),
        cl.evaluation.Arm(cl.CAA(vectors, base["chosen"]["caa"]["alpha"]), {"row": "CAA"}),
        cl.evaluation.Arm(
            cl.DirectionalAblation(vectors, base["chosen"]["ablation"]["layer"]),
            {"row": "directional ablation"},
        ),
    ]
    if tuned and (out / "tune" / "steering.json").is_file():
        tuned_steering = cl.Steering.load(out / "tune" / "steering.json")
        arms.insert(3, cl.evaluation.Arm(tuned_steering, {"row": "CNA tuned"}))
    rows = evaluate_rows(model, prompts, arms, heretic, out)
    touched = {
        "unsteered": "-",
        "CNA 0.1%": f"{len(found.circuit)} neurons ({len(found.circuit) / n_total:.2%})",
        "CNA top_k=1600": f"1600 neurons ({1600 / n_total:.2%})",
        "CAA": f"1 vector at layer {int(model.cfg.n_layers) // 2}, "
        f"alpha {base['chosen']['caa']['alpha']:g}",
        "directional ablation": f"1 direction (layer {base['chosen']['ablation']['layer']}) out of "
        f"{2 * int(model.cfg.n_layers) + 1} residual writes",
        "heretic": "rank-1 edits of o_proj/down_proj in the trial's layers",
    }
    if rec:
        touched["CNA tuned"] = f"{rec['k']} neurons ({rec['k'] / n_total:.2%})"
    seconds = {
        "CNA 0.1%": discover_seconds,
        "CNA top_k=1600": discover_seconds,
        "CNA tuned": tuned.get("seconds"),
        "CAA": base["seconds"]["caa"],
        "directional ablation": base["seconds"]["ablation"],
        "heretic": heretic.get("trial_seconds", heretic.get("wall_seconds")),
    }
    for row in rows:
        row["touches"] = touched.get(row["row"], "")
        row["search_seconds"] = seconds.get(row["row"])
    if tune_error is not None:
        rows.insert(3, {"row": "CNA tuned", "error": tune_error})
    if "error" in heretic and not any(r["row"] == "heretic" for r in rows):
        rows.append({"row": "heretic", "error": heretic["error"]})
    else:
        for row in rows:
            if row["row"] == "heretic":
                row["heretic_trials"] = len(heretic.get("trials", []))
                row["heretic_chosen_trial"] = heretic.get("chosen_trial")
    record = {
        "model": portable_model_id(args.model),
        "rows": rows,
        "kl_limit": kl_limit,
        "baselines": base,
        # portable ids only: no path of the machine that ran the benchmark
        "heretic": {
            k: portable_model_id(v) if k == "model" else v
            for k, v in heretic.items()
            if k != "trials"
        },
        "heretic_trials": heretic.get("trials", []),
        "tune_recommended": rec,
        "prompts": {
            "search": [len(prompts.search_harmful), len(prompts.search_harmless)],
            "heldout": [len(prompts.heldout_harmful), len(prompts.heldout_harmless)],
            "capability": N_CAPABILITY,
        },
        "wall_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    _json(out / "peers.json", record)
    (out / "peers.md").write_text(format_table(rows) + "\n")
    from cna_lens.viz import methods_figure, save_figures

    name = Path(args.model.removeprefix("zoo:").removesuffix(":hf")).name
    saved = save_figures(
        {"peers": methods_figure(rows, title=f"{name}: refusal vs damage (held-out)")},
        out,
    )
    if saved.png_error:
        print(f"(no PNG: {saved.png_error})")
    print(format_table(rows))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| row | touches | refusal | over-refusal | KL first | KL 16 | quality | capability | search s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} |" + " |" * 7)
            continue
        secs = r.get("search_seconds")
        lines.append(
            f"| {r['row']} | {r['touches']} | {r['refusal']:.1%} | {r['over_refusal']:.1%} | "
            f"{r['kl_first']:.3f} | {r['kl']:.3f} | {r['quality']:.3f} | {r['capability']:.1%} | "
            f"{'' if secs is None else f'{secs:.0f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
