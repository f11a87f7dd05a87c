// Math for the CPU's float lane loops: exp and log written branch-free so that GCC vectorises the
// loops that call them across pixels, and the function multiversioning those loops are compiled with.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace hss {
namespace cpu {

// The float lane loops are compiled for AVX-512, for AVX2 and for the baseline x86-64, and the loader
// picks one per machine (GCC function multiversioning), so that one build runs everywhere.
// x86-64-v4 is AVX-512 (16 float lanes), v3 AVX2 with FMA; GCC before 11 knows neither name.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define HSS_LANES_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HSS_LANES_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define HSS_LANES_TARGETS
#endif

// exp for the float lane loops: branch-free (clamp, Cephes' degree-6 polynomial on [-ln2/2, ln2/2],
// exponent by integer shift), so that compilers vectorise the loops that call it; about 1 ulp. Inputs
// below -87 give 2^-126 instead of a denormal or 0, which the sums here cannot notice.
__attribute__((always_inline)) inline float vexp(float v) {
  v = std::min(std::max(v, -87.0f), 88.0f);
  // n = round(v / ln2) by the 1.5 * 2^23 trick: two adds, no branch or rounding instruction.
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = v - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * r2 + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// log(1 + m) + e ln 2 for m in [sqrt(1/2) - 1, sqrt(2) - 1]: Cephes' logf polynomial (degree 9), with
// ln 2 split in two so that e ln 2 adds no rounding. The tail of vlog and of tree_min.cpp's vlog1p01.
__attribute__((always_inline)) inline float vlog_reduced(float m, float e) {
  const float z = m * m;
  float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
                 1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
             3.3333331174e-1f) * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// log for the float lane loops, x > 0 and normal: Cephes' logf, branch-free (mantissa in
// [sqrt(1/2), sqrt(2)) by selects, degree-9 polynomial); about 1 ulp.
__attribute__((always_inline)) inline float vlog(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  return vlog_reduced(m, e);
}

}  // namespace cpu
}  // namespace hss
