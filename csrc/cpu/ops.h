// Entry points of trilora's CPU extension (bound in ext.cpp).

#pragma once

// ATen only (no torch/extension.h): the kernels compile in a fraction of the time.
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace trilora_cpu {

// The most rows of x the small-M products take (decode, sampling): one accumulator register
// (or two) per row.
constexpr int64_t kMaxSmallM = 8;

// dequantize_4bit.cpp: packed 4-bit codes -> out (contiguous fp32/fp16/bf16, n elements).
void dequantize_4bit_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         const c10::optional<at::Tensor>& nested_absmax,
                         const c10::optional<at::Tensor>& nested_code, double offset,
                         int64_t nested_blocksize, int64_t blocksize, at::Tensor& out,
                         const std::string& isa_choice);

// dequantize_4bit.cpp: y [M, N] fp32 = x [M, K] fp32 @ W.T straight from the packed codes of
// the [n_out, K] weight (arguments as dequantize_4bit_out), for M <= kMaxSmallM.
at::Tensor small_m_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, double offset,
                               int64_t nested_blocksize, int64_t blocksize, int64_t n_out,
                               const std::string& isa_choice);

// rms_norm.cpp: backward of y = w * (x * rstd) -> (dx [M, H] in x's dtype, dw [H] fp32 or [0]).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     bool need_weight_grad, const std::string& isa_choice);

// adamw_8bit.cpp: one AdamW step with bitsandbytes' blockwise 8-bit state, in place: p
// (contiguous fp32/fp16/bf16, n elements), state1/state2 (uint8 [n]), absmax1/absmax2 (fp32
// [ceil(n / 256)]); g contiguous fp32/fp16/bf16 [n]; the maps' values, midpoints and code tables.
void adamw_8bit_step(at::Tensor& p, const at::Tensor& g, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
                     at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& bounds1,
                     const at::Tensor& bounds2, const at::Tensor& lut1, const at::Tensor& lut2, double decay,
                     double w1, double beta2, double w2, double step_size, double bc2_sqrt, double eps,
                     bool apply_decay, const std::string& isa_choice);

// The number of bytes adamw_8bit_step expects in each code table.
int64_t adamw_8bit_lut_bytes();

// int8_linear.cpp: bitsandbytes int8 weights, codes int8 [N, K] and SCB fp32 [N].
// W = (codes * SCB) * (1/127) into out (contiguous fp32/fp16/bf16, N * K elements).
void dequantize_int8_out(const at::Tensor& codes, const at::Tensor& scb, at::Tensor& out,
                         const std::string& isa_choice);
// y [M, N] fp32 = x [M, K] fp32 @ W.T, read from the codes, for M <= kMaxSmallM.
at::Tensor int8_small_m_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scb,
                               const std::string& isa_choice);

}  // namespace trilora_cpu
