// Portable kernels: the scalar element formulas of kernels.h, for CPUs without AVX2 (and for
// tests that compare every ISA against the reference). No target pragma.
#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels_api.h"

#define DC_ISA scalar_isa
#include "kernels.h"

namespace dist_cautious_cpu {
template struct scalar_isa::Entry<scalar_isa::Scalar>;
const KernelTable scalar_table = DIST_CAUTIOUS_KERNEL_TABLE(scalar_isa::Entry<scalar_isa::Scalar>, "scalar");
}  // namespace dist_cautious_cpu
