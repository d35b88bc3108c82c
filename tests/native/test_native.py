"""The native extension loader, the nvcc compile check's commands, and (on a GPU) the CUDA
extension itself: managed memory and the 4-bit decode GEMV."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import trilora
from trilora.config import override
from trilora.native import (
    NativeExtensionWarning,
    check_cuda,
    cuda_ext,
    load_extension,
    missing_toolchain,
    source_root,
)
from trilora.native.gemv import applies, decode_gemv_4bit

_counter = itertools.count()


def test_sources_are_found():
    root = source_root()
    for rel in cuda_ext.SOURCES:
        assert (root / rel).is_file(), rel
    cu, cpp = check_cuda.sources(root)
    assert {p.name for p in cu} >= {"managed.cu", "gemv_4bit.cu"}
    assert "ext.cpp" in {p.name for p in cpp}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRILORA_NO_NATIVE", raising=False)
    name = f"trilora_probe_{next(_counter)}"
    with pytest.warns(NativeExtensionWarning, match="unavailable: .*(CUDA|ninja|compiler)") as rec:
        assert load_extension(name, cuda_ext.SOURCES, cuda=True) is None
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning, no second attempt
        assert load_extension(name, cuda_ext.SOURCES, cuda=True) is None
    assert trilora.cuda_ext.load.__module__ == "trilora.native.cuda_ext"


def test_no_native_switch(monkeypatch):
    monkeypatch.setenv("TRILORA_NO_NATIVE", "1")
    assert missing_toolchain(cuda=False) == "TRILORA_NO_NATIVE is set"
    name = f"trilora_probe_{next(_counter)}"
    with pytest.warns(NativeExtensionWarning, match="TRILORA_NO_NATIVE"):
        assert load_extension(name, ("cuda/ext.cpp",), cuda=False) is None


def test_compile_check_commands():
    root = source_root()
    cu, cpp = check_cuda.sources(root)
    cmd = check_cuda.nvcc_command("nvcc", cu[0], root / "x.o", (80, 90))
    joined = " ".join(cmd)
    for arch in (80, 90):
        assert f"arch=compute_{arch},code=sm_{arch}" in joined
    assert any(flag.startswith("-I") and flag.endswith("include") for flag in cmd)
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in cmd  # what torch's own build passes
    host = check_cuda.host_command(cpp[0])
    assert "-fsyntax-only" in host and str(cpp[0]) in host


def test_gemv_is_only_for_cuda_decode():
    x = torch.randn(2, 64)
    packed = torch.zeros(32 * 64 // 2, dtype=torch.uint8)
    assert not applies(x, 64, 32, packed, 64)
    out = decode_gemv_4bit(x, packed, torch.ones(32), torch.zeros(16), None, None, None, 64, 32,
                           None, None, 1.0, None)  # fmt: skip
    assert out is None
    with (
        pytest.raises(ValueError, match="decode_gemv_max_tokens"),
        override(decode_gemv_max_tokens=5),
    ):
        pass


# ---- CUDA (never run here: no GPU) -----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_managed_memory_round_trip():
    ext = cuda_ext.load()
    if ext is None:
        pytest.skip(f"extension unavailable: {cuda_ext.reason()}")
    t = ext.managed_zeros(1 << 20, torch.cuda.current_device())
    assert t.is_cuda and t.dtype == torch.uint8 and int(t.sum()) == 0
    stream = torch.cuda.current_stream().cuda_stream
    ext.prefetch(t, torch.cuda.current_device(), stream)
    t.fill_(3)
    ext.prefetch(t, -1, stream)
    ext.advise(t, "read_mostly", torch.cuda.current_device())
    torch.cuda.synchronize()
    assert int(t.float().sum()) == 3 << 20
    with pytest.raises(RuntimeError, match="unknown advice"):
        ext.advise(t, "nowhere", 0)


@cuda
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_dequantize_then_matmul(seed, m, quant_type, double, dtype):
    from trilora.ops.qlora_linear import qlora_linear_fwd
    from trilora.quant import quantize

    if cuda_ext.load() is None:
        pytest.skip(f"extension unavailable: {cuda_ext.reason()}")
    n, k, r = 136, 320, 8
    w = quantize(torch.randn(n, k, device="cuda", dtype=dtype), quant_type=quant_type,
                 blocksize=64, double_quant=double)  # fmt: skip
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    a = torch.randn(r, k, device="cuda") * 0.1
    b = torch.randn(n, r, device="cuda") * 0.1
    bias = torch.randn(n, device="cuda", dtype=dtype)
    args = (x, w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, 64, n, a, b,
            0.5, bias, None, 1.0)  # fmt: skip
    got = decode_gemv_4bit(*args[:13])
    assert got is not None
    with override(decode_gemv_max_tokens=0):
        want = qlora_linear_fwd(*args)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    with override(decode_gemv_max_tokens=4):
        routed = qlora_linear_fwd(*args)
    assert torch.equal(routed[0], got[0])


def test_builds_are_kept_apart_per_torch_version(tmp_path, monkeypatch):
    """A build links against one torch's C++ ABI: after a torch upgrade the extension must
    be rebuilt, never loaded from the old build's folder."""
    from trilora.native import build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = build_directory("trilora_cpu")
    assert here.parent == tmp_path and torch.__version__.split("+")[0] in here.name
    monkeypatch.setattr(torch, "__version__", "9.9.0+other")
    assert build_directory("trilora_cpu") != here
    assert build_directory("trilora_cuda") != build_directory("trilora_cpu")


def test_the_cpu_extension_is_built_in_its_torch_folder():
    from pathlib import Path

    from trilora.native import build_directory, cpu_ext

    module = cpu_ext.load()
    if module is None:
        pytest.skip("no C++ toolchain here")
    assert build_directory(cpu_ext.NAME) in Path(module.__file__).parents
