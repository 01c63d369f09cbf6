"""Optional dependencies, imported where they are needed, with the install line when missing.

Both the library (`keras-split[export]`, `[tls]`) and the device runtime
(`keras-split-edge[litert]`, `[onnx]`) keep converters, runtimes and
certificate tools out of their import path; the function that needs one calls
`require` first.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, feature: str, install: str, package: str | None = None) -> ModuleType:
    """Import `module` for `feature`, or raise an `ImportError` that says how to install it.

    Args:
        module: the module to import, e.g. `"tf2onnx"` or `"ai_edge_litert.interpreter"`.
        feature: what needs it, as the start of the sentence ("ONNX export").
        install: what to `pip install` for it, e.g. `"keras-split[export]"`.
        package: its name on PyPI, if not the top-level module's with "-" for "_".

    Returns:
        The imported module.

    Example:

    ```python
    tf2onnx = require("tf2onnx", "ONNX export", "keras-split[export]")
    ```
    """
    root = module.split(".")[0]
    try:
        # The top-level package first: a cached submodule would hide a blocked parent.
        importlib.import_module(root)
        return importlib.import_module(module)
    except ImportError as error:
        name = package or root.replace("_", "-")
        raise ImportError(f"{feature} requires {name}. Install it with "
                          f"pip install '{install}'.") from error
