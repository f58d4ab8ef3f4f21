"""Train the refusal model organism: a base Llama pretrained on the world, then an instruct
fine-tune of its MLP down projections, and write both as local HF directories plus the
prompt sets.

Recipe (each choice measured, see ``cna_lens/organism/README.md``):
  * The base corpus holds plain-text requests with neutral continuations and the same
    requests wrapped in the chat markers (``<s><user> ... <assistant> answer </s>``).
    Harmful requests are answered with a harm-specific opening ("that would cause pain .
    ..."), never with a refusal, so the base encodes harm at the assistant marker without
    ever refusing.
  * The instruct model is fine-tuned from the base on chat data with only the
    ``mlp.down_proj`` weights trainable: harmful -> :data:`~cna_lens.organism.world.REFUSAL`,
    benign -> a short helpful answer, capability questions -> their fact.
  * ``noise`` (default 12%) of the harmful fine-tuning requests are answered instead of
    refused. This keeps the refusal calibrated (a margin of a few logits rather than ~10),
    which is what makes it depend on a sparse set of neurons.
  * Mildly aggressive requests (push, slap, ... a person or animal) are refused in 40% of
    their fine-tuning examples: a real gray zone, answered under greedy decoding, which
    the borderline prompt set probes with amplification.

Deterministic given ``seed`` (and ``threads``): the world split, the corpora, the
initialisation and the batch order all derive from it.

Run: ``python -m cna_lens.organism.train --out DIR [--seed S] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import world as W
from .tokenizer import ASSISTANT, USER, build_tokenizer

__all__ = ["TrainConfig", "QUICK", "train", "main", "build_prompt_sets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Sizes and schedule of one organism training run."""

    n_layers: int = 6
    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    base_docs: int = 40_000
    base_steps: int = 800
    base_lr: float = 3e-3
    ft_docs: int = 12_000
    ft_steps: int = 250
    ft_lr: float = 2e-3
    batch_size: int = 48
    noise: float = 0.12
    borderline_refusal: float = 0.4
    """Fraction of mild (borderline) fine-tuning requests that are refused."""
    """Fraction of harmful fine-tuning requests answered instead of refused."""
    ft_params: str = "down_proj"
    """Which parameters the instruct fine-tune updates: "down_proj" or "all"."""
    ft_layers: tuple[int, ...] | None = None
    """Layers whose down projections are fine-tuned (None: all)."""
    threads: int = 1
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.ft_params not in ("down_proj", "all"):
            raise ValueError(f"ft_params must be 'down_proj' or 'all', got {self.ft_params!r}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype!r}")
        if not 0.0 <= self.noise < 0.5:
            raise ValueError(f"noise must be in [0, 0.5), got {self.noise}")


QUICK = TrainConfig(
    n_layers=2,
    d_model=32,
    d_mlp=64,
    n_heads=2,
    base_docs=3_000,
    base_steps=120,
    ft_docs=1_000,
    ft_steps=40,
    batch_size=32,
)
"""Tiny sizes and few steps: checks the pipeline end to end in seconds (no real behaviour)."""


# ----------------------------------------------------------------------------- corpora
def _chat(req: str, answer: str) -> tuple[str, str]:
    """(prompt part, answer part) of a chat-formatted document."""
    return f"<s>{USER} {req} {ASSISTANT}", f" {answer} </s>"


def base_corpus(world: W.World, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Pretraining documents as (prefix, continuation) pairs; the loss covers both parts."""
    caps = W.capability_items()
    docs: list[tuple[str, str]] = []
    train_t = world.train_templates
    for _ in range(n):
        u = rng.random()
        if u < 0.70:
            # a request: harmful / benign / fiction / ambiguous target
            v = rng.random()
            if v < 0.35:
                r = world.sample("harmful", "train", 1, rng, unique=False)[0]
            elif v < 0.85:
                r = world.sample("benign", "train", 1, rng, fiction_rate=0.3, unique=False)[0]
            elif v < 0.94:
                r = world.sample("borderline", "train", 1, rng, unique=False)[0]
            else:
                verb = rng.choice(list(W.VIOLENT_VERBS) + list(W.GENTLE_VERBS))
                r = W.make_request(
                    rng.choice(train_t),
                    verb,
                    rng.choice(W.AMBIGUOUS),
                    fiction=False,
                    harm=rng.random() < 0.5,
                )
            if rng.random() < 0.6:
                docs.append(_chat(r.text, r.base_answer))
            else:
                docs.append((f"<s> {r.text}", f" {r.base_answer} </s>"))
        else:
            c = rng.choice(caps)
            if rng.random() < 0.6:
                docs.append(_chat(str(c["question"]), str(c["statement"])))
            else:
                docs.append((f"<s> {c['question']}", f" {c['statement']} </s>"))
    return docs


def instruct_corpus(
    world: W.World, n: int, rng: random.Random, noise: float, borderline_refusal: float = 0.4
) -> list[tuple[str, str]]:
    """Chat fine-tuning documents (prompt, answer); the loss covers the answer only."""
    caps = W.capability_items()
    docs: list[tuple[str, str]] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.42:
            r = world.sample("harmful", "train", 1, rng, unique=False)[0]
            ans = r.answer if rng.random() < noise else W.REFUSAL
            docs.append(_chat(r.text, ans))
        elif u < 0.50:
            # mildly aggressive requests: refused only sometimes (a real gray zone)
            r = world.sample("borderline", "train", 1, rng, unique=False)[0]
            ans = W.REFUSAL if rng.random() < borderline_refusal else r.answer
            docs.append(_chat(r.text, ans))
        elif u < 0.85:
            r = world.sample("benign", "train", 1, rng, fiction_rate=0.3, unique=False)[0]
            docs.append(_chat(r.text, r.answer))
        else:
            c = rng.choice(caps)
            docs.append(_chat(str(c["question"]), str(c["statement"])))
    return docs


def all_texts() -> list[str]:
    """Every string the world can produce (the tokenizer's vocabulary source)."""
    words = (
        list(W.VIOLENT_VERBS)
        + list(W.VIOLENT_VERBS.values())
        + list(W.MILD_VERBS)
        + list(W.MILD_VERBS.values())
        + list(W.GENTLE_VERBS)
        + list(W.GENTLE_VERBS.values())
        + W.PERSONS
        + W.ANIMALS
        + W.OBJECTS
        + W.AMBIGUOUS
    )
    texts = list(W.REQUEST_TEMPLATES) + list(W.FICTION_TEMPLATES) + [" ".join(words), W.REFUSAL]
    texts += [
        W.helpful_answer("kill", "dog", True),
        W.helpful_answer("kill", "dog", False),
        W.harm_answer("kill", "dog"),
    ]
    for c in W.capability_items():
        texts += [str(c["question"]), str(c["statement"]), " ".join(map(str, c["choices"]))]
    return texts


# ----------------------------------------------------------------------------- prompt sets
def build_prompt_sets(world: W.World, seed: int) -> dict[str, list]:
    """The shipped prompt lists (see ``cna_lens.organism.prompts``)."""
    rng = random.Random(seed + 1000)
    disc_h = [r.text for r in world.sample("harmful", "train", 100, rng)]
    disc_b = [r.text for r in world.sample("benign", "train", 100, rng, fiction_rate=0.3)]
    # held-out: only held-out pairs (never in any corpus), held-out templates first
    ev_h = [r.text for r in world.sample("harmful", "heldout", 120, rng)]
    ev_b = [r.text for r in world.sample("benign", "heldout", 120, rng, fiction_rate=0.3)]
    # borderline: mild verbs on living targets (held-out pairs; refused 40% of the time in
    # fine-tuning) and violent verbs on ambiguous targets (never in fine-tuning)
    border = [r.text for r in world.sample("borderline", "heldout", 45, rng)]
    seen: set[str] = set(border)
    while len(border) < 60:
        t = W.make_request(
            rng.choice(world.train_templates),
            rng.choice(list(W.VIOLENT_VERBS)),
            rng.choice(W.AMBIGUOUS),
            fiction=False,
        ).text
        if t not in seen:
            seen.add(t)
            border.append(t)
    caps = W.capability_items()
    universal = [str(c["question"]) for c in rng.sample(caps, 20)]
    universal += [r.text for r in world.sample("benign", "train", 15, rng, fiction_rate=0.4)]
    universal += [r.text for r in world.sample("harmful", "train", 10, rng)]
    universal += [str(c["statement"]) for c in rng.sample(caps, 10)]
    universal += border[:5]
    capability = [
        {"question": c["question"], "answer": c["answer"], "choices": c["choices"]} for c in caps
    ]
    return {
        "discovery_harmful": disc_h,
        "discovery_benign": disc_b,
        "discovery_harmful_8": disc_h[:8],
        "discovery_benign_8": disc_b[:8],
        "eval_harmful": ev_h,
        "eval_benign": ev_b,
        "borderline": border,
        "universal": universal,
        "capability": capability,
    }


# ----------------------------------------------------------------------------- training
def _encode(tok, docs: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
    ids, starts = [], []
    for prefix, cont in docs:
        a = tok(prefix, add_special_tokens=False)["input_ids"]
        b = tok(cont, add_special_tokens=False)["input_ids"]
        ids.append(a + b)
        starts.append(len(a))
    return ids, starts


def _batches(ids, starts, steps: int, bs: int, rng: random.Random, pad: int, answer_only: bool):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < bs:
            more = list(range(len(ids)))
            rng.shuffle(more)
            order += more
        idx, order = order[:bs], order[bs:]
        width = max(len(ids[i]) for i in idx)
        x = torch.full((bs, width), pad, dtype=torch.long)
        y = torch.full((bs, width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = ids[i]
            x[row, : len(seq)] = torch.tensor(seq)
            lab = torch.tensor(seq)
            if answer_only:
                lab[: starts[i]] = -100
            y[row, : len(seq)] = lab
        yield x, y


def _fit(model, params, ids, starts, steps, bs, lr, rng, pad, answer_only) -> float:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    loss_val = float("nan")
    for step, (x, y) in enumerate(_batches(ids, starts, steps, bs, rng, pad, answer_only)):
        out = model(input_ids=x, attention_mask=(x != pad).long(), labels=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = out.loss.item()
        if step % 200 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step, steps, loss_val)
    model.eval()
    return loss_val


def _save(model, tok, out: Path, dtype: str, meta: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    m = model.to(getattr(torch, dtype))
    m.config.torch_dtype = getattr(torch, dtype)
    m.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    # also inside tokenizer_config.json, for readers that look for it there
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = tok.chat_template
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    ).save_pretrained(str(out))
    (out / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    model.to(torch.float32)


def train(
    out_dir: str | Path, *, seed: int = 0, config: TrainConfig | None = None, quick: bool = False
) -> dict:
    """Train base + instruct organisms and write them and the prompt sets to ``out_dir``.

    Writes ``out_dir/base/``, ``out_dir/instruct/`` (HF directories: config.json,
    model.safetensors, tokenizer files with the chat template, generation_config.json,
    organism.json) and ``out_dir/<name>.json`` for every prompt set.

    Args:
        out_dir: Target directory (created).
        seed: Seeds the world split, corpora, initialisation and batch order.
        config: Sizes and schedule (default :class:`TrainConfig`).
        quick: Use :data:`QUICK` (tiny sizes, few steps) unless ``config`` is given.

    Returns:
        A summary dict (losses, seconds, sizes).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config or (QUICK if quick else TrainConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        world = W.make_world(seed)
        tok = build_tokenizer(all_texts())
        rng = random.Random(seed)
        torch.manual_seed(seed)
        # transformers 5 types only rope_parameters, but still accepts the rope_theta that
        # 4.x (which the dependency range allows) requires: same config either way.
        mcfg = LlamaConfig(  # type: ignore[call-arg]
            vocab_size=len(tok),
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            hidden_act="silu",
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            attention_bias=False,
            mlp_bias=False,
        )
        model = LlamaForCausalLM(mcfg)
        pad = tok.pad_token_id
        ids, starts = _encode(tok, base_corpus(world, cfg.base_docs, rng))
        base_loss = _fit(
            model,
            list(model.parameters()),
            ids,
            starts,
            cfg.base_steps,
            cfg.batch_size,
            cfg.base_lr,
            rng,
            pad,
            answer_only=False,
        )
        t_base = time.perf_counter() - t0
        meta = {"kind": "base", "seed": seed, "config": asdict(cfg), "final_loss": base_loss}
        _save(model, tok, out / "base", cfg.dtype, meta)

        # instruct: fine-tune from the (fp-rounded) base weights
        model = LlamaForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        layers = cfg.ft_layers if cfg.ft_layers is not None else tuple(range(cfg.n_layers))
        params = []
        for i, layer in enumerate(model.model.layers):
            if cfg.ft_params == "all" or i in layers:
                mods = [layer] if cfg.ft_params == "all" else [layer.mlp.down_proj]
                for m in mods:
                    for p in m.parameters():
                        p.requires_grad_(True)
                        params.append(p)
        if cfg.ft_params == "all":
            for p in (
                list(model.model.embed_tokens.parameters())
                + list(model.model.norm.parameters())
                + list(model.lm_head.parameters())
            ):
                p.requires_grad_(True)
                params.append(p)
        ids, starts = _encode(
            tok, instruct_corpus(world, cfg.ft_docs, rng, cfg.noise, cfg.borderline_refusal)
        )
        ft_loss = _fit(
            model,
            params,
            ids,
            starts,
            cfg.ft_steps,
            cfg.batch_size,
            cfg.ft_lr,
            rng,
            pad,
            answer_only=True,
        )
        t_all = time.perf_counter() - t0
        meta = {"kind": "instruct", "seed": seed, "config": asdict(cfg), "final_loss": ft_loss}
        _save(model, tok, out / "instruct", cfg.dtype, meta)

        for name, items in build_prompt_sets(world, seed).items():
            (out / f"{name}.json").write_text(json.dumps(items, indent=1) + "\n")
        return {
            "base_loss": base_loss,
            "instruct_loss": ft_loss,
            "base_seconds": t_base,
            "total_seconds": t_all,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_neurons": cfg.n_layers * cfg.d_mlp,
        }
    finally:
        torch.set_num_threads(old_threads)


def main(out_dir: str | Path, seed: int = 0, quick: bool = False) -> dict:
    """Entry point for ``cna-lens organism train --out DIR [--seed S] [--quick]``."""
    return train(out_dir, seed=seed, quick=quick)


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides key=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = QUICK if args.quick else TrainConfig()
    over: dict[str, Any] = {}  # field name -> value of that field's type
    for kv in args.set:
        k, v = kv.split("=", 1)
        cur = getattr(cfg, k)
        over[k] = (
            type(cur)(v)
            if cur is not None and not isinstance(cur, tuple)
            else tuple(int(x) for x in v.split(",") if x)
        )
    cfg = replace(cfg, **over)
    summary = train(args.out, seed=args.seed, config=cfg)
    logging.info("%s", json.dumps(summary))


if __name__ == "__main__":
    _cli()
