// LoRA weight gradients in ONE launch:
//   dA [r, k] = gᵀ · dropout(x)        g [m, r] from the dx kernel, x [m, k]
//   dB [n, r] = s · dyᵀ · u            dy [m, n], u [m, r] saved by the forward
// Twin: the dA / dB outputs of qlora_ext.reference.qlora_linear_backward.
//
// Both are the same skinny product  out[c, j] = Σ_i S[i, c] · Big[i, j]  with a reduction over the m tokens:
// (S, Big) = (g, dropout(x)) for dA, (u, dy) for dB. Big is streamed from HBM exactly once; S (m·r, a few MB)
// is re-read by every column tile and lives in L2. Floor = bytes of Big:
//   (m·n + m·k)·2 B / 4.27 TB/s — m=16384, n=14336, k=4096: 604 MB -> 141 us.
// Why tensor cores (mma.sync) and not SIMT fp32: the work is 2·r FLOP per Big element (2 B), i.e. r FLOP/B.
// H200 SIMT fp32 gives ~67 TFLOP/s / 4.27 TB/s = 16 FLOP/B, so a SIMT kernel is already compute-bound at
// r = 16 and 4-8x off the floor at r = 64-128. bf16/fp16 mma.sync has >10x that headroom.
//
// Grid: CTA (tile, split). A tile is 128 columns of Big (tiles [0, tiles_dB) cover dB's n, the rest dA's k)
// times all r (padded to kR); a split is a contiguous range of m. Each CTA runs a 4-stage cp.async pipeline
// over its m range: S and Big tiles land in swizzled shared memory, ldmatrix.trans turns them into mma
// fragments (the reduction dim m is the *row* dim of both stored matrices, hence .trans for both operands).
// Splits > 1: each CTA writes its fp32 partial to a workspace, bumps the tile's arrival counter, and the last
// CTA to arrive sums all partials in split order 0..S-1 (deterministic, independent of arrival order), then
// rounds and writes the tile. One kernel launch; the host only allocates and zeroes the counters.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/dropout.cuh"
#include "common/elem.cuh"
#include "common/mma_sm80.cuh"

namespace qlora_ext {
namespace {

constexpr int kBJ = 128;        // Big columns per CTA tile (dB: rows of dB; dA: columns of dA)
constexpr int kWarpsJ = 4;      // warps side by side along j ...
constexpr int kWarpJ = kBJ / kWarpsJ;  // ... 32 columns = 4 mma n8-tiles each
constexpr int kBI = 32;         // m rows per pipeline stage (two k16 mma steps)
constexpr int kStages = 4;      // 3 stages in flight: ~24 KB of Big per CTA, 2-3 CTAs/SM, hides HBM latency
constexpr int kMinStepsPerSplit = 4;  // >= 128 rows per split so pipeline fill and the partial are amortised
constexpr int kMaxSplits = 64;
constexpr int kOutPad = 8;      // epilogue tile pitch kBJ + 8 halfs: fragment stores hit 32 distinct banks

// Per-rank configuration. Each warp owns 32 j x kRW ranks of the tile: kRW = kR up to 64 (64 fp32 accumulators
// per thread), but kR = 128 splits r over 2 warp rows (256 threads): one warp holding 128 x 32 accumulators
// needed 255 registers and spilled in the main loop. Shared-memory traffic per Big byte (S ldmatrix'd by each
// of the 4 j-warps, Big by each r-warp, plus the cp.async writes) is ~2.6x (kR 16), ~4.5x (kR 64) and ~8x
// (kR 128) against a budget of ~7.8x (128 B/clk of smem vs 16 B/clk/SM of HBM at 4.27 TB/s): r <= 64 is
// HBM-bound; r > 64 sits at the smem limit (expect it a little above the floor).
template <int kR>
struct Cfg {
  static constexpr int kWarpsC = kR == 128 ? 2 : 1;
  static constexpr int kThreads = 32 * kWarpsJ * kWarpsC;
  static constexpr int kRW = kR / kWarpsC;    // ranks per warp
  static constexpr int kMinBlocks = kR == 128 ? 2 : 1;  // 2 x 256 threads -> <= 128 registers
};

// Smem per stage: Big [kBI][kBJ] + S [kBI][kR], bf16/fp16.
template <int kR>
constexpr int stage_bytes() { return kBI * (kBJ + kR) * 2; }
template <int kR>
constexpr int smem_bytes() {
  return std::max(kStages * stage_bytes<kR>(), kR * (kBJ + kOutPad) * 2);
}

struct BwdABParams {
  const void* dy;          // [m, n]  upstream gradient (x dtype)
  const void* x;           // [m, k]  layer input
  const void* u;           // [m, r]  dropout(x)·lora_Aᵀ saved by the forward
  const void* g;           // [m, r]  s·dy·lora_B from the dx kernel
  void* dA;                // [r, k]  out
  void* dB;                // [n, r]  out
  float* workspace;        // [tiles][splits][kBJ · kR] fp32 partials, fragment order (splits > 1 only)
  int* counters;           // [tiles] arrival counters, zero on entry (splits > 1 only)
  int64_t m, n, k;
  int r;
  int tiles_dB;            // ceil(n / kBJ); tiles [tiles_dB, tiles) are dA tiles
  int tiles;               // tiles_dB + ceil(k / kBJ)
  int splits;              // m ranges per tile
  int64_t rows_per_split;  // multiple of kBI
  float scaling;           // s, applied to dB in fp32 before rounding
  DropoutParams dropout;   // enabled: dA uses dropout(x), the mask of the forward
  bool dy_vec, x_vec, u_vec, g_vec;  // 16-byte cp.async allowed (row length % 8 == 0 and base 16-B aligned)
};

// Swizzled byte offset of 16-byte chunk `ch` of row `row` in a tile whose rows hold kCPR chunks: XOR the chunk
// with bits of the row so the 8 rows one ldmatrix phase reads (same logical chunk) land in 8 distinct
// 16-byte bank groups. Rows of < 128 B pack 8/kCPR rows per 128-B line, hence the row divisor.
template <int kCPR>
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  constexpr int kDiv = kCPR >= 8 ? 1 : 8 / kCPR;
  constexpr int kMask = (kCPR >= 8 ? 8 : kCPR) - 1;
  return uint32_t(row * kCPR + (ch ^ ((row / kDiv) & kMask))) * 16u;
}

// Load one [kBI][kCols] tile of a row-major [rows, ld] matrix into swizzled smem. Rows >= i_end (next split
// or past m) and columns >= ncols are zero-filled, so they contribute exactly 0 to the products.
// Vector path: 16-byte cp.async (requires ld % 8 == 0, i.e. every chunk is all-in or all-out of bounds);
// otherwise element-wise bounded loads + st.shared (only odd shapes: n % 8 != 0 or r % 8 != 0).
template <typename T, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(uint8_t* smem, const T* __restrict__ src, int64_t ld, int64_t i0,
                                          int64_t i_end, int64_t j0, int64_t ncols, bool vec) {
  constexpr int kCPR = kCols / 8;
  constexpr int kChunks = kBI * kCPR;
  const uint32_t base = smem_addr(smem);
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int row = c / kCPR, ch = c % kCPR;
    const int64_t i = i0 + row, j = j0 + ch * 8;
    const bool row_ok = i < i_end;
    if (vec) {
      const bool ok = row_ok && j < ncols;
      cp_async_16(base + swz<kCPR>(row, ch), ok ? src + i * ld + j : src, ok);
    } else {
      // Raw 16-bit copies (no half/bf16 conversions needed; bits 0 = +0.0 in both formats).
      const uint16_t* src16 = reinterpret_cast<const uint16_t*>(src);
      alignas(16) uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (row_ok && j + e < ncols) ? src16[i * ld + j + e] : uint16_t(0);
      *reinterpret_cast<uint4*>(smem + swz<kCPR>(row, ch)) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

// Dropout on a B-fragment register of x: it packs x[i][j] (low) and x[i+1][j] (high) — two *rows*, because m is
// the mma k dimension here — so their counters are idx and idx + k. keep ? out(fp32(x) * fp32(1/(1-p))) : 0,
// the rounding of reference.dropout, then the product runs on the rounded value.
template <typename T>
__device__ __forceinline__ uint32_t dropout_rows(uint32_t v, uint64_t idx, uint64_t k, const BwdABParams& p) {
  const float2 f = Elem<T>::unpack2(v);
  const float lo = p.dropout.keep(idx) ? __fmul_rn(f.x, p.dropout.inv_keep) : 0.0f;
  const float hi = p.dropout.keep(idx + k) ? __fmul_rn(f.y, p.dropout.inv_keep) : 0.0f;
  return Elem<T>::pack2(lo, hi);
}

template <typename T, int kR>
__global__ void __launch_bounds__(Cfg<kR>::kThreads, Cfg<kR>::kMinBlocks)
    qlora_bwd_ab_kernel(const __grid_constant__ BwdABParams p) {
  static_assert(kR % 16 == 0 && kR <= 128, "kR: rank padded to a multiple of 16, at most 128");
  constexpr int kThreads = Cfg<kR>::kThreads;
  constexpr int kRW = Cfg<kR>::kRW;
  constexpr int kMT = kRW / 16;     // mma m16-tiles along r per warp
  constexpr int kPartial4 = kBJ * kR / 4;  // float4s of one CTA's partial
  constexpr int kNT = kWarpJ / 8;   // mma n8-tiles along j per warp
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int is_last_s;

  const int tile = int(blockIdx.x % unsigned(p.tiles));
  const int split = int(blockIdx.x / unsigned(p.tiles));
  const bool is_dB = tile < p.tiles_dB;
  const int64_t j0 = int64_t(is_dB ? tile : tile - p.tiles_dB) * kBJ;
  const T* big = static_cast<const T*>(is_dB ? p.dy : p.x);
  const T* s_op = static_cast<const T*>(is_dB ? p.u : p.g);
  const int64_t ncols = is_dB ? p.n : p.k;  // Big's row length = its leading dimension
  const bool big_vec = is_dB ? p.dy_vec : p.x_vec;
  const bool s_vec = is_dB ? p.u_vec : p.g_vec;
  const bool drop = !is_dB && p.dropout.enabled;

  const int64_t i_begin = int64_t(split) * p.rows_per_split;
  const int64_t i_end = std::min(p.m, i_begin + p.rows_per_split);
  const int nsteps = int((i_end - i_begin + kBI - 1) / kBI);  // >= 1: the host never makes an empty split

  const int lane = threadIdx.x & 31;
  const int warp_j = (threadIdx.x >> 5) % kWarpsJ, warp_c = (threadIdx.x >> 5) / kWarpsJ;
  const int gid = lane >> 2, tig = lane & 3;
  const int q = lane >> 3;  // which 8x8 matrix of an ldmatrix.x4 this lane addresses

  float acc[kMT][kNT][4];
#pragma unroll
  for (int a = 0; a < kMT; ++a)
#pragma unroll
    for (int b = 0; b < kNT; ++b) acc[a][b][0] = acc[a][b][1] = acc[a][b][2] = acc[a][b][3] = 0.0f;

  auto big_stage = [&](int slot) { return smem + slot * stage_bytes<kR>(); };
  auto s_stage = [&](int slot) { return smem + slot * stage_bytes<kR>() + kBI * kBJ * 2; };
  auto load_stage = [&](int slot, int step) {
    const int64_t i0 = i_begin + int64_t(step) * kBI;
    load_tile<T, kBJ, kThreads>(big_stage(slot), big, ncols, i0, i_end, j0, ncols, big_vec);
    load_tile<T, kR, kThreads>(s_stage(slot), s_op, p.r, i0, i_end, 0, p.r, s_vec);
  };

  // Prologue: stages 0..kStages-2 in flight (empty commit groups keep the wait count uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) load_stage(s, s);
    cp_async_commit();
  }

  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<kStages - 2>();  // stage `step` has landed (this thread's copies) ...
    __syncthreads();               // ... for every thread; and slot (step-1) % kStages is free again
    if (step + kStages - 1 < nsteps) load_stage((step + kStages - 1) % kStages, step + kStages - 1);
    cp_async_commit();

    const int slot = step % kStages;
    const uint32_t big_base = smem_addr(big_stage(slot));
    const uint32_t s_base = smem_addr(s_stage(slot));
#pragma unroll
    for (int kk = 0; kk < kBI / 16; ++kk) {
      // B fragments of Big (k = m rows, n = j): matrices (rows +0/+8) x (cols +0/+8) per n8-tile pair.
      uint32_t bfr[kNT / 2][4];
#pragma unroll
      for (int h = 0; h < kNT / 2; ++h) {
        const int row = kk * 16 + (lane & 7) + (q & 1) * 8;
        const int col = warp_j * kWarpJ + h * 16 + (q >> 1) * 8;
        ldsm_x4_trans(bfr[h], big_base + swz<kBJ / 8>(row, col / 8));
      }
      if (drop) {
        // Register e of pair h holds x[i][j], x[i+1][j] with i = 2·tig (+8 for odd e), j = +8 for e >= 2.
        const uint64_t i_base = uint64_t(i_begin + int64_t(step) * kBI + kk * 16 + 2 * tig);
#pragma unroll
        for (int h = 0; h < kNT / 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const uint64_t i = i_base + (e & 1) * 8;
            const uint64_t j = uint64_t(j0 + warp_j * kWarpJ + h * 16 + (e >> 1) * 8 + gid);
            bfr[h][e] = dropout_rows<T>(bfr[h][e], i * uint64_t(p.k) + j, uint64_t(p.k), p);
          }
      }
      // A fragments of Sᵀ (m16 = r rows, k = m rows): a0 (c+0, i+0) a1 (c+8, i+0) a2 (c+0, i+8) a3 (c+8, i+8).
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        uint32_t afr[4];
        const int row = kk * 16 + (lane & 7) + (q >> 1) * 8;
        const int col = warp_c * kRW + mt * 16 + (q & 1) * 8;
        ldsm_x4_trans(afr, s_base + swz<kR / 8>(row, col / 8));
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
          mma_m16n8k16<T>(acc[mt][nt], afr, bfr[nt >> 1][(nt & 1) * 2], bfr[nt >> 1][(nt & 1) * 2 + 1]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps done with the pipeline smem before the epilogue reuses it

  // Split-m reduction: partials in fragment order (float4 v at [v][tid] -> each warp stores 512 contiguous B).
  if (p.splits > 1) {
    float4* ws = reinterpret_cast<float4*>(p.workspace) + (int64_t(tile) * p.splits) * kPartial4;
    float4* mine = ws + int64_t(split) * kPartial4;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        __stcg(mine + (mt * kNT + nt) * kThreads + threadIdx.x,
               make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]));
    __threadfence();  // release: partial visible device-wide before the counter moves
    __syncthreads();
    if (threadIdx.x == 0) {
      const int prev = atomicAdd(p.counters + tile, 1);
      is_last_s = prev == p.splits - 1;
      if (is_last_s) p.counters[tile] = 0;  // leave the counter reusable
    }
    __syncthreads();
    if (!is_last_s) return;
    __threadfence();  // acquire: other CTAs' partials, read below with ld.global.cg (L2, never a stale L1)
    // This CTA's own partial is read back from the workspace too (the same fp32 bits it stored above): keeping
    // acc live across the sum made kR = 128 spill at its 128-register cap.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int s = 0; s < p.splits; ++s) {
          const float4 v = __ldcg(ws + int64_t(s) * kPartial4 + (mt * kNT + nt) * kThreads + threadIdx.x);
          sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
        }
        acc[mt][nt][0] = sum.x; acc[mt][nt][1] = sum.y; acc[mt][nt][2] = sum.z; acc[mt][nt][3] = sum.w;
      }
  }

  // Epilogue: scale (dB only), round to T once, stage as out_s[c][j] (pitch kBJ + 8), then write coalesced.
  constexpr int kPitch = kBJ + kOutPad;
  T* out_s = reinterpret_cast<T*>(smem);
  const float mul = is_dB ? p.scaling : 1.0f;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int c = warp_c * kRW + mt * 16 + gid;
      const int j = warp_j * kWarpJ + nt * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(out_s + c * kPitch + j) =
          Elem<T>::pack2(__fmul_rn(acc[mt][nt][0], mul), __fmul_rn(acc[mt][nt][1], mul));
      *reinterpret_cast<uint32_t*>(out_s + (c + 8) * kPitch + j) =
          Elem<T>::pack2(__fmul_rn(acc[mt][nt][2], mul), __fmul_rn(acc[mt][nt][3], mul));
    }
  __syncthreads();

  const int64_t jcount = std::min<int64_t>(kBJ, ncols - j0);  // valid columns of this tile (>= 1)
  if (is_dB) {
    // dB [n, r]: the tile's rows j0..j0+jcount are one contiguous span of jcount·r elements.
    T* out = static_cast<T*>(p.dB) + j0 * p.r;
    const int total = int(jcount) * p.r;
    for (int e = threadIdx.x; e < total; e += kThreads) out[e] = out_s[(e % p.r) * kPitch + e / p.r];
  } else {
    // dA [r, k]: row c, columns j0.. — 16-byte chunks (k % 64 == 0 keeps rows and chunks 16-B aligned).
    T* out = static_cast<T*>(p.dA) + j0;
    const int chunks_per_row = int(jcount) / 8;
    const int total = p.r * chunks_per_row;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int c = e / chunks_per_row, ch = e % chunks_per_row;
      *reinterpret_cast<uint4*>(out + int64_t(c) * p.k + ch * 8) =
          *reinterpret_cast<const uint4*>(out_s + c * kPitch + ch * 8);
    }
  }
}


// Split count: minimise (wave-quantisation loss) + (fp32 workspace traffic), both relative to streaming Big.
// Wave loss: ceil(tiles·s / slots) waves of (steps / s) each vs the ideal tiles·steps / slots. Workspace:
// each split writes and the last CTA reads kR·4 B per Big column -> 2·s·kR·4 / (m·2) of the Big bytes.
int choose_splits(int64_t tiles, int64_t m, int kR, int64_t slots) {
  const int64_t steps = (m + kBI - 1) / kBI;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, steps / kMinStepsPerSplit));
  int best = 1;
  double best_cost = 1e30;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = double((tiles * s + slots - 1) / slots);
    const double wave_cost = waves / double(s) / (double(tiles) / double(slots));
    const double ws_cost = s > 1 ? 4.0 * double(s) * kR / double(m) : 0.0;
    const double cost = std::max(1.0, wave_cost) + ws_cost;
    if (cost < best_cost * 0.98) {  // prefer fewer splits unless clearly better
      best_cost = cost;
      best = int(s);
    }
  }
  return best;
}

template <typename T, int kR>
void launch_bwd_ab_impl(BwdABParams& p, int num_sms, cudaStream_t stream,
                        at::Tensor& workspace, at::Tensor& counters, const at::TensorOptions& opts) {
  auto kernel = qlora_bwd_ab_kernel<T, kR>;
  constexpr int kThreads = Cfg<kR>::kThreads;
  constexpr int smem = smem_bytes<kR>();
  // Always raise the dynamic limit (once per instantiation): the kernel's static `is_last_s` counts against the
  // same 48 KB default, so kR = 64's exactly-48 KB dynamic buffer already fails to launch without the opt-in.
  static const bool smem_limit_set = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)smem_limit_set;
  int ctas_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, kThreads, smem));
  const int64_t slots = int64_t(std::max(ctas_per_sm, 1)) * num_sms;

  p.splits = choose_splits(p.tiles, p.m, kR, slots);
  const int64_t steps = (p.m + kBI - 1) / kBI;
  p.rows_per_split = ((steps + p.splits - 1) / p.splits) * kBI;
  p.splits = int((p.m + p.rows_per_split - 1) / p.rows_per_split);  // no empty split
  if (p.splits > 1) {
    workspace = at::empty({int64_t(p.tiles) * p.splits * kBJ * kR}, opts.dtype(at::kFloat));
    counters = at::zeros({int64_t(p.tiles)}, opts.dtype(at::kInt));
    p.workspace = workspace.data_ptr<float>();
    p.counters = counters.data_ptr<int>();
  }
  const int64_t grid = int64_t(p.tiles) * p.splits;
  TORCH_CHECK(grid <= int64_t(INT32_MAX), "qlora_linear_backward: grid too large (", grid, " CTAs)");
  kernel<<<dim3(unsigned(grid)), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launcher: picks kR = r rounded up to {16, 32, 64, 128} and the dtype; sets smem; launches once.
void launch_qlora_bwd_ab(BwdABParams& p, at::ScalarType dtype, const at::TensorOptions& opts,
                         at::Tensor& workspace, at::Tensor& counters, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_rank(p.r, [&](auto rank_bucket) {
      launch_bwd_ab_impl<T, decltype(rank_bucket)::value>(p, num_sms, stream, workspace, counters, opts);
    });
  });
}

// Op qlora_ext::_bwd_ab (schema: csrc/ops.cpp) -> (dA [r, k], dB [n, r]) in x's dtype.
// Device guard → checks → allocate → Params → launch.
std::tuple<at::Tensor, at::Tensor> bwd_ab(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& u,
                                          const at::Tensor& g, double scaling, double dropout_p, int64_t seed) {
  constexpr const char* kOp = "qlora_linear_backward";
  check_activation(kOp, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  check_2d(kOp, "g", g, "[m, r]");
  check_2d(kOp, "dy", dy, "[m, n]");
  const int64_t r = g.size(1), n = dy.size(1);
  check_fast_path_sizes(kOp, k, r);
  TORCH_CHECK(n >= 1, kOp, ": n (out_features) must be >= 1, got ", n);
  check_matrix(kOp, "dy", dy, x.scalar_type(), "[m, n]", m, n, x.device());
  check_matrix(kOp, "u", u, x.scalar_type(), "[m, r]", m, r, x.device());
  check_matrix(kOp, "g", g, x.scalar_type(), "[m, r]", m, r, x.device());
  check_dropout_p(kOp, dropout_p);
  TORCH_CHECK(n <= int64_t(INT32_MAX) / kBJ && k <= int64_t(INT32_MAX) / kBJ, kOp, ": n or k too large");

  const auto opts = x.options();
  if (m == 0) return {at::zeros({r, k}, opts), at::zeros({n, r}, opts)};  // empty reduction over m
  at::Tensor dA = at::empty({r, k}, opts);
  at::Tensor dB = at::empty({n, r}, opts);

  BwdABParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.u = u.data_ptr();
  p.g = g.data_ptr();
  p.dA = dA.data_ptr();
  p.dB = dB.data_ptr();
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = int(r);  // 1 <= r <= 128 checked above
  p.tiles_dB = int(ceil_div(n, kBJ));
  p.tiles = p.tiles_dB + int(ceil_div(k, kBJ));
  p.scaling = float(scaling);
  p.dropout = make_dropout(dropout_p, seed);
  p.dy_vec = n % 8 == 0 && aligned16(p.dy);
  p.x_vec = aligned16(p.x);  // k % 64 == 0
  p.u_vec = r % 8 == 0 && aligned16(p.u);
  p.g_vec = r % 8 == 0 && aligned16(p.g);

  at::Tensor workspace, counters;  // kept alive until the launch is enqueued (caching allocator is stream-ordered)
  launch_qlora_bwd_ab(p, x.scalar_type(), opts, workspace, counters, c10::cuda::getCurrentCUDAStream());
  return {dA, dB};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_bwd_ab", &qlora_ext::bwd_ab); }
