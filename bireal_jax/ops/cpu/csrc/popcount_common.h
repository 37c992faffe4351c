// What the XOR + popcount kernels (xor_conv.cc: the training forward; packed_conv.cc: packed
// inference) share: packing the signs of float activations into 32-bit words.
#ifndef BIREAL_JAX_OPS_CPU_CSRC_POPCOUNT_COMMON_H_
#define BIREAL_JAX_OPS_CPU_CSRC_POPCOUNT_COMMON_H_

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bireal {

// Sign bits of `count` ≤ 32 floats: bit k = not (v[k] >= 0), as `ops/bits.py`'s pack_signs
// (NaN packs to 1). A full word by vector compares where the CPU has them; every path gives
// the same bits.
inline uint32_t PackWord(const float* v, int64_t count) {
#if defined(__AVX512F__)
  if (count == 32) {
    const __m512 zero = _mm512_setzero_ps();
    const uint32_t lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(v), zero, _CMP_NGE_UQ);
    const uint32_t hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + 16), zero, _CMP_NGE_UQ);
    return lo | (hi << 16);
  }
#elif defined(__AVX2__)
  if (count == 32) {
    const __m256 zero = _mm256_setzero_ps();
    uint32_t word = 0;
    for (int q = 0; q < 4; ++q)
      word |= static_cast<uint32_t>(_mm256_movemask_ps(
                  _mm256_cmp_ps(_mm256_loadu_ps(v + 8 * q), zero, _CMP_NGE_UQ)))
              << (8 * q);
    return word;
  }
#endif
  uint32_t word = 0;
  for (int64_t k = 0; k < count; ++k) word |= static_cast<uint32_t>(!(v[k] >= 0.0f)) << k;
  return word;
}

}  // namespace bireal

#endif  // BIREAL_JAX_OPS_CPU_CSRC_POPCOUNT_COMMON_H_
