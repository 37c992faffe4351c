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
#include <map>
#include <memory>
#include <mutex>
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
