// Counter-based dropout mask: a pure function of (seed, row*k + col), so backward regenerates exactly the
// mask forward used without storing it. Bit-identical twin: qlora_ext.reference.dropout_mask.
//   fmix32 = MurmurHash3's 32-bit finalizer (good avalanche, 5 ALU ops).
//   key    = fmix32(uint32(seed) ^ fmix32(uint32(seed >> 32) + 0x9E3779B9))       (host, once per op)
//   h      = fmix32(fmix32(uint32(idx) ^ key) ^ uint32(idx >> 32));  keep = h >= thresh
//   thresh = uint32(min(floor(p * 2^32), 2^32 - 1))                                (host, once per op)
// A kept element becomes out_dtype(fp32(x) * fp32(1/(1-p))), a dropped one +0.0 (reference.dropout).
#pragma once

#include <cstdint>
#include <cmath>
#include <cuda_runtime.h>  // __host__/__device__/__forceinline__ when included from plain C++

namespace qlora_ext {

__host__ __device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__host__ inline uint32_t dropout_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);  // two's complement reinterpretation, as Python's & 0xFFFFFFFF
  return fmix32(static_cast<uint32_t>(s) ^ fmix32(static_cast<uint32_t>(s >> 32) + 0x9E3779B9u));
}

// p in [0, 1). floor(p * 2^32) is exact in double for p's 53-bit mantissa; clamp keeps p -> 1 from wrapping.
__host__ inline uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0u;
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// idx = row * k + col over the [m, k] activation (uint64, so m*k beyond 2^32 keeps distinct counters).
__device__ __forceinline__ bool dropout_keep(uint32_t key, uint32_t thresh, uint64_t idx) {
  const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(idx) ^ key) ^ static_cast<uint32_t>(idx >> 32));
  return h >= thresh;
}

// Everything a kernel needs to apply the mask; one field of every Params struct that drops out.
struct DropoutParams {
  uint32_t key;     // dropout_key(seed)
  uint32_t thresh;  // dropout_threshold(p)
  float inv_keep;   // fp32(1 / (1 - p)): computed in double, rounded once (reference._keep_scale)
  bool enabled;     // p > 0 (else no mask at all)

  __device__ __forceinline__ bool keep(uint64_t idx) const { return dropout_keep(key, thresh, idx); }
};

// Host: the one place key, threshold and scale are derived from (p, seed). The caller checks 0 <= p < 1.
__host__ inline DropoutParams make_dropout(double p, int64_t seed) {
  DropoutParams d{};
  d.key = dropout_key(seed);
  d.thresh = dropout_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  d.enabled = p > 0.0;
  return d;
}

}  // namespace qlora_ext
