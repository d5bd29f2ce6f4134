// Fused QLoRA backward, input gradient, one launch (Ampere-style path; sm80/86/89/90):
//   g  = s·dy·lora_B                               [m, r]  (x's dtype; consumed by qlora_bwd_ab for dA)
//   dx = dy·w + (g·lora_A) ⊙ mask/(1-p)            [m, k]
// Same NF4-decoding GEMM as qlora_fwd.cu with W in its other orientation: the decoded tile is stored [n][k]
// exactly as in memory and read as the MMA B operand with ldmatrix.trans, so no transposed or dequantized
// copy of w exists anywhere. Twin (the spec): the dx output of qlora_ext.reference.qlora_linear_backward.
//
// CTA = 128 (m) x 128 (k) output tile, 8 warps (2 x 4, 64x32 each), reduction over n in steps of 64. A W tile
// is 64 rows (n) x 128 cols (k) = two NF4 blocks per row; thread tid owns row tid/4, 32-column quarter tid%4.
// Per n-step: fetch dy[128x64], lora_B rows [64 x kRPad] and the packed W tile; decode one step ahead into a
// double buffer; warp tile += dy·w; the warp's 16 dy rows · lora_B accumulate g for all r columns.
// Epilogue: g = dtype(s·acc_g) → shared (rounded first, like the reference's g in the activation dtype);
// dx = acc + mask(g·lora_A) with one more MMA pass against lora_A[:, k-tile]; the CTAs of k-tile 0 write g.
//
// n is arbitrary (odd n fine): the last n-step is zero-padded (dy columns, lora_B rows and W rows >= n). When
// n % 8 != 0 (or r % 8 != 0) the dy (lora_B) rows are not 16-byte aligned and the tile goes through registers.
// Config whitelist and ring depth: as qlora_fwd.cu (128x128x64, 8 warps, kRPad in {16, 32, 64, 128}, 2..4 stages).
// Shared memory per CTA (bytes): 4 stages 137344 / 145536 / 161920 / 194688 (kRPad 16 / 32 / 64 / 128), A100 at
// r > 64: 3 stages 154752; sm86/89: 2 stages 86144 / 90240 / 98432, r > 64 single decoded-W buffer 97408.
// 1 CTA/SM by shared memory; register counts: the build log (-Xptxas -v), 0 spills required.
// The pipeline (ring, one-step-ahead decode, barriers) is NF4Mainloop in common/nf4_gemm_sm80.cuh.
//
// Split-n (small m): one CTA per dx tile gives k/128 CTAs at m <= 128 (32 for k = 4096, a quarter of an H200),
// each walking all of n. When the tiles fill at most half the GPU, the n-steps are split S ways (grid z, S <=
// SMs / tiles, >= kMinStepsPerSplit steps each): every CTA writes its fp32 dx and g accumulators to a workspace
// (fragment order, one slice per split) and arrives on its tile's counter; the last of the S arrivals sums the
// slices in split order (deterministic) and runs the epilogue. Nothing waits for another CTA.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/dropout.cuh"
#include "common/nf4_gemm_sm80.cuh"
#include "common/nf4_tensors.h"
#include "path_ops.h"

namespace qlora_ext {
namespace {

struct QloraBwdDxParams : NF4GemmParamsBase {
  const uint16_t* dy;      // [m, n] row-major
  uint16_t* dx;            // [m, k] out
  uint16_t* g;             // [m, r] out: s·dy·lora_B
  bool dy_async;           // n % 8 == 0 and dy 16-byte aligned: dy rows can be cp.async'd
  int splits;              // S: CTAs per dx tile along n (grid z); 1: no workspace
  int steps_per_split;     // n-steps of kTileK per split (the last split may have fewer)
  float* ws;               // [tiles][S][floats per thread][kThreads] fp32 partial accumulators (S > 1)
  int* tile_count;         // [tiles] arrivals per dx tile, zero on entry and left zero (S > 1)
};

constexpr int kMinStepsPerSplit = 4;  // fewer n-steps than this per CTA and the ring never fills

// Ring slot = [dy 128 x 64 | lora_B rows 64 x kRPad | packed W]; W tile = 64 rows (n) x 128 cols (k), stored
// [n][k] and read with ldmatrix.trans. The epilogue reuses the space after the code table for g [128][kRPad]
// and lora_A [kRPad][128].
template <int kRPad>
struct DxTraits : NF4GemmTraits<kRPad, BLayout::kKN, kTileK, kBlockN,
                                kBlockM * (kTileK + kPad) * 2 + kTileK * (kRPad + kPad) * 2> {
  static constexpr int kStride = kTileK + kPad;                 // 72: dy tile row pitch
  static constexpr int kDyBytes = kBlockM * kStride * 2;        // lora_B rows follow dy in the slot
  static constexpr int kEpilogueBytes = 128 + kBlockM * (kRPad + kPad) * 2 + kRPad * (kBlockN + kPad) * 2;
};

// Split-n: publish this CTA's accumulators as split blockIdx.z of its tile and arrive. The last arrival gets true
// with acc and acc_g replaced by the sum of all S slices in split order; the others get false (and are done).
// Workspace layout [tile][split][register][thread]: a warp's stores and loads of one register are contiguous.
// `flag`: an int of shared memory that nothing else uses until the epilogue's first barrier.
template <int kRPad>
__device__ __forceinline__ bool reduce_splits(const QloraBwdDxParams& p, Acc& acc, float (&acc_g)[kRPad / 8][4],
                                              int* flag, int tid) {
  constexpr int kAccFloats = kMmaM * kMmaN * 4, kFloats = kAccFloats + kRPad / 2;
  cp_async_wait<0>();  // nothing of the ring may land in shared memory after this (flag lives there)
  const int64_t tile = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  float* slices = p.ws + tile * p.splits * kFloats * kThreads;
  float* mine = slices + int64_t(blockIdx.z) * kFloats * kThreads + tid;
#pragma unroll
  for (int i = 0; i < kAccFloats; ++i) mine[i * kThreads] = (&acc[0][0][0])[i];
#pragma unroll
  for (int i = 0; i < kRPad / 2; ++i) mine[(kAccFloats + i) * kThreads] = (&acc_g[0][0])[i];
  __threadfence();
  __syncthreads();
  if (tid == 0) *flag = atomicAdd(p.tile_count + tile, 1) == p.splits - 1;
  __syncthreads();
  if (!*flag) return false;
  __threadfence();
  zero_accumulators(acc, acc_g);
  for (int s = 0; s < p.splits; ++s) {
    const float* slice = slices + int64_t(s) * kFloats * kThreads + tid;
#pragma unroll
    for (int i = 0; i < kAccFloats; ++i) (&acc[0][0][0])[i] += slice[i * kThreads];
#pragma unroll
    for (int i = 0; i < kRPad / 2; ++i) (&acc_g[0][0])[i] += slice[(kAccFloats + i) * kThreads];
  }
  if (tid == 0) p.tile_count[tile] = 0;  // the last user: reset for the next launch on the stream
  return true;
}

template <typename T,   // __nv_bfloat16 or __half: dy, lora_A, lora_B, dx, g
          int kRPad>    // r rounded up to the rank bucket
__global__ void __launch_bounds__(kThreads, 1) qlora_bwd_dx_kernel(const __grid_constant__ QloraBwdDxParams p) {
  using L = DxTraits<kRPad>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t k0 = int64_t(blockIdx.x) * kBlockN;  // first dx column of this CTA
  const int num_n_steps = static_cast<int>((p.n + kTileK - 1) / kTileK);
  const int step0 = static_cast<int>(blockIdx.z) * p.steps_per_split;  // this split's first n-step
  const NF4Mainloop<L> mainloop(smem, p.stages, p.wdec_buffers, min(p.steps_per_split, num_n_steps - step0), p.k,
                                tid);

  Acc acc;
  float acc_g[kRPad / 8][4];
  zero_accumulators(acc, acc_g);

  const int a_off = ldsm_a_offset(wm * kWarpM, lane, L::kStride);             // dy rows of the warp
  const int ag_off = ldsm_a_offset(wm * kWarpM + wn * 16, lane, L::kStride);  // the warp's 16 g rows
  const int w_off = ldsm_b_kn_offset(wn * kWarpN, lane, L::kWStride);         // decoded W [n][k], .trans
  const int lb_off = ldsm_b_kn_offset(0, lane, L::kRStride);                  // lora_B rows [n][r], .trans

  mainloop.template run<T>(
      p.w, p.n, tid,
      // Dense tiles of n-step kt: dy[128 x 64] and lora_B rows [64 x kRPad]. Everything past n (and rows >= m)
      // arrives as zeros, so the padded tail of the reduction contributes exactly 0.
      [&](uint8_t* stage, int kt) {
        const int64_t nn0 = int64_t(step0 + kt) * kTileK;
        uint16_t* dy_s = reinterpret_cast<uint16_t*>(stage);
        uint16_t* b_s = dy_s + L::kDyBytes / 2;
        const uint16_t* dy_origin = p.dy + m0 * p.n + nn0;
        if (p.dy_async) load_tile_async<kBlockM, kTileK>(dy_s, dy_origin, p.n, p.m - m0, p.n - nn0, tid);
        else load_tile_sync<kBlockM, kTileK>(dy_s, dy_origin, p.n, p.m - m0, p.n - nn0, tid);
        const uint16_t* b_origin = p.lora_B + nn0 * p.r;
        if (p.lora_B_async) load_tile_async<kTileK, kRPad>(b_s, b_origin, p.r, p.n - nn0, p.r, tid);
        else load_tile_sync<kTileK, kRPad>(b_s, b_origin, p.r, p.n - nn0, p.r, tid);
      },
      // W tile of n-step kt: rows [64 kt, 64 kt + 64) x cols [k0, k0 + 128); thread tid owns row tid/4,
      // 32-column quarter tid%4.
      [&](int kt) { return WTileOrigin{int64_t(step0 + kt) * kTileK, k0}; },
      // warp tile 64x32 += dy·w; the warp's 16 dy rows · lora_B accumulate g for all r columns.
      [&](const uint8_t* stage, const uint16_t* wdec, int kt) {
        const uint32_t dys = smem_addr(stage);
        const uint32_t bs = dys + L::kDyBytes;
        const uint32_t ws = smem_addr(wdec);
#pragma unroll
        for (int kk = 0; kk < kTileK / 16; ++kk) {
          warp_mma_k16<T, BLayout::kKN, L::kStride, L::kWStride>(acc, dys + a_off, ws + w_off, kk);
          uint32_t ag[4];
          ldsm_x4(ag, dys + ag_off + kk * 16 * 2);
          warp_mma_rank_k16<T, BLayout::kKN, kRPad, L::kRStride>(acc_g, ag, bs + lb_off, kk);
        }
      });

  if (p.splits > 1 && !reduce_splits<kRPad>(p, acc, acc_g, reinterpret_cast<int*>(mainloop.epilogue_smem()), tid))
    return;  // not the tile's last split

  // ---- epilogue: g = dtype(s·dy·lora_B) (rounded first, like the reference's g) and lora_A[:, k0:k0+128] ----
  uint16_t* g_s = reinterpret_cast<uint16_t*>(mainloop.epilogue_smem());  // [kBlockM][kRStride]
  uint16_t* a_s = g_s + kBlockM * L::kRStride;                            // [kRPad][kWStride]
  mainloop.template rank_epilogue<T, kRPad>(
      acc_g, p.scaling, g_s, wm * kWarpM + wn * 16,
      [&] {
        load_tile_async<kRPad, kBlockN>(a_s, p.lora_A + k0, p.k, p.r, p.k - k0, tid);
        cp_async_commit();
        cp_async_wait<0>();
      },
      p.g, m0, p.m, p.r, tid);

  // dx = acc + mask(g·lora_A): one more MMA pass per m16 tile, fp32 sums rounded once.
  const uint32_t gs = smem_addr(g_s) + ldsm_a_offset(wm * kWarpM, lane, L::kRStride);
  const uint32_t as = smem_addr(a_s) + ldsm_b_kn_offset(wn * kWarpN, lane, L::kWStride);
  const int g = lane >> 2, t = lane & 3;

#pragma unroll
  for (int i = 0; i < kMmaM; ++i) {
    float lora[kMmaN][4];
    warp_lora_expand<T, BLayout::kKN, kRPad, L::kRStride, L::kWStride>(lora, gs, as, i);
#pragma unroll
    for (int j = 0; j < kMmaN; ++j) {
      const int64_t col = k0 + wn * kWarpN + j * 8 + 2 * t;  // even, and k is even: pairs never straddle k
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wm * kWarpM + i * 16 + g + 8 * h;
        if (row >= p.m || col >= p.k) continue;
        float l0 = lora[j][2 * h], l1 = lora[j][2 * h + 1];
        if (p.dropout.enabled) {  // the mask forward applied to x[row, col], regenerated from the counter
          const uint64_t idx = uint64_t(row) * uint64_t(p.k) + uint64_t(col);
          l0 = p.dropout.keep(idx) ? l0 * p.dropout.inv_keep : 0.f;
          l1 = p.dropout.keep(idx + 1) ? l1 * p.dropout.inv_keep : 0.f;
        }
        *reinterpret_cast<uint32_t*>(p.dx + row * p.k + col) =
            Elem<T>::pack2(acc[i][j][2 * h] + l0, acc[i][j][2 * h + 1] + l1);
      }
    }
  }
}

// The only launch site of qlora_bwd_dx_kernel: one CTA per 128 x 128 tile of dx (k fastest) and split (z).
void launch_qlora_bwd_dx(const QloraBwdDxParams& p, at::ScalarType dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.k, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)),
                  static_cast<unsigned>(p.splits));
  launch_nf4_gemm<DxTraits>("qlora_linear_backward", p, dtype, grid, stream, [](auto elem, auto rank_bucket) {
    return qlora_bwd_dx_kernel<decltype(elem), decltype(rank_bucket)::value>;
  });
}

// Op qlora_ext::_fused_bwd_dx (schema: csrc/ops.cpp) -> (dx [m, k], g = s·dy·lora_B [m, r]) in dy's dtype.
// Device guard → checks → allocate → Params → launch.
std::tuple<at::Tensor, at::Tensor> fused_bwd_dx(const at::Tensor& dy, const OptionalTensorList& w,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                                double dropout_p, int64_t seed) {
  constexpr const char* kOp = "qlora_linear_backward";
  check_activation(kOp, "dy", dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  check_2d(kOp, "lora_A", lora_A, "[r, k]");
  const int64_t m = dy.size(0), n = dy.size(1), r = lora_A.size(0), k = lora_A.size(1);
  check_fast_path_sizes(kOp, k, r);
  check_matrix(kOp, "lora_A", lora_A, dy.scalar_type(), "[r, k]", r, k, dy.device());
  check_matrix(kOp, "lora_B", lora_B, dy.scalar_type(), "[n, r]", n, r, dy.device());
  const NF4Tensors wt = NF4Tensors::from_list(kOp, w, n, k, dy.device());
  check_dropout_p(kOp, dropout_p);
  check_gemm_limits(kOp, m, kBlockM, wt.w_nf4);

  at::Tensor dx = at::empty({m, k}, dy.options());
  at::Tensor g = at::empty({m, r}, dy.options());
  if (m == 0) return {dx, g};

  const at::Tensor la = aligned16(lora_A.data_ptr()) ? lora_A : lora_A.clone();  // adapter sized

  QloraBwdDxParams p{};
  fill_nf4_gemm_base(p, wt.view(), la, lora_B, m, n, k, r, scaling, dropout_p, seed);
  p.dy = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  p.dx = reinterpret_cast<uint16_t*>(dx.data_ptr());
  p.g = reinterpret_cast<uint16_t*>(g.data_ptr());
  p.dy_async = n % 8 == 0 && aligned16(dy.data_ptr());

  // Split-n when the dx tiles fill at most half the GPU (see the header).
  const int64_t tiles = ceil_div(k, kBlockN) * ceil_div(m, kBlockM), n_steps = ceil_div(n, kTileK);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = 2 * tiles <= sms ? std::min(sms / tiles, n_steps / kMinStepsPerSplit) : 1;
  p.steps_per_split = static_cast<int>(ceil_div(n_steps, std::max<int64_t>(want, 1)));
  p.splits = static_cast<int>(ceil_div(n_steps, p.steps_per_split));  // every split has at least one step
  at::Tensor ws, counters;
  if (p.splits > 1) {
    int r_pad = 0;  // the kernel instance's rank bucket: acc_g holds r_pad / 2 floats per thread
    dispatch_rank(r, [&](auto rank_bucket) { r_pad = decltype(rank_bucket)::value; });
    const int64_t floats = int64_t(kMmaM * kMmaN * 4 + r_pad / 2) * kThreads;
    ws = stream_scratch(ScratchSlot::kDxPartials, tiles * p.splits * floats, dy.options().dtype(at::kFloat));
    counters = stream_counters(dy.device(), tiles);
    p.ws = ws.data_ptr<float>();
    p.tile_count = counters.data_ptr<int>();
  }
  launch_qlora_bwd_dx(p, dy.scalar_type(), c10::cuda::getCurrentCUDAStream());
  return {dx, g};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_fused_bwd_dx", &qlora_ext::fused_bwd_dx); }
