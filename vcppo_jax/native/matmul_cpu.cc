// Skinny float32 matrix products for the sampler's decode step: y[M, N] = x[M, K] @ w[K, N],
// with M small (the batch: one new token per row) and w read once per step.
//
// At M = 32 the product is bound by streaming the weights, and reading w[K, N] row-major
// touches a few cache lines per row of K per tile, N * 4 bytes apart. The weights are therefore
// packed once per generate() call (vcppo_jax/native/__init__.py: pack_kernel) into tiles of
// kNR = 48 columns stored contiguously, [T = ceil(N / kNR), K, kNR] (the last tile zero-padded),
// so each tile is one sequential stream. A tile is computed in blocks of kMR rows of x with
// kMR x kNR accumulators held in vector registers (8 x 3 zmm with AVX-512).
//
// Threads: the tiles are shared out through an atomic counter between the calling thread and
// helpers scheduled on XLA's intra-op thread pool. The caller never waits for a helper that
// has not started (a helper that starts late finds no tiles left and returns), so several of
// these calls running at once on a small pool cannot deadlock. Small products run on the
// caller alone.
//
// An XLA FFI handler: inputs x [M, K] and packed [T, K, kNR]; attribute n (the true N);
// output y [M, N].

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

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
    for (; m < m_len; ++m) Block<1>(x + m * k_len, k_len, tile, y + m * n_len + n, n_len, ncols);
  }
}

// Work shared between the caller and pool helpers; kept alive by whoever holds it last.
struct Shared {
  const float *x, *packed;
  float* y;
  int64_t m_len, k_len, n_len, tiles, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};  // tiles finished
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    for (;;) {
      const int64_t t0 = next.fetch_add(chunk);
      if (t0 >= tiles) return;
      const int64_t t1 = std::min(tiles, t0 + chunk);
      Tiles(x, packed, y, m_len, k_len, n_len, t0, t1);
      if (done.fetch_add(t1 - t0) + (t1 - t0) == tiles) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

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

  // Split only where each thread gets well over the cost of waking it (~10 us of work).
  const int64_t flops = 2 * m_len * k_len * tiles * kNR;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), flops / (1 << 21));
  if (helpers <= 0 || tiles < 2) {
    Tiles(x.typed_data(), packed.typed_data(), y->typed_data(), m_len, k_len, n, 0, tiles);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>();
  shared->x = x.typed_data();
  shared->packed = packed.typed_data();
  shared->y = y->typed_data();
  shared->m_len = m_len;
  shared->k_len = k_len;
  shared->n_len = n;
  shared->tiles = tiles;
  shared->chunk = std::max<int64_t>(1, tiles / (8 * (helpers + 1)));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  // Every tile has been claimed; wait for the ones other threads are still computing.
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == tiles; });
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
