// BirealResizeRegion: the antialiased bilinear ("triangle") resize of a region of a uint8 RGB
// image, giving what
//   round(clip(ScaleAndTranslate(float(image), scale=(oh/h, ow/w), translation=-(top, left) *
//                                scale, kernel_type="triangle", antialias=True)))
// gives (bireal_jax/data/augment.py), without its costs: the float copy of the whole input, a
// vertical pass over every input column, and a horizontal pass whose inner loop runs over 3
// channels at a time. Built on first use by bireal_jax/data/resize_op.py.
//
// The sample positions and weights follow TensorFlow's definition step by step, in float, so
// that the two agree to the last bit but for the order of float rounding in the sums (measured
// in tests/test_imagenet_pipeline.py): sample = (i + 0.5) / scale - translation / scale; kernel
// scale max(1 / scale, 1); taps ceil(sample - kernel_scale - 0.5) .. floor(sample + kernel_scale
// - 0.5), clamped to the image; weight 1 - |tap + 0.5 - sample| / kernel_scale (0 past 1),
// normalised to sum 1; no taps when the sample lies outside the image.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace shape_inference = tensorflow::shape_inference;

// One output row's (or column's) taps: first input index, count, and a weight each.
struct Taps {
  std::vector<int> first, count;
  std::vector<float> weight;  // `span` slots per output, the first `count` used
  int span = 0;
};

// The taps of one axis: `out_size` outputs from `in_size` inputs, `scale` and `translate` as
// ScaleAndTranslate takes them (computed by the caller the way the float graph computes them).
Taps axis_taps(int out_size, int in_size, float scale, float translate) {
  Taps t;
  // Each step as TensorFlow writes it, in float: a different (if more accurate) formula would
  // move a weight by an ulp and, now and then, a rounded pixel by a level.
  const float inv_scale = static_cast<float>(1.0 / scale);
  const float inv_translate = -inv_scale * translate;
  const float kernel_scale = std::max(inv_scale, 1.0f);  // antialias: widen when shrinking
  const float inv_kernel_scale = 1.0f / kernel_scale;
  t.span = std::min(2 * static_cast<int>(std::ceil(kernel_scale)) + 1, in_size);
  t.first.assign(out_size, 0);
  t.count.assign(out_size, 0);
  t.weight.assign(static_cast<size_t>(out_size) * t.span, 0.0f);
  std::vector<float> w(t.span + 2);
  for (int i = 0; i < out_size; ++i) {
    const float centre = static_cast<float>(i) + 0.5f;
    const float sample = centre * inv_scale + inv_translate;
    if (sample < 0 || sample > in_size) continue;  // outside the image: left at 0
    int64_t lo = static_cast<int64_t>(std::ceil(sample - kernel_scale - 0.5f));
    int64_t hi = static_cast<int64_t>(std::floor(sample + kernel_scale - 0.5f));
    lo = std::min<int64_t>(std::max<int64_t>(lo, 0), in_size - 1);
    hi = std::min<int64_t>(std::max<int64_t>(hi, 0), in_size - 1) + 1;
    const int n = static_cast<int>(hi - lo);
    if (n > t.span) continue;  // cannot happen for this kernel; TF would raise
    float total = 0.0f;
    for (int k = 0; k < n; ++k) {
      const float pos = static_cast<float>(lo + k) + 0.5f - sample;
      const float x = std::abs(pos * inv_kernel_scale);
      w[k] = x < 1.0f ? 1.0f - x : 0.0f;
      total += w[k];
    }
    t.first[i] = static_cast<int>(lo);
    if (std::abs(total) < 1000.0f * std::numeric_limits<float>::min()) continue;
    const float inv_total = 1.0f / total;
    t.count[i] = n;
    for (int k = 0; k < n; ++k) t.weight[static_cast<size_t>(i) * t.span + k] = w[k] * inv_total;
  }
  return t;
}

typedef float v4f __attribute__((vector_size(16)));

class ResizeRegionOp : public OpKernel {
 public:
  explicit ResizeRegionOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* c) override {
    const Tensor& image = c->input(0);
    const Tensor& region = c->input(1);
    const Tensor& size = c->input(2);
    OP_REQUIRES(c, image.dims() == 3 && image.dim_size(2) == 3,
                tensorflow::errors::InvalidArgument("image must be [H, W, 3], got ",
                                                    image.shape().DebugString()));
    OP_REQUIRES(c, image.dim_size(0) > 0 && image.dim_size(1) > 0 &&
                       image.dim_size(0) < (1 << 30) && image.dim_size(1) < (1 << 30),
                tensorflow::errors::InvalidArgument("image must be non-empty"));
    OP_REQUIRES(c, region.NumElements() == 4,
                tensorflow::errors::InvalidArgument("region must be (top, left, h, w)"));
    OP_REQUIRES(c, size.NumElements() == 2,
                tensorflow::errors::InvalidArgument("size must be (height, width)"));
    const auto r = region.flat<float>();
    const auto s = size.flat<int32_t>();
    const int in_h = static_cast<int>(image.dim_size(0)), in_w = static_cast<int>(image.dim_size(1));
    const int out_h = s(0), out_w = s(1);
    OP_REQUIRES(c, out_h > 0 && out_w > 0,
                tensorflow::errors::InvalidArgument("output size must be positive"));
    // As the graph computes them: scale = out / extent, translation = -origin * scale.
    const float scale_y = static_cast<float>(out_h) / r(2);
    const float scale_x = static_cast<float>(out_w) / r(3);
    OP_REQUIRES(c, scale_y > 0 && scale_x > 0,
                tensorflow::errors::InvalidArgument("region height and width must be > 0"));
    const Taps rows = axis_taps(out_h, in_h, scale_y, -r(0) * scale_y);
    const Taps cols = axis_taps(out_w, in_w, scale_x, -r(1) * scale_x);

    Tensor* output = nullptr;
    OP_REQUIRES_OK(c, c->allocate_output(0, TensorShape({out_h, out_w, 3}), &output));
    uint8_t* out = output->flat<uint8_t>().data();
    const uint8_t* in = image.flat<uint8_t>().data();

    // Only the input columns some output column reads take part in the vertical pass (the
    // decoded window carries a margin for eval).
    int c0 = in_w, c1 = 0;
    for (int x = 0; x < out_w; ++x) {
      if (cols.count[x] == 0) continue;
      c0 = std::min(c0, cols.first[x]);
      c1 = std::max(c1, cols.first[x] + cols.count[x]);
    }
    if (c1 <= c0) c0 = c1 = 0;
    const int n = (c1 - c0) * 3;
    // Vertical pass first, as TensorFlow's kernel sums (so the float sums round alike): rows of
    // `n` floats over the needed columns, plus one float so the 4-lane loads below of a row's
    // last pixel stay inside the buffer.
    const int stride = n + 1;
    std::vector<float> mid(static_cast<size_t>(out_h) * stride + 4, 0.0f);
    const size_t in_row = static_cast<size_t>(in_w) * 3;
    for (int y = 0; y < out_h; ++y) {
      float* __restrict acc = mid.data() + static_cast<size_t>(y) * stride;
      const float* wy = rows.weight.data() + static_cast<size_t>(y) * rows.span;
      const uint8_t* src = in + static_cast<size_t>(rows.first[y]) * in_row + c0 * 3;
      for (int k = 0; k < rows.count[y]; ++k, src += in_row) {
        const float w = wy[k];
        const uint8_t* __restrict p = src;
        for (int i = 0; i < n; ++i) acc[i] += w * static_cast<float>(p[i]);
      }
    }
    // Horizontal pass: one 4-lane multiply-add per tap covers a pixel's 3 channels (the 4th lane,
    // the next pixel's red, is ignored). Then round half to even (tf.round) and clip.
    for (int y = 0; y < out_h; ++y) {
      const float* row = mid.data() + static_cast<size_t>(y) * stride - c0 * 3;
      uint8_t* o = out + static_cast<size_t>(y) * out_w * 3;
      for (int x = 0; x < out_w; ++x, o += 3) {
        const float* wx = cols.weight.data() + static_cast<size_t>(x) * cols.span;
        const float* p = row + cols.first[x] * 3;
        v4f acc = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < cols.count[x]; ++k, p += 3) {
          v4f v;
          std::memcpy(&v, p, sizeof v);
          acc += wx[k] * v;
        }
        for (int ch = 0; ch < 3; ++ch) {
          const float v = std::nearbyint(acc[ch]);
          o[ch] = static_cast<uint8_t>(v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v);
        }
      }
    }
  }
};

}  // namespace

REGISTER_OP("BirealResizeRegion")
    .Input("image: uint8")
    .Input("region: float")
    .Input("size: int32")
    .Output("resized: uint8")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle hw, out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &hw));
      TF_RETURN_IF_ERROR(c->WithRank(hw, 2, &hw));
      TF_RETURN_IF_ERROR(c->Concatenate(hw, c->Vector(3), &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    })
    .Doc("Antialiased triangle resize of the region (top, left, height, width) of a uint8 "
         "[H, W, 3] image to `size`, rounded to uint8 (bireal_jax.data.resize_op).");

REGISTER_KERNEL_BUILDER(Name("BirealResizeRegion").Device(tensorflow::DEVICE_CPU)
                            .HostMemory("region").HostMemory("size"),
                        ResizeRegionOp);
