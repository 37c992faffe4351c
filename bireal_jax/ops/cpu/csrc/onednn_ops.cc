// oneDNN 2-D convolutions (NHWC input, HWIO kernel, f32) and max-pooling (NHWC f32) as XLA FFI
// custom calls for the CPU.
//
// Why: XLA:CPU's own convolutions (Eigen) run Bi-Real-18's train step at ~330 GFLOP/s on average
// and its stem and weight gradients far lower; oneDNN's direct convolutions run the same shapes
// near the matmul rate. Three handlers — forward, input gradient, kernel gradient — so that
// `bireal_jax.onednn.conv2d` can define its VJP with them. Built on first use by onednn.py.
//
// Primitives are cached per shape (creating one JIT-compiles a kernel); tensors stay in XLA's
// plain NHWC/HWIO layouts and only the kernel is reordered into oneDNN's preferred blocked layout.
// XLA runs devices (e.g. pmap over virtual CPU devices) on several threads at once, so every
// call brings its own scratchpad: oneDNN's library-managed one is shared between primitives.
#include <cstdint>
#include <algorithm>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Geometry of one convolution: x [n,h,w,c], kernel [kh,kw,c,o], y [n,oh,ow,o].
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr);
  }
  memory::desc x_md() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc y_md() const { return {{n, o, oh, ow}, memory::data_type::f32, tag::nhwc}; }
  memory::desc k_user_md() const { return {{o, c, kh, kw}, memory::data_type::f32, tag::hwio}; }
  memory::desc k_any_md() const { return {{o, c, kh, kw}, memory::data_type::f32, tag::any}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// The forward primitive descriptor: used to run the forward and as the backward passes' hint.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// oneDNN 3 dropped the operation descriptors that oneDNN 2 builds primitive descriptors from.
dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          g.x_md(), g.k_any_md(), g.y_md(), g.strides(), g.pad_l(), g.pad_r(), UserScratchpad()};
#else
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, g.x_md(), g.k_any_md(),
                                    g.y_md(), g.strides(), g.pad_l(), g.pad_r());
  return {d, UserScratchpad(), Engine()};
#endif
}

// The two backward passes take the same arguments: (diff_)src, (diff_)weights, diff_dst.
template <typename Primitive>
typename Primitive::primitive_desc BackwardPd(
    const Geometry& g, const dnnl::convolution_forward::primitive_desc& hint) {
#if DNNL_VERSION_MAJOR >= 3
  return {Engine(), dnnl::algorithm::convolution_direct, g.x_md(), g.k_any_md(), g.y_md(),
          g.strides(), g.pad_l(), g.pad_r(), hint, UserScratchpad()};
#else
  typename Primitive::desc d(dnnl::algorithm::convolution_direct, g.x_md(), g.k_any_md(),
                             g.y_md(), g.strides(), g.pad_l(), g.pad_r());
  return {d, UserScratchpad(), Engine(), hint};
#endif
}

struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
};

// One entry per geometry, built lazily by `build` (creating a primitive JIT-compiles a kernel);
// XLA may call from several threads (one per device).
template <typename P, typename G, typename Build>
const P& Cached(const G& g, Build build) {
  static std::mutex mu;
  static std::map<decltype(g.key()), std::unique_ptr<P>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g.key()];
  if (!slot) slot = build();
  return *slot;
}

const Primitives& Get(const Geometry& g) {
  return Cached<Primitives>(g, [&] {
    auto p = std::make_unique<Primitives>();
    p->fwd_pd = ForwardPd(g);
    p->fwd = dnnl::convolution_forward(p->fwd_pd);
    p->bwd_data_pd = BackwardPd<dnnl::convolution_backward_data>(g, p->fwd_pd);
    p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
    p->bwd_weights_pd = BackwardPd<dnnl::convolution_backward_weights>(g, p->fwd_pd);
    p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
    return p;
  });
}

template <typename B>
void* Data(B& b) { return reinterpret_cast<void*>(b.typed_data()); }

// Runs `body(stream)` on a fresh stream and waits for it; oneDNN's exceptions become FFI errors
// naming `what`.
template <typename Body>
ffi::Error Guarded(const char* what, Body&& body) {
  try {
    dnnl::stream s(Engine());
    ffi::Error e = body(s);
    s.wait();
    return e;
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(what) + ": " + e.what());
  }
}

// Executes `prim` with `args` plus its own scratchpad of `pd`'s size (see the file comment).
template <typename Prim, typename Pd>
void Execute(const Prim& prim, const Pd& pd, dnnl::stream& s,
             std::unordered_map<int, memory> args) {
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), Engine()));
  prim.execute(s, args);
}

// Kernel in oneDNN's layout `want`: the user's HWIO buffer itself when the layouts agree.
memory KernelIn(const Geometry& g, const memory::desc& want, void* hwio, dnnl::stream& s) {
  memory user(g.k_user_md(), Engine(), hwio);
  if (want == g.k_user_md()) return user;
  memory blocked(want, Engine());
  dnnl::reorder(user, blocked).execute(s, user, blocked);
  return blocked;
}

Geometry FromShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                    ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                    int64_t pl, int64_t pr) {
  return {x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

ffi::Error Check(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                 ffi::Span<const int64_t> y) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || x[3] != k[2] || y[0] != x[0] ||
      y[3] != k[3])
    return ffi::Error::InvalidArgument("onednn conv: expected NHWC x, HWIO kernel, NHWC y");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(x.dimensions(), k.dimensions(), y->dimensions()); e.failure()) return e;
  Geometry g = FromShapes(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded("oneDNN forward convolution", [&](dnnl::stream& s) {
    const Primitives& p = Get(g);
    memory xm(g.x_md(), Engine(), Data(x)), ym(g.y_md(), Engine(), Data(*y));
    memory km = KernelIn(g, p.fwd_pd.weights_desc(), Data(k), s);
    Execute(p.fwd, p.fwd_pd, s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym}});
    return ffi::Error::Success();
  });
}

// dx = conv_transpose(dy, kernel): the input gradient.
ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(dx->dimensions(), k.dimensions(), dy.dimensions()); e.failure()) return e;
  Geometry g =
      FromShapes(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded("oneDNN input-gradient convolution", [&](dnnl::stream& s) {
    const Primitives& p = Get(g);
    memory dym(g.y_md(), Engine(), Data(dy)), dxm(g.x_md(), Engine(), Data(*dx));
    memory km = KernelIn(g, p.bwd_data_pd.weights_desc(), Data(k), s);
    Execute(p.bwd_data, p.bwd_data_pd, s,
            {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DIFF_SRC, dxm}});
    return ffi::Error::Success();
  });
}

// dk = the kernel gradient from x and dy, written in HWIO.
ffi::Error BackwardKernel(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(x.dimensions(), dk->dimensions(), dy.dimensions()); e.failure()) return e;
  Geometry g =
      FromShapes(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded("oneDNN kernel-gradient convolution", [&](dnnl::stream& s) {
    const Primitives& p = Get(g);
    memory xm(g.x_md(), Engine(), Data(x)), dym(g.y_md(), Engine(), Data(dy));
    memory user(g.k_user_md(), Engine(), Data(*dk));
    const memory::desc want = p.bwd_weights_pd.diff_weights_desc();
    memory dkm = want == g.k_user_md() ? user : memory(want, Engine());
    Execute(p.bwd_weights, p.bwd_weights_pd, s,
            {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dkm}});
    if (!(want == g.k_user_md())) dnnl::reorder(dkm, user).execute(s, dkm, user);
    return ffi::Error::Success();
  });
}

// ----- bf16 forward convolution, f32 output ---------------------------------------------------
// For binary convolutions: with ±1 inputs and weights every product is exact in bf16 and oneDNN
// accumulates in f32 (the destination's type), so the sums are the exact integers (|D| < 2^24).
// On CPUs with AMX (amx_bf16) oneDNN runs it on the tile units; elsewhere on avx512_bf16 or an
// emulation. Forward only: the binary convs' gradients are the float convolution's.
struct Bf16Primitives {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward fwd;
};

// The cache key of `Cached` is the geometry; a distinct result type gives a distinct cache.
const Bf16Primitives& GetBf16(const Geometry& g) {
  return Cached<Bf16Primitives>(g, [&] {
    auto p = std::make_unique<Bf16Primitives>();
    const memory::desc x_md{{g.n, g.c, g.h, g.w}, memory::data_type::bf16, tag::nhwc};
    const memory::desc k_md{{g.o, g.c, g.kh, g.kw}, memory::data_type::bf16, tag::any};
#if DNNL_VERSION_MAJOR >= 3
    p->pd = {Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
             x_md, k_md, g.y_md(), g.strides(), g.pad_l(), g.pad_r(), UserScratchpad()};
#else
    dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_inference,
                                      dnnl::algorithm::convolution_direct, x_md, k_md, g.y_md(),
                                      g.strides(), g.pad_l(), g.pad_r());
    p->pd = {d, UserScratchpad(), Engine()};
#endif
    p->fwd = dnnl::convolution_forward(p->pd);
    return p;
  });
}

ffi::Error ForwardBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> k,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(x.dimensions(), k.dimensions(), y->dimensions()); e.failure()) return e;
  Geometry g = FromShapes(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded("oneDNN bf16 forward convolution", [&](dnnl::stream& s) {
    const Bf16Primitives& p = GetBf16(g);
    memory xm({{g.n, g.c, g.h, g.w}, memory::data_type::bf16, tag::nhwc}, Engine(),
              x.untyped_data());
    memory ym(g.y_md(), Engine(), y->untyped_data());
    memory user({{g.o, g.c, g.kh, g.kw}, memory::data_type::bf16, tag::hwio}, Engine(),
                k.untyped_data());
    memory km = user;
    if (!(p.pd.weights_desc() == user.get_desc())) {
      km = memory(p.pd.weights_desc(), Engine());
      dnnl::reorder(user, km).execute(s, user, km);
    }
    Execute(p.fwd, p.pd, s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym}});
    return ffi::Error::Success();
  });
}

// Packed inference: the kernel arrives as sign bits `[kh, kw, ceil(C/32), O]` (bit c % 32 of word
// c / 32, 1 for −1; bireal_jax/ops/bits.py), the same at every call of a model. Unpacking it to
// ±1 bf16 and reordering it into oneDNN's blocked layout took as long as the convolution at
// 7²×512 (batch 1, avx512_bf16), so the reordered kernel is kept, keyed by the geometry and the
// bits themselves (compared in full on a hit: no hash collision can give a wrong kernel), least
// recently used first out beyond kKernelCacheBytes.
constexpr size_t kKernelCacheBytes = size_t(256) << 20;

struct CachedKernel {
  std::vector<uint32_t> bits;
  memory blocked;
  size_t bytes;
};

uint64_t HashWords(const uint32_t* w, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  for (size_t i = 0; i < n; ++i) {
    h ^= w[i];
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  return h;
}

memory PackedKernel(const Geometry& g, const memory::desc& want, const uint32_t* bits,
                    dnnl::stream& s) {
  const int64_t nw = (g.c + 31) / 32;
  const size_t n_words = static_cast<size_t>(g.kh * g.kw * nw * g.o);
  using Key = std::tuple<decltype(g.key()), uint64_t>;
  static std::mutex mu;
  static std::list<std::pair<Key, CachedKernel>> lru;  // most recently used first
  static std::map<Key, decltype(lru)::iterator> index;
  static size_t total = 0;
  const Key key{g.key(), HashWords(bits, n_words)};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = index.find(key);
    if (it != index.end() &&
        std::equal(bits, bits + n_words, it->second->second.bits.begin())) {
      lru.splice(lru.begin(), lru, it->second);
      return it->second->second.blocked;
    }
  }
  // Unpack to ±1 bf16 in HWIO (0x3F80 = +1, 0xBF80 = −1), then reorder to oneDNN's layout.
  std::vector<uint16_t> hwio(static_cast<size_t>(g.kh * g.kw * g.c * g.o));
  for (int64_t t = 0; t < g.kh * g.kw; ++t)
    for (int64_t ci = 0; ci < g.c; ++ci) {
      const uint32_t* row = bits + (t * nw + ci / 32) * g.o;
      uint16_t* out = hwio.data() + (t * g.c + ci) * g.o;
      for (int64_t oc = 0; oc < g.o; ++oc)
        out[oc] = (row[oc] >> (ci % 32)) & 1u ? 0xBF80 : 0x3F80;
    }
  memory user({{g.o, g.c, g.kh, g.kw}, memory::data_type::bf16, tag::hwio}, Engine(),
              hwio.data());
  memory blocked(want, Engine());
  dnnl::reorder(user, blocked).execute(s, user, blocked);
  s.wait();  // `hwio` goes out of scope
  std::lock_guard<std::mutex> lock(mu);
  auto it = index.find(key);
  if (it != index.end()) {  // another thread's kernel, or a colliding hash: replace it
    total -= it->second->second.bytes;
    lru.erase(it->second);
    index.erase(it);
  }
  const size_t bytes = want.get_size();
  lru.push_front({key, CachedKernel{std::vector<uint32_t>(bits, bits + n_words), blocked, bytes}});
  index[key] = lru.begin();
  total += bytes;
  while (total > kKernelCacheBytes && lru.size() > 1) {
    total -= lru.back().second.bytes;
    index.erase(lru.back().first);
    lru.pop_back();
  }
  return blocked;
}

ffi::Error PackedForwardBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U32> bits,
                             ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pb, int64_t pl, int64_t pr) {
  auto xd = x.dimensions(), bd = bits.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || bd.size() != 4 || yd.size() != 4 || bd[2] != (xd[3] + 31) / 32 ||
      yd[0] != xd[0] || yd[3] != bd[3])
    return ffi::Error::InvalidArgument(
        "onednn packed conv: expected NHWC x, bits [kh, kw, ceil(C/32), O], NHWC y");
  Geometry g{xd[0], xd[1], xd[2], xd[3], bd[0], bd[1], bd[3], yd[1], yd[2],
             sh, sw, pt, pb, pl, pr};
  return Guarded("oneDNN bf16 packed convolution", [&](dnnl::stream& s) {
    const Bf16Primitives& p = GetBf16(g);
    memory xm({{g.n, g.c, g.h, g.w}, memory::data_type::bf16, tag::nhwc}, Engine(),
              x.untyped_data());
    memory ym(g.y_md(), Engine(), y->untyped_data());
    memory km = PackedKernel(g, p.pd.weights_desc(),
                             reinterpret_cast<const uint32_t*>(bits.untyped_data()), s);
    Execute(p.fwd, p.pd, s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym}});
    return ffi::Error::Success();
  });
}

// ----- Max-pooling --------------------------------------------------------------------------
// XLA:CPU fuses a strided-slice max-pool and its gradient into loops that recompute the argmax
// from the input in every consumer; oneDNN's pooling keeps it as a one-byte workspace (the first
// maximum of each window, in row-major order, as XLA's select_and_scatter) and reads each tensor
// once in each direction.
struct PoolGeometry {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr;
  auto key() const { return std::make_tuple(n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr); }
  memory::desc x_md() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc y_md() const { return {{n, c, oh, ow}, memory::data_type::f32, tag::nhwc}; }
};

struct PoolPrimitives {
  dnnl::pooling_forward::primitive_desc fwd_pd;
  dnnl::pooling_forward fwd;
  dnnl::pooling_backward::primitive_desc bwd_pd;
  dnnl::pooling_backward bwd;
};

const PoolPrimitives& GetPool(const PoolGeometry& g) {
  return Cached<PoolPrimitives>(g, [&] {
    auto p = std::make_unique<PoolPrimitives>();
    const memory::dims strides{g.sh, g.sw}, kernel{g.kh, g.kw}, pad_l{g.pt, g.pl},
        pad_r{g.pb, g.pr};
#if DNNL_VERSION_MAJOR >= 3
    p->fwd_pd = {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
                 g.x_md(), g.y_md(), strides, kernel, memory::dims{0, 0}, pad_l, pad_r,
                 UserScratchpad()};
    p->bwd_pd = {Engine(), dnnl::algorithm::pooling_max, g.x_md(), g.y_md(), strides, kernel,
                 memory::dims{0, 0}, pad_l, pad_r, p->fwd_pd, UserScratchpad()};
#else
    dnnl::pooling_forward::desc fd(dnnl::prop_kind::forward_training,
                                   dnnl::algorithm::pooling_max, g.x_md(), g.y_md(), strides,
                                   kernel, pad_l, pad_r);
    p->fwd_pd = {fd, UserScratchpad(), Engine()};
    dnnl::pooling_backward::desc bd(dnnl::algorithm::pooling_max, g.x_md(), g.y_md(), strides,
                                    kernel, pad_l, pad_r);
    p->bwd_pd = {bd, UserScratchpad(), Engine(), p->fwd_pd};
#endif
    p->fwd = dnnl::pooling_forward(p->fwd_pd);
    p->bwd = dnnl::pooling_backward(p->bwd_pd);
    return p;
  });
}

PoolGeometry PoolFromShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t kh,
                            int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                            int64_t pl, int64_t pr) {
  return {x[0], x[1], x[2], x[3], y[1], y[2], kh, kw, sh, sw, pt, pb, pl, pr};
}

// The workspace is returned as a u8 buffer of the output's shape; anything else is refused.
ffi::Error CheckPool(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                     ffi::Span<const int64_t> ws, const PoolPrimitives& p) {
  if (x.size() != 4 || y.size() != 4 || ws.size() != 4 || x[0] != y[0] || x[3] != y[3])
    return ffi::Error::InvalidArgument("onednn pool: expected NHWC x and y of equal N and C");
  for (int i = 0; i < 4; ++i)
    if (ws[i] != y[i]) return ffi::Error::InvalidArgument("onednn pool: workspace shape != y");
  const memory::desc wd = p.fwd_pd.workspace_desc();
  if (wd.get_size() != static_cast<size_t>(y[0] * y[1] * y[2] * y[3]))
    return ffi::Error::InvalidArgument("onednn pool: workspace is not one byte per output");
  return ffi::Error::Success();
}

ffi::Error PoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> ws, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  PoolGeometry g = PoolFromShapes(x.dimensions(), y->dimensions(), kh, kw, sh, sw, pt, pb, pl, pr);
  return Guarded("oneDNN max-pool", [&](dnnl::stream& s) {
    const PoolPrimitives& p = GetPool(g);
    if (auto e = CheckPool(x.dimensions(), y->dimensions(), ws->dimensions(), p); e.failure())
      return e;
    memory xm(g.x_md(), Engine(), Data(x)), ym(g.y_md(), Engine(), Data(*y));
    memory wm(p.fwd_pd.workspace_desc(), Engine(), Data(*ws));
    Execute(p.fwd, p.fwd_pd, s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DST, ym}, {DNNL_ARG_WORKSPACE, wm}});
    return ffi::Error::Success();
  });
}

// dx: dy scattered to each window's first maximum (recorded in the workspace), summed.
ffi::Error PoolBackward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> ws,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  PoolGeometry g = PoolFromShapes(dx->dimensions(), dy.dimensions(), kh, kw, sh, sw, pt, pb, pl,
                                  pr);
  return Guarded("oneDNN max-pool gradient", [&](dnnl::stream& s) {
    const PoolPrimitives& p = GetPool(g);
    if (auto e = CheckPool(dx->dimensions(), dy.dimensions(), ws.dimensions(), p); e.failure())
      return e;
    memory dym(g.y_md(), Engine(), Data(dy)), dxm(g.x_md(), Engine(), Data(*dx));
    memory wm(p.fwd_pd.workspace_desc(), Engine(), Data(ws));
    Execute(p.bwd, p.bwd_pd, s,
            {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WORKSPACE, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
    return ffi::Error::Success();
  });
}

}  // namespace

#define BIREAL_CONV_ATTRS                                                                \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb")      \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnConvFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnConvBf16Fwd, ForwardBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnPackedConvBf16Fwd, PackedForwardBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnConvBwdData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnConvBwdKernel, BackwardKernel,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_CONV_ATTRS);

#define BIREAL_POOL_ATTRS                                                                \
  .Attr<int64_t>("kh").Attr<int64_t>("kw") BIREAL_CONV_ATTRS

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnPoolFwd, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() BIREAL_POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BirealOnednnPoolBwd, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BIREAL_POOL_ATTRS);
