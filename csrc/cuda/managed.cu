// CUDA managed memory as torch tensors, for trilora.optim's paging="uvm".
//
// The optimizer keeps each parameter's state in one managed allocation that lives on the
// host between updates: allocated with cudaMallocManaged, advised to prefer host memory and to
// be mapped for the GPU, and zeroed from the host so its pages start there. Before a page is
// updated it is prefetched to the GPU on a side stream, and back to the host after, so the
// device holds only the pages in flight (bitsandbytes' paged optimizers allocate managed
// memory the same way but leave evicted pages wherever the driver put them).
//
// The runtime API changed in CUDA 13: cudaMemAdvise and cudaMemPrefetchAsync take a
// cudaMemLocation (12.2 had them as *_v2); both spellings are handled below.

// The tensor class and the one operator used (at::from_blob), not <ATen/ATen.h>: every
// operator's declarations would triple the compile time (nvcc parses them once per arch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

namespace trilora {

namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// device < 0 means the host.
cudaError_t advise(const void* ptr, size_t bytes, cudaMemoryAdvise advice, int device) {
#if CUDART_VERSION >= 12020
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(ptr, bytes, advice, loc);
#else
  return cudaMemAdvise_v2(ptr, bytes, advice, loc);
#endif
#else
  return cudaMemAdvise(ptr, bytes, advice, device < 0 ? cudaCpuDeviceId : device);
#endif
}

cudaError_t prefetch_async(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 12020
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
  return cudaMemPrefetchAsync_v2(ptr, bytes, loc, 0, stream);
#endif
#else
  return cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

}  // namespace

bool concurrent_managed_access(int64_t device) {
  int value = 0;
  check(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, static_cast<int>(device)),
        "cudaDeviceGetAttribute(ConcurrentManagedAccess)");
  return value != 0;
}

at::Tensor managed_zeros(int64_t nbytes, int64_t device) {
  TORCH_CHECK(nbytes >= 0, "managed_zeros: nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK(device >= 0, "managed_zeros: device must be a CUDA device index, got ", device);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(nbytes, 1));
  void* ptr = nullptr;
  check(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal), "cudaMallocManaged");
  const int dev = static_cast<int>(device);
  cudaError_t err = advise(ptr, bytes, cudaMemAdviseSetPreferredLocation, -1);
  if (err == cudaSuccess) {
    err = advise(ptr, bytes, cudaMemAdviseSetAccessedBy, dev);
  }
  if (err != cudaSuccess) {
    cudaFree(ptr);
    check(err, "cudaMemAdvise");
  }
  std::memset(ptr, 0, bytes);  // first touch on the host: the pages start there
  auto options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device);
  return at::from_blob(
      ptr, {nbytes}, [](void* p) { cudaFree(p); }, options,
      at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

void prefetch(const at::Tensor& t, int64_t device, int64_t stream) {
  if (t.numel() == 0) {
    return;
  }
  TORCH_CHECK(t.is_contiguous(), "prefetch: the tensor must be contiguous");
  check(prefetch_async(t.data_ptr(), static_cast<size_t>(t.nbytes()), static_cast<int>(device),
                       reinterpret_cast<cudaStream_t>(stream)),
        "cudaMemPrefetchAsync");
}

void advise_tensor(const at::Tensor& t, const std::string& advice, int64_t device) {
  if (t.numel() == 0) {
    return;
  }
  cudaMemoryAdvise a;
  if (advice == "preferred_location") {
    a = cudaMemAdviseSetPreferredLocation;
  } else if (advice == "accessed_by") {
    a = cudaMemAdviseSetAccessedBy;
  } else if (advice == "read_mostly") {
    a = cudaMemAdviseSetReadMostly;
  } else {
    TORCH_CHECK(false, "advise: unknown advice '", advice,
                "'; expected preferred_location, accessed_by or read_mostly");
  }
  check(advise(t.data_ptr(), static_cast<size_t>(t.nbytes()), a, static_cast<int>(device)),
        "cudaMemAdvise");
}

}  // namespace trilora
