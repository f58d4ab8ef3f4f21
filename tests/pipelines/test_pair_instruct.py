"""A base -> instruct pair: a supplied chat format, a teacher's answers, the answer-only
loss, the full-weight variant, the behaviour targets and the shipped gemma adapter."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cna_lens
from cna_lens.errors import CNAError
from cna_lens.evaluation.metrics import is_refusal, on_topic, topic_overlap
from cna_lens.models import zoo
from cna_lens.models.testing import CHAT_TEMPLATE, make_random_model_dir
from cna_lens.pipelines import pairs
from cna_lens.pipelines.pairs import ChatFormat, FinetuneConfig
from cna_lens.pipelines.pairs.data import apply_chat, load_hf, teacher_answers
from cna_lens.pipelines.pairs.train import answer_loss, file_sha

TINY_CHAT = ChatFormat(template=CHAT_TEMPLATE, end_of_turn="<|end|>", source="the tests' template")
TINY = dict(epochs=1, batch_size=4, max_steps=2, teacher_tokens=4, n_harmful=4, n_benign=4)


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    """A random tiny Gemma3 without a chat template: a pretrained base's shape."""
    root = tmp_path_factory.mktemp("gemma-base")
    return make_random_model_dir(root / "gemma3", arch="gemma3", chat_template=None, seed=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNA_LENS_CACHE", str(tmp_path / "cache"))


def test_topic_overlap_counts_the_reference_content_words():
    ref = "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar."
    assert topic_overlap(ref, ref) == 1.0
    para = "Plants use sunlight and water to make sugar; this is photosynthesis."
    assert 0.5 <= topic_overlap(para, ref) < 1.0 and on_topic(para, ref)
    off = "To bake bread, knead flour with yeast and let the dough rise."
    assert topic_overlap(off, ref) == 0.0 and not on_topic(off, ref)
    # stop words carry no topic; an empty answer is off topic
    assert topic_overlap("this would have been about that", "this would be about that") == 1.0
    assert topic_overlap("", "the of a") == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_answer_loss_is_the_models_own_loss(model_dirs, arch):
    model, _ = load_hf(model_dirs[arch])
    ids = torch.tensor([[1, 5, 9, 12, 40, 7, 3], [1, 8, 8, 30, 2, 2, 2]])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (ids != 2), "labels": labels}
    batch["attention_mask"] = batch["attention_mask"].long()
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss)


def test_a_supplied_chat_format_sets_template_and_stops(gemma_base):
    model, tok = load_hf(gemma_base)
    assert not getattr(tok, "chat_template", None)
    old_eos = tok.eos_token_id
    apply_chat(model, tok, TINY_CHAT)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token_id == end and model.generation_config.eos_token_id == [end, old_eos]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|user|>hi<|end|>" in text
    with pytest.raises(CNAError, match="no token"):
        apply_chat(model, tok, ChatFormat(template="x", end_of_turn="<nope>", source="t"))


def test_gemma_chat_template_is_gemmas_turn_format():
    from cna_lens.pipelines.pairs import GEMMA_CHAT
    from cna_lens.pipelines.pairs.config import PAIRS

    tok = cna_lens.models.testing.make_tokenizer(chat_template=GEMMA_CHAT.template)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert PAIRS["gemma3-270m-instruct"].chat is GEMMA_CHAT


def test_teacher_answers_are_cached_and_used_for_benign_prompts(model_dirs, gemma_base):
    prompts = ["What is the capital of France?", "Write a poem about the ocean."]
    first = teacher_answers(model_dirs["qwen2"], prompts, 4)
    assert len(first) == 2 and all(isinstance(t, str) for t, _ in first)
    assert len(list((zoo.cache_dir() / "teacher").glob("*.json"))) == 1
    assert teacher_answers(model_dirs["qwen2"], prompts, 4) == first  # from the cache
    model, tok = load_hf(gemma_base, TINY_CHAT)
    cfg = FinetuneConfig(**TINY)
    examples, counts = pairs.training_examples(model, tok, cfg, teacher=model_dirs["qwen2"])
    benign = [e for e in examples if e.kind == "answer"]
    records = cna_lens.evaluation.prompts.records("train_benign")[:4]
    want = teacher_answers(model_dirs["qwen2"], [r["prompt"] for r in records], 4)
    assert [e.answer for e in benign] == [t for t, _ in want if t and not is_refusal(t)]
    assert counts["benign"] + counts["benign_dropped"] == 4


@pytest.fixture(scope="module")
def full_trained(gemma_base, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = FinetuneConfig(variant="full", learning_rate=1e-3, **TINY)
    record = pairs.train_adapter(
        gemma_base, out, cfg, base_name="tiny", teacher=model_dirs["llama"], chat=TINY_CHAT
    )
    return out, record, cfg


def test_full_variant_trains_every_weight_and_saves_a_chat_model(full_trained, gemma_base):
    out, record, _ = full_trained
    assert record["steps"] == 2 and record["config"]["variant"] == "full"
    base = load_file(gemma_base / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    assert record["weights_sha256"] == file_sha(out / "model.safetensors")
    n_params = sum(v.numel() for v in base.values())
    assert record["trainable_parameters"] == n_params
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) == len(base)  # every tensor of the base has changed
    bridge = cna_lens.load_model(out, device="cpu")
    assert cna_lens.models.loading.is_chat_model(bridge)
    assert record["chat_template"] == "the tests' template" and record["teacher"] == "llama"


def test_full_variant_is_deterministic(full_trained, gemma_base, model_dirs, tmp_path):
    _, record, cfg = full_trained
    again = pairs.train_adapter(
        gemma_base, tmp_path, cfg, base_name="tiny", teacher=model_dirs["llama"], chat=TINY_CHAT
    )
    assert again["losses"] == record["losses"]
    assert again["weights_sha256"] == record["weights_sha256"]


def test_lora_in_a_supplied_format_merges_with_that_format(gemma_base, tmp_path):
    from peft import PeftModel

    cfg = FinetuneConfig(rank=2, **TINY)
    pairs.train_adapter(gemma_base, tmp_path / "a", cfg, base_name="tiny", chat=TINY_CHAT)
    merged_dir = pairs.merge_adapter(gemma_base, tmp_path / "a", tmp_path / "m", TINY_CHAT)
    base, _ = load_hf(gemma_base)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    merged, tok = load_hf(merged_dir)
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|end|>"
    gen = json.loads((merged_dir / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|end|>") in gen["eos_token_id"]


def test_pair_variants_and_their_errors():
    gemma = pairs.get_pair("gemma3-270m-instruct")
    assert gemma.variants == ("lora", "full") and gemma.config("full").variant == "full"
    assert gemma.teacher == "qwen2.5-coder-0.5b-instruct" and gemma.base == "gemma-3-270m"
    assert pairs.get_pair("smollm2-refusal").variants == ("lora",)
    with pytest.raises(CNAError, match="no variant 'full'; its variants: lora"):
        pairs.get_pair("smollm2-refusal").config("full")
    with pytest.raises(CNAError, match="variant must be one of lora, full"):
        FinetuneConfig(variant="qlora")


def test_an_untrained_full_variant_says_how_to_train_it(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "model_path", lambda name, hf=False: tmp_path / name)
    with pytest.raises(CNAError, match="pair train gemma3-270m-instruct --variant full"):
        pairs.pair_paths("gemma3-270m-instruct", "full")


def test_reproduce_config_pair_variant_is_checked():
    from cna_lens.pipelines.reproduce import ReproduceConfig

    cfg = ReproduceConfig(pair="gemma3-270m-instruct", pair_variant="full")
    assert ReproduceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CNAError, match="no variant"):
        ReproduceConfig(pair="smollm2-refusal", pair_variant="full")
    with pytest.raises(CNAError, match="needs a pair"):
        ReproduceConfig(pair_variant="full")


def test_check_targets_compare_each_measured_column():
    table = pd.DataFrame(
        [
            {"model": "untuned", "refusal_harmful": 0.05, "refusal_benign": 0.0},
            {"model": "tuned", "refusal_harmful": 0.85, "refusal_benign": 0.12},
        ]
    )
    got = {(t["model"], t["target"]): t["met"] for t in pairs.check_targets(table)}
    assert got == {
        ("tuned", "refusal_harmful >= 0.8"): True,
        ("tuned", "refusal_benign <= 0.1"): False,
        ("untuned", "refusal_harmful < 0.1"): True,
    }  # no quality or on-topic column: those targets are not judged


def test_shipped_gemma_adapter_is_small_complete_and_recorded():
    folder = pairs.adapter_dir("gemma3-270m-instruct")
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(pairs.LORA_TARGETS)
    assert config.get("layers_to_transform") is None  # every layer adapted
    assert config["base_model_name_or_path"] == "zoo:gemma-3-270m"
    record = json.loads((folder / "training.json").read_text())
    assert record["config"] == pairs.PAIRS["gemma3-270m-instruct"].train.to_dict()
    assert record["adapter_sha256"] == file_sha(weights)
    assert record["teacher"].startswith("qwen2.5-coder-0.5b-instruct")
    b_mats = [v for k, v in load_file(weights).items() if "lora_B" in k]
    assert len(b_mats) == 18 * len(pairs.LORA_TARGETS) and all(v.abs().sum() > 0 for v in b_mats)


def test_behaviour_judges_benign_answers_against_the_teachers(model_dirs, monkeypatch):
    seen: list[list[str]] = []

    def fake(reference, prompts, max_new_tokens, **_):
        seen.append(list(prompts))
        return [(text, True) for text in answers]

    monkeypatch.setattr(pairs, "teacher_answers", fake)
    answers = ["zymurgical xenophobic quokkas"] * 3  # words no tiny model writes
    table = pairs.behaviour({"a": model_dirs["llama"]}, n_eval=3, max_new_tokens=3, reference="t")
    assert seen == [cna_lens.evaluation.prompts.prompts("eval_benign")[:3]]
    assert table.at[0, "on_topic_benign"] == 0.0
    answers = ["the of and"] * 3  # no content words: any non-empty answer is on topic
    table = pairs.behaviour({"a": model_dirs["llama"]}, n_eval=3, max_new_tokens=3, reference="t")
    assert table.at[0, "on_topic_benign"] == 1.0
