// trilora's CPU int8 weights (part of the extension built by trilora.native.cpu_ext):
// bitsandbytes' LLM.int8 bytes, row-major int8 codes C [N, K] with one fp32 absmax per row
// (SCB [N]), whose value is
//     W[n, k] = (C[n, k] * SCB[n]) * (1/127)      (two fp32 products, no fused multiply-add)
// as trilora.ops.int8_linear.dequantize_int8_impl and bitsandbytes' int8_vectorwise_dequant
// define it. Two entry points:
//
// * dequantize_int8_out: W into a contiguous fp32/fp16/bf16 buffer in one pass (the torch path
//   takes two over fp32, and a third to cast), the same bits as the torch path.
// * int8_small_m_linear: y [M, N] fp32 = x [M, K] @ W.T for a few rows (decode, sampling),
//   straight from the int8 codes: y[m, n] = (sum_k x[m, k] * C[n, k]) * (SCB[n] / 127). At
//   M <= 8 the product is bound by reading the weight, and this reads 1 byte per weight where
//   dequantize + GEMM moves 9 (1 read, 4 written, 4 read back). The scale is applied once per
//   output instead of per weight, so the result differs from dequantize + GEMM by fp32
//   rounding only (both are compared with float64 in the tests).
//
// The ISA is chosen at run time as in dequantize_4bit.cpp: AVX2 + FMA on x86 CPUs that have
// it, a portable loop elsewhere.

#include "avx2_convert.h"
#include "isa.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef TRILORA_X86
#include <immintrin.h>
#endif

namespace trilora_cpu {

namespace {

// bitsandbytes' 1/127 as the fp32 the torch path multiplies by.
constexpr float kInv127 = static_cast<float>(7.874015718698502e-3);

template <typename T>
void row_scalar(const int8_t* c, float s, int64_t k0, int64_t k, T* dst) {
  for (int64_t j = k0; j < k; ++j) {
    const float product = static_cast<float>(c[j]) * s;
    dst[j] = static_cast<T>(product * kInv127);
  }
}

#ifdef TRILORA_X86
template <typename T>
TRILORA_AVX2 void row_avx2(const int8_t* c, float s, int64_t k, T* dst) {
  const __m256 scale = _mm256_set1_ps(s);
  const __m256 inv = _mm256_set1_ps(kInv127);
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j));
    const __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
    const __m256 v0 = _mm256_mul_ps(_mm256_mul_ps(c0, scale), inv);
    const __m256 v1 = _mm256_mul_ps(_mm256_mul_ps(c1, scale), inv);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(dst + j, v0);
      _mm256_storeu_ps(dst + j + 8, v1);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j + 8),
                       _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      const __m256i packed = _mm256_packus_epi32(bf16_bits_avx2(v0), bf16_bits_avx2(v1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_permute4x64_epi64(packed, 0xD8));
    }
  }
  row_scalar<T>(c, s, j, k, dst);
}

TRILORA_AVX2 inline float hsum_avx2(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

// Rows [n0, n1) of y for the M rows of x (fp32, [M, K]). Each (row of x, step of 8 weights)
// is a chain of fused multiply-adds whose latency (4-5 cycles) would bound a single chain;
// U independent accumulators per row of x keep M * U >= 4 chains in flight, and the x rows
// share each converted group of 8 weights.
template <int M>
TRILORA_AVX2 void small_m_rows_avx2(const float* x, const int8_t* c, const float* scb, int64_t k, int64_t n0,
                                    int64_t n1, int64_t n, float* y) {
  constexpr int U = M >= 4 ? 1 : 4 / M;
  for (int64_t row = n0; row < n1; ++row) {
    const int8_t* cr = c + row * k;
    __m256 acc[M][U];
    for (int i = 0; i < M; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 * U <= k; j += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cr + j + 8 * u));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        for (int i = 0; i < M; ++i)
          acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j + 8 * u), w, acc[i][u]);
      }
    }
    const float s = scb[row] * kInv127;
    for (int i = 0; i < M; ++i) {
      __m256 total = acc[i][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[i][u]);
      float sum = hsum_avx2(total);
      for (int64_t t = j; t < k; ++t) sum += x[i * k + t] * static_cast<float>(cr[t]);
      y[i * n + row] = sum * s;
    }
  }
}

void small_m_avx2(const float* x, const int8_t* c, const float* scb, int64_t m, int64_t k, int64_t n0,
                  int64_t n1, int64_t n, float* y) {
  switch (m) {
    case 1: return small_m_rows_avx2<1>(x, c, scb, k, n0, n1, n, y);
    case 2: return small_m_rows_avx2<2>(x, c, scb, k, n0, n1, n, y);
    case 3: return small_m_rows_avx2<3>(x, c, scb, k, n0, n1, n, y);
    case 4: return small_m_rows_avx2<4>(x, c, scb, k, n0, n1, n, y);
    case 5: return small_m_rows_avx2<5>(x, c, scb, k, n0, n1, n, y);
    case 6: return small_m_rows_avx2<6>(x, c, scb, k, n0, n1, n, y);
    case 7: return small_m_rows_avx2<7>(x, c, scb, k, n0, n1, n, y);
    default: return small_m_rows_avx2<8>(x, c, scb, k, n0, n1, n, y);
  }
}
#endif  // TRILORA_X86

void small_m_scalar(const float* x, const int8_t* c, const float* scb, int64_t m, int64_t k, int64_t n0,
                    int64_t n1, int64_t n, float* y) {
  for (int64_t row = n0; row < n1; ++row) {
    const int8_t* cr = c + row * k;
    const float s = scb[row] * kInv127;
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (int64_t t = 0; t < k; ++t) sum += x[i * k + t] * static_cast<float>(cr[t]);
      y[i * n + row] = sum * s;
    }
  }
}

template <typename T>
void dequantize_rows(const int8_t* c, const float* scb, int64_t n, int64_t k, T* out, Isa isa) {
  // ~64 Ki weights per task: small weights stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
#ifdef TRILORA_X86
      if (isa != Isa::kScalar) {
        row_avx2<T>(c + row * k, scb[row], k, out + row * k);
        continue;
      }
#endif
      row_scalar<T>(c + row * k, scb[row], 0, k, out + row * k);
    }
  });
}

void check_codes(const at::Tensor& codes, const at::Tensor& scb) {
  TORCH_CHECK(codes.device().is_cpu() && scb.device().is_cpu(), "int8 weights (CPU extension) take CPU tensors");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be contiguous int8 [N, K]");
  TORCH_CHECK(scb.scalar_type() == at::kFloat && scb.is_contiguous() && scb.numel() == codes.size(0),
              "SCB must be contiguous fp32 with one value per row of codes (", codes.size(0), ")");
}

}  // namespace

void dequantize_int8_out(const at::Tensor& codes, const at::Tensor& scb, at::Tensor& out,
                         const std::string& isa_choice) {
  check_codes(codes, scb);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.numel() == codes.numel(),
              "out must be a contiguous CPU tensor of ", codes.numel(), " elements");
  const Isa isa = parse_isa(isa_choice);
  const int64_t n = codes.size(0), k = codes.size(1);
  if (n == 0 || k == 0) return;
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scb.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_rows<float>(c, s, n, k, out.data_ptr<float>(), isa);
      break;
    case at::kHalf:
      dequantize_rows<c10::Half>(c, s, n, k, out.data_ptr<c10::Half>(), isa);
      break;
    case at::kBFloat16:
      dequantize_rows<c10::BFloat16>(c, s, n, k, out.data_ptr<c10::BFloat16>(), isa);
      break;
    default:
      TORCH_CHECK(false, "dequantize_int8 writes fp32, fp16 or bf16, got ", out.scalar_type());
  }
}

at::Tensor int8_small_m_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scb,
                               const std::string& isa_choice) {
  check_codes(codes, scb);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(1) == codes.size(1), "x has ", x.size(1), " columns, the weight ", codes.size(1));
  TORCH_CHECK(x.size(0) <= kMaxSmallM, "int8_small_m_linear takes at most ", kMaxSmallM, " rows, got ", x.size(0));
  const Isa isa = parse_isa(isa_choice);
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scb.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
#ifdef TRILORA_X86
    if (isa != Isa::kScalar) {
      small_m_avx2(xp, c, s, m, k, r0, r1, n, yp);
      return;
    }
#endif
    small_m_scalar(xp, c, s, m, k, r0, r1, n, yp);
  });
  return y;
}


}  // namespace trilora_cpu
