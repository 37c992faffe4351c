// A direct f32 convolution for few input channels (the ImageNet stem: 7×7/2, 3 → 64) as an XLA
// FFI custom call: NHWC x, HWIO kernel, explicit zero padding, any strides.
//
// Why: with 3 input channels the reduction of one tap row is only kw·C (21) values long, which
// oneDNN's and XLA's convolutions block poorly (the stem took ~2 ms of a ~4.5 ms batch-1
// Bi-Real-18 forward on a 2-core AVX-512 EPYC). Here the input is copied once into a zero-padded
// buffer, so the kw·C values of a tap row are contiguous for every output pixel and no tap needs
// a bounds check, and each kernel vector (16 output channels) loaded is used for P output
// pixels at once (P × V accumulators in registers). The sums are plain f32 fused multiply-adds in
// (tap row, tap column, channel) order: f32 rounding, not the same bits as XLA's convolution.
// Work items (image row, 64-channel block) are split over XLA's intra-op threads (ffi_threads.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "ffi_threads.h"

namespace ffi = xla::ffi;

namespace {

using bireal::ParallelFor;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl;
  int64_t hp, wp;  // the padded input's size
};

// Output channels [oc, oc + 16·V) of the P output pixels (b, oy, ox + p) for p < P.
#ifdef __AVX512F__
template <int P, int V>
inline void Block(const Geometry& g, const float* xp, const float* k, int64_t b, int64_t oy,
                  int64_t ox, int64_t oc, float* y) {
  __m512 acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
  const int64_t row_len = g.kw * g.c;  // one tap row's contiguous inputs (and kernel rows)
  for (int64_t i = 0; i < g.kh; ++i) {
    const float* xr = xp + ((b * g.hp + oy * g.sh + i) * g.wp + ox * g.sw) * g.c;
    const float* kr = k + i * row_len * g.o + oc;
    for (int64_t t = 0; t < row_len; ++t) {
      __m512 kv[V];
      for (int v = 0; v < V; ++v) kv[v] = _mm512_loadu_ps(kr + t * g.o + 16 * v);
      for (int p = 0; p < P; ++p) {
        const __m512 xv = _mm512_set1_ps(xr[p * g.sw * g.c + t]);
        for (int v = 0; v < V; ++v) acc[p][v] = _mm512_fmadd_ps(xv, kv[v], acc[p][v]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(y + ((b * g.oh + oy) * g.ow + ox + p) * g.o + oc + 16 * v, acc[p][v]);
}

// Runs of P pixels along an output row; the last run starts at ow − P (recomputing a few pixels
// rather than a narrower tail); rows narrower than P go pixel by pixel.
template <int P, int V>
inline void Row(const Geometry& g, const float* xp, const float* k, int64_t b, int64_t oy,
                int64_t oc, float* y) {
  if (g.ow < P) {
    for (int64_t ox = 0; ox < g.ow; ++ox) Block<1, V>(g, xp, k, b, oy, ox, oc, y);
    return;
  }
  for (int64_t ox = 0;; ox += P) {
    const int64_t x0 = std::min(ox, g.ow - P);
    Block<P, V>(g, xp, k, b, oy, x0, oc, y);
    if (x0 + P >= g.ow) break;
  }
}
#endif

// Output channels [oc0, oc1) of output row (b, oy), one at a time (no AVX-512, or a tail).
void RowScalar(const Geometry& g, const float* xp, const float* k, int64_t b, int64_t oy,
               int64_t oc0, int64_t oc1, float* y) {
  const int64_t row_len = g.kw * g.c;
  for (int64_t ox = 0; ox < g.ow; ++ox)
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      float acc = 0.0f;
      for (int64_t i = 0; i < g.kh; ++i) {
        const float* xr = xp + ((b * g.hp + oy * g.sh + i) * g.wp + ox * g.sw) * g.c;
        const float* kr = k + i * row_len * g.o + oc;
        for (int64_t t = 0; t < row_len; ++t) acc = __builtin_fmaf(xr[t], kr[t * g.o], acc);
      }
      y[((b * g.oh + oy) * g.ow + ox) * g.o + oc] = acc;
    }
}

ffi::Error StemConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                    ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[3] != kd[2] || yd[0] != xd[0] ||
      yd[3] != kd[3])
    return ffi::Error::InvalidArgument("stem conv: expected NHWC x, HWIO kernel, NHWC y");
  if (sh < 1 || sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0)
    return ffi::Error::InvalidArgument("stem conv: strides >= 1 and padding >= 0 expected");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2], sh, sw, pt, pl,
             xd[1] + pt + pb, xd[2] + pl + pr};
  if ((g.oh - 1) * sh + g.kh > g.hp || (g.ow - 1) * sw + g.kw > g.wp || g.oh < 1 || g.ow < 1)
    return ffi::Error::InvalidArgument("stem conv: output shape does not fit the geometry");

  // The zero-padded input (each image row copied by one worker).
  std::vector<float> padded(static_cast<size_t>(g.n * g.hp * g.wp * g.c), 0.0f);
  const float* xs = x.typed_data();
  ParallelFor(pool, g.n * g.h, [&](int64_t row) {
    const int64_t b = row / g.h, iy = row % g.h;
    std::memcpy(padded.data() + ((b * g.hp + iy + g.pt) * g.wp + g.pl) * g.c,
                xs + row * g.w * g.c, sizeof(float) * g.w * g.c);
  });

  const float* xp = padded.data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (g.o + kBlock - 1) / kBlock, rows = g.n * g.oh;
  ParallelFor(pool, blocks * rows, [&](int64_t item) {
    const int64_t blk = item % blocks, row = item / blocks;
    const int64_t b = row / g.oh, oy = row % g.oh;
    const int64_t oc0 = blk * kBlock, oc1 = std::min(g.o, oc0 + kBlock);
    int64_t oc = oc0;
#ifdef __AVX512F__
    if (oc1 - oc == 64) {
      Row<6, 4>(g, xp, kp, b, oy, oc, yp);
      oc += 64;
    }
    for (; oc + 16 <= oc1; oc += 16) Row<6, 1>(g, xp, kp, b, oy, oc, yp);
#endif
    if (oc < oc1) RowScalar(g, xp, kp, b, oy, oc, oc1, yp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealStemConvFwd, StemConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));
