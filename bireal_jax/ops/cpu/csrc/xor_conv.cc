// Binary convolution forward for the CPU train step, as an XLA FFI custom call: for x ∈ {±1}
// (NHWC) and an HWIO kernel w = α·sign(W), y = α · Σ x·sign(W) with zero padding, computed as
// XOR + popcount on sign bits packed 32 channels to a word. The sums are exact integers, so y
// equals the f32 convolution of the same operands (and `packed.xor_popcount_conv`) bit for bit.
//
// Why in C++: XLA fuses the pure-JAX version into loops that run the popcounts one 32-bit word
// at a time; here each tap's word is XORed with 16 output channels' kernel words per AVX-512
// instruction (VPOPCNTDQ), or with 8 per AVX2 one (popcount by nibble-table lookups), the path
// chosen at compile time, else plain C++. Zero padding needs no correction: taps outside the
// image are skipped, so each output sums `taps · C − 2 · popcount` over its valid taps only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "popcount_common.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BIREAL_XOR_AVX512 1
#elif defined(__AVX2__)
#define BIREAL_XOR_AVX2 1
#endif

using bireal::PackWord;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad, nw;
};

// Calls f(x words, kernel words + oc) for each tap of output pixel (b, oy, ox) that falls inside
// the image (zero padding contributes nothing) and returns how many did.
template <typename F>
inline int64_t ForValidTaps(const Geometry& g, const uint32_t* xb, const uint32_t* kb, int64_t b,
                            int64_t oy, int64_t ox, int64_t oc, F&& f) {
  int64_t valid = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = oy * g.stride + i - g.pad;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ix = ox * g.stride + j - g.pad;
      if (ix < 0 || ix >= g.w) continue;
      ++valid;
      f(xb + ((b * g.h + iy) * g.w + ix) * g.nw, kb + (i * g.kw + j) * g.nw * g.o + oc);
    }
  }
  return valid;
}

#ifdef BIREAL_XOR_AVX512
// Output channels [oc, oc + 16·V) of one output pixel, V accumulators of 16 lanes.
template <int V>
inline void PixelBlock(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                       const float* alpha, int64_t b, int64_t oy, int64_t ox, int64_t oc,
                       float* out) {
  __m512i acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_si512();
  const int64_t valid = ForValidTaps(g, xb, kb, b, oy, ox, oc,
                                     [&](const uint32_t* xw, const uint32_t* kt) {
    for (int64_t u = 0; u < g.nw; ++u) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(xw[u]));
      for (int v = 0; v < V; ++v)
        acc[v] = _mm512_add_epi32(acc[v], _mm512_popcnt_epi32(_mm512_xor_si512(
                                              xv, _mm512_loadu_si512(kt + u * g.o + 16 * v))));
    }
  });
  const __m512i full = _mm512_set1_epi32(static_cast<int>(valid * g.c));
  for (int v = 0; v < V; ++v) {
    const __m512i d = _mm512_sub_epi32(full, _mm512_slli_epi32(acc[v], 1));
    _mm512_storeu_ps(out + oc + 16 * v,
                     _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(alpha + oc + 16 * v)));
  }
}
#endif

#ifdef BIREAL_XOR_AVX2
// Without VPOPCNTDQ: Muła's popcount, each byte's count as two 16-entry table lookups
// (`vpshufb`) of its nibbles. The byte counts (≤ 8 per word) are summed in bytes over up to 31
// words (≤ 248), and only then widened to the 32-bit lanes, one per output channel: `vpmaddubsw`
// + `vpmaddwd` sum each lane's 4 bytes (`vpsadbw` would sum 8, two channels). About 8 vector ops
// per 8 channels and word, 10× the scalar loop; 4 accumulators (32 channels) fit the 16 ymm
// registers with the table, the mask and the broadcast word. (Splitting the kernel into nibbles
// per call, or lookups in tables specialised to the input's nibbles, measured no faster on Zen 2.)
constexpr int kByteWords = 31;

inline __m256i PopcountBytes(__m256i t, __m256i table, __m256i low) {
  const __m256i lo = _mm256_and_si256(t, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

// Output channels [oc, oc + 8·V) of one output pixel, V accumulators of 8 lanes.
template <int V>
inline void PixelBlock(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                       const float* alpha, int64_t b, int64_t oy, int64_t ox, int64_t oc,
                       float* out) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i acc[V], bytes[V];
  for (int v = 0; v < V; ++v) acc[v] = bytes[v] = _mm256_setzero_si256();
  auto widen = [&] {
    for (int v = 0; v < V; ++v) {
      acc[v] = _mm256_add_epi32(
          acc[v], _mm256_madd_epi16(_mm256_maddubs_epi16(bytes[v], ones8), ones16));
      bytes[v] = _mm256_setzero_si256();
    }
  };
  int64_t pending = 0;  // words summed in `bytes` since the last widening
  const int64_t valid = ForValidTaps(g, xb, kb, b, oy, ox, oc,
                                     [&](const uint32_t* xw, const uint32_t* kt) {
    for (int64_t u = 0; u < g.nw;) {
      const int64_t end = std::min(g.nw, u + kByteWords - pending);
      pending += end - u;
      for (; u < end; ++u) {
        const __m256i xv = _mm256_set1_epi32(static_cast<int>(xw[u]));
        for (int v = 0; v < V; ++v)
          bytes[v] = _mm256_add_epi8(
              bytes[v], PopcountBytes(_mm256_xor_si256(xv, _mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(kt + u * g.o + 8 * v))),
                                      table, low));
      }
      if (pending == kByteWords) widen(), pending = 0;
    }
  });
  widen();
  const __m256i full = _mm256_set1_epi32(static_cast<int>(valid * g.c));
  for (int v = 0; v < V; ++v) {
    const __m256i d = _mm256_sub_epi32(full, _mm256_slli_epi32(acc[v], 1));
    _mm256_storeu_ps(out + oc + 8 * v,
                     _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(alpha + oc + 8 * v)));
  }
}
#endif

// Output channels [oc, o) of one output pixel, one at a time.
inline void PixelTail(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                      const float* alpha, int64_t b, int64_t oy, int64_t ox, int64_t oc,
                      float* out) {
  for (; oc < g.o; ++oc) {
    int64_t pc = 0;
    const int64_t valid = ForValidTaps(g, xb, kb, b, oy, ox, oc,
                                       [&](const uint32_t* xw, const uint32_t* kt) {
      for (int64_t u = 0; u < g.nw; ++u) pc += __builtin_popcount(xw[u] ^ kt[u * g.o]);
    });
    out[oc] = static_cast<float>(static_cast<int32_t>(valid * g.c - 2 * pc)) * alpha[oc];
  }
}

ffi::Error XorConv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || xd[3] != wd[2] || yd[0] != xd[0] ||
      yd[3] != wd[3] || stride < 1 || pad < 0)
    return ffi::Error::InvalidArgument("xor conv: expected NHWC x, HWIO kernel, NHWC y");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2], stride, pad,
                   (xd[3] + 31) / 32};
  if (g.oh != (g.h + 2 * pad - g.kh) / stride + 1 || g.ow != (g.w + 2 * pad - g.kw) / stride + 1)
    return ffi::Error::InvalidArgument("xor conv: output size does not match the geometry");
  const int64_t taps = g.kh * g.kw, c = g.c, o = g.o, nw = g.nw;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();

  // The kernel's sign bits laid out [tap][word][out channel] (the inner loop reads consecutive
  // output channels), and α per output channel: max |w|, as `layers._alpha`.
  // Scratch kept per calling thread: fresh multi-MB vectors each call cost page faults.
  // (OpenMP workers see other thread_locals: they get the raw pointers below.)
  thread_local std::vector<uint32_t> kb_buf, xb_buf;
  thread_local std::vector<float> alpha_buf;
  kb_buf.assign(taps * nw * o, 0u);
  alpha_buf.assign(o, 0.0f);
  xb_buf.resize(g.n * g.h * g.w * nw);
  uint32_t* const kb = kb_buf.data();
  uint32_t* const xb = xb_buf.data();
  float* const alpha = alpha_buf.data();
#pragma omp parallel
  {
    std::vector<float> local(o, 0.0f);
#pragma omp for
    for (int64_t tu = 0; tu < taps * nw; ++tu) {
      const int64_t t = tu / nw, u = tu % nw;
      uint32_t* words = &kb[tu * o];
      for (int64_t k = 0; k < 32 && u * 32 + k < c; ++k) {
        const float* row = wp + (t * c + u * 32 + k) * o;
        for (int64_t oc = 0; oc < o; ++oc) {
          words[oc] |= static_cast<uint32_t>(!(row[oc] >= 0.0f)) << k;
          // std::max, not std::fmax (a libm call per weight, not vectorised): the same here, as
          // `local` is never NaN, and both ignore a NaN |w|.
          local[oc] = std::max(local[oc], std::fabs(row[oc]));
        }
      }
    }
#pragma omp critical
    for (int64_t oc = 0; oc < o; ++oc) alpha[oc] = std::fmax(alpha[oc], local[oc]);
  }

  // The input's sign bits, one row of `nw` words per pixel.
#pragma omp parallel for
  for (int64_t p = 0; p < g.n * g.h * g.w; ++p)
    for (int64_t u = 0; u < nw; ++u)
      xb[p * nw + u] = PackWord(xp + p * c + u * 32, std::min<int64_t>(32, c - u * 32));

#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < g.n; ++b)
    for (int64_t oy = 0; oy < g.oh; ++oy)
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        float* out = yp + ((b * g.oh + oy) * g.ow + ox) * o;
        int64_t oc = 0;
#ifdef BIREAL_XOR_AVX512
        for (; oc + 64 <= o; oc += 64)
          PixelBlock<4>(g, xb, kb, alpha, b, oy, ox, oc, out);
        for (; oc + 16 <= o; oc += 16)
          PixelBlock<1>(g, xb, kb, alpha, b, oy, ox, oc, out);
#elif defined(BIREAL_XOR_AVX2)
        for (; oc + 32 <= o; oc += 32)
          PixelBlock<4>(g, xb, kb, alpha, b, oy, ox, oc, out);
        for (; oc + 8 <= o; oc += 8)
          PixelBlock<1>(g, xb, kb, alpha, b, oy, ox, oc, out);
#endif
        PixelTail(g, xb, kb, alpha, b, oy, ox, oc, out);
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealXorConvFwd, XorConv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));
