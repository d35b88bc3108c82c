// Run-time choice of the x86 instruction set for trilora's CPU kernels.
//
// The extension is compiled without -march flags, so one cached build runs on any x86-64 CPU;
// the kernels that benefit carry __attribute__((target(...))) variants and dispatch on
// best_isa(). Tests force the narrower loops with the isa argument of the bindings.

#pragma once

#include <c10/util/Exception.h>

#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define TRILORA_X86 1
#endif

namespace trilora_cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_isa() {
#ifdef TRILORA_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
#else
  return Isa::kScalar;
#endif
}

inline std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// "auto" -> best_isa(); a named ISA the CPU lacks is an error.
inline Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  Isa want = Isa::kScalar;
  if (name == "avx2") {
    want = Isa::kAvx2;
  } else if (name == "avx512") {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK(name == "scalar", "isa must be auto, scalar, avx2 or avx512, got ", name);
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa()), "this CPU does not support ", name);
  return want;
}

}  // namespace trilora_cpu
