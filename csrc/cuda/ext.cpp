// Python bindings of trilora's CUDA extension (built by trilora.native.cuda_ext.load()).

// pybind11 and torch's tensor casters, not torch/extension.h (the whole C++ frontend): see
// csrc/cpu/ext.cpp.
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace trilora {

bool concurrent_managed_access(int64_t device);
at::Tensor managed_zeros(int64_t nbytes, int64_t device);
void prefetch(const at::Tensor& t, int64_t device, int64_t stream);
void advise_tensor(const at::Tensor& t, const std::string& advice, int64_t device);
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                     const c10::optional<at::Tensor>& nested_code,
                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                     int64_t n_out, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& xa, const c10::optional<at::Tensor>& lora_b,
                     double scale);

}  // namespace trilora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "trilora CUDA extension: managed memory for paged optimizer state, 4-bit decode GEMV";
  m.def("concurrent_managed_access", &trilora::concurrent_managed_access, py::arg("device"),
        "Whether the device can access managed memory concurrently with the host.");
  m.def("managed_zeros", &trilora::managed_zeros, py::arg("nbytes"), py::arg("device"),
        "uint8 CUDA tensor of nbytes in zeroed managed memory that prefers the host.");
  m.def("prefetch", &trilora::prefetch, py::arg("tensor"), py::arg("device"), py::arg("stream"),
        "cudaMemPrefetchAsync of a managed tensor to a device index (-1: the host) on a stream handle.");
  m.def("advise", &trilora::advise_tensor, py::arg("tensor"), py::arg("advice"), py::arg("device"),
        "cudaMemAdvise: preferred_location, accessed_by or read_mostly, for a device index (-1: host).");
  m.def("gemv_4bit", &trilora::gemv_4bit, py::arg("x"), py::arg("packed"), py::arg("absmax"),
        py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("blocksize"), py::arg("n_out"), py::arg("bias"), py::arg("xa"), py::arg("lora_b"),
        py::arg("scale"), "4-bit decode GEMV for M <= 4 (see csrc/cuda/gemv_4bit.cu).");
}
