"""Package layout; all other metadata lives in pyproject.toml.

The package spans four source roots: ``python/trilora`` (the library), ``kernels``
(installed as ``trilora.kernels``), ``bench`` (installed as ``trilora.bench``, so the
``trilora bench`` command works from a plain ``pip install``) and ``csrc`` (the native
sources, installed as data under ``trilora/csrc`` and built on first use).

``kernels/`` and ``bench/`` have no ``__init__.py``, so the repository root never holds a
package that shadows an installed distribution of the same name (Hugging Face's
``kernels``). Their ``__init__.py`` files live in ``python/trilora/{kernels,bench}``; the
wheel gets the modules copied beside them, and a source checkout finds them through
``trilora._source_tree``.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# subpackage -> top-level folder whose modules it installs
MODULE_FOLDERS = {"trilora.kernels": "kernels", "trilora.bench": "bench"}


class BuildPy(build_py):
    """``build_py`` that also installs each ``MODULE_FOLDERS`` folder's modules."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        folder = MODULE_FOLDERS.get(package)
        if folder is not None:
            modules += [
                (package, path.stem, str(path)) for path in sorted(Path(folder).glob("*.py"))
            ]
        return modules


setup(
    cmdclass={"build_py": BuildPy},
    packages=[*find_packages("python"), "trilora.csrc"],
    package_dir={"": "python", "trilora.csrc": "csrc"},
    package_data={
        "trilora": ["presets/*.json", "py.typed", "train/demo_dataset/*.jsonl"],
        # native sources, compiled on first use (trilora.native)
        "trilora.csrc": ["*/*.cu", "*/*.cuh", "*/*.cpp", "*/*.h"],
    },
)
