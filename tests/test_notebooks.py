"""The notebooks: each runs top to bottom, headless (nbclient), offline, in quick mode
(KERAS_SPLIT_QUICK=1 shrinks epochs and samples; KERAS_SPLIT_OFFLINE=1 means no
download is even attempted, so they fall back to the shipped data); and every
notebook in git has its outputs stripped and a Colab badge pointing at itself.

Times in quick mode on 2 shared cores (kernel start and TensorFlow import
included): quickstart ~15 s, several modalities ~20 s, many hospitals ~40 s and the
phone ~20 s run by default; privacy ~40 s and deployment ~70 s (two server
processes, two command-line clients) are marked slow (`pytest -m slow
tests/test_notebooks.py`).
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
SLOW = {"04_privacy", "06_deployment"}
BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/"
                   r"colab-badge\.svg\)\]\(https://colab\.research\.google\.com/github/"
                   r"(?P<repo>[^/]+/[^/]+)/blob/main/notebooks/(?P<name>[^)]+)\.ipynb\)")

pytestmark = pytest.mark.filterwarnings(
    # jupyter_client and its dependencies warn about their own configuration
    # (paths, event loops) when a kernel starts; not ours.
    "ignore::DeprecationWarning:jupyter_client.*",
    "ignore::DeprecationWarning:jupyter_core.*",
    "ignore::DeprecationWarning:zmq.*",
    "ignore::RuntimeWarning:zmq.*",
)


def test_the_six_notebooks_are_there():
    assert NAMES == ["01_quickstart", "02_many_hospitals", "03_several_modalities",
                     "04_privacy", "05_the_phone", "06_deployment"]


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_stripped_and_the_badge_opens_this_notebook(name):
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    cells = notebook["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name} cell {index} has outputs: strip them"
            assert cell["execution_count"] is None, f"{name} cell {index} has a count"
    first = "".join(cells[0]["source"])
    match = BADGE.search(first)
    assert cells[0]["cell_type"] == "markdown" and match, f"{name}: no Colab badge at the top"
    assert match["name"] == name
    setup = "".join(cells[1]["source"])
    # The first code cell installs the project, on Colab only, from the same repository.
    assert cells[1]["cell_type"] == "code" and '"google.colab" in sys.modules' in setup
    assert f'GITHUB_REPOSITORY = "{match["repo"]}"' in setup and "pip" in setup
    assert "KERAS_SPLIT_QUICK" in "".join(cells[2]["source"])


def _run(name, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("KERAS_SPLIT_QUICK", "1")
    monkeypatch.setenv("KERAS_SPLIT_OFFLINE", "1")
    monkeypatch.setenv("KERAS_SPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") or "".join(
                output.get("data", {}).get("text/plain", "")))
    return notebook, "\n".join(text)


def _images(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in NAMES])
def test_notebook_runs_offline_in_quick_mode(name, tmp_path, monkeypatch):
    notebook, text = _run(name, tmp_path, monkeypatch)
    assert _images(notebook) >= 1, f"{name} drew no figure"
    assert "Traceback" not in text
    if name != "06_deployment":  # which trains on the shipped X-rays by design
        # Offline, the notebooks fall back to the shipped X-rays and say so.
        assert "using the shipped balanced PneumoniaMNIST subset" in text
