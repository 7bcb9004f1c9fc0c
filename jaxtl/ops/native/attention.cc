// Multi-head scaled dot-product attention on the CPU, forward and backward, as
// XLA FFI custom calls (jaxtl/ops/native/__init__.py builds and registers them).
//
//   y[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h]
//
// q, k, v, y: (B, T, H, D) float32, the projections' own layout (no transposes
// to heads-first); lse: (B, H, T), the log of each softmax row's denominator,
// kept by the forward so that the backward recomputes the probabilities with one
// matmul instead of storing them.
//
// Why: XLA's CPU backend runs the attention of a ViT as separate batched
// matmuls of 197x64 matrices, a softmax and four transposes, well behind
// PyTorch's fused scaled_dot_product_attention (docs/performance.md). Here each (image, head) pair is one task
// whose T x T scores stay in L2, and the matmuls are register-tiled.
//
// Deterministic: every output element is computed by one task in a fixed order;
// which thread runs a task changes nothing. D must be a multiple of 16 (the
// caller checks; ViT heads are 64 wide).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxtl::RunTasks;

namespace {

constexpr int kLanes = 16;
// 16 floats; aligned(4) lets it load from any float address.
typedef float Vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(64), aligned(4)));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline Vec Splat(float x) { return Vec{} + x; }

// exp on 16 lanes: 2^n * p(r) with r = x - n ln2, |r| <= ln2 / 2, Cephes'
// degree-6 polynomial (about 1 ulp). Inputs below -87 give exp(-87) ~ 1.6e-38,
// not 0: negligible next to a softmax row's maximum term, which is 1. The
// clamps are written so that a NaN stays NaN (a comparison with NaN is false):
// a diverging model must reach the train step's non-finite check.
inline Vec Exp(Vec x) {
  x = x > Splat(88.3762626647949f) ? Splat(88.3762626647949f) : x;
  x = x < Splat(-87.3365447504019f) ? Splat(-87.3365447504019f) : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec n = (x * Splat(1.44269504088896341f) + magic) - magic;
  Vec r = x - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.0f);
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// c[i, n] = sum_k a(i, k) * b[k, n] for i < m, n < 16 * nv, k < depth, where
// a(i, k) = a[i * a_row + k * a_col] (a transposed operand is just other
// strides) and b's rows are contiguous with stride ldb. An MR x NV tile of c
// stays in registers over the whole sum.
template <int MR, int NV>
inline void Tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                 int64_t depth) {
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + k * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Vec av = Splat(a[r * a_row + k * a_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int NV>
void RowsOf(int64_t m, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c,
            int64_t ldc, int64_t depth) {
  constexpr int MR = NV >= 4 ? 6 : 8;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) Tile<MR, NV>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, depth);
  for (; i < m; ++i) Tile<1, NV>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, depth);
}

// c (m x n) = a (m x depth, strided) . b (depth x n); n a multiple of 16.
void MatMul(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
            int64_t ldb, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 4 * kLanes <= n; col += 4 * kLanes) RowsOf<4>(m, a, a_row, a_col, b + col, ldb, c + col, ldc, depth);
  for (; col + 2 * kLanes <= n; col += 2 * kLanes) RowsOf<2>(m, a, a_row, a_col, b + col, ldb, c + col, ldc, depth);
  for (; col < n; col += kLanes) RowsOf<1>(m, a, a_row, a_col, b + col, ldb, c + col, ldc, depth);
}

struct Shape {
  int64_t batch, tokens, heads, dim;
  int64_t padded;  // tokens rounded up to 16: the row length of the T x T scratch
  int64_t row() const { return heads * dim; }   // stride between tokens in q, k, v, y
  int64_t offset(int64_t task) const {          // task = b * heads + h
    return (task / heads) * tokens * row() + (task % heads) * dim;
  }
};

// t (dim x padded) = x (tokens x dim, row stride `row`) transposed, zero beyond `tokens`.
void Transpose(const Shape& s, const float* x, float* t) {
  for (int64_t d = 0; d < s.dim; ++d) {
    float* out = t + d * s.padded;
    for (int64_t j = 0; j < s.tokens; ++j) out[j] = x[j * s.row() + d];
    std::fill(out + s.tokens, out + s.padded, 0.f);
  }
}

// Scores S = q . k^T into `scores` (tokens x padded).
void Scores(const Shape& s, const float* q, const float* k, float* kt, float* scores) {
  Transpose(s, k, kt);
  MatMul(s.tokens, s.padded, s.dim, q, s.row(), 1, kt, s.padded, scores, s.padded);
}

struct Scratch {
  std::vector<float> kt, scores, dscores;
  explicit Scratch(const Shape& s, bool backward)
      : kt(s.dim * s.padded), scores(s.tokens * s.padded), dscores(backward ? s.tokens * s.padded : 0) {}
};

void ForwardTask(const Shape& s, float scale, const float* q, const float* k, const float* v, float* y, float* lse,
                 Scratch& w, int64_t task) {
  const int64_t off = s.offset(task);
  float* p = w.scores.data();
  Scores(s, q + off, k + off, w.kt.data(), p);
  const Vec neg_inf = Splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < s.tokens; ++i) {
    float* row = p + i * s.padded;
    for (int64_t j = s.tokens; j < s.padded; ++j) row[j] = -std::numeric_limits<float>::infinity();
    Vec mv = neg_inf;
    for (int64_t j = 0; j < s.padded; j += kLanes) {
      const Vec x = Load(row + j) * Splat(scale);
      Store(row + j, x);
      mv = mv > x ? mv : x;
    }
    float m = mv[0];
    for (int l = 1; l < kLanes; ++l) m = std::max(m, mv[l]);
    Vec sv{};
    for (int64_t j = 0; j < s.padded; j += kLanes) {
      const Vec e = Exp(Load(row + j) - Splat(m));
      Store(row + j, e);
      sv += e;
    }
    // The padding lanes hold exp(-87) ~ 1.6e-38 (Exp clamps): next to the row's
    // maximum term, 1, they vanish in the sum's rounding, and the product with v
    // below stops at `tokens`.
    float sum = 0.f;
    for (int l = 0; l < kLanes; ++l) sum += sv[l];
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < s.padded; j += kLanes) Store(row + j, Load(row + j) * Splat(inv));
    lse[task * s.tokens + i] = m + std::log(sum);
  }
  MatMul(s.tokens, s.dim, s.tokens, p, s.padded, 1, v + off, s.row(), y + off, s.row());
}

void BackwardTask(const Shape& s, float scale, const float* q, const float* k, const float* v, const float* y,
                  const float* dy, const float* lse, float* dq, float* dk, float* dv, Scratch& w, int64_t task) {
  const int64_t off = s.offset(task);
  float* p = w.scores.data();
  float* ds = w.dscores.data();
  Scores(s, q + off, k + off, w.kt.data(), p);
  // dP = dy . v^T (kt's scratch now holds v transposed).
  Transpose(s, v + off, w.kt.data());
  MatMul(s.tokens, s.padded, s.dim, dy + off, s.row(), 1, w.kt.data(), s.padded, ds, s.padded);
  for (int64_t i = 0; i < s.tokens; ++i) {
    float* prow = p + i * s.padded;
    float* drow = ds + i * s.padded;
    const float* yi = y + off + i * s.row();
    const float* dyi = dy + off + i * s.row();
    Vec dot{};
    for (int64_t d = 0; d < s.dim; d += kLanes) dot += Load(yi + d) * Load(dyi + d);
    float delta = 0.f;
    for (int l = 0; l < kLanes; ++l) delta += dot[l];
    const float l_i = lse[task * s.tokens + i];
    for (int64_t j = 0; j < s.padded; j += kLanes) {
      const Vec prob = Exp(Load(prow + j) * Splat(scale) - Splat(l_i));
      Store(prow + j, prob);
      // dS = P * (dP - delta), times the scale that multiplied the scores.
      Store(drow + j, prob * (Load(drow + j) - Splat(delta)) * Splat(scale));
    }
  }
  // dv = P^T . dy, dq = dS . k, dk = dS^T . q: each sums over tokens only, so
  // the padding columns of P and dS are never read.
  MatMul(s.tokens, s.dim, s.tokens, p, 1, s.padded, dy + off, s.row(), dv + off, s.row());
  MatMul(s.tokens, s.dim, s.tokens, ds, s.padded, 1, k + off, s.row(), dq + off, s.row());
  MatMul(s.tokens, s.dim, s.tokens, ds, 1, s.padded, q + off, s.row(), dk + off, s.row());
}

// body(scratch, task) for every task, one scratch per thread that claims any.
template <typename Body>
void ParallelTasks(ffi::ThreadPool& pool, int64_t tasks, const Shape& s, bool backward, Body body) {
  RunTasks(pool, tasks, [=](auto next) {
    int64_t t = next();
    if (t < 0) return;
    Scratch scratch(s, backward);
    for (; t >= 0; t = next()) body(scratch, t);
  });
}

ffi::Error CheckShape(ffi::Span<const int64_t> d, Shape* s) {
  if (d.size() != 4) return ffi::Error::InvalidArgument("attention: expected (batch, tokens, heads, head_dim)");
  *s = Shape{d[0], d[1], d[2], d[3], (d[1] + kLanes - 1) / kLanes * kLanes};
  if (s->dim % kLanes != 0) return ffi::Error::InvalidArgument("attention: head_dim must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> lse,
                            float scale) {
  Shape s;
  if (auto e = CheckShape(q.dimensions(), &s); e.failure()) return e;
  const int64_t tasks = s.batch * s.heads;
  if (tasks == 0 || s.tokens == 0) return ffi::Error::Success();
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float *yd = y->typed_data(), *ld = lse->typed_data();
  ParallelTasks(pool, tasks, s, false,
                [=](Scratch& w, int64_t t) { ForwardTask(s, scale, qd, kd, vd, yd, ld, w, t); });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Shape s;
  if (auto e = CheckShape(q.dimensions(), &s); e.failure()) return e;
  const int64_t tasks = s.batch * s.heads;
  if (tasks == 0 || s.tokens == 0) return ffi::Error::Success();
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data(), *yd = y.typed_data(),
              *dyd = dy.typed_data(), *ld = lse.typed_data();
  float *dqd = dq->typed_data(), *dkd = dk->typed_data(), *dvd = dv->typed_data();
  ParallelTasks(pool, tasks, s, true, [=](Scratch& w, int64_t t) {
    BackwardTask(s, scale, qd, kd, vd, yd, dyd, ld, dqd, dkd, dvd, w, t);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtlAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtlAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
