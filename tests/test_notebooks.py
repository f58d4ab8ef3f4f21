"""The documentation notebooks execute top to bottom (outputs are stripped in git)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _organism_available() -> bool:
    try:
        from cna_lens import organism

        organism.path("instruct")
        organism.path("base")
        organism.prompts("discovery_harmful")
    except Exception:  # noqa: BLE001 - any missing piece means: skip
        return False
    return True


def _run(name: str, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_outputs_are_stripped(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.parametrize(
    "name", ["01_quickstart.ipynb", "02_paper_reproduction.ipynb", "04_explore_neurons.ipynb"]
)
def test_organism_notebooks_run(name, tmp_path, monkeypatch):
    if not _organism_available():
        pytest.skip("the model organism is not built into cna_lens/organism/data")
    monkeypatch.setenv("CNA_LENS_QUICK", "1")
    _run(name, tmp_path)


def test_your_model_notebook_runs_on_a_local_model(tmp_path, monkeypatch, model_dirs):
    monkeypatch.setenv("CNA_LENS_MODEL", str(model_dirs["llama"]))
    monkeypatch.setenv("CNA_LENS_MAX_NEW_TOKENS", "4")
    _run("03_your_model.ipynb", tmp_path)


def test_your_model_notebook_defaults_to_a_model_that_loads_offline(monkeypatch):
    """The default model of 03_your_model is an installed zoo model or the organism, never a
    hub name (which cannot load offline)."""
    import cna_lens

    monkeypatch.delenv("CNA_LENS_MODEL", raising=False)
    nb = nbformat.read(NOTEBOOKS / "03_your_model.ipynb", as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    setup = first.split("model = cl.load_model")[0]  # everything before the (slow) load
    namespace: dict = {}
    exec(setup, namespace)  # noqa: S102 - the notebook's own code
    model = namespace["MODEL"]
    assert model.startswith(("zoo:", "organism:")), model
    assert Path(cna_lens.resolve_model(model)).exists()
