// AVX2 + FMA + F16C kernels (8 fp32 lanes), compiled under a target pragma so the library
// builds with portable flags and picks this table at run time (binding.cpp) only on CPUs that
// report avx2, fma and f16c.
#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DC_ISA avx2_isa
#define DIST_CAUTIOUS_ISA_AVX2
#include "kernels.h"
namespace dist_cautious_cpu {
template struct avx2_isa::Entry<avx2_isa::Avx2>;
}
#pragma GCC pop_options

namespace dist_cautious_cpu {
const KernelTable avx2_table = DIST_CAUTIOUS_KERNEL_TABLE(avx2_isa::Entry<avx2_isa::Avx2>, "avx2");
bool avx2_compiled() { return true; }
}  // namespace dist_cautious_cpu
#else
namespace dist_cautious_cpu {
const KernelTable avx2_table{"unavailable", 0};  // never selected: avx2_compiled() is false
bool avx2_compiled() { return false; }
}  // namespace dist_cautious_cpu
#endif
