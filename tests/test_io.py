"""io: atomic, collision-safe writes; output paths checked before any work."""

from __future__ import annotations

import json
import os
import threading

import pytest

from cna_lens import CNAError
from cna_lens.io import atomic_write_text, check_out_dir, check_writable_file


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text("old")
    own_tmp = tmp_path / "c.json.tmp"
    own_tmp.write_text("the user's own file")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CNAError, match="No space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert own_tmp.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.tmp"]


def test_write_to_a_directory_is_refused(tmp_path):
    with pytest.raises(CNAError, match="is a directory"):
        atomic_write_text(tmp_path, "x")


def test_concurrent_writers_and_readers_see_whole_files(tmp_path):
    path = tmp_path / "shared.json"
    atomic_write_text(path, json.dumps({"writer": -1, "i": -1, "pad": "x" * 5000}))
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(25):
                atomic_write_text(path, json.dumps({"writer": w, "i": i, "pad": "x" * 5000}))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    reads = []

    def read() -> None:
        try:
            while not stop.is_set():
                reads.append(json.loads(path.read_text())["pad"] == "x" * 5000)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert reads and all(reads)
    assert json.loads(path.read_text())["i"] == 24
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_check_writable_file(tmp_path):
    assert check_writable_file(tmp_path / "new" / "deeper" / "c.json")
    with pytest.raises(CNAError, match="is a directory"):
        check_writable_file(tmp_path)
    (tmp_path / "f.jsonl").write_text("")
    with pytest.raises(CNAError, match="is a file, not a directory"):
        check_writable_file(tmp_path / "f.jsonl" / "under" / "out.jsonl")
    assert not (tmp_path / "new").exists()  # nothing created


def test_check_out_dir(tmp_path):
    check_out_dir(tmp_path / "missing", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty, overwrite=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(CNAError, match="not a previous cna_lens output"):
        check_out_dir(foreign, overwrite=False)
    check_out_dir(foreign, overwrite=True)
    (foreign / "summary.json").write_text('{"results": 1}')  # not written by cna_lens
    with pytest.raises(CNAError, match="overwrite=True"):
        check_out_dir(foreign, overwrite=False)
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "summary.json").write_text(json.dumps({"meta": {"package_version": "0.1.0"}}))
    (previous / "fig.png").write_bytes(b"png")
    check_out_dir(previous, overwrite=False)
    with pytest.raises(CNAError, match="is an existing file"):
        check_out_dir(previous / "fig.png", overwrite=True)
