// NF4 quantize / dequantize (bitsandbytes-compatible storage: csrc/README.md, "NF4 storage").
// Twins: qlora_ext.reference.quantize_nf4 / dequantize_nf4 — bit-exact; the rule (normalisation, thresholds,
// tie-breaking, zero blocks, nested map search) is the module docstring of reference.py, mirrored step by step
// below ("rule 1".."rule 8" refer to it).
//
// Kernels (all memory-bound; one launcher each):
//   nf4_quantize_kernel        w -> packed nibbles + fp32 absmax             reads 2-4 B/elem, writes 0.5 B/elem
//   nf4_quantize_nested_kernel absmax - offset -> uint8 codes + nested_absmax (1/64 of the data; negligible)
//   nf4_dequantize_kernel      packed nibbles -> w [n, k] (bf16/fp16/fp32)    reads 0.5 B/elem, writes 2-4 B/elem
// Floors at 4.27 TB/s for a 14336x4096 weight (58.7M elements): quantize from bf16 146 MB -> 34 us;
// dequantize to bf16 29.4 MB + 117 MB = 146 MB -> 34 us. Quantize runs once per model load; dequantize also runs
// inside the training step on the decode + cuBLAS path (slab by slab), so it is built to stream at the floor.
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

#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/nf4.cuh"
#include "common/nf4_tensors.h"

namespace qlora_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kQuantElemsPerThread = 8;    // 8 elements -> 4 packed bytes: one 32-bit store per thread
constexpr int kQuantThreadsPerBlock = kNF4BlockSize / kQuantElemsPerThread;  // 8 lanes share one absmax
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
  const int64_t block = e0 / kNF4BlockSize;
  const float denom = fmaxf(amax, kAbsmaxFloor);
  const bool partial = (block + 1) * kNF4BlockSize > p.numel;
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
__global__ void __launch_bounds__(kNF4NestedBlockSize)
    nf4_quantize_nested_kernel(const __grid_constant__ NF4QuantParams p) {
  static_assert(kNF4NestedBlockSize == 256, "one thread per absmax of a nested group");
  __shared__ float map_s[256];
  __shared__ float warp_max[kNF4NestedBlockSize / 32];
  map_s[threadIdx.x] = p.nested_code[threadIdx.x];

  const int64_t group = blockIdx.x;
  const int64_t b = group * kNF4NestedBlockSize + threadIdx.x;
  const bool valid = b < p.nblocks;
  const float a = valid ? nf4_sub_rn(p.absmax[b], __ldg(p.offset)) : 0.0f;

  float amax = fabsf(a);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();  // also publishes map_s
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kNF4NestedBlockSize / 32; ++w) amax = fmaxf(amax, warp_max[w]);

  if (threadIdx.x == 0) p.nested_absmax[group] = amax;
  if (valid) {
    const float v = nf4_mul_rn(a, nf4_rcp_rn(amax));
    p.absmax_q8[b] = uint8_t(dynamic_code(v, map_s));
  }
}

// ------------------------------------------------------------------------------------------------------------
// Dequantize: packed nibbles -> out [n, k] (bf16 / fp16 / fp32) with row pitch ld >= k.
// ------------------------------------------------------------------------------------------------------------
// A lane owns one piece at a time: 4 packed bytes = 8 consecutive elements = one 16-byte store of bf16/fp16
// (two of fp32). Consecutive lanes own consecutive pieces, so each warp load reads 128 contiguous packed bytes
// and each warp store writes 512 contiguous bytes of bf16: whole 32-byte sectors, no strided partial writes. A
// warp chunk is kDqRounds = 8 such rounds = 256 pieces = 2048 elements = 32 NF4 blocks: lane l computes the
// scale of block l of its chunk once (absmax / nested loads, bnb's rounding order) and the 8 lanes of a block
// take it with one shuffle per round. A lane issues all 8 of its packed loads (read once: ld.global.cs,
// evict-first) before the first decode. Output stores stay ordinary write-back: the decode + cuBLAS path wants
// a just-decoded slab to still be in L2 when the GEMM reads it.
// Decode: w = T(fp32(code[nibble] * scale)) with nf4_mul_rn (no FMA contraction) and round-to-nearest-even
// conversion, exactly reference.dequantize_nf4. Per element: one shift/mask, one LDS of the 16-word codebook
// (all lanes read one 64-byte table: broadcasts, no bank conflicts), one FMUL, half a pack: 58.7M elements ->
// ~7 us of LDS issue on an H200, under the DRAM time.
// Floor, 4096x14336 -> bf16: 29.4 MB packed + 117.4 MB out = 146.8 MB at 4.27 TB/s = 34.4 us. Prediction:
// ~38 us (~90 % of the floor, what a large streaming copy reaches); target <= 45 us. Not yet measured on a GPU.
constexpr int kDqRounds = 8;                       // pieces per lane per warp chunk
constexpr int kDqPiecesPerWarp = 32 * kDqRounds;   // 256 pieces = 2048 elements
static_assert(kDqPiecesPerWarp * 8 == 32 * kNF4BlockSize, "one block scale per lane of a warp chunk");

struct NF4DequantParams {
  NF4View w;                 // storage of the [n, k] weight
  void* out;                 // element (row, col) at out + row * ld + col; bf16 / fp16 / fp32
  int64_t numel;             // n * k
  int64_t nblocks;           // ceil(numel / 64)
  int64_t ld;                // row pitch of out in elements (ld == k: the flat index is the offset)
  uint32_t pieces_per_row;   // k / 8 (strided only: k % 8 == 0, so a piece never straddles rows)
  bool strided;              // ld != k
  bool out_vec;              // 16-byte stores: out 16-byte aligned (and ld * elem % 16 == 0 when strided)
  bool w_vec;                // w_nf4 4-byte aligned: one 32-bit load per piece
};

// Decode one piece (packed word `word`, byte j = elements 2j (high nibble) and 2j+1 (low nibble)) and store
// its `count` (<= 8) valid elements at dst; vec: all 8 valid and dst 16-byte aligned.
template <typename T>
__device__ __forceinline__ void dequant_piece(T* dst, uint32_t word, float scale, const float* code_s, bool vec,
                                              int count) {
  alignas(16) T vals[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    vals[2 * j] = from_f32<T>(nf4_mul_rn(code_s[(word >> (8 * j + 4)) & 0xFu], scale));
    vals[2 * j + 1] = from_f32<T>(nf4_mul_rn(code_s[(word >> (8 * j)) & 0xFu], scale));
  }
  if (vec) {
#pragma unroll
    for (int v = 0; v < int(8 * sizeof(T) / 16); ++v)
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(vals)[v];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)  // unrolled with a predicate: a runtime bound would put vals[] in local memory
      if (i < count) dst[i] = vals[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_kernel(const __grid_constant__ NF4DequantParams p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = __ldg(p.w.code + threadIdx.x);

  // No early exit anywhere before the last shuffle: all 32 lanes of a warp take part in every round.
  const int lane = threadIdx.x & 31;
  const int64_t piece0 = ((int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5) * kDqPiecesPerWarp;
  const int64_t nbytes = (p.numel + 1) / 2;

  uint32_t words[kDqRounds];
#pragma unroll
  for (int i = 0; i < kDqRounds; ++i) {
    const int64_t b = 4 * (piece0 + 32 * i + lane);  // packed bytes [b, b + 4)
    if (p.w_vec && b + 4 <= nbytes) {
      words[i] = __ldcs(reinterpret_cast<const unsigned int*>(p.w.w_nf4 + b));
    } else {  // misaligned storage or the ragged end
      uint32_t v = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) v |= b + j < nbytes ? uint32_t(__ldg(p.w.w_nf4 + b + j)) << (8 * j) : 0u;
      words[i] = v;
    }
  }
  const int64_t block = piece0 / 8 + lane;  // = block `lane` of this warp chunk
  const float my_scale = block < p.nblocks ? nf4_block_scale(p.w, block) : 0.f;
  __syncthreads();  // code_s

  // Strided out: row and 8-column group of the lane's first piece, then stepped by 32 pieces per round
  // (one division per lane per chunk; npieces < 2^31 checked on the host).
  uint32_t row = 0, col8 = 0;
  if (p.strided) {
    const uint32_t q = static_cast<uint32_t>(piece0 + lane);
    row = q / p.pieces_per_row;
    col8 = q - row * p.pieces_per_row;
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kDqRounds; ++i) {
    const float scale = __shfl_sync(0xffffffffu, my_scale, 4 * i + (lane >> 3));  // block (32 i + lane) / 8
    const int64_t e0 = 8 * (piece0 + 32 * i + lane);
    if (p.strided) {
      if (i > 0) {
        col8 += 32;
        while (col8 >= p.pieces_per_row) {
          col8 -= p.pieces_per_row;
          ++row;
        }
      }
      if (e0 < p.numel)  // numel % 8 == 0 here: every piece is whole
        dequant_piece<T>(out + int64_t(row) * p.ld + 8 * int64_t(col8), words[i], scale, code_s, p.out_vec, 8);
    } else if (e0 < p.numel) {
      const int count = p.numel - e0 < 8 ? int(p.numel - e0) : 8;
      dequant_piece<T>(out + e0, words[i], scale, code_s, p.out_vec && count == 8, count);
    }
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
  dispatch_float(wdtype, "quantize_nf4: w", [&](auto tag) {
    nf4_quantize_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_nf4_quantize_nested(const NF4QuantParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.ngroups <= int64_t(INT32_MAX), "quantize_nf4: too many nested groups (", p.ngroups, ")");
  nf4_quantize_nested_kernel<<<dim3(unsigned(p.ngroups)), kNF4NestedBlockSize, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_nf4_dequantize(const NF4DequantParams& p, at::ScalarType dtype, cudaStream_t stream) {
  const int64_t warps = ceil_div(ceil_div(p.numel, 8), kDqPiecesPerWarp);
  const dim3 grid(unsigned(grid_for(warps * 32)));
  dispatch_float(dtype, "dequantize_nf4: out", [&](auto tag) {
    nf4_dequantize_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(p);
  });
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

// ------------------------------------------------------------------------------------------------------------
// Op wrappers (schemas: csrc/ops.cpp).
// ------------------------------------------------------------------------------------------------------------
// Op qlora_ext::_quantize_nf4: w (float32/16, bfloat16, any shape, flattened row-major, contiguous, CUDA)
// -> (w_nf4 uint8 [(numel+1)/2], absmax uint8 [nblocks] | fp32 [nblocks], nested_absmax fp32 [ceil(nblocks/256)]
//     | empty [0], offset fp32 0-d | empty [0]), blocksize 64. Finite input is the caller's job (checking it
//     here would need a host sync). Twin: reference.quantize_nf4.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& w, bool double_quant) {
  constexpr const char* kOp = "quantize_nf4";
  TORCH_CHECK(w.is_cuda(), kOp, ": w must be a CUDA tensor, got device ", w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              kOp, ": w must be float32, float16 or bfloat16, got ", w.scalar_type());
  check_contiguous(kOp, "w", w);
  TORCH_CHECK(w.numel() > 0, kOp, ": w must be non-empty, got shape ", shape_str(w.sizes()));

  const int64_t numel = w.numel();
  const int64_t nblocks = ceil_div(numel, kNF4BlockSize);
  const int64_t ngroups = ceil_div(nblocks, kNF4NestedBlockSize);
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

// Op qlora_ext::_dequantize_nf4_out: decode the [n, k] = out.shape weight in bundle w into out, bit-exact with
// bnb's dequantize_4bit (twin: reference.dequantize_nf4). out: CUDA, bf16 / fp16 / fp32, 2-D, stride(1) == 1,
// row pitch ld = stride(0) >= k. ld == k (or n == 1): any k and any data pointer. ld != k (e.g. the first k
// columns of a wider workspace): k % 8 == 0, ld * elem_size % 16 == 0 and a 16-byte-aligned data pointer;
// columns k..ld-1 are not touched.
void dequantize_nf4_out(const OptionalTensorList& w, const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_nf4";
  TORCH_CHECK(out.is_cuda(), kOp, ": out must be a CUDA tensor, got device ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const at::ScalarType dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": out must be float32, float16 or bfloat16, got ", dtype);
  check_2d(kOp, "out", out, "[n, k]");
  const int64_t n = out.size(0), k = out.size(1);
  TORCH_CHECK(n >= 1 && k >= 1 && n <= INT64_MAX / k, kOp, ": out must have a positive shape [n, k], got ",
              shape_str(out.sizes()));
  TORCH_CHECK(out.stride(1) == 1 || k == 1, kOp, ": out must have unit column stride, got strides ",
              shape_str(out.strides()), " for shape ", shape_str(out.sizes()));
  const int64_t ld = n == 1 ? k : out.stride(0);
  TORCH_CHECK(ld >= k, kOp, ": out's row stride must be >= k = ", k, ", got strides ", shape_str(out.strides()));
  const NF4Tensors wt = NF4Tensors::from_list(kOp, w, n, k, out.device());
  const bool strided = ld != k;
  const int64_t elem = static_cast<int64_t>(out.element_size());
  if (strided) {
    TORCH_CHECK(k % 8 == 0, kOp, ": a strided out (row stride ", ld, " != k) needs k % 8 == 0, got k = ", k);
    TORCH_CHECK(ld * elem % 16 == 0, kOp, ": a strided out needs its row stride to be a multiple of 16 bytes, "
                "got ", ld, " elements of ", elem, " bytes");
    check_aligned(kOp, "out", out, 16);
    TORCH_CHECK(n * k / 8 < (int64_t(1) << 31), kOp, ": a strided out of ", n * k, " elements is too large "
                "(at most 2^34)");
  }

  NF4DequantParams p{};
  p.w = wt.view();
  p.out = out.data_ptr();
  p.numel = n * k;
  p.nblocks = ceil_div(p.numel, kNF4BlockSize);
  p.ld = ld;
  p.pieces_per_row = static_cast<uint32_t>(strided ? k / 8 : 0);
  p.strided = strided;
  p.out_vec = aligned16(p.out);
  p.w_vec = reinterpret_cast<uintptr_t>(p.w.w_nf4) % 4 == 0;
  launch_nf4_dequantize(p, dtype, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("_quantize_nf4", &qlora_ext::quantize_nf4);
  m.impl("_dequantize_nf4_out", &qlora_ext::dequantize_nf4_out);
}
