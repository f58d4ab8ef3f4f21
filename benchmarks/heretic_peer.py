"""heretic (``heretic-llm``, AGPL) as a peer: installed into its own venv, run as a program.

Nothing of heretic is imported or copied here. This module makes a venv with the CPU torch
and heretic, writes heretic's ``config.toml`` pointing at local copies of the benchmark's own
prompts, runs the ``heretic`` program with stdin/stdout pipes and answers its menus (with
``KAGGLE_KERNEL_RUN_TYPE`` set, every heretic menu is a numbered list read with ``input()``),
saves the model of the chosen trial, and reads the per-trial results from heretic's Optuna
journal. A run directory that already holds a finished run with the same config is reused,
so a benchmark can be resumed.

Used by ``benchmarks/peers.py``; runnable alone to start the (long) heretic stage early:

    python benchmarks/heretic_peer.py --model-dir HF_DIR --run DIR --good-prompts G.txt \
        --bad-prompts B.txt --good-eval E.txt --bad-eval F.txt --trials 50
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

VENV = Path(
    os.environ.get("CNA_LENS_HERETIC_VENV", Path.home() / ".cache" / "cna_lens" / "heretic-venv")
)
MENU_LINE = re.compile(r"^\[(\d+)\] (.*)$")
TRIAL_TITLE = re.compile(
    r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.eE+-]+|nan|inf)"
)


class HereticError(RuntimeError):
    """heretic is missing, failed, or ran out of time (the benchmark row says why)."""


def install(venv: Path = VENV, log: Path | None = None) -> Path:
    """The venv's ``heretic`` program, installing torch==2.13.0 (CPU) and heretic-llm first."""
    exe = venv / "bin" / "heretic"
    if exe.is_file():
        return exe
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out
        )
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True, stdout=out, stderr=out)
        subprocess.run([*pip, "heretic-llm"], check=True, stdout=out, stderr=out)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise HereticError(f"could not install heretic-llm into {venv}: {exc}") from exc
    if not exe.is_file():
        raise HereticError(f"heretic-llm installed but {exe} is missing")
    return exe


def version(venv: Path = VENV) -> str:
    py = venv / "bin" / "python"
    code = "from importlib.metadata import version; print(version('heretic-llm'))"
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()


def config_text(
    model_dir: Path,
    prompts: dict[str, Path],
    *,
    trials: int,
    startup: int,
    max_tokens: int,
    batch_size: int,
    system_prompt: str | None,
    seed: int = 1234,
) -> str:
    """heretic's config.toml: local prompt files (one prompt per line), float32 on the CPU,
    an explicit batch size, ``n_startup_trials < n_trials``, the merged model on export."""
    if not 0 < startup < trials:
        raise ValueError(f"need 0 < n_startup_trials < n_trials, got {startup}, {trials}")
    lines = [
        f'model = "{model_dir}"',
        'dtypes = ["float32"]',
        'device_map = "cpu"',
        f"batch_size = {batch_size}",
        f"max_response_length = {max_tokens}",
        f"n_trials = {trials}",
        f"n_startup_trials = {startup}",
        f"seed = {seed}",
        'export_strategy = "merge"',
        'study_checkpoint_dir = "checkpoints"',
        'response_prefix = ""',
    ]
    if system_prompt is not None:
        lines.append(f"system_prompt = {json.dumps(system_prompt)}")
    for table in (
        "good_prompts",
        "bad_prompts",
        "good_evaluation_prompts",
        "bad_evaluation_prompts",
    ):
        lines += ["", f"[{table}]", f'dataset = "{prompts[table]}"']
    return "\n".join(lines) + "\n"


def _pick(options: list[tuple[str, str]], text: str) -> str:
    for num, title in options:
        if title.startswith(text):
            return num
    raise HereticError(f"heretic menu has no option {text!r}: {options}")


def _choose(options: list[tuple[str, str]]) -> tuple[str, int, int, float]:
    """The Pareto trial with the fewest refusals (ties: lowest KL), as heretic lists them."""
    trials = []
    for num, title in options:
        m = TRIAL_TITLE.search(title)
        if m:
            trials.append((num, int(m.group(1)), int(m.group(2)), float(m.group(4))))
    if not trials:
        raise HereticError(f"no trial in heretic's menu: {options}")
    return min(trials, key=lambda t: (t[2], t[3]))


def _answer(
    options: list[tuple[str, str]], saved: bool, chosen: list[Any], resume: bool, extra: list[int]
) -> str:
    titles = [t for _, t in options]
    if any(t.startswith("Ignore the previous run") for t in titles):
        for keep in ("Continue the previous run", "Show the results from the previous run"):
            if resume and any(t.startswith(keep) for t in titles):
                return _pick(options, keep)
        return _pick(options, "Ignore the previous run")
    if any(t.startswith("Run additional trials") for t in titles):
        if saved:
            return _pick(options, "Exit program")
        if extra[0] > 0:  # a finished study short of complete trials: top it up first
            return _pick(options, "Run additional trials")
        chosen[:] = list(_choose(options))
        return str(chosen[0])
    if any(t.startswith("Save the model to a local folder") for t in titles):
        return _pick(options, "Return to the trial selection menu" if saved else "Save the model")
    if any(t.startswith("Merge the abliteration LoRA") for t in titles):
        return _pick(options, "Merge the abliteration LoRA")
    raise HereticError(f"unknown heretic menu {options}")


def run(
    exe: Path,
    workdir: Path,
    save: Path,
    *,
    timeout: float,
    resume: bool = False,
    extra_trials: int = 0,
) -> dict[str, Any]:
    """Run heretic in ``workdir`` (its ``config.toml``), answer its menus, save the chosen
    trial's merged model to ``save``; return the chosen trial and the wall time. ``resume``
    continues an interrupted study found in ``workdir/checkpoints`` (heretic's own menu);
    ``extra_trials`` runs that many more trials of a finished study first."""
    env = dict(
        os.environ,
        KAGGLE_KERNEL_RUN_TYPE="Batch",
        COLUMNS="250",
        TERM="dumb",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
    )
    log = open(workdir / "heretic.log", "a" if resume else "w")
    proc = subprocess.Popen(
        [str(exe)],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    options: list[tuple[str, str]] = []
    chosen: list[Any] = []
    pending, saved, t0 = "", False, time.time()
    extra = [extra_trials]
    try:
        while True:
            if time.time() - t0 > timeout:
                raise HereticError(f"heretic ran past its time budget of {timeout / 60:.0f} min")
            ready, _, _ = select.select([proc.stdout.fileno()], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text = chunk.decode("utf-8", "replace")
            log.write(text)
            log.flush()
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                m = MENU_LINE.match(line.strip())
                if m:
                    options.append((m.group(1), m.group(2)))
                saved = saved or line.startswith("Model saved to")
            answer = None
            if pending.endswith("Enter number: "):
                answer, options = _answer(options, saved, chosen, resume, extra), []
            elif pending.endswith("How many additional trials do you want to run?: "):
                answer, extra[0] = str(extra[0]), 0
            elif pending.endswith("Path to the folder:: "):
                answer = str(save.resolve())
            elif pending.endswith(("? (y/N) ", "[y/N]: ")):
                answer = "n"
            if answer is not None:
                log.write(f"<<< {answer}\n")
                proc.stdin.write((answer + "\n").encode())
                proc.stdin.flush()
                pending = ""
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    rc = proc.wait()
    if not saved:
        raise HereticError(
            f"heretic exited with status {rc} before saving a model (see {workdir}/heretic.log)"
        )
    return {
        "chosen_trial": chosen[1] if chosen else None,
        "wall_seconds": round(time.time() - t0, 1),
    }


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _journal(workdir: Path) -> Iterator[dict[str, Any]]:
    """The operations of heretic's Optuna journal (JSON lines), in order."""
    for journal in sorted((workdir / "checkpoints").glob("*.jsonl")):
        for line in journal.read_text().splitlines():
            yield json.loads(line)


def trials(workdir: Path) -> list[dict[str, Any]]:
    """Per-trial refusals and KL from heretic's Optuna journal (a JSON-lines file)."""
    out: dict[int, dict[str, Any]] = {}
    next_id = 0
    for op in _journal(workdir):
        if op["op_code"] == 4:  # create a trial
            out[next_id] = {"params": {}}
            next_id += 1
        elif op["op_code"] == 5:
            out[op["trial_id"]]["params"][op["param_name"]] = op["param_value_internal"]
        elif op["op_code"] == 6:
            out[op["trial_id"]].update(state=op["state"], values=op.get("values"))
        elif op["op_code"] == 8:
            out[op["trial_id"]].update(op["user_attr"])
    return [t for t in out.values() if t.get("state") == 1]  # complete trials


def trial_seconds(workdir: Path) -> float:
    """Seconds heretic spent in its trials (journal start/complete times), summed: the
    search's cost even when an interrupted study was continued in a later process."""
    starts: dict[int, datetime] = {}
    total, next_id = 0.0, 0
    for op in _journal(workdir):
        if op["op_code"] == 4:
            starts[next_id] = datetime.fromisoformat(op["datetime_start"])
            next_id += 1
        elif op["op_code"] == 6 and op.get("datetime_complete") and op["trial_id"] in starts:
            done = datetime.fromisoformat(op["datetime_complete"])
            total += (done - starts[op["trial_id"]]).total_seconds()
    return round(total, 1)


def heretic_stage(
    model_dir: Path,
    run_dir: Path,
    prompts: dict[str, list[str]],
    *,
    trials_n: int = 50,
    startup: int = 15,
    max_tokens: int = 32,
    batch_size: int = 40,
    system_prompt: str | None = None,
    timeout: float = 3 * 3600,
) -> dict[str, Any]:
    """Run heretic once (or reuse a finished run with the same config) and return its record:
    the saved model's directory, the chosen trial, every trial's refusals and KL, times."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for table, lines in prompts.items():
        path = run_dir / f"{table}.txt"
        path.write_text("".join(p.replace("\n", " ") + "\n" for p in lines))
        files[table] = path.resolve()
    text = config_text(
        model_dir,
        files,
        trials=trials_n,
        startup=startup,
        max_tokens=max_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
    )
    record_path = run_dir / "record.json"
    extra = 0
    if record_path.is_file() and (run_dir / "config.toml").read_text() == text:
        record = json.loads(record_path.read_text())
        extra = trials_n - len(trials(run_dir))  # a trial lost to an interruption
        if Path(record["model"]).is_dir() and extra <= 0:
            return record  # a finished run of the same config: reused
    lock = run_dir / "running.pid"
    if lock.is_file() and _alive(int(lock.read_text().strip() or 0)):
        raise HereticError(
            f"another heretic run is in progress in {run_dir} (pid {lock.read_text().strip()}); "
            "wait for it (its record is reused when it has the same config)"
        )
    exe = install(log=run_dir / "install.log")
    config = run_dir / "config.toml"
    resume = config.is_file() and config.read_text() == text and bool(trials(run_dir))
    if not resume and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")  # another config's study: start afresh
    resumed_after = len(trials(run_dir)) if resume else 0
    config.write_text(text)
    save = run_dir / "model"
    lock.write_text(str(os.getpid()))
    try:
        result = run(exe, run_dir, save, timeout=timeout, resume=resume, extra_trials=extra)
    finally:
        lock.unlink(missing_ok=True)
    record = {
        "model": str(save.resolve()),
        "heretic_version": version(),
        **result,
        "n_trials": trials_n,
        "n_startup_trials": startup,
        "resumed_after_trials": resumed_after,
        "trial_seconds": trial_seconds(run_dir),
        "trials": trials(run_dir),
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--run", required=True)
    for name in ("good-prompts", "bad-prompts", "good-eval", "bad-eval"):
        ap.add_argument(f"--{name}", required=True, help="one prompt per line")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--startup", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--system-prompt", default=None)
    a = ap.parse_args()
    read = lambda p: Path(p).read_text().splitlines()  # noqa: E731
    prompts = {
        "good_prompts": read(a.good_prompts),
        "bad_prompts": read(a.bad_prompts),
        "good_evaluation_prompts": read(a.good_eval),
        "bad_evaluation_prompts": read(a.bad_eval),
    }
    record = heretic_stage(
        Path(a.model_dir).resolve(),
        Path(a.run),
        prompts,
        trials_n=a.trials,
        startup=a.startup,
        max_tokens=a.max_tokens,
        batch_size=a.batch_size,
        system_prompt=a.system_prompt,
    )
    print(json.dumps({k: v for k, v in record.items() if k != "trials"}, indent=1))


if __name__ == "__main__":
    _main()
