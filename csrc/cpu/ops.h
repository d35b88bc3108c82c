// Entry points of trilora's CPU extension (bound in ext.cpp).

#pragma once

// ATen only (no torch/extension.h): the kernels compile in a fraction of the time.
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace trilora_cpu {

// dequantize_4bit.cpp: packed 4-bit codes -> out (contiguous fp32/fp16/bf16, n elements).
void dequantize_4bit_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         const c10::optional<at::Tensor>& nested_absmax,
                         const c10::optional<at::Tensor>& nested_code, double offset,
                         int64_t nested_blocksize, int64_t blocksize, at::Tensor& out,
                         const std::string& isa_choice);

// rms_norm.cpp: backward of y = w * (x * rstd) -> (dx [M, H] in x's dtype, dw [H] fp32 or [0]).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     bool need_weight_grad, const std::string& isa_choice);

}  // namespace trilora_cpu
