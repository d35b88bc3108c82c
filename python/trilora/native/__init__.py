"""trilora's native extensions: the C++/CUDA sources in ``csrc/``, built on first use.

Nothing here is needed to install or import trilora. :func:`load_extension` builds one
extension with ninja through ``torch.utils.cpp_extension.load`` the first time it is needed
on this machine, and returns the module.

**Once per source version.** The build folder (:func:`build_directory`, under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) is named after a hash of the
sources' contents, the flags, the torch build, the compiler and the Python ABI
(:func:`build_key`): two trilora installs with different sources (a venv and an editable
clone of another commit) never share a folder, so they never take turns rebuilding it, and
two with the same sources share one build. The sources are compiled from a copy in the
folder, so every install with those sources compiles the same paths and ninja finds the
build up to date. A finished build is marked (``trilora-build.json``) and later processes
import it directly, silently. While one process builds, others that need the same build
wait for it (a ``flock``, which the kernel releases if the builder dies) and say so. A
build says on stderr what it builds and how long that usually takes, and when it is done.
Old folders are never deleted by trilora.

When a toolchain piece is missing or the build fails it returns ``None`` after one
:class:`NativeExtensionWarning` that names what was missing, and the callers fall back to
their Triton or torch paths. ``TRILORA_NO_NATIVE=1`` turns every extension off.

Each extension has a small loader module beside this one (:mod:`trilora.native.cuda_ext`),
naming its sources relative to ``csrc/`` and its flags; they share this function.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
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


# Extensions that :func:`build_directory` can find the settings of by name alone.
_LOADERS = {"trilora_cpu": "trilora.native.cpu_ext", "trilora_cuda": "trilora.native.cuda_ext"}
_MARKER = "trilora-build.json"  # written once a build in the folder has finished
_LOCK_FILE = "trilora-build.lock"  # flock'ed by the one process that builds in the folder


# What a wheel installs of csrc/ (setup.py's package_data): a clone's other files (notes,
# editor backups) must not make its build key differ from a wheel's of the same commit.
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def _source_files(root: Path, sources: tuple[str, ...]) -> list[str]:
    """The files a build reads, relative to ``root``: the sources and the C++/CUDA files
    beside them (the headers they include)."""
    names = set(sources)
    for rel in sources:
        folder = (root / rel).parent
        names.update(
            str(p.relative_to(root))
            for p in folder.iterdir()
            if p.is_file() and p.suffix in _SOURCE_SUFFIXES
        )
    return sorted(names)


def _compiler_identity(cuda: bool) -> str:
    """The C++ compiler (resolved path and first line of ``--version``), and for CUDA
    builds the toolkit folder and target architectures."""
    import subprocess

    compiler = os.environ.get("CXX", "c++")
    path = shutil.which(compiler)
    first = ""
    if path is not None:
        path = os.path.realpath(path)
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
        except (OSError, subprocess.SubprocessError):
            pass
    ident = f"{path}|{first}"
    if cuda:
        from torch.utils import cpp_extension

        ident += f"|{cpp_extension.CUDA_HOME}|{os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"
    return ident


def build_key(
    name: str,
    sources: tuple[str, ...],
    *,
    cuda: bool,
    extra_cflags: tuple[str, ...] = (),
    extra_cuda_cflags: tuple[str, ...] = (),
    root: Path | None = None,
) -> str:
    """The source version of an extension build (16 hex digits): a hash of the contents of
    the files it compiles (:func:`_source_files`), its flags, the torch build, the
    compiler and the Python ABI. Two installs whose sources differ never share a build; two
    with the same sources (a venv and an editable clone of one commit) share one safely."""
    import hashlib
    import platform
    import sysconfig

    import torch

    root = source_root() if root is None else Path(root)
    digest = hashlib.sha256()
    for rel in _source_files(root, sources):
        data = (root / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    setting = {
        "name": name,
        "sources": list(sources),
        "cuda": cuda,
        "cflags": list(extra_cflags),
        "cuda_cflags": list(extra_cuda_cflags) if cuda else [],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git": getattr(torch.version, "git_version", ""),
        "compiler": _compiler_identity(cuda),
        "machine": platform.machine(),
        "python": sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag,
    }
    digest.update(json.dumps(setting, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_directory(
    name: str,
    sources: tuple[str, ...] | None = None,
    *,
    cuda: bool | None = None,
    extra_cflags: tuple[str, ...] | None = None,
    extra_cuda_cflags: tuple[str, ...] = (),
    root: Path | None = None,
) -> Path:
    """Where ``name`` is built: ``$TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``) / ``trilora-NAME-torchVERSION-KEY``, one folder per source
    version (:func:`build_key`). The torch version is also spelled out in the name, so that
    the folders of one torch are easy to find.

    ``name`` alone works for trilora's own extensions (``trilora_cpu``, ``trilora_cuda``):
    their loader modules supply the sources and flags.
    """
    import importlib

    import torch

    if sources is None:
        loader = importlib.import_module(_LOADERS[name])
        sources = loader.SOURCES
        cuda = loader.CUDA if cuda is None else cuda
        extra_cflags = getattr(loader, "CFLAGS", ()) if extra_cflags is None else extra_cflags
    key = build_key(
        name,
        sources,
        cuda=bool(cuda),
        extra_cflags=tuple(extra_cflags or ()),
        extra_cuda_cflags=extra_cuda_cflags,
        root=root,
    )
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in torch.__version__)
    return Path(base) / f"trilora-{name}-torch{tag}-{key}"


@contextlib.contextmanager
def _build_lock(build_dir: Path, label: str) -> Iterator[None]:
    """Hold the folder's build lock: one process builds, the others wait (and say so) and
    then load what it built. ``flock`` is released by the kernel when its holder dies, so a
    killed build never blocks later ones (torch's own ``lock`` file would)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock file alone serializes the build
        yield
        return
    with open(build_dir / _LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"waiting for another process that is building {label} in {build_dir}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(f"trilora: {message}", file=sys.stderr, flush=True)


def _import_built(name: str, build_dir: Path) -> ModuleType:
    import importlib.util

    path = build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage_sources(root: Path, files: list[str], staged: Path) -> None:
    """Copy the build's files into ``staged`` (left alone where the content is already the
    same), so that every install with these sources compiles the same paths: ninja would
    rebuild everything for another install's paths."""
    for rel in files:
        data = (root / rel).read_bytes()
        target = staged / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def _build_or_load(
    name: str,
    sources: tuple[str, ...],
    root: Path,
    build_dir: Path,
    *,
    cuda: bool,
    cflags: list[str],
    cuda_cflags: list[str] | None,
    label: str,
    usual: str,
) -> ModuleType:
    """Under the folder's lock: import the finished build, or build it first (saying so
    on stderr, with how long it usually takes, and when it is done)."""
    import time

    from torch.utils import cpp_extension

    with _build_lock(build_dir, label):
        if (build_dir / _MARKER).is_file():
            try:
                return _import_built(name, build_dir)
            except (ImportError, OSError):
                pass  # a damaged folder: build it again below
        files = _source_files(root, sources)
        _stage_sources(root, files, build_dir / "src")
        # We hold the folder's lock, so a torch lock file here is a killed build's leftover.
        (build_dir / "lock").unlink(missing_ok=True)
        _say(f"building {label} (once per version, {usual}) in {build_dir}...")
        start = time.perf_counter()
        module = cpp_extension.load(
            name=name,
            sources=[str(build_dir / "src" / s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            build_directory=str(build_dir),
            verbose=os.environ.get("TRILORA_NATIVE_VERBOSE", "") not in ("", "0"),
        )
        seconds = time.perf_counter() - start
        marker = {
            "name": name,
            "seconds": round(seconds, 1),
            "sources": str(root),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = build_dir / f".{_MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(marker) + "\n")
        os.replace(tmp, build_dir / _MARKER)
        _say(f"built {label} in {seconds:.0f} s; later runs load it from {build_dir}")
        return module


def load_extension(
    name: str,
    sources: tuple[str, ...],
    *,
    cuda: bool,
    extra_cflags: tuple[str, ...] = (),
    extra_cuda_cflags: tuple[str, ...] = (),
    root: Path | None = None,
    label: str | None = None,
    usual: str = "usually a minute or two",
) -> ModuleType | None:
    """Build (once per source version) and import the extension ``name`` from ``sources``
    (paths relative to ``root``, default ``csrc/``); ``None`` with one warning when it cannot
    be built here.

    ``cuda``: the sources include ``.cu`` files (needs a CUDA build of torch, a device and
    nvcc). The result, a module or ``None``, is cached for the process. A build prints one
    line on stderr before (``label``, ``usual``: what is built and how long that usually
    takes) and one after; loading a finished build prints nothing. Builds live in
    :func:`build_directory`; concurrent processes wait for the one that builds.
    """
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        reason = missing_toolchain(cuda)
        module = None
        if reason is None:
            try:
                src = source_root() if root is None else Path(root)
                build_dir = build_directory(
                    name,
                    sources,
                    cuda=cuda,
                    extra_cflags=extra_cflags,
                    extra_cuda_cflags=extra_cuda_cflags,
                    root=src,
                )
                build_dir.mkdir(parents=True, exist_ok=True)
                module = _build_or_load(
                    name,
                    sources,
                    src,
                    build_dir,
                    cuda=cuda,
                    cflags=["-O3", *extra_cflags],
                    cuda_cflags=["-O3", *extra_cuda_cflags] if cuda else None,
                    label=label or f"trilora's native extension {name}",
                    usual=usual,
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
    "build_key",
    "load_extension",
    "missing_toolchain",
    "source_root",
    "unavailable_reason",
]
