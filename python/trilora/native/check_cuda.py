"""Compile-check every ``.cu`` file under ``csrc/`` with nvcc, for sm_80 and sm_90, on a
machine without a GPU (CI): ``python -m trilora.native.check_cuda``.

Each file is compiled to an object (``nvcc -c``) against torch's headers with the flags
``torch.utils.cpp_extension`` uses for a real build. Linking needs a CUDA build of torch, so
the extension itself is only built on CUDA machines, on first use. The C++ binding files next
to the ``.cu`` files (``csrc/cuda/*.cpp``) are syntax-checked with the host compiler.

The CPU wheel of torch ships ``c10/cuda`` without its generated
``c10/cuda/impl/cuda_cmake_macros.h`` (it only defines ``C10_CUDA_BUILD_SHARED_LIBS``, which
matters on Windows); the check then defines ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE``. torch's
headers need C++20 from torch 2.10 on; the check uses the standard torch's own build uses.

Exit status: 0 when every file compiles, 1 when one fails, 2 when nvcc is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from trilora.native import source_root

DEFAULT_ARCHS = (80, 90)


class Result(NamedTuple):
    path: str
    seconds: float
    ok: bool
    log: str


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cxx_standard() -> str:

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 10) else "c++17"


def common_flags() -> list[str]:
    """Include paths and defines shared by the nvcc and host-compiler checks."""
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
    flags.append("-DTORCH_EXTENSION_NAME=trilora_check")
    flags.append("-DTORCH_API_INCLUDE_EXTENSION_H")
    macros = (
        Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    )
    if not macros.exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def nvcc_command(nvcc: str, source: Path, out: Path, archs: tuple[int, ...]) -> list[str]:
    from torch.utils import cpp_extension

    cmd = [nvcc, "-c", str(source), "-o", str(out), f"-std={_cxx_standard()}", "-O3"]
    cmd += common_flags()
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    cmd += ["-Xcompiler", "-fPIC", "-diag-suppress", "3306"]  # 3306: torch's C++20 bit-fields
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def host_command(source: Path) -> list[str]:
    compiler = os.environ.get("CXX", "c++")
    return [
        compiler,
        "-fsyntax-only",
        f"-std={_cxx_standard()}",
        "-fPIC",
        *common_flags(),
        str(source),
    ]


def sources(root: Path) -> tuple[list[Path], list[Path]]:
    """``(.cu files, binding .cpp files next to them)`` under ``root``."""
    cu = sorted(root.rglob("*.cu"))
    cpp = sorted({p for d in {c.parent for c in cu} for p in d.glob("*.cpp")})
    return cu, cpp


def _run(cmd: list[str], path: Path, root: Path) -> Result:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return Result(
        str(path.relative_to(root.parent)),
        seconds,
        proc.returncode == 0,
        (proc.stdout + proc.stderr).strip(),
    )


def check(root: Path, archs: tuple[int, ...], jobs: int) -> list[Result] | None:
    """Compile every file; ``None`` when nvcc is missing."""
    nvcc = _nvcc()
    if nvcc is None:
        return None
    cu, cpp = sources(root)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(_run, nvcc_command(nvcc, s, Path(tmp) / f"{i}.o", archs), s, root)
            for i, s in enumerate(cu)
        ]
        futures += [pool.submit(_run, host_command(s), s, root) for s in cpp]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trilora.native.check_cuda", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(DEFAULT_ARCHS),
        help="SM versions (default: 80 90)",
    )
    p.add_argument("--jobs", type=int, default=2, help="files compiled at once (default: 2)")
    p.add_argument("--root", type=Path, default=None, help="csrc folder (default: trilora's)")
    args = p.parse_args(argv)

    root = args.root or source_root()
    results = check(root, tuple(args.arch), max(1, args.jobs))
    if results is None:
        print("check_cuda: nvcc was not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    archs = ",".join(f"sm_{a}" for a in args.arch)
    for r in results:
        what = archs if r.path.endswith(".cu") else "host syntax"
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.path:<32} {what:<14} {r.seconds:7.1f} s")
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"\n--- {r.path} ---\n{r.log}", file=sys.stderr)
    print(f"{len(results) - len(bad)}/{len(results)} files compile")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
