// bf16 / fp16 storage types and the conversion intrinsics of cuda_bf16.hpp / cuda_fp16.hpp, bit
// for bit (tests only; see cuda_on_cpu.h). The types carry only their bits and convert only
// through the intrinsics, as under torch's __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so code that compiles here compiles under nvcc too.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

namespace dc_emu {

enum class Round { kNearestEven, kTowardZero, kDown, kUp };

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Whether to add one unit to a truncated magnitude `q` that dropped `rem` of `half * 2`.
inline bool round_up(Round mode, bool negative, uint32_t q, uint64_t rem, uint64_t half) {
  switch (mode) {
    case Round::kNearestEven: return rem > half || (rem == half && (q & 1u));
    case Round::kTowardZero: return false;
    case Round::kDown: return negative && rem != 0;
    case Round::kUp: return !negative && rem != 0;
  }
  return false;
}

inline uint16_t float_to_bf16(float f, Round mode) {
  const uint32_t u = f32_bits(f);
  if (std::isnan(f)) return 0x7fffu;  // CUDA's canonical bf16 NaN
  const bool negative = u >> 31;
  uint32_t q = u >> 16;  // sign, exponent and the top 7 mantissa bits
  const uint32_t rem = u & 0xffffu;
  // inf stays inf (rem == 0); a finite value may round up into inf, as on the GPU.
  if (round_up(mode, negative, q, rem, 0x8000u)) ++q;
  return static_cast<uint16_t>(q);
}

inline uint16_t float_to_half(float f, Round mode) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const bool negative = sign != 0;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;  // CUDA's canonical fp16 NaN
  const uint16_t max_finite = 0x7bffu, inf = 0x7c00u;
  const bool to_inf = mode == Round::kNearestEven || (mode == Round::kUp && !negative) || (mode == Round::kDown && negative);
  if (a == 0x7f800000u) return sign | inf;
  const int e = static_cast<int>(a >> 23) - 127;
  if (e > 15) return sign | (to_inf ? inf : max_finite);
  uint32_t q;
  uint64_t rem, half;
  if (e >= -14) {  // normal half: keep 10 of the 23 mantissa bits
    const uint32_t mant = a & 0x7fffffu;
    q = (static_cast<uint32_t>(e + 15) << 10) | (mant >> 13);
    rem = mant & 0x1fffu;
    half = 0x1000u;
  } else {  // subnormal half (or zero): the value in units of 2^-24
    if (a == 0) return sign;
    const uint64_t mant24 = (a >> 23) ? ((a & 0x7fffffu) | 0x800000u) : (a & 0x7fffffu);
    const int s = (a >> 23) ? (-e - 1) : 125;  // a float subnormal is mant * 2^-149
    if (s >= 40) {
      q = 0;
      rem = 1;  // nonzero, below half
      half = uint64_t(1) << 62;
    } else {
      q = static_cast<uint32_t>(mant24 >> s);
      rem = mant24 & ((uint64_t(1) << s) - 1);
      half = uint64_t(1) << (s - 1);
    }
  }
  if (round_up(mode, negative, q, rem, half)) ++q;  // a carry moves into the exponent correctly
  if (q >= inf) return sign | (to_inf ? inf : max_finite);
  return sign | static_cast<uint16_t>(q);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (e == 0x1f) return f32_from(sign | 0x7f800000u | (mant << 13));
  if (e == 0) {
    const float value = std::ldexp(static_cast<float>(mant), -24);  // exact
    return sign ? -value : value;
  }
  return f32_from(sign | ((e + 112u) << 23) | (mant << 13));
}

}  // namespace dc_emu

inline float __bfloat162float(__nv_bfloat16 b) { return dc_emu::f32_from(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {dc_emu::float_to_bf16(f, dc_emu::Round::kNearestEven)}; }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return {dc_emu::float_to_bf16(f, dc_emu::Round::kTowardZero)}; }
inline __nv_bfloat16 __float2bfloat16_rd(float f) { return {dc_emu::float_to_bf16(f, dc_emu::Round::kDown)}; }
inline __nv_bfloat16 __float2bfloat16_ru(float f) { return {dc_emu::float_to_bf16(f, dc_emu::Round::kUp)}; }

inline float __half2float(__half h) { return dc_emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {dc_emu::float_to_half(f, dc_emu::Round::kNearestEven)}; }
inline __half __float2half_rz(float f) { return {dc_emu::float_to_half(f, dc_emu::Round::kTowardZero)}; }
inline __half __float2half_rd(float f) { return {dc_emu::float_to_half(f, dc_emu::Round::kDown)}; }
inline __half __float2half_ru(float f) { return {dc_emu::float_to_half(f, dc_emu::Round::kUp)}; }
