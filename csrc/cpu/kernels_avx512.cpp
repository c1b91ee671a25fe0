// AVX-512F kernels (16 fp32 lanes), compiled under a target pragma so the library
// builds with portable flags and picks this table at run time (binding.cpp) only on CPUs that
// report avx512f.
#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define DC_ISA avx512_isa
#define DIST_CAUTIOUS_ISA_AVX512
#include "kernels.h"
namespace dist_cautious_cpu {
template struct avx512_isa::Entry<avx512_isa::Avx512>;
}
#pragma GCC pop_options

namespace dist_cautious_cpu {
const KernelTable avx512_table = DIST_CAUTIOUS_KERNEL_TABLE(avx512_isa::Entry<avx512_isa::Avx512>, "avx512");
bool avx512_compiled() { return true; }
}  // namespace dist_cautious_cpu
#else
namespace dist_cautious_cpu {
const KernelTable avx512_table{"unavailable", 0};  // never selected: avx512_compiled() is false
bool avx512_compiled() { return false; }
}  // namespace dist_cautious_cpu
#endif
