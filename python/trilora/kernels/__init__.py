"""Triton kernels of trilora: ``@triton.jit`` kernels and their launchers, one module per op family.

The modules live in the repository's top-level ``kernels/`` folder. That folder has no
``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root
would shadow Hugging Face's ``kernels`` distribution (which transformers imports) whenever
the root is on ``sys.path``. A wheel installs the modules here, beside this file; a source
checkout (an editable install) reaches them through ``__path__``. Registry of every
shipped kernel config for ahead-of-time checks: :mod:`trilora.kernels.aot`.

This package imports torch and triton only, never ``torch.nn`` or trilora's higher layers.
"""

from trilora._source_tree import extend_path

__path__ = extend_path(__path__, __file__, "kernels", marker="aot.py")
