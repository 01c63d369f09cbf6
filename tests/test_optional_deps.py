"""Optional dependencies: the exporters and their runtimes (`keras-split[export]`),
development certificates (`keras-split[tls]`) and the device runtimes
(`keras-split-edge[litert]`, `[onnx]`). Importing the packages never imports
them, and a feature whose package is missing says which one and the pip line
that installs it, before doing any work."""

import subprocess
import sys
import textwrap

import keras
import pytest

from keras_split.export import export_client, export_inference
from keras_split.network import devcerts
from keras_split_edge import runtime
from keras_split_wire.optional import require

OPTIONAL = ("tf2onnx", "onnx", "ai_edge_litert", "onnxruntime", "cryptography")


def _block(monkeypatch, name):
    """Make `name` (and its submodules) unimportable, as if it were not installed."""
    for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    monkeypatch.setitem(sys.modules, name, None)


def test_importing_the_packages_imports_no_optional_dependency():
    # A fresh interpreter where none of them can be imported at all.
    code = textwrap.dedent(f"""
        import importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ImportError(name + " is not installed")

        sys.meta_path.insert(0, Blocker())
        import keras_split, keras_split.export, keras_split.export.artefacts
        import keras_split.network.devcerts, keras_split_edge, keras_split_edge.__main__
        print(sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _tiny_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


@pytest.mark.parametrize(("path", "module", "message"), [
    ("client.onnx", "tf2onnx", "ONNX export requires tf2onnx."),
    ("client.onnx", "onnx", "ONNX export requires onnx."),
    ("client.onnx", "onnxruntime", "ONNX export requires onnxruntime."),
    ("client.tflite", "ai_edge_litert", "LiteRT export requires ai-edge-litert."),
])
def test_export_without_its_converter_or_runtime_says_how_to_install_it(
        tmp_path, monkeypatch, path, module, message):
    _block(monkeypatch, module)
    with pytest.raises(ImportError) as info:
        export_client(_tiny_model(), tmp_path / "out" / path)
    assert str(info.value) == f"{message} Install it with pip install 'keras-split[export]'."
    assert isinstance(info.value.__cause__, ImportError)  # the original error is kept
    assert not list(tmp_path.iterdir())  # refused before any work


def test_inference_export_without_litert_says_how_to_install_it(tmp_path, monkeypatch):
    _block(monkeypatch, "ai_edge_litert")
    with pytest.raises(ImportError, match=r"^LiteRT export requires ai-edge-litert\. Install it "
                                          r"with pip install 'keras-split\[export\]'\.$"):
        export_inference(_tiny_model(), tmp_path / "client.int8.tflite", quantize="int8")
    assert not list(tmp_path.iterdir())


def test_dev_certificates_without_cryptography_say_how_to_install_it(tmp_path, monkeypatch):
    _block(monkeypatch, "cryptography")
    expected = (r"^Making development certificates requires cryptography\. Install it with "
                r"pip install 'keras-split\[tls\]'\.$")
    with pytest.raises(ImportError, match=expected):
        devcerts.write_dev_certificates(tmp_path)
    with pytest.raises(ImportError, match=expected):
        devcerts.Authority()


@pytest.mark.parametrize(("path", "module", "message"), [
    ("client.tflite", "ai_edge_litert", "Running a .tflite export requires ai-edge-litert. "
                                        "Install it with pip install 'keras-split-edge[litert]'."),
    ("client.onnx", "onnxruntime", "Running an .onnx export requires onnxruntime. "
                                   "Install it with pip install 'keras-split-edge[onnx]'."),
])
def test_edge_runtime_without_its_interpreter_says_how_to_install_it(monkeypatch, path, module,
                                                                     message):
    _block(monkeypatch, module)
    with pytest.raises(ImportError) as info:
        runtime.load(path)  # the runtime is imported before the file is opened
    assert str(info.value) == message


def test_require_imports_the_module_or_names_the_pypi_package(monkeypatch):
    # One helper, in the wire package, serves the library and the device runtime.
    assert require("json", "Reading JSON", "any").dumps([]) == "[]"
    # A cached submodule does not hide a package that is gone.
    _block(monkeypatch, "email")
    monkeypatch.setitem(sys.modules, "email.message", object())
    with pytest.raises(ImportError, match=r"^Mail requires email\. Install it with pip install "
                                          r"'keras-split-edge\[mail\]'\.$"):
        require("email.message", "Mail", "keras-split-edge[mail]")
    _block(monkeypatch, "some_package")
    with pytest.raises(ImportError, match="requires some-package"):
        require("some_package.sub", "Something", "keras-split[extra]")
    with pytest.raises(ImportError, match="requires PyPI-Name"):
        require("some_package", "Something", "keras-split[extra]", package="PyPI-Name")
