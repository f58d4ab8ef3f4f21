"""GGUF out, verified by llama.cpp: the exported file refuses as the hooked model does.

    python benchmarks/gguf_llamacpp.py [--model zoo:qwen2.5-coder-0.5b-instruct]
        [--steering S.json] [--method auto|up|down] [--n 20] [--tokens 32] --out DIR

1. The steering: ``--steering`` (e.g. the tuner's ``steering.json``), or the paper code's
   ``top_k=1600`` at m = 0 (scale, both signs), discovered on the shipped discovery sets.
2. ``cna_lens.export_gguf`` folds it into a copy of the source GGUF (timed; sizes).
3. The held-out prompts (``--n`` harmful + ``--n`` benign: the categories the tuner does not
   search on) are generated greedily, ``--tokens`` new tokens:
   * in cna_lens, from the source GGUF (dequantised, float32), unsteered and hooked-steered;
   * in llama.cpp (``llama-cpp-python``), the source file and the exported file, fed
     cna_lens's own token ids (no re-tokenisation), one prompt at a time, argmax.
4. Refusal labels (cna_lens's classifier on every text). Reported: the refusal rates, the
   agreement of llama.cpp-unsteered with cna_lens-unsteered (the floor: llama.cpp computes
   with 8-bit activations, so even the same weights differ a little) and of
   llama.cpp-exported with cna_lens-hooked. Passes when the second is within 5 points of the
   first. Also checks that every tensor the export did not change is byte-identical to the
   source.

``llama-cpp-python`` is built from its PyPI sdist when it is not installed (about 5 minutes
on 2 cores): ``CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INSTALL = (
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 '
    "pip install llama-cpp-python==0.3.36"
)


def ensure_llama_cpp(build: bool) -> Any:
    """The ``llama_cpp`` module, built from the sdist first when ``build`` and absent."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        if not build:
            raise SystemExit(f"llama-cpp-python is not installed: {INSTALL}") from None
        env = {
            **os.environ,
            "CMAKE_ARGS": "-DLLAVA_BUILD=OFF",
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        }
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "llama-cpp-python==0.3.36"],
            check=True,
            env=env,
        )
        import llama_cpp
    return llama_cpp


class LlamaCpp:
    """Greedy decoding in llama.cpp from given token ids (one prompt at a time)."""

    def __init__(self, path: Path, stop: list[int], threads: int = 2):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
        self.stop = set(stop)

    def _last_logits(self) -> Any:
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        """New token ids, up to (excluding) the first stop token."""
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new):
            tok = int(self._last_logits().argmax())
            if tok in self.stop:
                break
            out.append(tok)
            self.llm.eval([tok])
        return out

    def close(self) -> None:
        self.llm.close()
        del self.llm  # collected now, not at interpreter exit (where its __del__ fails)


def _steering(model: Any, path: str | None) -> Any:
    import cna_lens as cl
    from cna_lens.evaluation import prompts as ps

    if path:
        return cl.Steering.load(path)
    circuit = cl.discover(
        model, ps.prompts("discovery_harmful"), ps.prompts("discovery_benign"), top_k=1600
    )
    return cl.Steering(circuit=circuit, multiplier=0.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import cna_lens as cl
    from cna_lens.evaluation import prompts as ps
    from cna_lens.evaluation.metrics import is_refusal
    from cna_lens.generation.decoding import eos_ids
    from cna_lens.models.loading import encode_prompts
    from cna_lens.models.names import resolve_model
    from cna_lens.steering.gguf_export import tensor_bytes

    ensure_llama_cpp(args.build)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model(args.model))
    model = cl.load_model(source, device="cpu")
    steering = _steering(model, args.steering)
    steering.save(out_dir / "steering.json")

    began = time.perf_counter()
    exported = cl.export_gguf(source, steering, out_dir / "steered.gguf", method=args.method)
    export_seconds = time.perf_counter() - began

    harmful = ps.split_by_category("eval_harmful")[1][: args.n]
    benign = ps.split_by_category("eval_benign")[1][: args.n]
    prompts = harmful + benign
    gens = cl.generate_many(
        model, prompts, [None, steering], backend="fast", max_new_tokens=args.tokens, batch_size=8
    )
    ids = encode_prompts(model, prompts)
    stop = eos_ids(model)
    texts: dict[str, list[str]] = {"cna_unsteered": gens.texts[0], "cna_hooked": gens.texts[1]}
    seconds: dict[str, float] = {}
    for label, path in (("llama_unsteered", source), ("llama_exported", exported.path)):
        began = time.perf_counter()
        llm = LlamaCpp(path, stop, threads=args.threads)
        try:
            rows = [llm.greedy(seq, args.tokens) for seq in ids]
        finally:
            llm.close()
        seconds[label] = time.perf_counter() - began
        texts[label] = [model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    labels = {k: [bool(is_refusal(t)) for t in v] for k, v in texts.items()}
    n = len(harmful)

    def rate(key: str, part: slice) -> float:
        vals = labels[key][part]
        return sum(vals) / len(vals)

    def agree(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(labels[a], labels[b], strict=True)) / len(prompts)

    source_tensors = {name: (kind, data) for name, kind, data in tensor_bytes(source)}
    new_tensors = {name: (kind, data) for name, kind, data in tensor_bytes(exported.path)}
    untouched = [name for name in source_tensors if name not in exported.tensors]
    identical = all(new_tensors[name] == source_tensors[name] for name in untouched)
    floor, steered = (
        agree("llama_unsteered", "cna_unsteered"),
        agree("llama_exported", "cna_hooked"),
    )
    result = {
        "model": args.model,
        "steering": {"neurons": len(steering.circuit), "multiplier": steering.multiplier},
        "method": exported.method,
        "changed_tensors": exported.tensors,
        "source_bytes": exported.source_bytes,
        "exported_bytes": exported.bytes,
        "export_seconds": round(export_seconds, 1),
        "untouched_tensors": len(untouched),
        "untouched_byte_identical": identical,
        "prompts": {"harmful": n, "benign": len(benign)},
        "refusal": {k: rate(k, slice(0, n)) for k in labels},
        "over_refusal": {k: rate(k, slice(n, None)) for k in labels},
        "agreement_unsteered": floor,
        "agreement_steered": steered,
        "passes": identical and steered >= floor - 0.05,
        "llama_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "tokens": args.tokens,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    with (out_dir / "texts.jsonl").open("w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, **{k: v[i] for k, v in texts.items()}}) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steering", default=None, help="a steering file (default: top_k=1600, m=0)")
    ap.add_argument("--method", default="auto", choices=["auto", "up", "down"])
    ap.add_argument("--n", type=int, default=20, help="held-out prompts per set")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-build", dest="build", action="store_false")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k != "changed_tensors"}, indent=1))
    return res


if __name__ == "__main__":
    main()
