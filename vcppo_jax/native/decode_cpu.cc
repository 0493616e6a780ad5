// The sampler's decode step on the host CPU, float32: one new token per row.
//
// 1. Skinny matrix products y[M, N] = x[M, K] @ w[K, N], M small (the batch), w read once per
//    step (VcppoPackedMatmul).
// 2. Attention of the new token over the KV cache, reading only the slots each row can see
//    (VcppoDecodeAttention).
//
// Products. At M = 32 the product is bound by streaming the weights, and reading w[K, N] row-major
// touches a few cache lines per row of K per tile, N * 4 bytes apart. The weights are therefore
// packed once per generate() call (vcppo_jax/native/__init__.py: pack_kernel) into tiles of
// kNR = 48 columns stored contiguously, [T = ceil(N / kNR), K, kNR] (the last tile zero-padded),
// so each tile is one sequential stream. A tile is computed in blocks of kMR rows of x with
// kMR x kNR accumulators held in vector registers (8 x 3 zmm with AVX-512).
//
// FFI: inputs x [M, K] and packed [T, K, kNR]; attribute n (the true N); output y [M, N].
//
// Attention. The cache holds every slot of the buffer (prompt + max_new_tokens), but a query at
// position p sees slots 0..p only; XLA reads all of them and masks. Here each (row, KV head)
// reads keys and values 0..p once, for all the query heads of its group: scores, a softmax in
// float32 (max subtracted), and the weighted sum of values.
// FFI: q [B, Hkv, G, D], k and v caches [B, Hkv, S, D], visible [B] int32 (p + 1); output
// [B, Hkv, G, D].
//
// Threads: work items (tiles, or (row, head) pairs) are shared out through an atomic counter
// between the calling thread and helpers scheduled on XLA's intra-op thread pool. The caller
// never waits for a helper that has not started (a helper that starts late finds nothing left
// and returns), so several of these calls running at once on a small pool cannot deadlock.
// Small calls run on the caller alone.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;  // floats per vector register
constexpr int kMR = 8;  // rows of x per block: 8 x 3 accumulators + 3 + 1 = 28 of 32 registers
constexpr int kNV = 3;
#else
constexpr int kW = 8;
constexpr int kMR = 2;  // 2 x 6 accumulators + 6 + 1 = 19 ymm: a few spills, still vectorised
constexpr int kNV = 6;
#endif
constexpr int kNR = kW * kNV;  // 48 either way: the packed layout does not depend on the CPU
static_assert(kNR == 48, "the packed tile width is part of the Python interface");

typedef float vec __attribute__((vector_size(kW * 4)));
typedef float vec_unaligned __attribute__((vector_size(kW * 4), aligned(4)));

inline vec Load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void Store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }

// y[0:MR, 0:ncols] = x[0:MR, 0:K] @ tile[0:K, 0:ncols]; tile is [K, kNR] contiguous.
template <int MR>
void Block(const float* x, int64_t k_len, const float* tile, float* y, int64_t ldy,
           int64_t ncols) {
  vec acc[MR][kNV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNV; ++j) acc[i][j] = vec{};
  for (int64_t k = 0; k < k_len; ++k) {
    const float* row = tile + k * kNR;
    __builtin_prefetch(row + 16 * kNR);
    __builtin_prefetch(row + 16 * kNR + 16);
    __builtin_prefetch(row + 16 * kNR + 32);
    vec b[kNV];
    for (int j = 0; j < kNV; ++j) b[j] = Load(row + j * kW);
    for (int i = 0; i < MR; ++i) {
      const float s = x[i * k_len + k];
      for (int j = 0; j < kNV; ++j) acc[i][j] += s * b[j];
    }
  }
  if (ncols == kNR) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNV; ++j) Store(y + i * ldy + j * kW, acc[i][j]);
    return;
  }
  float tmp[kNR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < kNV; ++j) Store(tmp + j * kW, acc[i][j]);
    std::memcpy(y + i * ldy, tmp, ncols * sizeof(float));
  }
}

void Tiles(const float* x, const float* packed, float* y, int64_t m_len, int64_t k_len,
           int64_t n_len, int64_t t_begin, int64_t t_end) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    const float* tile = packed + t * k_len * kNR;
    const int64_t n = t * kNR, ncols = std::min<int64_t>(kNR, n_len - n);
    int64_t m = 0;
    for (; m + kMR <= m_len; m += kMR)
      Block<kMR>(x + m * k_len, k_len, tile, y + m * n_len + n, n_len, ncols);
    // Fewer rows left than a block (or a small batch): the widest block that fits, so the tile
    // is read once per block rather than once per row.
    for (; m + 4 <= m_len; m += 4)
      Block<4>(x + m * k_len, k_len, tile, y + m * n_len + n, n_len, ncols);
    for (; m + 2 <= m_len; m += 2)
      Block<2>(x + m * k_len, k_len, tile, y + m * n_len + n, n_len, ncols);
    for (; m < m_len; ++m) Block<1>(x + m * k_len, k_len, tile, y + m * n_len + n, n_len, ncols);
  }
}

// Runs fn(begin, end) over [0, items) in chunks, on the caller and up to `helpers` pool threads.
struct Shared {
  std::function<void(int64_t, int64_t)> fn;
  int64_t items = 0, chunk = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    for (;;) {
      const int64_t i0 = next.fetch_add(chunk);
      if (i0 >= items) return;
      const int64_t i1 = std::min(items, i0 + chunk);
      fn(i0, i1);
      if (done.fetch_add(i1 - i0) + (i1 - i0) == items) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t flops,
                 std::function<void(int64_t, int64_t)> fn) {
  // Split only where each thread gets well over the cost of waking it (~10 us of work).
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), flops / (1 << 21), items - 1});
  if (helpers <= 0) {
    fn(0, items);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->fn = std::move(fn);
  shared->items = items;
  shared->chunk = std::max<int64_t>(1, items / (8 * (helpers + 1)));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  // Everything has been claimed; wait for the chunks other threads are still computing.
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->items; });
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> packed, int64_t n,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("packed_matmul: x must be [M, K], packed [T, K, 48]");
  }
  const int64_t m_len = xd[0], k_len = xd[1], tiles = pd[0];
  if (pd[1] != k_len || pd[2] != kNR || n <= 0 || tiles != (n + kNR - 1) / kNR ||
      yd[0] != m_len || yd[1] != n) {
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, packed and n disagree");
  }
  if (m_len == 0) return ffi::Error::Success();

  const float* xp = x.typed_data();
  const float* pp = packed.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, tiles, 2 * m_len * k_len * tiles * kNR, [=](int64_t t0, int64_t t1) {
    Tiles(xp, pp, yp, m_len, k_len, n, t0, t1);
  });
  return ffi::Error::Success();
}

float HorizontalSum(vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

// One (row, KV head): q [G, D], keys and values [S, D] of which the first `len` are visible.
void AttendOne(const float* q, const float* k, const float* v, int64_t g_len, int64_t d,
               int64_t len, float scale, float* scores, float* out) {
  const bool vectorised = d % kW == 0;
  constexpr int64_t kAhead = 16;  // Rows prefetched ahead of use.
  for (int64_t j = 0; j < len; ++j) {  // Scores: each key row read once for the whole group.
    const float* kj = k + j * d;
    // Both streams in flight: the values are in cache when the second pass reads them.
    for (int64_t e = 0; e < d; e += 16) {
      __builtin_prefetch(kj + kAhead * d + e);
      __builtin_prefetch(v + j * d + e);
    }
    for (int64_t g = 0; g < g_len; ++g) {
      const float* qg = q + g * d;
      float s = 0.f;
      if (vectorised) {
        vec acc{};
        for (int64_t e = 0; e < d; e += kW) acc += Load(qg + e) * Load(kj + e);
        s = HorizontalSum(acc);
      } else {
        for (int64_t e = 0; e < d; ++e) s += qg[e] * kj[e];
      }
      scores[g * len + j] = s * scale;
    }
  }
  for (int64_t g = 0; g < g_len; ++g) {  // Softmax over the visible slots, in float32.
    float* sg = scores + g * len;
    float m = sg[0];
    for (int64_t j = 1; j < len; ++j) m = std::max(m, sg[j]);
    float total = 0.f;
    for (int64_t j = 0; j < len; ++j) total += (sg[j] = std::exp(sg[j] - m));
    const float inv = 1.f / total;
    for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
  }
  std::fill(out, out + g_len * d, 0.f);
  for (int64_t j = 0; j < len; ++j) {  // Weighted values: each value row read once.
    const float* vj = v + j * d;
    for (int64_t g = 0; g < g_len; ++g) {
      const float p = scores[g * len + j];
      float* og = out + g * d;
      if (vectorised) {
        for (int64_t e = 0; e < d; e += kW) Store(og + e, Load(og + e) + p * Load(vj + e));
      } else {
        for (int64_t e = 0; e < d; ++e) og[e] += p * vj[e];
      }
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                               ffi::Buffer<ffi::S32> visible, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || visible.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "decode_attention: q must be [B, Hkv, G, D], caches [B, Hkv, S, D], visible [B]");
  }
  const int64_t b_len = qd[0], h_len = qd[1], g_len = qd[2], d = qd[3], s_len = kd[2];
  if (kd[0] != b_len || kd[1] != h_len || kd[3] != d || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3] || visible.dimensions()[0] != b_len) {
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, caches, visible disagree");
  }
  if (b_len * h_len == 0) return ffi::Error::Success();
  if (s_len == 0) {  // Nothing to attend to.
    std::fill(out->typed_data(), out->typed_data() + b_len * h_len * g_len * d, 0.f);
    return ffi::Error::Success();
  }
  const float* qp = q.typed_data();
  const float* kp = k_cache.typed_data();
  const float* vp = v_cache.typed_data();
  const int32_t* vis = visible.typed_data();
  float* op = out->typed_data();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  auto fn = [=](int64_t i0, int64_t i1) {
    std::vector<float> scores(g_len * s_len);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / h_len;
      const int64_t len = std::clamp<int64_t>(vis[b], 1, s_len);
      const int64_t kv = i * s_len * d;
      AttendOne(qp + i * g_len * d, kp + kv, vp + kv, g_len, d, len, scale, scores.data(),
                op + i * g_len * d);
    }
  };
  int64_t slots = 0;  // Visible slots over the batch: the work, for deciding on threads.
  for (int64_t b = 0; b < b_len; ++b) slots += std::clamp<int64_t>(vis[b], 1, s_len);
  ParallelFor(pool, b_len * h_len, 4 * slots * h_len * g_len * d, fn);
  return ffi::Error::Success();
}

}  // namespace

extern "C" int VcppoPackedMatmulTileWidth() { return kNR; }
extern "C" int VcppoPackedMatmulVectorWidth() { return kW; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VcppoPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VcppoDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
