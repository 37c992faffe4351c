// Packed inference's binary convolution + folded affine (+ residual) as one XLA FFI custom call:
//
//     y = float(D) · scale + bias [+ residual],   D = conv(sign(x), ŵ) with zero padding,
//
// with the kernel's sign bits already packed (`ops/bits.py`'s format: `bits[kh, kw, nw, O]`,
// channel c = bit c % 32 of word c // 32, 1 = −1), so unlike `xor_conv.cc` (the training
// forward, which packs its float kernel on every call) nothing is done per call but packing the
// input's signs and the popcount sums. D is exact: each output sums `valid taps · C − 2 ·
// popcount` over the taps inside the image (taps on the zero padding add 0).
//
// Why: XLA's own XOR/popcount loops (`bits.xor_popcount_conv`) cost several fusions per conv
// (sign packing, padding, the sum, border correction, affine, residual), each a pass over memory
// with a thread hand-off, which dominates at batch 1 on the small late feature maps. Here the
// work is split over XLA's intra-op thread pool (the FFI ThreadPool, not OpenMP, so it shares the
// threads XLA already runs and never oversubscribes them): the caller and the pool's threads
// take chunks from one atomic counter, so a busy pool (e.g. two streams at batch 32) only means
// the caller does more chunks itself, never a wait on a task that cannot start.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "popcount_common.h"
#include "ffi_threads.h"

namespace ffi = xla::ffi;

namespace {

using bireal::ParallelFor;

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BIREAL_PACKED_AVX512 1
#endif

using bireal::PackWord;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad, nw;
  int64_t hp, wp;  // the packed input's padded size: h + 2·pad, w + 2·pad
};

// The packed words of input pixel (b, iy, ix) (unpadded coordinates) in the padded buffer.
inline const uint32_t* XAt(const Geometry& g, const uint32_t* xb, int64_t b, int64_t iy,
                           int64_t ix) {
  return xb + ((b * g.hp + iy + g.pad) * g.wp + ix + g.pad) * g.nw;
}

// Output channels [oc, oc + 16·V) of output pixel (b, oy, ox).
template <int V, bool kResidual>
inline void PixelBlock(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                       const float* scale, const float* bias, const float* res, int64_t b,
                       int64_t oy, int64_t ox, int64_t oc, float* out) {
#ifdef BIREAL_PACKED_AVX512
  __m512i acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_si512();
  int64_t valid = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = oy * g.stride + i - g.pad;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ix = ox * g.stride + j - g.pad;
      if (ix < 0 || ix >= g.w) continue;
      ++valid;
      const uint32_t* xw = XAt(g, xb, b, iy, ix);
      const uint32_t* kt = kb + (i * g.kw + j) * g.nw * g.o + oc;
      for (int64_t u = 0; u < g.nw; ++u) {
        const __m512i xv = _mm512_set1_epi32(static_cast<int>(xw[u]));
        for (int v = 0; v < V; ++v)
          acc[v] = _mm512_add_epi32(acc[v], _mm512_popcnt_epi32(_mm512_xor_si512(
                                                xv, _mm512_loadu_si512(kt + u * g.o + 16 * v))));
      }
    }
  }
  const __m512i full = _mm512_set1_epi32(static_cast<int>(valid * g.c));
  for (int v = 0; v < V; ++v) {
    const __m512i d = _mm512_sub_epi32(full, _mm512_slli_epi32(acc[v], 1));
    __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(scale + oc + 16 * v),
                               _mm512_loadu_ps(bias + oc + 16 * v));
    if (kResidual) y = _mm512_add_ps(y, _mm512_loadu_ps(res + oc + 16 * v));
    _mm512_storeu_ps(out + oc + 16 * v, y);
  }
#endif
}

#ifdef BIREAL_PACKED_AVX512
// Output channels [oc, oc + 64) of P adjacent output pixels (b, oy, ox..ox+P-1): each kernel
// vector is loaded once for the P pixels (4·P accumulators). Taps on the padding read the
// padded buffer's 0 words, which add popcount(ŵ) there; for border pixels that sum, `qk[tap][o]`
// (precomputed), is taken off again, so D counts the taps inside the image only.
template <int P, bool kResidual>
inline void RowBlock(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                     const int32_t* qk, const float* scale, const float* bias, const float* res,
                     int64_t b, int64_t oy, int64_t ox, int64_t oc, float* out) {
  constexpr int V = 4;
  __m512i acc[P][V];
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < V; ++v) acc[q][v] = _mm512_setzero_si512();
  const int64_t step = g.stride * g.nw;  // words between adjacent output pixels' taps
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t py = oy * g.stride + i;  // padded coordinates
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t px = ox * g.stride + j;
      const uint32_t* xw = xb + ((b * g.hp + py) * g.wp + px) * g.nw;
      const uint32_t* kt = kb + (i * g.kw + j) * g.nw * g.o + oc;
      for (int64_t u = 0; u < g.nw; ++u) {
        __m512i kv[V];
        for (int v = 0; v < V; ++v) kv[v] = _mm512_loadu_si512(kt + u * g.o + 16 * v);
        for (int q = 0; q < P; ++q) {
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(xw[q * step + u]));
          for (int v = 0; v < V; ++v)
            acc[q][v] = _mm512_add_epi32(acc[q][v],
                                         _mm512_popcnt_epi32(_mm512_xor_si512(xv, kv[v])));
        }
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    int64_t valid = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.stride + i - g.pad;
      const bool row_in = iy >= 0 && iy < g.h;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ix = (ox + q) * g.stride + j - g.pad;
        if (row_in && ix >= 0 && ix < g.w) {
          ++valid;
          continue;
        }
        const int32_t* qt = qk + (i * g.kw + j) * g.o + oc;
        for (int v = 0; v < V; ++v)
          acc[q][v] = _mm512_sub_epi32(acc[q][v], _mm512_loadu_si512(qt + 16 * v));
      }
    }
    const __m512i full = _mm512_set1_epi32(static_cast<int>(valid * g.c));
    for (int v = 0; v < V; ++v) {
      const __m512i d = _mm512_sub_epi32(full, _mm512_slli_epi32(acc[q][v], 1));
      __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(scale + oc + 16 * v),
                                 _mm512_loadu_ps(bias + oc + 16 * v));
      if (kResidual) y = _mm512_add_ps(y, _mm512_loadu_ps(res + q * g.o + oc + 16 * v));
      _mm512_storeu_ps(out + q * g.o + oc + 16 * v, y);
    }
  }
}
#endif

// Output channels [oc, oc_end) of one output pixel, one at a time (any CPU, any O).
template <bool kResidual>
inline void PixelScalar(const Geometry& g, const uint32_t* xb, const uint32_t* kb,
                        const float* scale, const float* bias, const float* res, int64_t b,
                        int64_t oy, int64_t ox, int64_t oc, int64_t oc_end, float* out) {
  for (; oc < oc_end; ++oc) {
    int64_t pc = 0, valid = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.stride + i - g.pad;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ix = ox * g.stride + j - g.pad;
        if (ix < 0 || ix >= g.w) continue;
        ++valid;
        const uint32_t* xw = XAt(g, xb, b, iy, ix);
        const uint32_t* kt = kb + (i * g.kw + j) * g.nw * g.o + oc;
        for (int64_t u = 0; u < g.nw; ++u) pc += __builtin_popcount(xw[u] ^ kt[u * g.o]);
      }
    }
    const int32_t d = static_cast<int32_t>(valid * g.c - 2 * pc);
    float y = std::fma(static_cast<float>(d), scale[oc], bias[oc]);
    if (kResidual) y = y + res[oc];
    out[oc] = y;
  }
}

constexpr int64_t kBlock = 64;  // output channels per work item (4 AVX-512 accumulators)

template <bool kResidual>
ffi::Error PackedConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> bits,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                      const float* res, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                      int64_t pad) {
  auto xd = x.dimensions(), kd = bits.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || stride < 1 || pad < 0)
    return ffi::Error::InvalidArgument("packed conv: expected NHWC x, [kh,kw,nw,O] bits, NHWC y");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2], stride, pad,
                   (xd[3] + 31) / 32, xd[1] + 2 * pad, xd[2] + 2 * pad};
  if (kd[2] != g.nw || yd[0] != g.n || yd[3] != g.o ||
      scale.element_count() != static_cast<size_t>(g.o) ||
      bias.element_count() != static_cast<size_t>(g.o) ||
      g.oh != (g.h + 2 * pad - g.kh) / stride + 1 || g.ow != (g.w + 2 * pad - g.kw) / stride + 1)
    return ffi::Error::InvalidArgument("packed conv: shapes do not match the geometry");
  const float* xp = x.typed_data();
  const uint32_t* kb = bits.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();

  // The input's sign bits, `nw` words per pixel (scratch kept per calling thread: fresh buffers
  // cost page faults; pool tasks get the raw pointer).
  // The buffer has `pad` rows and columns of 0 words (+1) around each image.
  thread_local std::vector<uint32_t> xb_buf;
  thread_local std::vector<int32_t> qk_buf;
  const int64_t pixels = g.n * g.h * g.w;
  if (pad) xb_buf.assign(g.n * g.hp * g.wp * g.nw, 0u);
  else xb_buf.resize(g.n * g.hp * g.wp * g.nw);
  uint32_t* const xb = xb_buf.data();
  auto pack_rows = [&](int64_t p0, int64_t p1) {  // input pixels [p0, p1) in NHW order
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (g.h * g.w), iy = (p / g.w) % g.h, ix = p % g.w;
      uint32_t* dst = const_cast<uint32_t*>(XAt(g, xb, b, iy, ix));
      for (int64_t u = 0; u < g.nw; ++u)
        dst[u] = PackWord(xp + p * g.c + u * 32, std::min<int64_t>(32, g.c - u * 32));
    }
  };
  // qk[tap][o] = Σ_words popcount(ŵ): what a tap on the padding (0 words) adds to the sum.
  const int64_t taps = g.kh * g.kw;
  qk_buf.assign(pad ? taps * g.o : 0, 0);
  int32_t* const qk = qk_buf.data();
  for (int64_t t = 0; pad && t < taps; ++t)
    for (int64_t u = 0; u < g.nw; ++u) {
      const uint32_t* row = kb + (t * g.nw + u) * g.o;
      int32_t* dst = qk + t * g.o;
      for (int64_t oc = 0; oc < g.o; ++oc) dst[oc] += __builtin_popcount(row[oc]);
    }
  // Packing reads each float once (a few µs per 10^5 floats): small inputs are packed by the
  // caller alone, which saves a hand-off to the pool (and a wait on a descheduled helper).
  if (pixels * g.c <= (int64_t{1} << 20)) {
    pack_rows(0, pixels);
  } else {
    const int64_t rows_per_chunk = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.w * g.nw));
    const int64_t in_rows = g.n * g.h;
    ParallelFor(pool, (in_rows + rows_per_chunk - 1) / rows_per_chunk, [&](int64_t chunk) {
      pack_rows(chunk * rows_per_chunk * g.w,
                std::min(in_rows, (chunk + 1) * rows_per_chunk) * g.w);
    });
  }

  // Work items: (block of kBlock output channels, output row), channel-block major so that
  // consecutive items reuse one block's kernel slab from cache.
  const int64_t blocks = (g.o + kBlock - 1) / kBlock;
  const int64_t out_rows = g.n * g.oh;
  ParallelFor(pool, blocks * out_rows, [&](int64_t item) {
    const int64_t blk = item / out_rows, row = item % out_rows;
    const int64_t b = row / g.oh, oy = row % g.oh;
    const int64_t oc0 = blk * kBlock, oc1 = std::min(g.o, oc0 + kBlock);
#ifdef BIREAL_PACKED_AVX512
    if (oc1 - oc0 == 64) {
      // Runs of P pixels along the row; the last run starts at ow − P (recomputing a few
      // pixels rather than a narrower tail); rows narrower than P go pixel by pixel.
      constexpr int P = 4;
      if (g.ow >= P) {
        for (int64_t ox = 0;; ox += P) {
          const int64_t x0 = std::min(ox, g.ow - P), p = row * g.ow + x0;
          RowBlock<P, kResidual>(g, xb, kb, qk, sp, bp, kResidual ? res + p * g.o : nullptr, b,
                                 oy, x0, oc0, yp + p * g.o);
          if (x0 + P >= g.ow) break;
        }
      } else {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          const int64_t p = row * g.ow + ox;
          RowBlock<1, kResidual>(g, xb, kb, qk, sp, bp, kResidual ? res + p * g.o : nullptr, b,
                                 oy, ox, oc0, yp + p * g.o);
        }
      }
      return;
    }
#endif
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      const int64_t p = row * g.ow + ox;
      float* out = yp + p * g.o;
      const float* rp = kResidual ? res + p * g.o : nullptr;
      int64_t oc = oc0;
#ifdef BIREAL_PACKED_AVX512
      for (; oc + 16 <= oc1; oc += 16)
        PixelBlock<1, kResidual>(g, xb, kb, sp, bp, rp, b, oy, ox, oc, out);
#endif
      PixelScalar<kResidual>(g, xb, kb, sp, bp, rp, b, oy, ox, oc, oc1, out);
    }
  });
  return ffi::Error::Success();
}

ffi::Error PackedConvPlain(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::U32> bits, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                           int64_t stride, int64_t pad) {
  return PackedConv<false>(pool, x, bits, scale, bias, nullptr, y, stride, pad);
}

ffi::Error PackedConvResidual(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::U32> bits, ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> res,
                              ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad) {
  if (res.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("packed conv: the residual must have the output's shape");
  return PackedConv<true>(pool, x, bits, scale, bias, res.typed_data(), y, stride, pad);
}

}  // namespace

// The two entry points take the same operands but for the residual (before the result).
#define BIREAL_PACKED_OPERANDS                                                       \
  ffi::Ffi::Bind()                                                                   \
      .Ctx<ffi::ThreadPool>()                                                        \
      .Arg<ffi::Buffer<ffi::F32>>() /* x */                                          \
      .Arg<ffi::Buffer<ffi::U32>>() /* bits */                                       \
      .Arg<ffi::Buffer<ffi::F32>>() /* scale */                                      \
      .Arg<ffi::Buffer<ffi::F32>>() /* bias */
#define BIREAL_PACKED_RESULT_AND_ATTRS \
  .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("stride").Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealPackedConvFwd, PackedConvPlain,
                              BIREAL_PACKED_OPERANDS BIREAL_PACKED_RESULT_AND_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealPackedConvResFwd, PackedConvResidual,
                              BIREAL_PACKED_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* residual */
                                  BIREAL_PACKED_RESULT_AND_ATTRS);
