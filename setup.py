"""Package layout; all other metadata lives in pyproject.toml.

The package spans four source roots: ``python/trilora`` (the library), ``kernels``
(installed as ``trilora.kernels``), ``bench`` (installed as ``trilora.bench``, so the
``trilora bench`` command works from a plain ``pip install``) and ``csrc`` (the native
sources, installed as data under ``trilora/csrc`` and built on first use).
"""

from setuptools import find_packages, setup

packages = [*find_packages("python"), "trilora.kernels", "trilora.bench", "trilora.csrc"]
setup(
    packages=packages,
    package_dir={"": "python", "trilora.kernels": "kernels", "trilora.bench": "bench",
                 "trilora.csrc": "csrc"},
    package_data={"trilora": ["presets/*.json", "py.typed", "train/demo_dataset/*.jsonl"],
                  "trilora.bench": ["*.md"],
                  # native sources, compiled on first use (trilora.native)
                  "trilora.csrc": ["*/*.cu", "*/*.cuh", "*/*.cpp", "*/*.h"]},
)  # fmt: skip
