// Decoupled GAE on the host CPU: one reverse pass over time per row, both lambdas at once.
//
// An XLA FFI handler (called from JAX with jax.ffi.ffi_call; see vcppo_jax/native/__init__.py).
// Inputs, row-major float32:
//   rewards, values, mask  [B, T]
//   gamma                  [B, 1]
//   coef_actor, coef_critic [B, L], L = 1 (one lambda per row) or T (per token): gamma*lambda
// Outputs: advantages [B, T] (lambda_actor) and returns [B, T] (lambda_critic advantages plus
// values), zero where mask is zero. Padding may hold anything (even NaN): it is selected away,
// never multiplied. Rows are split over a few threads when the batch is large.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void SolveRows(const float* r, const float* v, const float* m, const float* g, const float* ca,
               const float* cc, int64_t coef_len, int64_t t_len, int64_t row_begin,
               int64_t row_end, float* adv, float* ret) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t o = b * t_len;
    const float gamma = g[b];
    const float* ca_row = ca + b * coef_len;
    const float* cc_row = cc + b * coef_len;
    const bool per_token = coef_len != 1;
    float a = 0.0f, c = 0.0f, v_next = 0.0f;
    bool next_real = false;
    for (int64_t t = t_len - 1; t >= 0; --t) {
      const bool real = m[o + t] > 0.0f;
      const float v_t = real ? v[o + t] : 0.0f;
      const float boot = next_real ? v_next : 0.0f;
      const float delta = real ? r[o + t] + gamma * boot - v_t : 0.0f;
      a = delta + (per_token ? ca_row[t] : ca_row[0]) * a;
      c = delta + (per_token ? cc_row[t] : cc_row[0]) * c;
      adv[o + t] = real ? a : 0.0f;
      ret[o + t] = real ? c + v_t : 0.0f;
      v_next = v_t;
      next_real = real;
    }
  }
}

ffi::Error GaeImpl(ffi::Buffer<ffi::F32> rewards, ffi::Buffer<ffi::F32> values,
                   ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> gamma,
                   ffi::Buffer<ffi::F32> coef_actor, ffi::Buffer<ffi::F32> coef_critic,
                   ffi::ResultBuffer<ffi::F32> advantages, ffi::ResultBuffer<ffi::F32> returns) {
  auto dims = rewards.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("gae_cpu: rewards must be [B, T]");
  const int64_t b_len = dims[0], t_len = dims[1];
  auto cdims = coef_actor.dimensions();
  auto kdims = coef_critic.dimensions();
  if (cdims.size() != 2 || kdims.size() != 2 || cdims[0] != b_len || kdims[0] != b_len ||
      (cdims[1] != 1 && cdims[1] != t_len) || kdims[1] != cdims[1]) {
    return ffi::Error::InvalidArgument("gae_cpu: coefficients must be [B, 1] or [B, T]");
  }
  const int64_t coef_len = cdims[1];
  const float* r = rewards.typed_data();
  const float* v = values.typed_data();
  const float* m = mask.typed_data();
  const float* g = gamma.typed_data();
  const float* ca = coef_actor.typed_data();
  const float* cc = coef_critic.typed_data();
  float* adv = advantages->typed_data();
  float* ret = returns->typed_data();

  // Threads only pay off past a few hundred thousand elements.
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t n_threads = std::min<int64_t>({hw, b_len, 1 + b_len * t_len / (1 << 18)});
  if (n_threads <= 1) {
    SolveRows(r, v, m, g, ca, cc, coef_len, t_len, 0, b_len, adv, ret);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  const int64_t per = (b_len + n_threads - 1) / n_threads;
  for (int64_t i = 1; i < n_threads; ++i) {
    const int64_t lo = i * per, hi = std::min(b_len, lo + per);
    if (lo < hi) {
      pool.emplace_back(SolveRows, r, v, m, g, ca, cc, coef_len, t_len, lo, hi, adv, ret);
    }
  }
  SolveRows(r, v, m, g, ca, cc, coef_len, t_len, 0, std::min(b_len, per), adv, ret);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VcppoGaeCpu, GaeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
