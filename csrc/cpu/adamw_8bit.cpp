// trilora's CPU AdamW step with 8-bit blockwise state (part of the extension built by
// trilora.native.cpu_ext): one fused pass per 256-element block.
//
// The state is bitsandbytes' blockwise 8-bit format (trilora.optim.blockwise): uint8 codes
// into the signed map qmap1 (first moment) / unsigned map qmap2 (second moment), one fp32
// absmax per 256 elements. This kernel computes, value for value, what the torch path
// trilora.optim.blockwise.adamw_8bit_ computes with one torch op at a time (its torch ops are
// the reference; tests/optim/test_adamw_8bit_native.py compares bit for bit):
//
//     m = qmap1[c1] * absmax1            v = qmap2[c2] * absmax2            (fp32 products)
//     p = p * decay                                      (only when weight_decay != 0)
//     m = fma(coeff, g - m, base)        torch's lerp_(g, w1): coeff w1, base m when
//                                        |w1| < 0.5, else coeff w1 - 1, base g
//     v = fma(w2 * g, g, v * beta2)      mul_(beta2).addcmul_(g, g, value=w2)
//     p = p + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)           (addcdiv_)
//     absmax = max |m| of the block (NaN if any is NaN), codes = the nearest map value of
//     m / (absmax > 0 ? absmax : 1): the number of midpoints bounds[j] (j < 255) with
//     !(bounds[j] >= x), which is torch.bucketize(x, bounds[:-1]) (ties to the lower code,
//     NaN to 255)
//
// The two multiply-adds are fused because torch's CPU kernels fuse them (lerp's vector path
// calls fmadd, and the compiler contracts addcmul's self + value * t1 * t2); every other
// operation is rounded on its own (this file is built with -ffp-contract=off). All scalars
// are rounded to fp32 first, as torch does for an fp32 tensor and a Python number. The square
// root is IEEE's; torch's on an MKL build is MKL's (VML_HA), one ulp off for some values, so
// the torch path's parameter can differ by one rounding of its update (the moments, codes
// and absmax do not involve the square root).
//
// Requantizing: a 1-D table indexed by the sign, exponent and top 8 mantissa bits of x
// (|x| <= 1) gives a code c such that the answer is c or c + 1 for every float with those
// bits (the table is built and checked in Python, trilora.optim.blockwise.nearest_code_lut);
// one comparison with bounds[c] decides. |x| > 1 and NaN (possible only when the block's
// absmax is NaN) take the binary search that bucketize does.
//
// The AVX2 loop runs on AVX2 and AVX-512 CPUs; other CPUs get the portable loop, which
// computes the same values (std::fma is the correctly rounded multiply-add either way).

#include "avx2_convert.h"
#include "isa.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

namespace trilora_cpu {
namespace {

constexpr int64_t kBlock = 256;
// The requantizing table's keys: (bits of |x|) >> 15, clamped to [kLutLow, kLutHigh].
// kLutHigh is the key of 1.0; everything below 2^-23 shares the key kLutLow (the smallest
// nonzero midpoint of either map is 1.6e-7 > 2^-23 + one key's width).
constexpr int kLutShift = 15;
constexpr int32_t kOneBits = 0x3F800000;
constexpr int32_t kLutHigh = kOneBits >> kLutShift;
constexpr int32_t kLutLow = 104 << 8;
constexpr int32_t kLutKeys = kLutHigh - kLutLow + 1;  // per sign
constexpr int64_t kLutBytes = 2 * kLutKeys + 4;        // + 4: 32-bit gathers read 3 bytes past

struct Step {
  float decay, coeff, w2, beta2, bc2_sqrt, eps, neg_step_size;
  bool lerp_small;
  bool apply_decay;
};

struct Map {
  const float* qmap;    // [256]
  const float* bounds;  // [256], bounds[255] = +inf
  const uint8_t* lut;   // [kLutBytes]
};

// torch.bucketize(x, bounds[:255]) (right=False): its binary search, comparison for comparison.
inline int nearest_code(const float* bounds, float x) {
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (!(bounds[mid] >= x)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The same code through the table (see the top of the file): |x| <= 1 only.
inline int table_code(const Map& map, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t mag = static_cast<int32_t>(bits & 0x7FFFFFFFu);
  if (mag > kOneBits) return nearest_code(map.bounds, x);  // |x| > 1 or NaN
  const int32_t key = std::max(mag >> kLutShift, kLutLow);
  const int c = map.lut[key - kLutLow + ((bits >> 31) != 0 ? kLutKeys : 0)];
  return c + (map.bounds[c] >= x ? 0 : 1);
}

inline float block_scale(float absmax) { return absmax > 0.0f ? absmax : 1.0f; }

inline float nan_or(bool nan, float value) { return nan ? std::numeric_limits<float>::quiet_NaN() : value; }

// One element of the update (the portable loop and the vector loops' tails).
template <typename T, typename G>
inline void step_one(const Step& s, T& p_io, G g_in, uint8_t c1, uint8_t c2, float a1, float a2, const Map& m1,
                     const Map& m2, float& m_out, float& v_out) {
  float m = m1.qmap[c1] * a1;
  float v = m2.qmap[c2] * a2;
  const float g = static_cast<float>(g_in);
  float p = static_cast<float>(p_io);
  if (s.apply_decay) p = p * s.decay;
  m = std::fma(s.coeff, g - m, s.lerp_small ? m : g);
  v = std::fma(s.w2 * g, g, v * s.beta2);
  const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  p = p + (s.neg_step_size * m) / denom;
  p_io = static_cast<T>(p);
  m_out = m;
  v_out = v;
}

struct BlockAbsmax {
  float max = 0.0f;
  bool nan = false;
  void add(float x) {
    const float a = std::fabs(x);
    if (a != a) nan = true;
    if (a > max) max = a;
  }
  float value() const { return nan_or(nan, max); }
};

template <typename T, typename G>
void block_scalar(const Step& s, const Map& m1, const Map& m2, int64_t count, T* p, const G* g, uint8_t* c1,
                  uint8_t* c2, float* a1, float* a2) {
  float m[kBlock], v[kBlock];
  BlockAbsmax x1, x2;
  for (int64_t i = 0; i < count; ++i) {
    step_one(s, p[i], g[i], c1[i], c2[i], *a1, *a2, m1, m2, m[i], v[i]);
    x1.add(m[i]);
    x2.add(v[i]);
  }
  *a1 = x1.value();
  *a2 = x2.value();
  const float scale1 = block_scale(*a1), scale2 = block_scale(*a2);
  for (int64_t i = 0; i < count; ++i) {
    c1[i] = static_cast<uint8_t>(table_code(m1, m[i] / scale1));
    c2[i] = static_cast<uint8_t>(table_code(m2, v[i] / scale2));
  }
}

#ifdef TRILORA_X86

TRILORA_AVX2 inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }
TRILORA_AVX2 inline __m256 load8(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
TRILORA_AVX2 inline __m256 load8(const c10::BFloat16* src) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

TRILORA_AVX2 inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
TRILORA_AVX2 inline void store8(c10::Half* dst, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
TRILORA_AVX2 inline void store8(c10::BFloat16* dst, __m256 v) {
  const __m256i bits = bf16_bits_avx2(v);  // 8 x 16-bit values in 32-bit lanes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

TRILORA_AVX2 inline __m256i load_codes8(const uint8_t* src) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
}

// The nearest codes of 8 values: the table's candidate c, plus one where !(bounds[c] >= x).
// Returns the lanes that are out of the table's range (|x| > 1, NaN) as a bit mask.
TRILORA_AVX2 inline int quantize8(const Map& map, __m256 x, uint8_t* dst) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const int outside = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(kOneBits))));
  __m256i key = _mm256_srli_epi32(mag, kLutShift);
  key = _mm256_min_epi32(_mm256_max_epi32(key, _mm256_set1_epi32(kLutLow)), _mm256_set1_epi32(kLutHigh));
  const __m256i negative = _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(kLutKeys));
  const __m256i index = _mm256_add_epi32(_mm256_sub_epi32(key, _mm256_set1_epi32(kLutLow)), negative);
  const __m256i candidate = _mm256_and_si256(
      _mm256_i32gather_epi32(reinterpret_cast<const int*>(map.lut), index, 1), _mm256_set1_epi32(0xFF));
  const __m256 bound = _mm256_i32gather_ps(map.bounds, candidate, 4);
  const __m256 at_or_above = _mm256_cmp_ps(bound, x, _CMP_GE_OQ);
  const __m256i code =
      _mm256_add_epi32(candidate, _mm256_andnot_si256(_mm256_castps_si256(at_or_above), _mm256_set1_epi32(1)));
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
  return outside;
}

TRILORA_AVX2 inline float fma_avx2(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

template <typename T, typename G>
TRILORA_AVX2 void block_avx2(const Step& s, const Map& m1, const Map& m2, int64_t count, T* p, const G* g,
                             uint8_t* c1, uint8_t* c2, float* a1, float* a2) {
  alignas(32) float m[kBlock];
  alignas(32) float v[kBlock];
  const __m256 old1 = _mm256_set1_ps(*a1), old2 = _mm256_set1_ps(*a2);
  const __m256 decay = _mm256_set1_ps(s.decay), coeff = _mm256_set1_ps(s.coeff), w2 = _mm256_set1_ps(s.w2);
  const __m256 beta2 = _mm256_set1_ps(s.beta2), bc2 = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 neg_step = _mm256_set1_ps(s.neg_step_size);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 max1 = _mm256_setzero_ps(), max2 = _mm256_setzero_ps();
  __m256 nan1 = _mm256_setzero_ps(), nan2 = _mm256_setzero_ps();
  const int64_t vec_end = count & ~int64_t{7};
  for (int64_t i = 0; i < vec_end; i += 8) {
    __m256 mi = _mm256_mul_ps(_mm256_i32gather_ps(m1.qmap, load_codes8(c1 + i), 4), old1);
    __m256 vi = _mm256_mul_ps(_mm256_i32gather_ps(m2.qmap, load_codes8(c2 + i), 4), old2);
    const __m256 gi = load8(g + i);
    __m256 pi = load8(p + i);
    if (s.apply_decay) pi = _mm256_mul_ps(pi, decay);
    mi = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gi, mi), s.lerp_small ? mi : gi);
    vi = _mm256_fmadd_ps(_mm256_mul_ps(w2, gi), gi, _mm256_mul_ps(vi, beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
    pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(neg_step, mi), denom));
    store8(p + i, pi);
    _mm256_store_ps(m + i, mi);
    _mm256_store_ps(v + i, vi);
    const __m256 abs1 = _mm256_andnot_ps(sign, mi), abs2 = _mm256_andnot_ps(sign, vi);
    max1 = _mm256_max_ps(max1, abs1);
    max2 = _mm256_max_ps(max2, abs2);
    nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(mi, mi, _CMP_UNORD_Q));
    nan2 = _mm256_or_ps(nan2, _mm256_cmp_ps(vi, vi, _CMP_UNORD_Q));
  }
  alignas(32) float lanes1[8], lanes2[8];
  _mm256_store_ps(lanes1, max1);
  _mm256_store_ps(lanes2, max2);
  BlockAbsmax x1, x2;
  for (int j = 0; j < 8; ++j) {
    x1.add(lanes1[j]);
    x2.add(lanes2[j]);
  }
  x1.nan = x1.nan || _mm256_movemask_ps(nan1) != 0;
  x2.nan = x2.nan || _mm256_movemask_ps(nan2) != 0;
  for (int64_t i = vec_end; i < count; ++i) {  // the ragged end of the last block
    float mi = m1.qmap[c1[i]] * *a1;
    float vi = m2.qmap[c2[i]] * *a2;
    const float gi = static_cast<float>(g[i]);
    float pi = static_cast<float>(p[i]);
    if (s.apply_decay) pi = pi * s.decay;
    mi = fma_avx2(s.coeff, gi - mi, s.lerp_small ? mi : gi);
    vi = fma_avx2(s.w2 * gi, gi, vi * s.beta2);
    pi = pi + (s.neg_step_size * mi) / (std::sqrt(vi) / s.bc2_sqrt + s.eps);
    p[i] = static_cast<T>(pi);
    m[i] = mi;
    v[i] = vi;
    x1.add(mi);
    x2.add(vi);
  }
  *a1 = x1.value();
  *a2 = x2.value();
  const float scale1 = block_scale(*a1), scale2 = block_scale(*a2);
  const __m256 s1 = _mm256_set1_ps(scale1), s2 = _mm256_set1_ps(scale2);
  for (int64_t i = 0; i < vec_end; i += 8) {
    const int out1 = quantize8(m1, _mm256_div_ps(_mm256_load_ps(m + i), s1), c1 + i);
    const int out2 = quantize8(m2, _mm256_div_ps(_mm256_load_ps(v + i), s2), c2 + i);
    if ((out1 | out2) != 0) {  // a NaN absmax left values unscaled: bucketize's search
      for (int j = 0; j < 8; ++j) {
        if (out1 & (1 << j)) c1[i + j] = static_cast<uint8_t>(nearest_code(m1.bounds, m[i + j] / scale1));
        if (out2 & (1 << j)) c2[i + j] = static_cast<uint8_t>(nearest_code(m2.bounds, v[i + j] / scale2));
      }
    }
  }
  for (int64_t i = vec_end; i < count; ++i) {
    c1[i] = static_cast<uint8_t>(table_code(m1, m[i] / scale1));
    c2[i] = static_cast<uint8_t>(table_code(m2, v[i] / scale2));
  }
}

#endif  // TRILORA_X86

template <typename T, typename G>
void step_all(const Step& s, const Map& m1, const Map& m2, int64_t n, T* p, const G* g, uint8_t* c1, uint8_t* c2,
              float* a1, float* a2, Isa isa) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  // 64 blocks (16 Ki elements) per task: a LoRA factor of a few thousand elements stays on
  // one thread, where waking the others would cost more than it saves.
  at::parallel_for(0, nblocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t count = std::min(kBlock, n - start);
#ifdef TRILORA_X86
      if (isa != Isa::kScalar) {
        block_avx2<T, G>(s, m1, m2, count, p + start, g + start, c1 + start, c2 + start, a1 + b, a2 + b);
        continue;
      }
#endif
      block_scalar<T, G>(s, m1, m2, count, p + start, g + start, c1 + start, c2 + start, a1 + b, a2 + b);
    }
  });
}

template <typename T>
void dispatch_grad(const Step& s, const Map& m1, const Map& m2, int64_t n, T* p, const at::Tensor& g, uint8_t* c1,
                   uint8_t* c2, float* a1, float* a2, Isa isa) {
  switch (g.scalar_type()) {
    case at::kFloat:
      step_all<T, float>(s, m1, m2, n, p, g.data_ptr<float>(), c1, c2, a1, a2, isa);
      break;
    case at::kHalf:
      step_all<T, c10::Half>(s, m1, m2, n, p, g.data_ptr<c10::Half>(), c1, c2, a1, a2, isa);
      break;
    case at::kBFloat16:
      step_all<T, c10::BFloat16>(s, m1, m2, n, p, g.data_ptr<c10::BFloat16>(), c1, c2, a1, a2, isa);
      break;
    default:
      TORCH_CHECK(false, "adamw_8bit_step takes fp32, fp16 or bf16 gradients, got ", g.scalar_type());
  }
}

void check_map(const at::Tensor& qmap, const at::Tensor& bounds, const at::Tensor& lut, const char* name) {
  TORCH_CHECK(qmap.device().is_cpu() && qmap.scalar_type() == at::kFloat && qmap.is_contiguous() &&
                  qmap.numel() == 256,
              name, ": the map must be a contiguous fp32 [256] CPU tensor");
  TORCH_CHECK(bounds.device().is_cpu() && bounds.scalar_type() == at::kFloat && bounds.is_contiguous() &&
                  bounds.numel() == 256,
              name, ": the bounds must be a contiguous fp32 [256] CPU tensor");
  TORCH_CHECK(lut.device().is_cpu() && lut.scalar_type() == at::kByte && lut.is_contiguous() &&
                  lut.numel() == kLutBytes,
              name, ": the code table must be a contiguous uint8 [", kLutBytes, "] CPU tensor");
}

}  // namespace

int64_t adamw_8bit_lut_bytes() { return kLutBytes; }

void adamw_8bit_step(at::Tensor& p, const at::Tensor& g, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
                     at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& bounds1,
                     const at::Tensor& bounds2, const at::Tensor& lut1, const at::Tensor& lut2, double decay,
                     double w1, double beta2, double w2, double step_size, double bc2_sqrt, double eps,
                     bool apply_decay, const std::string& isa_choice) {
  const int64_t n = p.numel();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu() && state1.device().is_cpu() && state2.device().is_cpu() &&
                  absmax1.device().is_cpu() && absmax2.device().is_cpu(),
              "adamw_8bit_step (CPU extension) takes CPU tensors");
  TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "p and g must be contiguous");
  TORCH_CHECK(g.numel() == n, "g has ", g.numel(), " elements, p has ", n);
  for (const at::Tensor* t : {&state1, &state2}) {
    TORCH_CHECK(t->scalar_type() == at::kByte && t->is_contiguous() && t->numel() == n,
                "state1/state2 must be contiguous uint8 with ", n, " elements");
  }
  for (const at::Tensor* t : {&absmax1, &absmax2}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == nblocks,
                "absmax1/absmax2 must be contiguous fp32 with ", nblocks, " blocks");
  }
  check_map(qmap1, bounds1, lut1, "qmap1");
  check_map(qmap2, bounds2, lut2, "qmap2");
  if (n == 0) return;
  const Isa isa = parse_isa(isa_choice);
  Step s;
  // torch rounds a Python number to the tensor's fp32 before each op (lerp's weight too,
  // and 1 - weight is then computed in fp32).
  const float weight = static_cast<float>(w1);
  s.lerp_small = std::fabs(weight) < 0.5f;
  s.coeff = s.lerp_small ? weight : weight - 1.0f;
  s.decay = static_cast<float>(decay);
  s.w2 = static_cast<float>(w2);
  s.beta2 = static_cast<float>(beta2);
  s.bc2_sqrt = static_cast<float>(bc2_sqrt);
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-step_size);
  s.apply_decay = apply_decay;
  const Map m1{qmap1.data_ptr<float>(), bounds1.data_ptr<float>(), lut1.data_ptr<uint8_t>()};
  const Map m2{qmap2.data_ptr<float>(), bounds2.data_ptr<float>(), lut2.data_ptr<uint8_t>()};
  uint8_t* c1 = state1.data_ptr<uint8_t>();
  uint8_t* c2 = state2.data_ptr<uint8_t>();
  float* a1 = absmax1.data_ptr<float>();
  float* a2 = absmax2.data_ptr<float>();
  switch (p.scalar_type()) {
    case at::kFloat:
      dispatch_grad<float>(s, m1, m2, n, p.data_ptr<float>(), g, c1, c2, a1, a2, isa);
      break;
    case at::kHalf:
      dispatch_grad<c10::Half>(s, m1, m2, n, p.data_ptr<c10::Half>(), g, c1, c2, a1, a2, isa);
      break;
    case at::kBFloat16:
      dispatch_grad<c10::BFloat16>(s, m1, m2, n, p.data_ptr<c10::BFloat16>(), g, c1, c2, a1, a2, isa);
      break;
    default:
      TORCH_CHECK(false, "adamw_8bit_step updates fp32, fp16 or bf16 parameters, got ", p.scalar_type());
  }
}

}  // namespace trilora_cpu
