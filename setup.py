"""Package layout; all other metadata lives in pyproject.toml.

The package spans three source roots: ``python/trilora`` (the library), ``kernels``
(installed as ``trilora.kernels``) and ``bench`` (installed as ``trilora.bench``, so the
``trilora bench`` command works from a plain ``pip install``), plus the native sources
``csrc`` (installed as data under ``trilora/csrc``, where ``trilora.native`` finds them).
"""

from setuptools import find_packages, setup

packages = [*find_packages("python"), "trilora.kernels", "trilora.bench", "trilora.csrc"]
setup(
    packages=packages,
    package_dir={
        "": "python",
        "trilora.kernels": "kernels",
        "trilora.bench": "bench",
        # native sources (built on first use by trilora.native, never at install time)
        "trilora.csrc": "csrc",
    },
    package_data={
        "trilora": ["presets/*.json", "py.typed"],
        "trilora.bench": ["*.md"],
        "trilora.csrc": [
            "cpu/*.cpp",
            "cpu/*.h",
            "cuda/*.cpp",
            "cuda/*.cu",
            "cuda/*.h",
            "cuda/*.cuh",
        ],
    },
)
