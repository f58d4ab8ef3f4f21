"""CLI: discover writes a circuit that generate --multiplier 0 uses; errors exit 2 with a message."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import NEGATIVE, POSITIVE

import cna_lens
from cna_lens import CNAError
from cna_lens.cli import main, read_prompts


@pytest.fixture
def files(tmp_path):
    pos = tmp_path / "pos.txt"
    pos.write_text("\n".join(POSITIVE) + "\n\n")
    neg = tmp_path / "neg.json"
    neg.write_text(json.dumps(NEGATIVE))
    return tmp_path, pos, neg


def test_discover_then_generate_ablated(files, model_dirs, llama, capsys):
    tmp, pos, neg = files
    out = tmp / "circuit.json"
    rc = main(
        [
            "discover",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--top-k",
            "5",
            "--exclude-layers",
            "0",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    circuit = cna_lens.Circuit.load(out)
    assert len(circuit) == 5 and all(n.layer != 0 for n in circuit)
    assert "5 neurons" in capsys.readouterr().out
    expected = cna_lens.discover(llama, POSITIVE, NEGATIVE, top_k=5, exclude_layers=[0])
    assert circuit.labels == expected.labels

    results = tmp / "results.jsonl"
    rc = main(
        [
            "generate",
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(pos),
            "--circuit",
            str(out),
            "--multiplier",
            "0",
            "--max-new-tokens",
            "6",
            "--out",
            str(results),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == POSITIVE
    ablated = cna_lens.generate(llama, POSITIVE, circuit=circuit, multiplier=0.0, max_new_tokens=6)
    assert [r["output"] for r in rows] == ablated
    assert all(r["multiplier"] == 0.0 for r in rows)


def test_info(model_dirs, capsys):
    assert main(["info", "--model", str(model_dirs["gpt2"])]) == 0
    out = capsys.readouterr().out
    assert "MLP neurons        384" in out and "chat template      True" in out


@pytest.mark.parametrize(
    ("argv_tail", "match"),
    [
        (["--fraction", "0"], r"fraction must be in \(0, 1\]"),
        (["--fraction", "1.5"], r"fraction must be in \(0, 1\]"),
        (["--top-k", "100000"], "larger than"),
    ],
)
def test_discover_errors_exit_2(files, model_dirs, capsys, argv_tail, match):
    tmp, pos, neg = files
    rc = main(
        [
            "discover",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--out",
            str(tmp / "c.json"),
            *argv_tail,
        ]
    )
    assert rc == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)
    assert not (tmp / "c.json").exists()


def test_generate_errors_exit_2(files, model_dirs, capsys):
    tmp, pos, _ = files
    (tmp / "broken.json").write_text('{"format": "cna_lens.circuit", "neurons": [')
    rc = main(
        [
            "generate",
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(pos),
            "--circuit",
            str(tmp / "broken.json"),
            "--multiplier",
            "0",
        ]
    )
    assert rc == 2 and "corrupt or truncated" in capsys.readouterr().err
    rc = main(
        [
            "generate",
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(pos),
            "--multiplier",
            "0",
        ]
    )
    assert rc == 2 and "needs --circuit" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "a.txt") == ["one", " two "]
    (tmp_path / "b.json").write_text('{"not": "a list"}')
    with pytest.raises(cna_lens.CNAError, match="list of strings"):
        read_prompts(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('["ok", 5]')
    with pytest.raises(cna_lens.CNAError, match=r"\[1\] is int"):
        read_prompts(tmp_path / "c.json")
    (tmp_path / "d.txt").write_text("\n\n")
    with pytest.raises(cna_lens.CNAError, match="empty"):
        read_prompts(tmp_path / "d.txt")
    with pytest.raises(cna_lens.CNAError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_console_script_installed():
    exe = shutil.which("cna-lens")
    assert exe, "pip install -e . should install the cna-lens console script"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("discover", "generate", "info"):
        assert cmd in out


# ---- hardening ---------------------------------------------------------------------------


def test_discover_checks_out_before_any_forward_pass(files, model_dirs, capsys, monkeypatch):
    tmp, pos, neg = files
    import cna_lens.core.discovery

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("discover ran although --out cannot be written")

    monkeypatch.setattr(cna_lens.core.discovery, "discover", no_forward_pass)
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("x")
    for out, match in (
        (tmp / "adir", "is a directory"),
        (tmp / "afile" / "c.json", "is a file, not a directory"),
    ):
        rc = main(
            [
                "discover",
                "--model",
                str(model_dirs["llama"]),
                "--positive",
                str(pos),
                "--negative",
                str(neg),
                "--top-k",
                "3",
                "--out",
                str(out),
            ]
        )
        assert rc == 2
        assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp.iterdir()) == ["adir", "afile", "neg.json", "pos.txt"]


def test_generate_checks_out_first_and_never_loses_results(files, model_dirs, capsys, monkeypatch):
    tmp, pos, _ = files
    (tmp / "afile.jsonl").write_text("x")
    args = [
        "generate",
        "--model",
        str(model_dirs["llama"]),
        "--prompts",
        str(pos),
        "--max-new-tokens",
        "2",
    ]
    rc = main(args + ["--out", str(tmp / "afile.jsonl" / "under.jsonl")])
    assert rc == 2 and "is a file, not a directory" in capsys.readouterr().err
    # a write that fails after generation: results still reach stdout as JSON lines
    import cna_lens.io

    def broken(path, text):
        raise CNAError(f"cannot write {str(path)!r}: No space left on device")

    monkeypatch.setattr(cna_lens.cli.basic, "atomic_write_text", broken)
    rc = main(args + ["--out", str(tmp / "r.jsonl")])
    captured = capsys.readouterr()
    assert rc == 2 and "written to stdout as JSON lines" in captured.err
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == POSITIVE
    assert not (tmp / "r.jsonl").exists()


@pytest.mark.parametrize(
    ("model_args", "match"),
    [
        (["--model", "organism:bogus"], "unknown organism kind 'bogus'"),
        (["--model", ""], "model name is empty"),
        (["--model", "LLAMA", "--device", "bogus"], "unknown device 'bogus'"),
        (["--model", "nobody-xyz/not-a-model-9"], "cannot load 'nobody-xyz/not-a-model-9'"),
    ],
)
def test_bad_model_arguments_exit_2_with_a_message(model_args, match, model_dirs, capsys):
    model_args = [str(model_dirs["llama"]) if a == "LLAMA" else a for a in model_args]
    rc = main(["info", *model_args])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_a_directory_as_circuit_file_is_named_as_such(files, model_dirs, capsys):
    tmp, pos, _ = files
    rc = main(
        [
            "generate",
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(pos),
            "--circuit",
            str(tmp),
        ]
    )
    assert rc == 2 and "is a directory" in capsys.readouterr().err


def test_discover_score_and_generate_intervention_sign(files, model_dirs, llama):
    tmp, pos, neg = files
    out = tmp / "circuit.json"
    rc = main(
        [
            "discover",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--top-k",
            "6",
            "--score",
            "effect_size",
            "--no-universal-filter",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    circuit = cna_lens.Circuit.load(out)
    assert circuit == cna_lens.discover(
        llama, POSITIVE, NEGATIVE, top_k=6, score="effect_size", universal_filter=False
    )
    results = tmp / "results.jsonl"
    rc = main(
        [
            "generate",
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(pos),
            "--circuit",
            str(out),
            "--multiplier",
            "0",
            "--intervention",
            "mean",
            "--sign",
            "positive",
            "--max-new-tokens",
            "5",
            "--out",
            str(results),
        ]
    )
    assert rc == 0
    steering = cna_lens.Steering(
        circuit=circuit, intervention="mean", multiplier=0.0, sign="positive"
    )
    expected = cna_lens.generate(llama, POSITIVE, steering=steering, max_new_tokens=5)
    assert [json.loads(line)["output"] for line in results.read_text().splitlines()] == expected


def test_unknown_score_or_intervention_exit_2(files, model_dirs, capsys):
    tmp, pos, neg = files
    rc = main(
        [
            "discover",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--score",
            "cohen",
            "--out",
            str(tmp / "c.json"),
        ]
    )
    assert rc == 2 and "valid scores" in capsys.readouterr().err
