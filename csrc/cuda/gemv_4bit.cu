// 4-bit (NF4/FP4, bitsandbytes layout) decode GEMV: y[M, N] = x[M, K] @ W[N, K].T for M <= 4,
// with the bias and the LoRA up-projection (y += scale * xa @ B.T) in the epilogue.
//
// Decode (generation) runs the base projection with one to four tokens: it is a stream over the
// packed weight, N * K / 2 bytes, and nothing else matters. One warp owns one output row;
// each lane loads 16 bytes (32 weights) per iteration with one vector load, decodes them through
// the 16-entry table in shared memory, scales them by their block's absmax (fp32, or the
// double-quantized uint8 code: nested_code[q] * nested_absmax[b / 256] + offset), rounds them to
// the activation dtype as the dequantize-then-matmul reference does, and multiplies them with
// the M activation rows (16-byte loads, L1/L2 resident: every warp reads the same x). The
// warp's partial sums are reduced with shuffles; lane 0 adds the bias and the LoRA term and
// writes y. No split-K partials, no second kernel.
//
// Requirements (the Python side checks them and otherwise uses the Triton kernel): K % 32 == 0
// (each row starts on a 16-byte boundary and a 32-weight chunk never straddles an absmax block,
// blocksizes being powers of two >= 32), 16-byte aligned packed bytes and activation rows.

// The tensor class and the one operator used (at::empty), not <ATen/ATen.h>: every
// operator's declarations would triple the compile time (nvcc parses them once per arch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace trilora {

namespace {

constexpr int kWarps = 4;  // output rows per thread block
constexpr int kMaxM = 4;

template <typename T>
struct Act;

template <>
struct Act<float> {
  static constexpr int kPerVec = 4;
  __device__ static float get(const uint4& v, int i) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
    return __uint_as_float(w[i]);
  }
  __device__ static float round(float f) { return f; }
  __device__ static float load(const float* p) { return *p; }
  __device__ static float store(float f) { return f; }
};

template <>
struct Act<__half> {
  static constexpr int kPerVec = 8;
  __device__ static float get(const uint4& v, int i) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
    const unsigned int word = w[i >> 1];
    const unsigned short bits = (i & 1) ? static_cast<unsigned short>(word >> 16)
                                        : static_cast<unsigned short>(word & 0xFFFFu);
    return __half2float(__ushort_as_half(bits));
  }
  __device__ static float round(float f) { return __half2float(__float2half_rn(f)); }
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static __half store(float f) { return __float2half_rn(f); }
};

template <>
struct Act<__nv_bfloat16> {
  static constexpr int kPerVec = 8;
  __device__ static float get(const uint4& v, int i) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
    const unsigned int word = w[i >> 1];
    const unsigned int bits = (i & 1) ? (word & 0xFFFF0000u) : (word << 16);
    return __uint_as_float(bits);
  }
  __device__ static float round(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
};

template <typename T, int M, bool DQ, typename LB>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_4bit_kernel(const T* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ packed,
                     const void* __restrict__ absmax, const float* __restrict__ code,
                     const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
                     const float* __restrict__ offset_ptr, int blocksize_log2, int n, int k, const T* __restrict__ bias,
                     const float* __restrict__ xa, int r, const LB* __restrict__ lora_b, float scale,
                     T* __restrict__ y, int64_t ldy) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[DQ ? 256 : 1];
  if (threadIdx.x < 16) {
    s_code[threadIdx.x] = code[threadIdx.x];
  }
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      s_ncode[i] = nested_code[i];
    }
  }
  __syncthreads();
  const float offset = DQ ? *offset_ptr : 0.0f;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= n) {
    return;
  }
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = 0.0f;
  }
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + static_cast<int64_t>(row) * (k / 2));
  const int chunks = k / 32;
  constexpr int kVecs = 32 / Act<T>::kPerVec;  // 16-byte loads per 32 activations
  for (int c = lane; c < chunks; c += 32) {
    const uint4 wq = __ldg(wrow + c);
    const int64_t block = (static_cast<int64_t>(row) * k + static_cast<int64_t>(c) * 32) >> blocksize_log2;
    float s;
    if (DQ) {
      const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
      s = s_ncode[q] * nested_absmax[block >> 8] + offset;
    } else {
      s = static_cast<const float*>(absmax)[block];
    }
    const unsigned int words[4] = {wq.x, wq.y, wq.z, wq.w};
    float w[32];
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const unsigned int byte = (words[b >> 2] >> (8 * (b & 3))) & 0xFFu;
      w[2 * b] = Act<T>::round(s_code[byte >> 4] * s);  // first element: high nibble
      w[2 * b + 1] = Act<T>::round(s_code[byte & 0xFu] * s);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xv = reinterpret_cast<const uint4*>(x + m * ldx + static_cast<int64_t>(c) * 32);
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        const uint4 xr = __ldg(xv + v);
#pragma unroll
        for (int i = 0; i < Act<T>::kPerVec; ++i) {
          acc[m] = fmaf(w[v * Act<T>::kPerVec + i], Act<T>::get(xr, i), acc[m]);
        }
      }
    }
  }
  if (xa != nullptr) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float l = 0.0f;
      for (int j = lane; j < r; j += 32) {
        l = fmaf(xa[m * r + j], Act<LB>::load(lora_b + static_cast<int64_t>(row) * r + j), l);
      }
      acc[m] = fmaf(scale, l, acc[m]);  // summed into the lane partials, reduced below
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], off);
    }
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Act<T>::load(bias + row) : 0.0f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      y[m * ldy + row] = Act<T>::store(acc[m] + b);
    }
  }
}

template <typename T, int M, bool DQ, typename LB>
void launch(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
            const at::Tensor& code, const float* nested_absmax, const float* nested_code,
            const float* offset, int blocksize_log2, int n, int k, const at::Tensor& bias,
            const at::Tensor& xa, const at::Tensor& lora_b, float scale, at::Tensor& y) {
  const dim3 grid((n + kWarps - 1) / kWarps);
  const dim3 block(kWarps * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  gemv_4bit_kernel<T, M, DQ, LB><<<grid, block, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), packed.data_ptr<uint8_t>(),
      absmax.data_ptr(), code.data_ptr<float>(), nested_absmax, nested_code, offset,
      blocksize_log2, n, k, bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr,
      xa.defined() ? xa.data_ptr<float>() : nullptr, xa.defined() ? static_cast<int>(xa.size(1)) : 0,
      lora_b.defined() ? reinterpret_cast<const LB*>(lora_b.data_ptr()) : nullptr, scale,
      reinterpret_cast<T*>(y.data_ptr()), y.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DQ, typename LB>
void dispatch_m(int m, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                const at::Tensor& code, const float* nabs, const float* ncode, const float* offset,
                int bs_log2, int n, int k, const at::Tensor& bias, const at::Tensor& xa,
                const at::Tensor& lora_b, float scale, at::Tensor& y) {
  switch (m) {
    case 1:
      launch<T, 1, DQ, LB>(x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
      break;
    case 2:
      launch<T, 2, DQ, LB>(x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
      break;
    case 3:
      launch<T, 3, DQ, LB>(x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
      break;
    default:
      launch<T, 4, DQ, LB>(x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
      break;
  }
}

template <typename T, bool DQ>
void dispatch_lora(int m, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                   const at::Tensor& code, const float* nabs, const float* ncode,
                   const float* offset, int bs_log2, int n, int k, const at::Tensor& bias, const at::Tensor& xa,
                   const at::Tensor& lora_b, float scale, at::Tensor& y) {
  if (lora_b.defined() && lora_b.scalar_type() == at::kFloat) {
    dispatch_m<T, DQ, float>(m, x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
  } else {
    dispatch_m<T, DQ, T>(m, x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
  }
}

template <typename T>
void dispatch_dq(bool dq, int m, const at::Tensor& x, const at::Tensor& packed,
                 const at::Tensor& absmax, const at::Tensor& code, const float* nabs,
                 const float* ncode, const float* offset, int bs_log2, int n, int k,
                 const at::Tensor& bias, const at::Tensor& xa, const at::Tensor& lora_b,
                 float scale, at::Tensor& y) {
  if (dq) {
    dispatch_lora<T, true>(m, x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
  } else {
    dispatch_lora<T, false>(m, x, packed, absmax, code, nabs, ncode, offset, bs_log2, n, k, bias, xa, lora_b, scale, y);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                     const c10::optional<at::Tensor>& nested_code,
                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                     int64_t n_out, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& xa, const c10::optional<at::Tensor>& lora_b,
                     double scale) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "gemv_4bit: x must be a 2-D CUDA tensor");
  const int64_t m = x.size(0), k = x.size(1), n = n_out;
  TORCH_CHECK(m >= 1 && m <= kMaxM, "gemv_4bit: x must have 1 to ", kMaxM, " rows, got ", m);
  TORCH_CHECK(k % 32 == 0, "gemv_4bit: K must be a multiple of 32, got ", k);
  TORCH_CHECK(x.stride(1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 && aligned16(x.data_ptr()),
              "gemv_4bit: x rows must be contiguous and 16-byte aligned");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
              "gemv_4bit: x must be fp16, bf16 or fp32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == n * k / 2 &&
                  aligned16(packed.data_ptr()),
              "gemv_4bit: packed must be N*K/2 contiguous, 16-byte aligned uint8");
  for (const at::Tensor* t : {&packed, &absmax, &code}) {
    TORCH_CHECK(t->device() == x.device(), "gemv_4bit: every tensor must be on ", x.device());
  }
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
              "gemv_4bit: blocksize must be a power of two >= 32, got ", blocksize);
  const int64_t nblocks = (n * k + blocksize - 1) / blocksize;
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "gemv_4bit: code must be 16 fp32 values");
  const bool dq = nested_absmax.has_value();
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == nblocks &&
                  absmax.scalar_type() == (dq ? at::kByte : at::kFloat),
              "gemv_4bit: absmax must be ", nblocks, dq ? " uint8 codes" : " fp32 values");
  const float* nabs = nullptr;
  const float* ncode = nullptr;
  const float* off = nullptr;
  if (dq) {
    TORCH_CHECK(nested_code.has_value() && nested_code->numel() == 256 &&
                    nested_code->scalar_type() == at::kFloat && nested_absmax->scalar_type() == at::kFloat &&
                    nested_absmax->numel() >= (nblocks + 255) / 256,
                "gemv_4bit: double quantization needs fp32 nested_absmax and a 256-entry nested_code");
    TORCH_CHECK(offset.has_value() && offset->numel() == 1 && offset->scalar_type() == at::kFloat &&
                    offset->is_cuda(),
                "gemv_4bit: double quantization needs the fp32 offset on the device");
    nabs = nested_absmax->data_ptr<float>();
    ncode = nested_code->data_ptr<float>();
    off = offset->data_ptr<float>();
  }
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (b.defined()) {
    TORCH_CHECK(b.scalar_type() == st && b.numel() == n && b.is_contiguous(),
                "gemv_4bit: bias must be [N] in x's dtype");
  }
  at::Tensor a = xa.has_value() ? *xa : at::Tensor();
  at::Tensor lb = lora_b.has_value() ? *lora_b : at::Tensor();
  TORCH_CHECK(a.defined() == lb.defined(), "gemv_4bit: xa and lora_b go together");
  if (a.defined()) {
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 2 && a.size(0) == m,
                "gemv_4bit: xa must be contiguous fp32 [M, r]");
    TORCH_CHECK(lb.is_contiguous() && lb.dim() == 2 && lb.size(0) == n && lb.size(1) == a.size(1) &&
                    (lb.scalar_type() == at::kFloat || lb.scalar_type() == st),
                "gemv_4bit: lora_b must be contiguous [N, r] in fp32 or x's dtype");
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({m, n}, x.options());
  int bs_log2 = 0;
  while ((int64_t{1} << bs_log2) < blocksize) {
    ++bs_log2;
  }
  const float sc = static_cast<float>(scale);
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (st == at::kFloat) {
    dispatch_dq<float>(dq, mi, x, packed, absmax, code, nabs, ncode, off, bs_log2, ni, ki, b, a, lb, sc, y);
  } else if (st == at::kHalf) {
    dispatch_dq<__half>(dq, mi, x, packed, absmax, code, nabs, ncode, off, bs_log2, ni, ki, b, a, lb, sc, y);
  } else {
    dispatch_dq<__nv_bfloat16>(dq, mi, x, packed, absmax, code, nabs, ncode, off, bs_log2, ni, ki, b, a, lb, sc, y);
  }
  return y;
}

}  // namespace trilora
