"""Dose-response sweep on the model organism (instruct): scale vs mean, both vs positive.

Run from the repository root (about a minute on one CPU thread):

    PYTHONPATH=$PWD python benchmarks/dose_organism.py --out results/dose_organism

Discovery on the organism's discovery sets (shipped universal prompts for the filter),
then every fraction x intervention x sign x multiplier on all eval_harmful (refusal) and
eval_benign (over-refusal) prompts, 32 new tokens, greedy. Writes sweep.csv, sweep.json
and the figures; prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cna_lens as cl
from cna_lens import organism
from cna_lens.viz import dose_figure, save_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/dose_organism")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = organism.load("instruct", device="cpu")
    config = cl.DiscoveryConfig(fraction=0.02, universal_prompts=organism.prompts("universal"))
    start = time.perf_counter()
    found = cl.discover_full(
        model, organism.prompts("discovery_harmful"), organism.prompts("discovery_benign"), config
    )
    sets = {
        "eval_harmful": organism.prompts("eval_harmful"),
        "eval_benign": organism.prompts("eval_benign"),
    }
    table = cl.sweep(
        model,
        found,
        sets,
        fractions=[0.005, 0.01, 0.02],
        multipliers=[0.0, 1.0],
        interventions=("scale", "mean"),
        signs=("both", "positive"),
        max_new_tokens=args.max_new_tokens,
        batch_size=32,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "discovery": config.to_dict() | {"universal_prompts": "organism universal set"},
                "max_new_tokens": args.max_new_tokens,
                "seconds": seconds,
                "rows": json.loads(table.to_json(orient="records")),
            },
            indent=1,
        )
    )
    save_figures(
        {"dose_vs_k": dose_figure(table, x="k"), "dose_vs_m": dose_figure(table, x="multiplier")},
        out,
        png=False,
    )
    wide = table.pivot_table(
        index=["k", "intervention", "sign", "multiplier"],
        columns="prompt_set",
        values=["refusal_rate", "quality"],
    )
    print(wide.round(3).to_string())
    print(f"{len(table)} rows, {seconds:.1f} s -> {out}")


if __name__ == "__main__":
    main()
