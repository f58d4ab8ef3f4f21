"""GGUF out: fold a ``scale`` steering into a llama.cpp model file, everything else untouched.

Scaling neuron ``j``'s activation at every position by ``m`` is exactly scaling, in the
weights,

* **row j of the up projection** (``blk.L.ffn_up.weight``, and its bias), when the MLP is
  gated (``act(gate) * up``: Llama, Qwen, Gemma, Mistral): each quantisation block of that
  tensor lies inside one neuron's row and stores its values as ``scale * integer`` (plus
  ``min * integer`` for the ``_1`` and K types), so multiplying the block's scales by ``m``
  scales the row. Only those few bytes change; the tensor keeps its type and size. Exact
  for ``m = 0`` and powers of two (the scales are fp16: other ``m`` round them by at most
  2^-11 relatively).
* **column j of the down projection** (``blk.L.ffn_down.weight``), for any MLP: the tensor
  is dequantised, its columns scaled, and written again as ``Q8_0``, ``F16`` or ``F32``
  (K-quants cannot be re-encoded by the ``gguf`` package; the type the package can encode
  faithfully is kept where it can).

``method="auto"`` takes the up projection where it is gated and its type's block layout is
known, else the down projection. Every metadata key and every other tensor is copied byte
for byte; keys under ``cna_lens.`` record the steering, the circuit's provenance, the
source file and what was changed.

A Hugging Face directory or bridge is exported through llama.cpp's converter
(``convert_hf_to_gguf.py``, in a llama.cpp checkout or the llama-cpp-python sdist under
``vendor/llama.cpp/``; no pip package installs it): the steered HF directory is written
first (:func:`cna_lens.export_steered`), then converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cna_lens._validate import check_choice
from cna_lens._version import __version__
from cna_lens.errors import CNAError
from cna_lens.models.gguf import gguf_info, resolve_gguf
from cna_lens.steering.bake import export_steered
from cna_lens.steering.interventions import BAKEABLE, Steering

__all__ = ["BLOCK_SCALES", "GGUFExport", "export_gguf", "scale_rows"]

Method = Literal["auto", "up", "down"]

# Where the fp16 scale fields sit in one block of each type: (block bytes, offsets of the
# fields that multiply every value of the block). value = d * q (+ min * q' for _1 / K).
BLOCK_SCALES: dict[str, tuple[int, tuple[int, ...]]] = {
    "Q4_0": (18, (0,)),
    "Q4_1": (20, (0, 2)),
    "Q5_0": (22, (0,)),
    "Q5_1": (24, (0, 2)),
    "Q8_0": (34, (0,)),
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}
"""Quantised types whose blocks can be scaled in place, with their layouts."""

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: The new file.
        method: "up" (block scales of ``ffn_up`` rows) or "down" (``ffn_down`` columns).
        tensors: The tensors that changed, with their type in the new file.
        source_bytes, bytes: Sizes of the source and the new file.
    """

    path: Path
    method: str
    tensors: dict[str, str]
    source_bytes: int
    bytes: int


def _gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError as exc:
        raise CNAError("writing .gguf files needs the gguf package: pip install gguf") from exc
    return gguf


def check_foldable(steering: Any) -> Steering:
    """``steering`` if it folds into weights: a :class:`Steering` with a ``"scale"``
    intervention at every position.

    Raises:
        CNAError: anything else (the message says what would fold).
    """
    what = (
        "only a cna_lens Steering with intervention='scale' and positions='all' folds into weights"
    )
    if not isinstance(steering, Steering):
        raise CNAError(
            f"{what}; got {type(steering).__name__} (CAA and other conditions need hooks)"
        )
    if steering.intervention not in BAKEABLE:
        raise CNAError(f"{what}; got intervention={steering.intervention!r}")
    if steering.positions != "all":
        raise CNAError(f"{what}; got positions={steering.positions!r}")
    return steering


def scale_rows(data: np.ndarray, type_name: str, scales: np.ndarray) -> np.ndarray:
    """A copy of one tensor's raw data with row ``j`` scaled by ``scales[j]``.

    Args:
        data: The tensor as the ``gguf`` reader gives it: ``[rows, values]`` for float types,
            ``[rows, bytes]`` for quantised ones (rows = the neurons of an up projection).
        type_name: Its GGML type name ("Q5_0", "F16", ...).
        scales: One multiplier per row.

    Raises:
        CNAError: a type whose block layout is unknown, or a scale that overflows fp16.
    """
    out = np.array(data, copy=True)
    rows = np.nonzero(scales != 1.0)[0]
    if type_name in FLOAT_TYPES:
        if type_name == "BF16":  # stored as uint16: scale through float32
            as_f32 = (out[rows].astype(np.uint32) << 16).view(np.float32) * scales[rows, None]
            out[rows] = (as_f32.view(np.uint32) >> 16).astype(np.uint16)
        else:
            out[rows] = (out[rows] * scales[rows, None].astype(out.dtype)).astype(out.dtype)
        return out
    if type_name not in BLOCK_SCALES:
        raise CNAError(f"cannot scale blocks of type {type_name}; known: {sorted(BLOCK_SCALES)}")
    size, offsets = BLOCK_SCALES[type_name]
    blocks = out.reshape(out.shape[0], -1, size)
    for off in offsets:
        field = blocks[:, :, off : off + 2].copy().view(np.float16)[..., 0]  # [rows, blocks]
        scaled = field[rows].astype(np.float32) * scales[rows, None]
        if not np.isfinite(scaled.astype(np.float16)).all():
            raise CNAError(f"a multiplier overflows the fp16 block scales of a {type_name} tensor")
        field[rows] = scaled.astype(np.float16)
        blocks[:, :, off : off + 2] = field[..., None].view(np.uint8).reshape(*field.shape, 2)
    return blocks.reshape(out.shape)


def _layer_scales(steering: Steering) -> dict[int, np.ndarray]:
    return {layer: v.numpy().astype(np.float32) for layer, v in steering.scale_vectors().items()}


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _plan(reader: Any, steering: Steering, method: str) -> tuple[str, dict[str, Any]]:
    """(method, tensor name -> new data and type)."""
    gguf = _gguf()
    tensors = _tensors(reader)
    scales = _layer_scales(steering)
    gated = all(f"blk.{layer}.ffn_gate.weight" in tensors for layer in scales)
    up_ok = all(
        tensors.get(f"blk.{layer}.ffn_up.weight") is not None
        and tensors[f"blk.{layer}.ffn_up.weight"].tensor_type.name in (*FLOAT_TYPES, *BLOCK_SCALES)
        for layer in scales
    )
    if method == "up" and not (gated and up_ok):
        raise CNAError(
            "method='up' needs a gated MLP (blk.L.ffn_gate.weight) whose ffn_up type has a known "
            f"block layout ({sorted(BLOCK_SCALES)} or a float type); use method='down'"
        )
    chosen = "up" if method == "up" or (method == "auto" and gated and up_ok) else "down"
    plan: dict[str, Any] = {}
    for layer, vec in scales.items():
        if chosen == "up":
            up = tensors[f"blk.{layer}.ffn_up.weight"]
            plan[up.name] = (
                scale_rows(np.asarray(up.data), up.tensor_type.name, vec),
                up.tensor_type,
            )
            bias = tensors.get(f"blk.{layer}.ffn_up.bias")
            if bias is not None:  # a float vector, one entry per neuron
                values = np.asarray(bias.data)
                plan[bias.name] = ((values * vec).astype(values.dtype), bias.tensor_type)
        else:
            name = f"blk.{layer}.ffn_down.weight"
            t = tensors.get(name)
            if t is None:
                raise CNAError(f"the file has no {name} to fold layer {layer} into")
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # [d_model, d_ff]
            values = values * vec[None, :]
            plan[name] = _encode(gguf, values, t.tensor_type)
    return chosen, plan


def _encode(gguf: Any, values: np.ndarray, source_type: Any) -> tuple[np.ndarray, Any]:
    """Values in a type llama.cpp reads: the source's type when the gguf package encodes it
    faithfully (Q8_0, Q4_0, Q5_0, ... and the float types), else Q8_0."""
    q = gguf.GGMLQuantizationType
    if source_type in (q.F32,):
        return values.astype(np.float32), q.F32
    if source_type in (q.F16,):
        return values.astype(np.float16), q.F16
    for candidate in (source_type, q.Q8_0):
        try:
            return gguf.quants.quantize(values.astype(np.float32), candidate), candidate
        except (NotImplementedError, gguf.quants.QuantError):
            continue
    return values.astype(np.float16), q.F16


def _copy_fields(reader: Any, writer: Any) -> None:
    """Every metadata key of the source, in order, with its exact value and type."""
    gguf = _gguf()
    writer.kv_data[0].clear()  # the writer's own general.architecture: keep the source's order
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = None
        if vtype == gguf.GGUFValueType.STRING:
            value: Any = bytes(field.parts[-1])
        elif vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise CNAError(f"{name}: nested metadata arrays are not supported")
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i][0] for i in field.data]
        else:
            value = field.parts[-1][0]
        writer.kv_data[0][name] = gguf.gguf_writer.GGUFValue(value=value, type=vtype, sub_type=sub)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _record(
    writer: Any, steering: Steering, source: Path, method: str, changed: dict[str, str]
) -> None:
    writer.add_string("cna_lens.version", __version__)
    writer.add_string("cna_lens.steering", steering.to_json())
    writer.add_string("cna_lens.source", source.name)
    writer.add_string("cna_lens.source_sha256", _sha256(source))
    writer.add_string("cna_lens.method", method)
    writer.add_string("cna_lens.changed_tensors", json.dumps(changed))


def _write(
    src: Path, out: Path, steering: Steering, method: Method | str, *, fold: bool = True
) -> GGUFExport:
    """Copy ``src`` to ``out`` with the steering folded in (``fold``) and recorded."""
    gguf = _gguf()
    gguf_info(src)  # a readable GGUF of a known architecture, before any work
    reader = gguf.GGUFReader(str(src))
    _check_grid(reader, steering)
    plan: dict[str, Any] = {}
    chosen = str(method)
    if fold:
        chosen, plan = _plan(
            reader, steering, check_choice("method", method, ("auto", "up", "down"))
        )
    changed = {name: gguf.GGMLQuantizationType(t).name for name, (_, t) in plan.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), _arch(reader))
        writer.data_alignment = int(reader.alignment)
        _copy_fields(reader, writer)
        _record(writer, steering, src, chosen, changed)
        for t in reader.tensors:
            data, qtype = plan.get(t.name, (t.data, t.tensor_type))
            writer.add_tensor(t.name, np.asarray(data), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # a normal file's mode, not mkstemp's private 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, chosen, changed, src.stat().st_size, out.stat().st_size)


def _arch(reader: Any) -> str:
    return bytes(reader.fields["general.architecture"].parts[-1]).decode()


def _d_ff(reader: Any) -> int:
    value = reader.fields[f"{_arch(reader)}.feed_forward_length"].parts[-1]
    return int(np.max(value))


def _check_grid(reader: Any, steering: Steering) -> None:
    n_layers = int(reader.fields[f"{_arch(reader)}.block_count"].parts[-1][0])
    c = steering.circuit
    if (c.n_layers, c.d_mlp) != (n_layers, _d_ff(reader)):
        raise CNAError(
            f"the circuit is for [{c.n_layers}, {c.d_mlp}] neurons but the GGUF has "
            f"{n_layers} layers x {_d_ff(reader)} neurons"
        )


def export_gguf(
    source: Any,
    steering: Any,  # anything else is refused with what would fold
    out_path: str | os.PathLike[str],
    *,
    method: Method = "auto",
    converter: str | os.PathLike[str] | None = None,
) -> GGUFExport:
    """Write ``source`` with ``steering`` folded into its weights as a new GGUF file.

    Args:
        source: A ``.gguf`` file (the main path), or a HF directory / bridge (converted with
            llama.cpp's ``convert_hf_to_gguf.py``: pass ``converter`` or set
            ``CNA_LENS_GGUF_CONVERTER``).
        steering: A :class:`Steering` (or its file) with ``intervention="scale"`` and
            ``positions="all"``: per-neuron multipliers, signs respected.
        out_path: The ``.gguf`` file to write (atomically).
        method: "auto", "up" (``ffn_up`` rows, in place) or "down" (``ffn_down`` columns).

    Returns:
        What was written (:class:`GGUFExport`).

    Raises:
        CNAError: a steering that does not fold (``mean`` and other interventions,
            position-limited steering, CAA), a circuit of another shape, an unreadable
            source, or an HF source without a converter.
    """
    check_choice("method", method, ("auto", "up", "down"))
    if isinstance(steering, (str, os.PathLike)):
        steering = Steering.load(steering)
    steering = check_foldable(steering)
    out = Path(out_path).expanduser()
    if out.suffix.lower() != ".gguf":
        raise CNAError(f"out_path must end in .gguf, got {str(out)!r}")
    src = (
        resolve_gguf(source)
        if isinstance(source, (str, os.PathLike)) and Path(source).exists()
        else None
    )
    if src is not None:
        return _write(src, out, steering, method)
    return _from_hf(source, steering, out, converter)


def _from_hf(source: Any, steering: Steering, out: Path, converter: Any) -> GGUFExport:
    """The HF path: the steered HF directory, converted by llama.cpp's converter."""
    script = converter or os.environ.get("CNA_LENS_GGUF_CONVERTER")
    if not script or not Path(script).is_file():
        raise CNAError(
            "exporting a Hugging Face model to GGUF needs llama.cpp's convert_hf_to_gguf.py "
            "(in a llama.cpp checkout, or the llama-cpp-python sdist under vendor/llama.cpp/; "
            "no pip package installs it): pass converter=PATH or set CNA_LENS_GGUF_CONVERTER. "
            "From a .gguf source no converter is needed"
        )
    with tempfile.TemporaryDirectory() as tmp:
        steered = export_steered(source, steering, None, Path(tmp) / "steered")
        raw = Path(tmp) / "steered.gguf"
        cmd = [sys.executable, str(script), str(steered), "--outfile", str(raw), "--outtype", "f32"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CNAError(f"convert_hf_to_gguf.py failed: {done.stderr.strip()[-500:]}")
        return _write(raw, out, steering, "converted from the steered HF directory", fold=False)


def tensor_bytes(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, bytes]]:
    """(name, type, raw bytes) of every tensor of a GGUF file (for comparisons)."""
    reader = _gguf().GGUFReader(str(path))
    for t in reader.tensors:
        yield t.name, t.tensor_type.name, np.asarray(t.data).tobytes()
