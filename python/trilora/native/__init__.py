"""trilora's native extensions: the C++/CUDA sources in ``csrc/``, built on first use.

Nothing here is needed to install or import trilora. :func:`load_extension` builds one
extension with ninja through ``torch.utils.cpp_extension.load`` the first time a process asks
for it (later processes reuse the cached build under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, in a folder per torch version, unless the sources changed)
and returns the module. When a
toolchain piece is missing or the build fails it returns ``None`` after one
:class:`NativeExtensionWarning` that names what was missing, and the callers fall back to
their Triton or torch paths. ``TRILORA_NO_NATIVE=1`` turns every extension off.

Each extension has a small loader module beside this one (:mod:`trilora.native.cuda_ext`),
naming its sources relative to ``csrc/`` and its flags; they share this function.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

_LOADED: dict[str, ModuleType | None] = {}
_REASONS: dict[str, str] = {}
_LOCK = threading.Lock()


class NativeExtensionWarning(UserWarning):
    """A native extension is unavailable; trilora uses its fallback path instead."""


def source_root() -> Path:
    """The ``csrc`` folder: ``trilora/csrc`` in an installed wheel, ``<repo>/csrc`` in a
    source checkout."""
    here = Path(__file__).resolve().parent.parent  # .../trilora
    for candidate in (here / "csrc", here.parent.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"trilora's csrc/ sources are not installed (looked under {here})")


def missing_toolchain(cuda: bool) -> str | None:
    """Why an extension cannot be built here, or ``None`` when everything is present."""
    if os.environ.get("TRILORA_NO_NATIVE", "") not in ("", "0"):
        return "TRILORA_NO_NATIVE is set"
    import torch
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    if cuda:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").exists():
            return "the CUDA toolkit (nvcc) was not found: set CUDA_HOME"
    try:
        source_root()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def build_directory(name: str) -> Path:
    """Where ``name`` is built: one folder per extension and torch version, because a build
    links against one torch's C++ ABI, and torch's own cache key (sources and flags) would
    hand a build made under another torch to this one after an upgrade."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in torch.__version__)
    return Path(root) / f"trilora-{name}-torch{tag}"


def load_extension(
    name: str,
    sources: tuple[str, ...],
    *,
    cuda: bool,
    extra_cflags: tuple[str, ...] = (),
    extra_cuda_cflags: tuple[str, ...] = (),
) -> ModuleType | None:
    """Build (once) and import the extension ``name`` from ``sources`` (paths relative to
    ``csrc/``); ``None`` with one warning when it cannot be built here.

    ``cuda``: the sources include ``.cu`` files (needs a CUDA build of torch, a device and
    nvcc). The result, a module or ``None``, is cached for the process.
    """
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        reason = missing_toolchain(cuda)
        module = None
        if reason is None:
            try:
                from torch.utils import cpp_extension

                root = source_root()
                build_dir = build_directory(name)
                build_dir.mkdir(parents=True, exist_ok=True)
                module = cpp_extension.load(
                    name=name,
                    sources=[str(root / s) for s in sources],
                    extra_cflags=["-O3", *extra_cflags],
                    extra_cuda_cflags=["-O3", *extra_cuda_cflags] if cuda else None,
                    build_directory=str(build_dir),
                    verbose=os.environ.get("TRILORA_NATIVE_VERBOSE", "") not in ("", "0"),
                )
            except Exception as exc:  # a failed build must not take the caller down
                lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                reason = f"the build failed ({type(exc).__name__}: {lines[0] if lines else ''})"
        if module is None:
            _REASONS[name] = reason
            warnings.warn(
                f"trilora's native extension {name} is unavailable: {reason}; using the "
                "fallback path (set TRILORA_NATIVE_VERBOSE=1 to see the build log)",
                NativeExtensionWarning,
                stacklevel=3,
            )
        _LOADED[name] = module
        return module


def unavailable_reason(name: str) -> str | None:
    """Why the extension ``name`` failed to load in this process (``None``: not tried, or
    loaded)."""
    return _REASONS.get(name)


__all__ = [
    "NativeExtensionWarning",
    "build_directory",
    "load_extension",
    "missing_toolchain",
    "source_root",
    "unavailable_reason",
]
