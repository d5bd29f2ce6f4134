// NF4 quantize / dequantize (bitsandbytes-compatible storage, ARCHITECTURE §2).
// Twins: qlora_ext.reference.quantize_nf4 / dequantize_nf4 — bit-exact; the rule (normalisation, thresholds,
// tie-breaking, zero blocks, nested map search) is the module docstring of reference.py, mirrored step by step
// below ("rule 1".."rule 8" refer to it).
//
// Kernels (all memory-bound; one launcher each):
//   nf4_quantize_kernel        w -> packed nibbles + fp32 absmax             reads 2-4 B/elem, writes 0.5 B/elem
//   nf4_quantize_nested_kernel absmax - offset -> uint8 codes + nested_absmax (1/64 of the data; negligible)
//   nf4_dequantize_kernel      packed nibbles -> w [n, k] (bf16/fp16/fp32)    reads 0.5 B/elem, writes 2-4 B/elem
// Floors at 4.27 TB/s for a 14336x4096 weight (58.7M elements): quantize from bf16 146 MB -> 34 us;
// dequantize to bf16 146 MB -> 34 us. These run once per model load (quantize) or in tests/merge (dequantize),
// never inside the training step, so the kernels aim at the floor without heroics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/nf4.cuh"
#include "launchers.h"

namespace {

constexpr int kThreads = 256;
constexpr int kQuantElemsPerThread = 8;    // 8 elements -> 4 packed bytes: one 32-bit store per thread
constexpr int kQuantThreadsPerBlock = nf4::kBlockSize / kQuantElemsPerThread;  // 8 lanes share one absmax
constexpr int kDequantBytesPerThread = 16; // one 16-byte load = 32 elements; a block (>= 32 elems) never splits it
constexpr int kDequantElemsPerThread = 2 * kDequantBytesPerThread;
constexpr float kAbsmaxFloor = 1e-38f;     // rule 2: bnb's clamp; subnormal in fp32, kept (no FTZ: PTX .rn ops)

// The NF4 codebook as the reference builds it: Python float (double) literals rounded once to fp32.
constexpr double kNF4CodeF64[16] = {
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0};


template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------------------------------------
// Quantize family: one Params for both kernels.
// ------------------------------------------------------------------------------------------------------------
struct NF4QuantParams {
  const void* w;             // [numel] fp32 / fp16 / bf16, flattened row-major weight
  uint8_t* w_nf4;            // [(numel+1)/2] packed, high nibble = even element
  float* absmax;             // [nblocks] fp32 block absmax (output without double quant, scratch with it)
  uint8_t* absmax_q8;        // [nblocks] nested 8-bit codes (double quant only)
  float* nested_absmax;      // [ngroups] (double quant only)
  const float* offset;       // [1] mean(absmax) on device (double quant only)
  int64_t numel;             // n * k
  int64_t nblocks;           // ceil(numel / 64)
  int64_t ngroups;           // ceil(nblocks / 256)
  bool w_aligned16;          // w's data pointer is 16-byte aligned -> vector loads allowed
  float thresh[15];          // rule 3: fp32(NF4[i] + NF4[i+1]) * 0.5, built on the host
  float nested_code[256];    // rule 8: dynamic_map_signed(), bit-identical to the reference's table
};

// Load 8 consecutive elements as fp32; elements at or past numel read as 0 (they code to the pad nibble 7 and
// leave absmax unchanged, rule 5). The vector path needs the whole run in bounds and an aligned base.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ w, int64_t e0, int64_t numel, bool aligned,
                                      float (&x)[8]) {
  if (aligned && e0 + 8 <= numel) {
    // Read-once stream: ld.global.cs (evict-first) keeps the weight from displacing anything useful in L2.
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldcs(reinterpret_cast<const float4*>(w + e0));
      const float4 b = __ldcs(reinterpret_cast<const float4*>(w + e0 + 4));
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(w + e0));
      const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = to_f32<T>(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = (e0 + i < numel) ? to_f32<T>(w[e0 + i]) : 0.0f;
  }
}

// Rule 3: nibble = #{i : v > t[i]} by a 4-step bisection over the 15 sorted thresholds (strict '>' so a value
// on a threshold takes the lower code). t[7] sits in a register; the rest come from shared memory, where
// lanes read at most 15 distinct consecutive words -> no bank conflicts.
__device__ __forceinline__ uint32_t nf4_nibble(float v, const float* __restrict__ t_s, float t7) {
  uint32_t q = (v > t7) ? 8u : 0u;
  q += (v > t_s[q + 3]) ? 4u : 0u;
  q += (v > t_s[q + 1]) ? 2u : 0u;
  q += (v > t_s[q]) ? 1u : 0u;
  return q;
}

// Thread = 8 elements; 8 consecutive lanes = one 64-block (the CTA size is a multiple of 8 and the first chunk
// of every CTA is block-aligned, so lane groups never straddle blocks).
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_quantize_kernel(const __grid_constant__ NF4QuantParams p) {
  __shared__ float t_s[16];
  if (threadIdx.x < 15) t_s[threadIdx.x] = p.thresh[threadIdx.x];
  __syncthreads();
  const float t7 = p.thresh[7];

  const int64_t chunk = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t e0 = chunk * kQuantElemsPerThread;
  float x[8];
  load8<T>(static_cast<const T*>(p.w), e0, p.numel, p.w_aligned16, x);

  // Rule 1: absmax = max |x| over the block: 8 lanes reduce with xor-shuffles (all lanes take part, even
  // those past numel, so the shuffles are never partial).
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(x[i]));
#pragma unroll
  for (int d = 1; d < kQuantThreadsPerBlock; d <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));

  if (e0 >= p.numel) return;  // no element of this thread exists (no further shuffles below)
  const int64_t block = e0 / nf4::kBlockSize;
  const float denom = fmaxf(amax, kAbsmaxFloor);
  const bool partial = (block + 1) * nf4::kBlockSize > p.numel;
  // Rule 4: a full block stores its absmax as is; the partial last block stores the clamped divisor (bnb CPU).
  if ((threadIdx.x & (kQuantThreadsPerBlock - 1)) == 0) p.absmax[block] = partial ? denom : amax;

  // Rule 2: full blocks multiply by the correctly rounded reciprocal; the partial last block divides.
  const float recip = nf4_rcp_rn(denom);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float v = partial ? nf4_div_rn(x[i], denom) : nf4_mul_rn(x[i], recip);
    word |= nf4_nibble(v, t_s, t7) << ((i & 1) ? 8 * (i >> 1) : 8 * (i >> 1) + 4);  // rule 5: even -> high
  }

  // 4 packed bytes at byte e0/2 (4-aligned: w_nf4 is a fresh allocation); the last bytes are bounds-checked.
  const int64_t byte0 = e0 / 2;
  const int64_t nbytes = (p.numel + 1) / 2;
  if (byte0 + 4 <= nbytes) {
    *reinterpret_cast<uint32_t*>(p.w_nf4 + byte0) = word;
  } else {
    for (int i = 0; i < 4 && byte0 + i < nbytes; ++i) p.w_nf4[byte0 + i] = uint8_t(word >> (8 * i));
  }
}

// Rule 8: bnb CUDA dQuantize<0> over the sorted 256-entry signed dynamic map: 7-step bisection from pivot 127,
// then one nearest-neighbour correction against the fp32 midpoints (ties keep the pivot; NaN -> code 0).
// The search path always visits p-1 and p+1 (odd pivots bracket the even leaf p), so bnb's upper/lower pivots
// are p+1 / p-1 — except at p = 0, where bnb's lower_pivot stays 0: v below map[0] (= -0.99297, reached when a
// group's largest |absmax - offset| is negative, v ~ -1) keeps code 0, never p - 1 = -1.
__device__ __forceinline__ uint32_t dynamic_code(float v, const float* __restrict__ map_s) {
  int p = 127;
#pragma unroll
  for (int step = 64; step > 0; step >>= 1) p = (v > map_s[p]) ? p + step : p - step;
  const float at = map_s[p];
  if (v > at) {
    const float mid_up = nf4_mul_rn(nf4_add_rn(map_s[p + 1], at), 0.5f);  // p <= 254
    return uint32_t((v > mid_up) ? p + 1 : p);
  }
  const float mid_down = nf4_mul_rn(nf4_add_rn(map_s[p > 0 ? p - 1 : 0], at), 0.5f);
  return uint32_t((p > 0 && v < mid_down) ? p - 1 : p);
}

// Rules 6-7: one CTA per 256-block group, one absmax per thread. a = fp32(absmax - offset); the group's
// max |a| is reduced in-CTA; v = a * rcp(max|a|) in every group, partial last group included. No floor here
// (as in bnb's nested pass): an all-equal group gives 0 * inf = NaN, which rule 8 codes as 0.
__global__ void __launch_bounds__(nf4::kNestedBlockSize)
    nf4_quantize_nested_kernel(const __grid_constant__ NF4QuantParams p) {
  static_assert(nf4::kNestedBlockSize == 256, "one thread per absmax of a nested group");
  __shared__ float map_s[256];
  __shared__ float warp_max[nf4::kNestedBlockSize / 32];
  map_s[threadIdx.x] = p.nested_code[threadIdx.x];

  const int64_t group = blockIdx.x;
  const int64_t b = group * nf4::kNestedBlockSize + threadIdx.x;
  const bool valid = b < p.nblocks;
  const float a = valid ? nf4_sub_rn(p.absmax[b], __ldg(p.offset)) : 0.0f;

  float amax = fabsf(a);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();  // also publishes map_s
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < nf4::kNestedBlockSize / 32; ++w) amax = fmaxf(amax, warp_max[w]);

  if (threadIdx.x == 0) p.nested_absmax[group] = amax;
  if (valid) {
    const float v = nf4_mul_rn(a, nf4_rcp_rn(amax));
    p.absmax_q8[b] = uint8_t(dynamic_code(v, map_s));
  }
}

// ------------------------------------------------------------------------------------------------------------
// Dequantize family.
// ------------------------------------------------------------------------------------------------------------
struct NF4DequantParams {
  NF4View w;                 // storage of the [n, k] weight
  void* out;                 // [n, k] bf16 / fp16 / fp32, fresh allocation (16-byte aligned)
  int64_t numel;             // n * k
  int64_t nchunks;           // ceil(numel / 32): one 16-byte chunk of packed bytes per thread
  int block_shift;           // log2(blocksize), blocksize a power of two >= 32
  bool w_aligned16;          // w_nf4's data pointer is 16-byte aligned -> vector loads allowed
};

// Thread = 16 packed bytes = 32 elements, all inside one block (blocksize >= 32, chunks 32-element aligned), so
// the scale is computed once per thread. Decode: w = out(fp32(code[nibble] * scale)) with code[] in shared
// memory. (Building the 16 decoded values per block first, as the GEMM decoders do, is bit-identical but does
// not pay here: a block's table would be used by only 32 elements, and a per-thread table lookup in shared
// memory bank-conflicts, while all lanes reading the one 16-word codebook never do. One LDS + one FMUL + one
// cvt per element is far below the memory floor: 58.7M elements -> ~7 us of LDS issue vs 34 us of DRAM.)
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_kernel(const __grid_constant__ NF4DequantParams p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = __ldg(p.w.code + threadIdx.x);
  __syncthreads();

  const int64_t chunk = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (chunk >= p.nchunks) return;
  const int64_t e0 = chunk * kDequantElemsPerThread;
  const int64_t byte0 = chunk * kDequantBytesPerThread;
  const int64_t nbytes = (p.numel + 1) / 2;
  const float scale = nf4_block_scale(p.w, e0 >> p.block_shift);

  // Packed bytes are read once: ld.global.cs (evict-first). The tail chunk falls back to bounded byte loads.
  alignas(16) uint8_t bytes[kDequantBytesPerThread];
  if (p.w_aligned16 && byte0 + kDequantBytesPerThread <= nbytes) {
    *reinterpret_cast<uint4*>(bytes) = __ldcs(reinterpret_cast<const uint4*>(p.w.w_nf4 + byte0));
  } else {
#pragma unroll
    for (int i = 0; i < kDequantBytesPerThread; ++i)
      bytes[i] = (byte0 + i < nbytes) ? __ldg(p.w.w_nf4 + byte0 + i) : uint8_t(0x77);
  }

  alignas(16) T vals[kDequantElemsPerThread];
#pragma unroll
  for (int i = 0; i < kDequantBytesPerThread; ++i) {
    vals[2 * i] = from_f32<T>(nf4_mul_rn(code_s[bytes[i] >> 4], scale));
    vals[2 * i + 1] = from_f32<T>(nf4_mul_rn(code_s[bytes[i] & 0xF], scale));
  }

  // 32 elements = 64 B (bf16/fp16) or 128 B (fp32) of contiguous output per thread, 16-byte stores.
  T* out = static_cast<T*>(p.out) + e0;
  if (e0 + kDequantElemsPerThread <= p.numel) {
    constexpr int kVecs = kDequantElemsPerThread * int(sizeof(T)) / 16;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) reinterpret_cast<uint4*>(out)[v] = reinterpret_cast<const uint4*>(vals)[v];
  } else {
    for (int i = 0; i < kDequantElemsPerThread && e0 + i < p.numel; ++i) out[i] = vals[i];
  }
}

// ------------------------------------------------------------------------------------------------------------
// Launchers (the only places that launch these kernels).
// ------------------------------------------------------------------------------------------------------------
int64_t grid_for(int64_t work_items) {
  const int64_t grid = (work_items + kThreads - 1) / kThreads;
  TORCH_CHECK(grid <= int64_t(INT32_MAX), "nf4_quant: tensor too large for a 1-D grid (", work_items,
              " work items)");
  return std::max<int64_t>(grid, 1);
}

void launch_nf4_quantize(const NF4QuantParams& p, at::ScalarType wdtype, cudaStream_t stream) {
  const int64_t chunks = (p.numel + kQuantElemsPerThread - 1) / kQuantElemsPerThread;
  const dim3 grid(unsigned(grid_for(chunks)));
  switch (wdtype) {
    case at::kFloat: nf4_quantize_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kHalf: nf4_quantize_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kBFloat16: nf4_quantize_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    default: TORCH_CHECK(false, "quantize_nf4: w must be float32, float16 or bfloat16, got ", wdtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_nf4_quantize_nested(const NF4QuantParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.ngroups <= int64_t(INT32_MAX), "quantize_nf4: too many nested groups (", p.ngroups, ")");
  nf4_quantize_nested_kernel<<<dim3(unsigned(p.ngroups)), nf4::kNestedBlockSize, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_nf4_dequantize(const NF4DequantParams& p, at::ScalarType dtype, cudaStream_t stream) {
  const dim3 grid(unsigned(grid_for(p.nchunks)));
  switch (dtype) {
    case at::kFloat: nf4_dequantize_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kHalf: nf4_dequantize_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kBFloat16: nf4_dequantize_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    default: TORCH_CHECK(false, "dequantize_nf4: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rule 8's table, built with the same ATen CPU ops as reference.dynamic_map_signed() (linspace, add, div,
// scalar mul in fp32, then a sort of the exact values), so it is bit-identical to the reference's nested_code.
const std::array<float, 256>& dynamic_map_signed() {
  static const std::array<float, 256> table = [] {
    std::vector<float> values = {0.0f, 1.0f};
    for (int i = 0; i < 7; ++i) {
      const at::Tensor edges = at::linspace(0.1, 1.0, (int64_t(1) << i) + 1, at::dtype(at::kFloat));
      const at::Tensor means = at::div(at::add(edges.slice(0, 0, -1), edges.slice(0, 1)), 2.0);
      // Python: (10 ** (i - 6)) * means — a float scalar for i < 6 (pow(10, i-6)), the int 1 for i = 6.
      const at::Tensor decade = i < 6 ? at::mul(means, std::pow(10.0, double(i - 6))) : means;
      const at::Tensor d = decade.contiguous();
      const float* ptr = d.data_ptr<float>();
      for (int64_t j = 0; j < d.numel(); ++j) values.push_back(ptr[j]);
      for (int64_t j = 0; j < d.numel(); ++j) values.push_back(-ptr[j]);
    }
    TORCH_CHECK(values.size() == 256, "dynamic_map_signed: expected 256 values, got ", values.size());
    std::sort(values.begin(), values.end());
    std::array<float, 256> out{};
    std::copy(values.begin(), values.end(), out.begin());
    return out;
  }();
  return table;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// Host wrappers (launchers.h).
// ------------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& w,
                                                                             int64_t blocksize,
                                                                             bool double_quant) {
  static constexpr const char* kOp = "quantize_nf4";
  TORCH_CHECK(w.is_cuda(), kOp, ": w must be a CUDA tensor, got device ", w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              kOp, ": w must be float32, float16 or bfloat16, got ", w.scalar_type());
  qlora_checks::check_contiguous(kOp, "w", w);
  TORCH_CHECK(w.numel() > 0, kOp, ": w must be non-empty, got shape ", qlora_checks::shape_str(w.sizes()));
  qlora_checks::check_fast_blocksize(kOp, blocksize);

  const int64_t numel = w.numel();
  const int64_t nblocks = qlora_checks::ceil_div(numel, nf4::kBlockSize);
  const int64_t ngroups = qlora_checks::ceil_div(nblocks, nf4::kNestedBlockSize);
  const auto opts = w.options();
  at::Tensor w_nf4 = at::empty({(numel + 1) / 2}, opts.dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, opts.dtype(at::kFloat));

  NF4QuantParams p{};
  p.w = w.data_ptr();
  p.w_nf4 = w_nf4.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr<float>();
  p.numel = numel;
  p.nblocks = nblocks;
  p.ngroups = ngroups;
  p.w_aligned16 = aligned16(p.w);
  for (int i = 0; i < 15; ++i) {
    // Host fp32 arithmetic (SSE, round-to-nearest) = torch's (code[:-1] + code[1:]) / 2 on fp32 tensors.
    volatile float sum = float(kNF4CodeF64[i]) + float(kNF4CodeF64[i + 1]);
    p.thresh[i] = sum * 0.5f;
  }
  const auto& map = dynamic_map_signed();
  std::copy(map.begin(), map.end(), p.nested_code);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_nf4_quantize(p, w.scalar_type(), stream);
  if (!double_quant) {
    return {w_nf4, absmax, at::empty({0}, opts.dtype(at::kFloat)), at::empty({0}, opts.dtype(at::kFloat))};
  }

  // Rule 6: the offset is torch's own mean of the fp32 absmax, so it equals what the reference computes from
  // the same absmax on the same device (the reduction order is torch's, not ours).
  at::Tensor offset = at::mean(absmax);
  at::Tensor absmax_q8 = at::empty({nblocks}, opts.dtype(at::kByte));
  at::Tensor nested_absmax = at::empty({ngroups}, opts.dtype(at::kFloat));
  p.absmax_q8 = absmax_q8.data_ptr<uint8_t>();
  p.nested_absmax = nested_absmax.data_ptr<float>();
  p.offset = offset.data_ptr<float>();
  launch_nf4_quantize_nested(p, stream);
  return {w_nf4, absmax_q8, nested_absmax, offset};
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& w_nf4, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, int64_t n, int64_t k, int64_t blocksize,
                               at::ScalarType dtype) {
  static constexpr const char* kOp = "dequantize_nf4";
  TORCH_CHECK(w_nf4.is_cuda(), kOp, ": w_nf4 must be a CUDA tensor, got device ", w_nf4.device());
  const c10::cuda::CUDAGuard guard(w_nf4.device());
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, kOp,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(n >= 1 && k >= 1 && n <= INT64_MAX / k, kOp, ": [n, k] must be positive, got [", n, ", ", k, "]");
  qlora_checks::check_nf4_weight(kOp, w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize,
                                 w_nf4.device());

  at::Tensor out = at::empty({n, k}, w_nf4.options().dtype(dtype));
  NF4DequantParams p{};
  p.w = make_nf4_view(w_nf4, absmax, code, nested_absmax, nested_code, offset);
  p.out = out.data_ptr();
  p.numel = n * k;
  p.nchunks = qlora_checks::ceil_div(p.numel, kDequantElemsPerThread);
  p.block_shift = 0;
  while ((int64_t(1) << p.block_shift) < blocksize) ++p.block_shift;
  p.w_aligned16 = aligned16(p.w.w_nf4);
  launch_nf4_dequantize(p, dtype, c10::cuda::getCurrentCUDAStream());
  return out;
}
