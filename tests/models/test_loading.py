"""Loading: hook_post is the down-projection input on every supported architecture;
chat formatting, BOS handling and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import cna_lens
from cna_lens import CNAError
from cna_lens.models.loading import format_prompt, mlp_hook_names, model_source
from cna_lens.models.testing import ARCHITECTURES

PROMPTS = ["How do I pick a lock?", "Write a poem about the ocean and the moon, please."]


def _down_projections(hf) -> list[torch.nn.Module]:
    """The HF MLP down-projection modules, found by their HF names (the independent reference)."""
    mods = [m for n, m in hf.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))]
    assert len(mods) == hf.config.num_hidden_layers
    return mods


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_post_equals_hf_down_projection_input(arch, compat, model_dirs):
    model = cna_lens.load_model(model_dirs[arch], device="cpu")
    if compat:
        model.enable_compatibility_mode()
    batch = cna_lens.tokenize_prompts(model, PROMPTS, batch_size=2)[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dirs[arch], attn_implementation="eager").eval()
    caught: dict[int, torch.Tensor] = {}
    handles = [
        mod.register_forward_pre_hook(lambda m, a, i=i: caught.__setitem__(i, a[0].clone()))
        for i, mod in enumerate(_down_projections(hf))
    ]
    # HF's own forward derives positions from cache_position, the bridge from the mask;
    # pass mask-derived positions so that both see the same (left-padded) inputs.
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    names = mlp_hook_names(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=names
        )
    real = batch.attention_mask.bool()
    for layer, name in enumerate(names):
        assert cache[name].shape[-1] == model.cfg.d_mlp
        # compatibility mode processes weights, so allow float noise; pad positions excluded
        tol = 1e-4 if compat else 1e-5
        torch.testing.assert_close(cache[name][real], caught[layer][real], atol=tol, rtol=tol)


def test_chat_model_detected_from_template_not_name(model_dirs, base_model_dir):
    chat = cna_lens.load_model(model_dirs["llama"], device="cpu")
    base = cna_lens.load_model(base_model_dir, device="cpu")
    assert cna_lens.is_chat_model(chat) and not cna_lens.is_chat_model(base)
    assert "<|assistant|>" in format_prompt(chat, "hi")
    assert format_prompt(base, "hi") == "hi"
    forced = cna_lens.load_model(model_dirs["llama"], device="cpu", chat=False)
    assert format_prompt(forced, "hi") == "hi"


@pytest.mark.parametrize("which", ["chat", "base"])
def test_never_a_doubled_bos(which, model_dirs, base_model_dir):
    path = model_dirs["llama"] if which == "chat" else base_model_dir
    model = cna_lens.load_model(path, device="cpu")
    batch = cna_lens.tokenize_prompts(model, ["hello there"], batch_size=1)[0]
    ids = batch.input_ids[0].tolist()
    bos = model.tokenizer.bos_token_id
    assert ids.count(bos) <= 1
    if which == "chat":  # the template writes the BOS itself
        assert ids[0] == bos


def test_left_padding_puts_last_token_last(llama):
    batches = cna_lens.tokenize_prompts(
        llama, ["a", "a much longer prompt than that"], batch_size=2
    )
    (b,) = batches
    assert b.attention_mask[:, -1].all()
    assert (b.attention_mask[0] == 0).any()  # the short one is padded, on the left
    first_real = b.attention_mask[0].nonzero()[0].item()
    assert b.attention_mask[0, first_real:].all()


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], "empty"),
        (["ok", 3], r"\[1\] is int"),
        ("a single string", "single string"),
        (["ok", "   "], "blank"),
    ],
)
def test_bad_prompt_sets_are_refused(llama, prompts, match):
    with pytest.raises(CNAError, match=match):
        cna_lens.tokenize_prompts(llama, prompts, batch_size=2)


def test_prompt_longer_than_context_is_refused(llama):
    long = "word " * (llama.cfg.n_ctx * 2)
    with pytest.raises(CNAError, match="longer than the model's context"):
        cna_lens.tokenize_prompts(llama, ["fine", long], batch_size=2)


def test_bad_batch_size(llama):
    with pytest.raises(CNAError, match="batch_size"):
        cna_lens.tokenize_prompts(llama, ["x"], batch_size=0)


def test_missing_directory_and_non_model_directory(tmp_path):
    with pytest.raises(CNAError, match="does not exist"):
        cna_lens.load_model(tmp_path / "nope")
    with pytest.raises(CNAError, match="no config.json"):
        cna_lens.load_model(tmp_path)


def test_model_without_mlp_hook_post_is_refused():
    class Cfg:
        n_layers = 2

    class NoMLP:
        cfg = Cfg()
        hook_dict = {"blocks.0.attn.hook_z": None, "blocks.1.attn.hook_z": None}

    with pytest.raises(CNAError, match="hook_post"):
        mlp_hook_names(NoMLP())


def test_fingerprint_depends_on_shape_not_weights(tmp_path, model_dirs):
    from cna_lens.models.testing import make_random_model_dir

    a = cna_lens.load_model(model_dirs["llama"], device="cpu")
    same_shape = cna_lens.load_model(make_random_model_dir(tmp_path / "s", seed=9), device="cpu")
    wider = cna_lens.load_model(make_random_model_dir(tmp_path / "w", d_mlp=256), device="cpu")
    assert cna_lens.model_fingerprint(a) == cna_lens.model_fingerprint(same_shape)
    assert cna_lens.model_fingerprint(a) != cna_lens.model_fingerprint(wider)


# ---- hardening ---------------------------------------------------------------------------


def test_no_attributes_are_patched_onto_the_model(model_dirs):
    model = cna_lens.load_model(model_dirs["llama"], device="cpu", chat=False)
    assert not any(name.startswith("_cna") for name in vars(model))
    assert cna_lens.model_id(model) == "llama"  # portable: the directory's name
    assert model_source(model) == str(model_dirs["llama"].resolve())
    assert cna_lens.is_chat_model(model) is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name_or_path": ""}, "model name is empty"),
        ({"name_or_path": "   "}, "model name is empty"),
        ({"device": "bogus"}, "unknown device 'bogus'"),
        (
            {"name_or_path": "nobody-xyz/not-a-model-9"},
            r"cannot load 'nobody-xyz/not-a-model-9' as a hub model",
        ),
    ],
)
def test_load_model_errors_are_cna_errors(model_dirs, kwargs, match):
    kwargs = {"name_or_path": model_dirs["llama"], "device": "cpu", **kwargs}
    with pytest.raises(CNAError, match=match) as info:
        cna_lens.load_model(**kwargs)
    if "cannot load" in match:
        assert isinstance(info.value.__cause__, OSError)  # the cause is chained


def test_too_long_prompt_names_its_set(llama):
    long = "word " * (int(llama.cfg.n_ctx) + 10)
    with pytest.raises(CNAError, match=r"negative prompts\[1\] is \d+ tokens"):
        cna_lens.discover(llama, ["a"], ["b", long], top_k=1, universal_filter=False)


def test_lone_surrogate_is_refused_before_the_tokenizer():
    from cna_lens.models.loading import validate_prompts

    with pytest.raises(CNAError, match=r"positive\[0\] is not valid Unicode"):
        validate_prompts(["x\udc80y"], "positive")
