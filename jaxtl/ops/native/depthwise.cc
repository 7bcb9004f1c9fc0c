// The kernel gradient of a depthwise 2-D convolution on the CPU, as an XLA FFI
// custom call (jaxtl/ops/native/__init__.py builds and registers it).
//
//   dk[t, c] = sum over n, ho, wo of  padded[n, ho*s + i*d, wo*s + j*d, c] * grad[n, ho, wo, c]
//   for every tap t = i * kw + j,
//
// padded: the zero-padded input (N, Hp, Wp, C), grad: the output gradient
// (N, Ho, Wo, C), both float32 NHWC; dk: (kh * kw, C) float32.
//
// Why: XLA computes this as kh*kw separate multiply-reductions, each of which
// reads the whole layer (and first materialises its strided window). Here one
// pass over the layer keeps the kh*kw partial sums of a block of channels in
// registers while it walks the pixels.
//
// Deterministic: the pixels are split into chunks that depend only on the
// shapes; each chunk sums into its own row of partial sums, and the partials
// are added in chunk order. Which thread runs a chunk changes nothing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxtl::RunTasks;

namespace {

struct Geometry {
  int64_t n, hp, wp, c, ho, wo, kh, kw, stride, dilation;
};

// The kh*kw partial sums of channels [c0, c0 + CB) over output rows
// [row_begin, row_end) (row = n * ho + output row), added into acc (taps x C).
template <int CB, int KH, int KW>
void AccumulateBlock(const Geometry& g, const float* x, const float* dy, int64_t row_begin, int64_t row_end,
                     int64_t c0, float* acc) {
  const int64_t kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int64_t taps = kh * kw;
  // Registers for the fixed-size cases; the generic case sums in a small array too.
  float sums[(KH > 0 ? KH : 7) * (KW > 0 ? KW : 7)][CB];
  float* s = &sums[0][0];
  std::vector<float> heap;
  if (KH == 0 && taps > 49) {
    heap.assign(taps * CB, 0.f);
    s = heap.data();
  } else {
    std::memset(sums, 0, sizeof(sums));
  }
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / g.ho, oh = row % g.ho;
    const float* dy_row = dy + (row * g.wo) * c + c0;
    const float* x_image = x + (b * g.hp) * g.wp * c + c0;
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const float* dyp = dy_row + ow * c;
      float gv[CB];
      for (int k = 0; k < CB; ++k) gv[k] = dyp[k];
      for (int64_t i = 0; i < kh; ++i) {
        const float* x_row = x_image + ((oh * g.stride + i * g.dilation) * g.wp + ow * g.stride) * c;
        for (int64_t j = 0; j < kw; ++j) {
          const float* xp = x_row + j * g.dilation * c;
          float* st = s + (i * kw + j) * CB;
          for (int k = 0; k < CB; ++k) st[k] += xp[k] * gv[k];
        }
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t)
    for (int k = 0; k < CB; ++k) acc[t * c + c0 + k] += s[t * CB + k];
}

template <int KH, int KW>
void AccumulateRows(const Geometry& g, const float* x, const float* dy, int64_t row_begin, int64_t row_end,
                    float* acc) {
  int64_t c0 = 0;
  for (; c0 + 32 <= g.c; c0 += 32) AccumulateBlock<32, KH, KW>(g, x, dy, row_begin, row_end, c0, acc);
  for (; c0 + 8 <= g.c; c0 += 8) AccumulateBlock<8, KH, KW>(g, x, dy, row_begin, row_end, c0, acc);
  for (; c0 < g.c; ++c0) AccumulateBlock<1, KH, KW>(g, x, dy, row_begin, row_end, c0, acc);
}

void Accumulate(const Geometry& g, const float* x, const float* dy, int64_t row_begin, int64_t row_end,
                float* acc) {
  if (g.kh == 3 && g.kw == 3) return AccumulateRows<3, 3>(g, x, dy, row_begin, row_end, acc);
  if (g.kh == 5 && g.kw == 5) return AccumulateRows<5, 5>(g, x, dy, row_begin, row_end, acc);
  if (g.kh == 7 && g.kw == 7) return AccumulateRows<7, 7>(g, x, dy, row_begin, row_end, acc);
  AccumulateRows<0, 0>(g, x, dy, row_begin, row_end, acc);
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> padded, ffi::Buffer<ffi::F32> grad,
                               ffi::ResultBuffer<ffi::F32> out, int64_t kh, int64_t kw, int64_t stride,
                               int64_t dilation) {
  auto xd = padded.dimensions(), gd = grad.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[3] != gd[3])
    return ffi::Error::InvalidArgument("depthwise kernel gradient: expected NHWC input and gradient");
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], kh, kw, stride, dilation};
  if ((g.ho - 1) * stride + (kh - 1) * dilation >= g.hp || (g.wo - 1) * stride + (kw - 1) * dilation >= g.wp)
    return ffi::Error::InvalidArgument("depthwise kernel gradient: gradient does not fit the padded input");
  const int64_t taps = kh * kw, rows = g.n * g.ho;
  float* result = out->typed_data();
  if (rows == 0 || g.c == 0) {
    std::fill(result, result + taps * g.c, 0.f);
    return ffi::Error::Success();
  }
  // Chunks of about 64 KiB of gradient each (at least one row): enough of them
  // to share between threads, few enough that their partial sums stay small.
  const int64_t row_bytes = g.wo * g.c * 4;
  const int64_t rows_per_chunk = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<float> partial(chunks * taps * g.c, 0.f);
  const float* x = padded.typed_data();
  const float* dy = grad.typed_data();
  float* partial_data = partial.data();

  RunTasks(pool, chunks, [=](auto next) {
    for (int64_t k = next(); k >= 0; k = next())
      Accumulate(g, x, dy, k * rows_per_chunk, std::min(rows, (k + 1) * rows_per_chunk),
                 partial_data + k * taps * g.c);
  });
  // Pairwise over the chunks (a fixed tree): the rounding error grows with the
  // log of the number of chunks, not with the number.
  const int64_t size = taps * g.c;
  for (int64_t step = 1; step < chunks; step *= 2)
    for (int64_t k = 0; k + step < chunks; k += 2 * step) {
      float* into = partial_data + k * size;
      const float* from = partial_data + (k + step) * size;
      for (int64_t i = 0; i < size; ++i) into[i] += from[i];
    }
  std::memcpy(result, partial_data, size * sizeof(float));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtlDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation"));
