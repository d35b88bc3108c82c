"""Package layout; all other metadata lives in pyproject.toml.

The package spans three source roots: ``python/trilora`` (the library), ``kernels``
(installed as ``trilora.kernels``) and ``bench`` (installed as ``trilora.bench``, so the
``trilora bench`` command works from a plain ``pip install``).
"""

from setuptools import find_packages, setup

packages = [*find_packages("python"), "trilora.kernels", "trilora.bench"]
setup(
    packages=packages,
    package_dir={"": "python", "trilora.kernels": "kernels", "trilora.bench": "bench"},
    package_data={
        "trilora": ["presets/*.json", "py.typed", "train/demo_dataset/*.jsonl"],
        "trilora.bench": ["*.md"],
    },
)
