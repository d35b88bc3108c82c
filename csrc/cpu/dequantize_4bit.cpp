// trilora's CPU 4-bit dequantization (part of the extension built by trilora.native.cpu_ext).
//
// The format (bitsandbytes NF4/FP4, docs/architecture.md): element e of the flattened weight
// is the nibble e of the packed bytes (the first element of a byte in its high nibble), and
//     value[e] = code[nibble[e]] * scale[e / blocksize]     (one fp32 product, then the cast)
// where scale is the fp32 absmax, or with double quantization
//     scale[i] = nested_code[q[i]] * nested_absmax[i / nested_blocksize] + offset
// (the product rounded to fp32, then the sum rounded to fp32: no fused multiply-add; the
// extension is built with -ffp-contract=off for that reason).
//
// One pass over the bytes: each block scales the 16-entry code table once (16 products, the
// same fp32 products as scaling every element), and every byte becomes two table lookups.
// With AVX-512 the scaled table lives in one register and a lookup is a lane permute
// (vpermps); with AVX2 it is two 8-lane permutes and a blend. Casts to bf16/fp16 round to
// nearest even, as torch's .to() does. The ISA is chosen at run time (__builtin_cpu_supports)
// so the build needs no -march flag and the cached library runs on any x86-64 CPU; other
// architectures get the portable loop.

#include "avx2_convert.h"
#include "isa.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef TRILORA_X86
#include <immintrin.h>
#endif

namespace trilora_cpu {
namespace {

struct Scales {
  const float* absmax = nullptr;         // plain fp32 absmax, or
  const uint8_t* q = nullptr;            // double quantization: 8-bit codes of absmax - offset
  const float* nested_code = nullptr;    // [256]
  const float* nested_absmax = nullptr;  // [ceil(nblocks / nested_blocksize)]
  int64_t nested_blocksize = 256;
  float offset = 0.0f;

  float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    const float product = nested_code[q[block]] * nested_absmax[block / nested_blocksize];
    return product + offset;
  }
};

// --- portable loop ------------------------------------------------------------------------

template <typename T>
inline T cast_from_float(float v) {
  return static_cast<T>(v);
}

template <typename T>
void block_scalar(const uint8_t* src, int64_t count, const float* table, T* dst) {
  // count elements starting at an even element (a block start), from bytes src[0..]
  int64_t e = 0;
  for (; e + 1 < count; e += 2) {
    const uint8_t byte = src[e >> 1];
    dst[e] = cast_from_float<T>(table[byte >> 4]);
    dst[e + 1] = cast_from_float<T>(table[byte & 0xF]);
  }
  if (e < count) dst[e] = cast_from_float<T>(table[src[e >> 1] >> 4]);
}

#ifdef TRILORA_X86

// --- AVX2 ---------------------------------------------------------------------------------

TRILORA_AVX2 inline __m256 lookup_avx2(__m256i idx, __m256 lo8, __m256 hi8) {
  // bit 3 of the index picks the upper half of the table; blendv reads the sign bit.
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                          upper);
}

template <typename T>
TRILORA_AVX2 void block_avx2(const uint8_t* src, int64_t count, const float* table, T* dst) {
  const __m256 lo8 = _mm256_loadu_ps(table);
  const __m256 hi8 = _mm256_loadu_ps(table + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {  // 8 bytes -> 16 values
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + (e >> 1))));
    const __m256i hi = _mm256_srli_epi32(w, 4);
    const __m256i lo = _mm256_and_si256(w, low_nibble);
    const __m256i ul = _mm256_unpacklo_epi32(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
    const __m256i uh = _mm256_unpackhi_epi32(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
    const __m256 v0 = lookup_avx2(_mm256_permute2x128_si256(ul, uh, 0x20), lo8, hi8);
    const __m256 v1 = lookup_avx2(_mm256_permute2x128_si256(ul, uh, 0x31), lo8, hi8);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(dst + e, v0);
      _mm256_storeu_ps(dst + e + 8, v1);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e),
                       _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e + 8),
                       _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      const __m256i packed = _mm256_packus_epi32(bf16_bits_avx2(v0), bf16_bits_avx2(v1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e), _mm256_permute4x64_epi64(packed, 0xD8));
    }
  }
  block_scalar<T>(src + (e >> 1), count - e, table, dst + e);
}

// --- AVX-512 ------------------------------------------------------------------------------

#define TRILORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

TRILORA_AVX512 inline __m256i bf16_bits_avx512(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename T>
TRILORA_AVX512 void block_avx512(const uint8_t* src, int64_t count, const float* table, T* dst) {
  const __m512 lut = _mm512_loadu_ps(table);
  // Interleave the high and low nibbles of 16 bytes: h0 l0 h1 l1 ... (first half), ... (second).
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  int64_t e = 0;
  for (; e + 32 <= count; e += 32) {  // 16 bytes -> 32 values
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (e >> 1))));
    // vpermps reads only the low 4 bits of each index, so the byte itself is the low nibble.
    const __m512i hi = _mm512_srli_epi32(w, 4);
    const __m512 v0 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, w), lut);
    const __m512 v1 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, w), lut);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(dst + e, v0);
      _mm512_storeu_ps(dst + e + 16, v1);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e),
                          _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e + 16),
                          _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e), bf16_bits_avx512(v0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e + 16), bf16_bits_avx512(v1));
    }
  }
  block_scalar<T>(src + (e >> 1), count - e, table, dst + e);
}

#endif  // TRILORA_X86

template <typename T>
void dequantize_into(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                     int64_t n, T* out, Isa isa) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  // ~64 Ki elements per task: small weights stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    float table[16];
    for (int64_t b = b0; b < b1; ++b) {
      const float s = scales(b);
      for (int j = 0; j < 16; ++j) table[j] = code[j] * s;
      const int64_t start = b * blocksize;
      const int64_t count = std::min(blocksize, n - start);
      const uint8_t* src = packed + (start >> 1);
      T* dst = out + start;
      switch (isa) {
#ifdef TRILORA_X86
        case Isa::kAvx512:
          block_avx512<T>(src, count, table, dst);
          break;
        case Isa::kAvx2:
          block_avx2<T>(src, count, table, dst);
          break;
#endif
        default:
          block_scalar<T>(src, count, table, dst);
      }
    }
  });
}

}  // namespace

namespace {

// The checks and the scale decoder shared by the entry points: n elements of 4-bit codes.
Scales checked_scales(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                      const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                      double offset, int64_t nested_blocksize, int64_t blocksize, int64_t n) {
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize must be a positive even number, got ", blocksize);
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu() && code.device().is_cpu(),
              "4-bit weights (CPU extension) take CPU tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() >= (n + 1) / 2, "packed holds ", packed.numel(), " bytes, need ", (n + 1) / 2);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16,
              "code must be a contiguous fp32 [16] table");
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() >= nblocks, "absmax must be contiguous with ", nblocks,
              " blocks");
  Scales scales;
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value(), "nested_absmax needs nested_code");
    const at::Tensor& na = *nested_absmax;
    const at::Tensor& nc = *nested_code;
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8");
    TORCH_CHECK(nested_blocksize > 0, "nested_blocksize must be positive");
    TORCH_CHECK(na.scalar_type() == at::kFloat && na.is_contiguous() && na.device().is_cpu() &&
                    na.numel() >= (nblocks + nested_blocksize - 1) / nested_blocksize,
                "nested_absmax must be contiguous fp32 with one value per ", nested_blocksize, " blocks");
    TORCH_CHECK(nc.scalar_type() == at::kFloat && nc.is_contiguous() && nc.device().is_cpu() && nc.numel() == 256,
                "nested_code must be a contiguous fp32 [256] table");
    scales.q = absmax.data_ptr<uint8_t>();
    scales.nested_code = nc.data_ptr<float>();
    scales.nested_absmax = na.data_ptr<float>();
    scales.nested_blocksize = nested_blocksize;
    scales.offset = static_cast<float>(offset);
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be fp32 (or uint8 with the nested state)");
    scales.absmax = absmax.data_ptr<float>();
  }
  return scales;
}

// --- small-M product: y [M, N] = x [M, K] @ W.T straight from the packed codes -------------
//
// For decode and sampling (a few rows of x), the product is bound by reading the weight:
// this reads half a byte per weight, where dequantize + GEMM moves 4.5 (0.5 read, 4 written,
// 4 read back). Each weight is the same fp32 value dequantization gives (code * scale, one
// product), multiplied into fp32 accumulators; rows of W may start and end inside a block.

// One element's weight (scalar loop; the first element of a byte is its high nibble).
inline float weight_at(const uint8_t* packed, const float* table, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return table[(e & 1) ? (byte & 0xF) : (byte >> 4)];
}

void small_m_scalar(const float* x, const uint8_t* packed, const Scales& scales, const float* code,
                    int64_t blocksize, int64_t m, int64_t k, int64_t n0, int64_t n1, int64_t n, float* y) {
  float table[16];
  int64_t table_block = -1;
  for (int64_t row = n0; row < n1; ++row) {
    float sum[kMaxSmallM] = {};
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = row * k + j;
      if (e / blocksize != table_block) {
        table_block = e / blocksize;
        const float s = scales(table_block);
        for (int t = 0; t < 16; ++t) table[t] = code[t] * s;
      }
      const float w = weight_at(packed, table, e);
      for (int64_t i = 0; i < m; ++i) sum[i] += x[i * k + j] * w;
    }
    for (int64_t i = 0; i < m; ++i) y[i * n + row] = sum[i];
  }
}

#ifdef TRILORA_X86
TRILORA_AVX2 inline float hsum_avx2(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

// 16 weights from 8 bytes (elements e .. e + 15, e even), table split in lo8/hi8.
TRILORA_AVX2 inline void weights16_avx2(const uint8_t* bytes, __m256 lo8, __m256 hi8, __m256& v0, __m256& v1) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i hi = _mm256_srli_epi32(w, 4);
  const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi32(0xF));
  const __m256i ul = _mm256_unpacklo_epi32(hi, lo);
  const __m256i uh = _mm256_unpackhi_epi32(hi, lo);
  v0 = lookup_avx2(_mm256_permute2x128_si256(ul, uh, 0x20), lo8, hi8);
  v1 = lookup_avx2(_mm256_permute2x128_si256(ul, uh, 0x31), lo8, hi8);
}

template <int M>
TRILORA_AVX2 void small_m_rows_avx2(const float* x, const uint8_t* packed, const Scales& scales, const float* code,
                                    int64_t blocksize, int64_t k, int64_t n0, int64_t n1, int64_t n, float* y) {
  // two accumulators per row of x: M * 2 >= 2 chains of fused multiply-adds in flight
  const __m256 code_lo = _mm256_loadu_ps(code);
  const __m256 code_hi = _mm256_loadu_ps(code + 8);
  float table[16];
  for (int64_t row = n0; row < n1; ++row) {
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    float tail[M] = {};
    const int64_t start = row * k, end = start + k;
    int64_t e = start;
    int64_t block = -1;
    auto scalar_upto = [&](int64_t stop) {
      for (; e < stop; ++e) {
        if (e / blocksize != block) {
          block = e / blocksize;
          const float s = scales(block);
          for (int t = 0; t < 16; ++t) table[t] = code[t] * s;
        }
        const float w = weight_at(packed, table, e);
        for (int i = 0; i < M; ++i) tail[i] += x[i * k + (e - start)] * w;
      }
    };
    // up to the first 16-aligned element (blocks are multiples of 16: a group never straddles)
    scalar_upto(std::min(end, (start + 15) / 16 * 16));
    __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps();
    int64_t vec_block = -1;
    for (; e + 16 <= end; e += 16) {
      const int64_t b = e / blocksize;
      if (b != vec_block) {
        vec_block = b;
        const __m256 s = _mm256_set1_ps(scales(b));
        lo8 = _mm256_mul_ps(code_lo, s);
        hi8 = _mm256_mul_ps(code_hi, s);
      }
      __m256 v0, v1;
      weights16_avx2(packed + (e >> 1), lo8, hi8, v0, v1);
      const float* xe = x + (e - start);
      for (int i = 0; i < M; ++i) {
        acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + i * k), v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + i * k + 8), v1, acc[i][1]);
      }
    }
    block = -1;
    scalar_upto(end);
    for (int i = 0; i < M; ++i) y[i * n + row] = hsum_avx2(_mm256_add_ps(acc[i][0], acc[i][1])) + tail[i];
  }
}

void small_m_avx2(const float* x, const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                  int64_t m, int64_t k, int64_t n0, int64_t n1, int64_t n, float* y) {
  switch (m) {
    case 1: return small_m_rows_avx2<1>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 2: return small_m_rows_avx2<2>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 3: return small_m_rows_avx2<3>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 4: return small_m_rows_avx2<4>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 5: return small_m_rows_avx2<5>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 6: return small_m_rows_avx2<6>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    case 7: return small_m_rows_avx2<7>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
    default: return small_m_rows_avx2<8>(x, packed, scales, code, blocksize, k, n0, n1, n, y);
  }
}
#endif  // TRILORA_X86

}  // namespace

// packed: uint8 [(n + 1) / 2]; absmax: fp32 [nblocks], or uint8 [nblocks] with the nested
// state; code: fp32 [16]; out: a contiguous fp32/fp16/bf16 tensor of n elements, written.
void dequantize_4bit_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         const c10::optional<at::Tensor>& nested_absmax,
                         const c10::optional<at::Tensor>& nested_code, double offset,
                         int64_t nested_blocksize, int64_t blocksize, at::Tensor& out,
                         const std::string& isa_choice) {
  const int64_t n = out.numel();
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "out must be a contiguous CPU tensor");
  const Scales scales =
      checked_scales(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, blocksize, n);
  if (n == 0) return;
  const Isa isa = parse_isa(isa_choice);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* table = code.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_into<float>(src, scales, table, blocksize, n, out.data_ptr<float>(), isa);
      break;
    case at::kHalf:
      dequantize_into<c10::Half>(src, scales, table, blocksize, n, out.data_ptr<c10::Half>(), isa);
      break;
    case at::kBFloat16:
      dequantize_into<c10::BFloat16>(src, scales, table, blocksize, n, out.data_ptr<c10::BFloat16>(), isa);
      break;
    default:
      TORCH_CHECK(false, "dequantize_4bit writes fp32, fp16 or bf16, got ", out.scalar_type());
  }
}

at::Tensor small_m_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, double offset,
                               int64_t nested_blocksize, int64_t blocksize, int64_t n_out,
                               const std::string& isa_choice) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(0) <= kMaxSmallM, "small_m_linear_4bit takes at most ", kMaxSmallM, " rows, got ", x.size(0));
  TORCH_CHECK(n_out >= 0, "n_out must be >= 0");
  TORCH_CHECK(blocksize % 16 == 0, "small_m_linear_4bit needs a blocksize that is a multiple of 16, got ", blocksize);
  const int64_t m = x.size(0), k = x.size(1);
  const Scales scales = checked_scales(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize,
                                       blocksize, n_out * k);
  const Isa isa = parse_isa(isa_choice);
  at::Tensor y = at::empty({m, n_out}, x.options());
  if (m == 0 || n_out == 0) return y;
  if (k == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* table = code.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / k);
  at::parallel_for(0, n_out, grain, [&](int64_t r0, int64_t r1) {
#ifdef TRILORA_X86
    if (isa != Isa::kScalar) {
      small_m_avx2(xp, src, scales, table, blocksize, m, k, r0, r1, n_out, yp);
      return;
    }
#endif
    small_m_scalar(xp, src, scales, table, blocksize, m, k, r0, r1, n_out, yp);
  });
  return y;
}

}  // namespace trilora_cpu
