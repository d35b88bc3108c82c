// trilora's CPU RMSNorm backward (part of the extension built by trilora.native.cpu_ext).
//
// For y = weight * (x * rstd) row by row (rstd = rsqrt(mean(x^2) + eps), saved by the forward):
//     n = x * rstd,  dn = dy * weight,  c = mean(dn * n)
//     dx = rstd * (dn - n * c)                   (fp32, rounded once to x's dtype)
//     dweight = sum over rows of dy * n.to(x.dtype)   (fp32)
// the same formulas as the torch path of trilora.ops.rms_norm. Two passes over each row and
// no temporaries; eager autograd through the module's six ops allocates and rereads about ten
// [rows, hidden] fp32 tensors. Rows run in parallel; each thread sums its own dweight row.

#include "isa.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace trilora_cpu {
namespace {

struct RowArgs {
  const void* dy;
  int64_t dy_stride;
  const void* x;
  int64_t x_stride;
  const float* weight;
  const float* rstd;
  void* dx;
  float* dw;  // this thread's [h] partial sum, or nullptr
  int64_t h;
};

template <typename T>
__attribute__((always_inline)) inline void backward_rows(const RowArgs& a, int64_t r0, int64_t r1) {
  const int64_t h = a.h;
  const float* w = a.weight;
  for (int64_t i = r0; i < r1; ++i) {
    const T* g = static_cast<const T*>(a.dy) + i * a.dy_stride;
    const T* xi = static_cast<const T*>(a.x) + i * a.x_stride;
    T* d = static_cast<T*>(a.dx) + i * h;
    const float r = a.rstd[i];
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < h; ++j) acc += (static_cast<float>(g[j]) * w[j]) * (static_cast<float>(xi[j]) * r);
    const float c = acc / static_cast<float>(h);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const float n = static_cast<float>(xi[j]) * r;
      const float dn = static_cast<float>(g[j]) * w[j];
      d[j] = static_cast<T>(r * (dn - n * c));
    }
    if (a.dw != nullptr) {
      float* dw = a.dw;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j)
        dw[j] += static_cast<float>(g[j]) * static_cast<float>(static_cast<T>(static_cast<float>(xi[j]) * r));
    }
  }
}

#ifdef TRILORA_X86
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void rows_avx512(const RowArgs& a, int64_t r0,
                                                                                    int64_t r1) {
  backward_rows<T>(a, r0, r1);
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const RowArgs& a, int64_t r0, int64_t r1) {
  backward_rows<T>(a, r0, r1);
}
#endif

template <typename T>
void rows_portable(const RowArgs& a, int64_t r0, int64_t r1) {
  backward_rows<T>(a, r0, r1);
}

template <typename T>
void run(const RowArgs& args, int64_t m, Isa isa, float* partial) {
  // ~32 Ki elements per task: small norms stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(args.h, 1));
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    RowArgs a = args;
    a.dw = partial == nullptr ? nullptr : partial + at::get_thread_num() * args.h;
    switch (isa) {
#ifdef TRILORA_X86
      case Isa::kAvx512:
        rows_avx512<T>(a, r0, r1);
        break;
      case Isa::kAvx2:
        rows_avx2<T>(a, r0, r1);
        break;
#endif
      default:
        rows_portable<T>(a, r0, r1);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     bool need_weight_grad, const std::string& isa_choice) {
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "x and dy must be [M, H] of one shape");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "x and dy must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && dy.device().is_cpu() && weight.device().is_cpu() && rstd.device().is_cpu(),
              "rms_norm_backward (CPU extension) takes CPU tensors");
  TORCH_CHECK(x.stride(1) == 1 && dy.stride(1) == 1, "x and dy must be contiguous along the last dimension");
  const int64_t m = x.size(0);
  const int64_t h = x.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == h,
              "weight must be contiguous fp32 [H]");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == m,
              "rstd must be contiguous fp32 [M]");
  const Isa isa = parse_isa(isa_choice);
  at::Tensor dx = at::empty({m, h}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor partial;
  if (need_weight_grad) partial = at::zeros({at::get_num_threads(), h}, x.options().dtype(at::kFloat));
  RowArgs args{dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), weight.data_ptr<float>(),
               rstd.data_ptr<float>(), dx.data_ptr(), nullptr, h};
  float* part = need_weight_grad ? partial.data_ptr<float>() : nullptr;
  if (m > 0 && h > 0) {
    switch (x.scalar_type()) {
      case at::kFloat:
        run<float>(args, m, isa, part);
        break;
      case at::kHalf:
        run<c10::Half>(args, m, isa, part);
        break;
      case at::kBFloat16:
        run<c10::BFloat16>(args, m, isa, part);
        break;
      default:
        TORCH_CHECK(false, "rms_norm_backward takes fp32, fp16 or bf16, got ", x.scalar_type());
    }
  }
  at::Tensor dw = need_weight_grad ? partial.sum(0) : at::empty({0}, x.options().dtype(at::kFloat));
  return {dx, dw};
}

}  // namespace trilora_cpu
