"""Optional dependencies, named by the extra that installs them.

The core (quantize, save, load, evaluate on local files, generate) needs torch, transformers,
accelerate and safetensors. Reading GGUF files, fetching data sets from the hub, plotting and the
Triton kernels each need a heavier package, installed on request (``pip install 'cmpq[gguf]'``).
We check before the work starts, so the user reads which extra to install, not a traceback from
deep inside transformers.
"""

from __future__ import annotations

import importlib.util

# module -> extra of pyproject.toml that installs it
EXTRAS = {"gguf": "gguf", "datasets": "datasets", "matplotlib": "bench", "triton": "kernels"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str) -> None:
    """Raise ``MissingExtra`` unless ``module`` can be imported; ``purpose`` says what needs it."""
    if not available(module):
        extra = EXTRAS[module]
        raise MissingExtra(f"{purpose} needs the {module} package, which is not installed: "
                           f"pip install 'cmpq[{extra}]'")
