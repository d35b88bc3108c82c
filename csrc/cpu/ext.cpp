// Python bindings of trilora's CPU extension (built by trilora.native.cpu_ext.load()).

// torch/csrc/utils/pybind.h, not torch/extension.h: the bindings need pybind11 and torch's
// tensor casters only, and torch/extension.h (the whole C++ frontend) tripled the build
// (54 s of CPU against 18 s for this file, on a 2-core AMD EPYC).
#include <torch/csrc/utils/pybind.h>

#include "isa.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "trilora CPU extension: 4-bit and int8 weights, the RMSNorm backward, 8-bit AdamW";
  m.def("dequantize_4bit_out", &trilora_cpu::dequantize_4bit_out, py::arg("packed"), py::arg("absmax"),
        py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("blocksize"), py::arg("out"), py::arg("isa") = "auto",
        "Dequantize packed 4-bit codes into out (contiguous fp32/fp16/bf16, n elements).");
  m.def("rms_norm_backward", &trilora_cpu::rms_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("rstd"), py::arg("need_weight_grad"), py::arg("isa") = "auto",
        "RMSNorm backward: (dx in x's dtype, dweight fp32 or empty).");
  m.def("adamw_8bit_step", &trilora_cpu::adamw_8bit_step, py::arg("p"), py::arg("g"), py::arg("state1"),
        py::arg("state2"), py::arg("absmax1"), py::arg("absmax2"), py::arg("qmap1"), py::arg("qmap2"),
        py::arg("bounds1"), py::arg("bounds2"), py::arg("lut1"), py::arg("lut2"), py::arg("decay"), py::arg("w1"),
        py::arg("beta2"), py::arg("w2"), py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("eps"),
        py::arg("apply_decay"), py::arg("isa") = "auto",
        "One AdamW step with blockwise 8-bit state, in place (trilora.optim.blockwise.adamw_8bit_).");
  m.def("adamw_8bit_lut_bytes", &trilora_cpu::adamw_8bit_lut_bytes,
        "Bytes of the nearest-code table adamw_8bit_step takes per map.");
  m.def("dequantize_int8_out", &trilora_cpu::dequantize_int8_out, py::arg("codes"), py::arg("scb"), py::arg("out"),
        py::arg("isa") = "auto",
        "Dequantize int8 codes [N, K] with row scales SCB [N] into out (contiguous fp32/fp16/bf16).");
  m.def("int8_small_m_linear", &trilora_cpu::int8_small_m_linear, py::arg("x"), py::arg("codes"), py::arg("scb"),
        py::arg("isa") = "auto", "y [M, N] fp32 = x [M, K] fp32 @ W.T straight from the int8 codes (small M).");
  m.def("small_m_linear_4bit", &trilora_cpu::small_m_linear_4bit, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("blocksize"), py::arg("n_out"), py::arg("isa") = "auto",
        "y [M, N] fp32 = x [M, K] fp32 @ W.T straight from the packed 4-bit codes (small M).");
  m.def(
      "small_m_max_rows", [] { return trilora_cpu::kMaxSmallM; },
      "The most rows of x int8_small_m_linear and small_m_linear_4bit take.");
  m.def(
      "best_isa", [] { return trilora_cpu::isa_name(trilora_cpu::best_isa()); },
      "The instruction set the kernels use on this CPU: avx512, avx2 or scalar.");
}
