"""The native extension loader, the nvcc compile check's commands, and (on a GPU) the CUDA
extension itself: managed memory and the 4-bit decode GEMV."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import trilora
from trilora.config import override
from trilora.native import (
    NativeExtensionWarning,
    build_directory,
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
    out = decode_gemv_4bit(
        x, packed, torch.ones(32), torch.zeros(16), None, None, None, 64, 32, None, None, 1.0, None
    )
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
    w = quantize(
        torch.randn(n, k, device="cuda", dtype=dtype),
        quant_type=quant_type,
        blocksize=64,
        double_quant=double,
    )
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    a = torch.randn(r, k, device="cuda") * 0.1
    b = torch.randn(n, r, device="cuda") * 0.1
    bias = torch.randn(n, device="cuda", dtype=dtype)
    args = (
        x,
        w.packed,
        w.absmax,
        w.code,
        w.nested_absmax,
        w.nested_code,
        w.offset,
        64,
        n,
        a,
        b,
        0.5,
        bias,
        None,
        1.0,
    )
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


# ---- build folders: one per source version, built once ---------------------------------------

_PROBE = """
#include <Python.h>
static PyObject* answer(PyObject* self, PyObject* args) { return PyLong_FromLong(ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "NAME", NULL, -1, methods};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModule_Create(&definition); }
"""


def _probe_tree(root, name: str, answer: int):
    """A source tree like csrc/ holding one tiny extension (plain CPython, no torch headers,
    so that it compiles in a second) whose ``answer()`` returns ``answer``."""
    (root / "probe").mkdir(parents=True)
    (root / "probe" / "probe.cpp").write_text(
        _PROBE.replace("NAME", name).replace("ANSWER", str(answer))
    )
    (root / "probe" / "probe.h").write_text("// a header beside the source is hashed too\n")
    return root


def _load_in_fresh_process(tree, name: str, extensions_dir) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom pathlib import Path\nfrom trilora.native import load_extension\n"
        f"m = load_extension({name!r}, ('probe/probe.cpp',), cuda=False, root=Path(sys.argv[1]),"
        " label='the probe', usual='a second')\n"
        "print(m.answer())"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRILORA_NO_NATIVE", "TRITON_INTERPRET")
    }
    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(tree)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _without_torch_log(stderr: str) -> str:
    """``stderr`` less torch's own log lines (``W1207 12:46:47.53 123 torch/...] ...``): torch
    logs at import when it finds a CUDA toolkit without a CUDA runtime, as on CI's machine."""
    lines = stderr.splitlines(keepends=True)
    return "".join(ln for ln in lines if not re.match(r"[DIWEF]\d{4} [\d:.]+ +\d+ torch/", ln))


def _finish(proc) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out.strip(), err


def test_build_folder_follows_the_source_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    name = "trilora_probe_key"
    a = _probe_tree(tmp_path / "a", name, 1)
    clone = _probe_tree(tmp_path / "clone", name, 1)  # same contents, another place
    b = _probe_tree(tmp_path / "b", name, 2)
    folder = {
        t: build_directory(name, ("probe/probe.cpp",), cuda=False, root=t) for t in (a, clone, b)
    }
    assert folder[a] == folder[clone]
    assert folder[a] != folder[b] and folder[a].parent == tmp_path / "ext"
    (a / "probe" / "probe.h").write_text("// edited\n")  # a header counts
    assert build_directory(name, ("probe/probe.cpp",), cuda=False, root=a) != folder[clone]
    flags = build_directory(name, ("probe/probe.cpp",), cuda=False, root=b, extra_cflags=("-O1",))
    assert flags != folder[b]


def test_same_sources_build_once_and_load_silently(tmp_path):
    """Two installs with the same sources (here: two copies of a tree) share one build: the
    first says it builds, the second loads it and prints nothing (other sources get another
    folder: test_build_folder_follows_the_source_contents)."""
    name = "trilora_probe_once"
    ext = tmp_path / "ext"
    out, err = _finish(_load_in_fresh_process(_probe_tree(tmp_path / "venv", name, 7), name, ext))
    assert out == "7"
    assert "building the probe (once per version, a second)" in err and "built the probe" in err
    out, err = _finish(_load_in_fresh_process(_probe_tree(tmp_path / "clone", name, 7), name, ext))
    assert out == "7" and _without_torch_log(err) == ""
    assert len(list(ext.iterdir())) == 1


@pytest.mark.slow  # two real processes and a compile (~5 s of CPU); torch's build machinery: test_same_sources_build_once_and_load_silently
def test_concurrent_processes_wait_for_one_build(tmp_path):
    name = "trilora_probe_race"
    ext = tmp_path / "ext"
    trees = [_probe_tree(tmp_path / f"install{i}", name, 5) for i in range(2)]
    procs = [_load_in_fresh_process(t, name, ext) for t in trees]
    results = [_finish(p) for p in procs]
    assert [out for out, _ in results] == ["5", "5"]
    builds = sum(err.count("trilora: building the probe (") for _, err in results)
    assert builds == 1, [err for _, err in results]  # the other waited, or came after it
    assert len(list(ext.iterdir())) == 1


def test_cpu_extension_and_python_agree_on_the_8bit_code_table():
    """The 8-bit AdamW kernel's requantizing tables are built in Python
    (``nearest_code_lut``) with the key layout the C++ assumes: the sizes must agree."""
    from trilora.native import cpu_ext
    from trilora.optim.blockwise import quant_maps

    assert "cpu/adamw_8bit.cpp" in cpu_ext.SOURCES
    ext = cpu_ext.load()
    if ext is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    maps = quant_maps("cpu")
    assert maps.lut1.numel() == maps.lut2.numel() == ext.adamw_8bit_lut_bytes()
