"""The tuner on the organism: it finds what a fixed grid finds, resumes from its storage,
refuses what cannot work, and its steering file reproduces the reported point."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import cna_lens
from cna_lens import CNAError, organism
from cna_lens.cli import main
from cna_lens.pipelines.tune import TuneConfig, load_tune_prompts, tune
from cna_lens.pipelines.tune.run import spearman
from cna_lens.pipelines.tune.search import Objectives, pareto_front, steering_of

SMALL = dict(n_search=16, n_heldout=16, kl_tokens=6, confirm_tokens=12, confirm_points=2)


def _organism_available() -> bool:
    try:
        organism.path("instruct")
    except (FileNotFoundError, ValueError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _organism_available(), reason="the organism is not built")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    cfg = TuneConfig(
        model="organism:instruct", out=str(out), budget_minutes=10, trials=60, seed=0, **SMALL
    )
    return cfg, tune(cfg)


def test_finds_a_point_as_good_as_the_best_of_a_fixed_grid(run):
    from cna_lens.evaluation.kl import KLReference
    from cna_lens.evaluation.proxy import RefusalProxy
    from cna_lens.generation import FastBackend
    from cna_lens.pipelines.tune.run import _discover, _first_layer

    cfg, result = run
    prompts = load_tune_prompts(cfg)
    model = organism.load("instruct", device="cpu")
    found = _discover(model, cfg, prompts)
    first = _first_layer(cfg, found)
    with FastBackend(model) as backend:
        proxy = RefusalProxy(
            backend,
            prompts.search_harmful,
            prompts.search_harmless,
            calibration_tokens=8,
            batch_size=cfg.batch_size,
            start_layer=first,
        )
        kl = KLReference(backend, prompts.search_harmless, tokens=cfg.kl_tokens, start_layer=first)
        objectives = Objectives(proxy, kl, cfg.over_refusal_slack)
        assert proxy.tokens == tuple(result.summary["proxy_tokens"])  # the tuner's own proxy
        grid = []
        for fraction in (0.005, 0.01, 0.02):
            for intervention in ("scale", "mean"):
                for sign in ("both", "positive"):
                    params = dict(
                        fraction=fraction,
                        score="abs_delta",
                        intervention=intervention,
                        sign=sign,
                        multiplier=0.0,
                        negative_multiplier=0.0,
                        first_layer=first,
                    )
                    refusal, mean_kl, _, _ = objectives(steering_of(found, params))
                    grid.append((refusal, mean_kl))
    # the grid's best point: the lowest KL among the grid points that do the job (halve the
    # refusal proxy); some do, so the bar is real
    doing = [g for g in grid if g[0] <= objectives.baseline_refusal / 2]
    assert doing
    best = min(doing, key=lambda g: g[1])
    front = pareto_front(result.points)
    assert any(p.refusal <= best[0] + 1e-9 and p.kl <= best[1] + 1e-9 for p in front), (best, front)


def test_writes_its_files_and_the_steering_reproduces_the_reported_point(run):
    cfg, result = run
    assert {"trials.csv", "pareto.csv", "pareto.json", "confirmed.csv", "pareto.html"} <= set(
        result.files
    )
    assert result.recommended is not None
    assert len(pd.read_csv(result.files["trials.csv"])) == 60
    summary = json.loads(result.files["tune.json"].read_text())
    rec = summary["recommended"]
    assert rec["over_refusal"] <= summary["confirmed"][0]["over_refusal"] + cfg.over_refusal_slack
    texts = pd.read_json(result.files["confirm.jsonl"], lines=True, dtype=False)
    mine = texts[(texts["point"] == rec["point"]) & (texts["prompt_set"] == "harmful")]
    model = organism.load("instruct", device="cpu")
    again = cna_lens.generate(
        model,
        mine["prompt"].tolist(),
        steering=str(result.files["steering.json"]),
        max_new_tokens=cfg.confirm_tokens,
        batch_size=cfg.batch_size,
    )
    assert again == mine["output"].tolist()


def test_a_study_resumes_from_its_storage(tmp_path):
    cfg = TuneConfig(model="organism:instruct", out=str(tmp_path), trials=4, **SMALL)
    first = tune(cfg)
    assert first.summary["trials"] == {
        "this_run": 4,
        "in_study": 4,
        "feasible": first.summary["trials"]["feasible"],
    }
    again = tune(TuneConfig(model="organism:instruct", out=str(tmp_path), trials=7, **SMALL))
    assert again.summary["trials"]["this_run"] == 3 and again.summary["trials"]["in_study"] == 7
    before = {p.number: (p.refusal, p.kl) for p in first.points}
    after = {p.number: (p.refusal, p.kl) for p in again.points if p.number in before}
    assert after == before  # the stored trials are kept, unchanged
    with pytest.raises(CNAError, match="another model or search space"):
        tune(
            TuneConfig(
                model="organism:instruct",
                out=str(tmp_path),
                trials=8,
                scores=("abs_delta",),
                **SMALL,
            )
        )


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(CNAError, match="fewer than one"):
        tune(TuneConfig(model="organism:instruct", out=str(tmp_path / "a"), fractions=(1e-6, 1e-5)))
    with pytest.raises(CNAError, match="cannot fit a trial"):
        tune(
            TuneConfig(
                model="organism:instruct", out=str(tmp_path / "b"), budget_minutes=0.01, **SMALL
            )
        )
    with pytest.raises(CNAError, match="budget_minutes"):
        TuneConfig(model="organism:instruct", budget_minutes=0)
    with pytest.raises(CNAError, match="scores"):
        TuneConfig(model="organism:instruct", scores=("nope",))


def test_the_cli_runs_on_the_organism(tmp_path, capsys):
    rc = main(
        [
            "tune",
            "--model",
            "organism:instruct",
            "--budget",
            "5",
            "--trials",
            "6",
            "--n-search",
            "12",
            "--n-heldout",
            "12",
            "--confirm-tokens",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 trials this run" in printed and (tmp_path / "pareto.csv").is_file()


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)


def test_a_new_study_starts_at_the_paper_points(tmp_path):
    """The paper's 0.1% and the paper code's top_k=1600 (scale, m = 0) are the first trials
    where they lie in the size range; a resumed study is not seeded again."""
    import optuna

    from cna_lens.pipelines.tune.run import _seed_paper_point, _study

    cfg = TuneConfig(model="organism:instruct", out=str(tmp_path), fractions=(0.0001, 0.03))
    study = _study(cfg)
    _seed_paper_point(study, cfg, first=3, n_total=116_736)  # the 0.5B's 24 x 4,864
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert [round(q["fraction"] * 116_736) for q in queued] == [117, 1600]
    assert all(q["intervention"] == "scale" and q["multiplier"] == 0.0 for q in queued)
    assert {q["first_layer"] for q in queued} == {3}
    _seed_paper_point(study, cfg, first=3, n_total=116_736)
    assert len(study.trials) == 2  # already seeded: nothing added
    small = TuneConfig(model="organism:instruct", out=str(tmp_path / "s"))
    study = _study(small)
    _seed_paper_point(study, small, first=0, n_total=4096)  # 1600 is 39%: out of range
    assert len(study.trials) == 1
