"""Where a subpackage's modules live in a source checkout.

``trilora.kernels`` and ``trilora.bench`` keep their modules in the repository's top-level
``kernels/`` and ``bench/`` folders, which deliberately have no ``__init__.py``: a regular
package at the repository root is importable under its folder name whenever the root is on
``sys.path`` (``python -m pytest``, a script run there), and would shadow an installed
distribution of that name (Hugging Face's ``kernels``, which transformers imports). A wheel
copies the modules beside the subpackage's ``__init__.py`` (``setup.py``); in a source
checkout this points the subpackage's ``__path__`` at the top-level folder instead.
"""

from __future__ import annotations

from pathlib import Path


def extend_path(path: list[str], init_file: str, folder: str, *, marker: str) -> list[str]:
    """``path`` plus ``<repo>/<folder>`` when ``marker`` is not installed beside ``init_file``.

    ``init_file`` is the subpackage's ``__init__.py`` (``python/trilora/<name>/__init__.py``
    in a checkout); ``marker`` is one module that a wheel installs beside it.
    """
    here = Path(init_file).resolve().parent
    if (here / marker).is_file():
        return path
    source = here.parents[2] / folder
    if not (source / marker).is_file():
        raise ImportError(
            f"trilora's {folder}/ modules are neither installed nor in a checkout ({source})"
        )
    return [*path, str(source)]
