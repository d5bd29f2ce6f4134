// Fused QLoRA forward, one launch (Ampere-style path: cp.async + ldmatrix + mma.sync; sm80/86/89/90):
//   u = dropout(x)·lora_Aᵀ                 [m, r]  (saved for backward)
//   y = x·wᵀ + s·(u·lora_Bᵀ) + bias        [m, n]
// w is NF4 and is decoded tile by tile into shared memory; no dequantized weight ever reaches global memory.
// Twin (the spec): qlora_ext.reference.qlora_linear.
//
// CTA = 128 (m) x 128 (n) output tile, 8 warps (2 x 4, 64x32 each), k stepped by 64 = one NF4 block per W row,
// so every (row, k-tile) has exactly one scale. Per k-tile:
//   fetch   cp.async x[128x64], lora_A[kRPad x 64] and the packed W tile (128 rows x 32 B) into ring slot
//   decode  each thread turns its own 16 packed bytes into 32 bf16/fp16 values in the decoded-W buffer,
//           one k-tile ahead of the MMAs (double buffer), so one __syncthreads per k-tile suffices
//   matmul  warp tile 64x32 += x·wᵀ (ldmatrix, mma.m16n8k16), and the warp's 16 x-rows (dropout-masked in
//           registers) · lora_Aᵀ accumulate u for all r columns — each x element is masked once per CTA
// Epilogue: u rounded to the activation dtype (as the reference does) → shared; y = acc + s·(u·lora_Bᵀ) + bias
// with one more MMA pass against the CTA's lora_B rows; the CTAs of n-tile 0 also write u.
// u is recomputed by every n-tile column (r/128 extra MMA work); the sm90 path is the place to avoid that.
//
// Config whitelist: one tile shape (128x128x64, 8 warps) x rank buckets kRPad in {16, 32, 64, 128}; the ring
// depth (2..4) and decoded-W buffering are picked at launch from the device's shared memory (table below).
// The pipeline (ring, one-step-ahead decode, barriers) is NF4Mainloop in common/nf4_gemm_sm80.cuh. Not yet
// tuned on hardware: 128x128 / 8 warps is the usual mma.sync sweet spot (Marlin, FlashAttention-2), and 4
// stages is what fits at r = 128 on Hopper.
// Shared memory per CTA (bytes, 2 decoded-W buffers unless noted):
//   kRPad           16        32        64        128
//   4 stages     136320    145536    163968    200832     H100/H200 (227 KB opt-in): all; A100 (163 KB): r <= 64
//   3 stages          -         -         -    159872     A100, r > 64
//   2 stages      86656     91264    100480         -     sm86/89 (99 KB); r > 64 there: 1 buffer, 100480
// 1 CTA/SM by shared memory; register counts: the build log (-Xptxas -v), 0 spills required.
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

namespace qlora_ext {
namespace {

// The whole host → kernel contract. Element pointers are raw 16-bit patterns of x's dtype (bf16 or fp16).
struct QloraFwdParams : NF4GemmParamsBase {
  const uint16_t* x;       // [m, k] row-major, 16-byte aligned
  const uint16_t* bias;    // [n] or nullptr
  uint16_t* y;             // [m, n] out
  uint16_t* u;             // [m, r] out
};

// Ring slot = [x 128 x 64 | lora_A kRPad x 64 | packed W]; W tile = 128 rows (n) x 64 cols (k), stored [n][k].
// The epilogue reuses the space after the code table for u [128][kRPad] and lora_B [128][kRPad].
template <int kRPad>
struct FwdTraits : NF4GemmTraits<kRPad, BLayout::kNK, kBlockN, kTileK, (kBlockM + kRPad) * (kTileK + kPad) * 2> {
  static constexpr int kStride = kTileK + kPad;                 // 72: x, lora_A and decoded-W row pitch
  static constexpr int kXBytes = kBlockM * kStride * 2;         // lora_A follows x in the slot
  static constexpr int kEpilogueBytes = 128 + (kBlockM + kBlockN) * (kRPad + kPad) * 2;
};

template <typename T,   // __nv_bfloat16 or __half: x, lora_A, lora_B, bias, y, u
          int kRPad>    // r rounded up to the rank bucket; LoRA tiles are zero beyond r
__global__ void __launch_bounds__(kThreads, 1) qlora_fwd_kernel(const __grid_constant__ QloraFwdParams p) {
  using L = FwdTraits<kRPad>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  const NF4Mainloop<L> mainloop(smem, p.stages, p.wdec_buffers, static_cast<int>(p.k / kTileK), p.k, tid);

  Acc acc;
  float acc_u[kRPad / 8][4];
  zero_accumulators(acc, acc_u);

  // Lane offsets (bytes) of the ldmatrix addresses; per-step offsets are compile-time constants.
  const int a_off = ldsm_a_offset(wm * kWarpM, lane, L::kStride);             // x rows of the warp
  const int au_off = ldsm_a_offset(wm * kWarpM + wn * 16, lane, L::kStride);  // the warp's 16 u rows
  const int w_off = ldsm_b_nk_offset(wn * kWarpN, lane, L::kStride);          // decoded W [n][k]
  const int la_off = ldsm_b_nk_offset(0, lane, L::kStride);                   // lora_A [r][k]

  // Dropout counters of the u A-fragment: rows g and g+8 of the warp's 16 u rows, column pair 2t (+8).
  const uint64_t u_row = uint64_t(m0 + wm * kWarpM + wn * 16 + (lane >> 2));
  const uint64_t idx_lo = u_row * uint64_t(p.k) + 2 * (lane & 3);
  const uint64_t idx_hi = idx_lo + 8 * uint64_t(p.k);

  mainloop.template run<T>(
      p.w, p.n, tid,
      // Dense tiles of k-step kt: x[128 x 64] and lora_A[kRPad x 64] (rows >= m, rows >= r arrive as zeros).
      [&](uint8_t* stage, int kt) {
        const int64_t k0 = int64_t(kt) * kTileK;
        uint16_t* x_s = reinterpret_cast<uint16_t*>(stage);
        load_tile_async<kBlockM, kTileK>(x_s, p.x + m0 * p.k + k0, p.k, p.m - m0, kTileK, tid);
        load_tile_async<kRPad, kTileK>(x_s + L::kXBytes / 2, p.lora_A + k0, p.k, p.r, kTileK, tid);
      },
      // W tile of k-step kt: rows [n0, n0 + 128) x cols [64 kt, 64 kt + 64); thread tid owns row tid/2, half tid%2.
      [&](int kt) { return WTileOrigin{n0, int64_t(kt) * kTileK}; },
      // warp tile 64x32 += x·wᵀ; the warp's 16 x rows, dropout-masked in registers, · lora_Aᵀ accumulate u.
      [&](const uint8_t* stage, const uint16_t* wdec, int kt) {
        const uint32_t xs = smem_addr(stage);
        const uint32_t as = xs + L::kXBytes;
        const uint32_t ws = smem_addr(wdec);
#pragma unroll
        for (int kk = 0; kk < kTileK / 16; ++kk) {
          warp_mma_k16<T, BLayout::kNK, L::kStride, L::kStride>(acc, xs + a_off, ws + w_off, kk);
          uint32_t au[4];
          ldsm_x4(au, xs + au_off + kk * 16 * 2);
          if (p.dropout.enabled) {
            const uint64_t c = uint64_t(kt) * kTileK + kk * 16;
            au[0] = dropout_pair<T>(au[0], idx_lo + c, p.dropout);
            au[1] = dropout_pair<T>(au[1], idx_hi + c, p.dropout);
            au[2] = dropout_pair<T>(au[2], idx_lo + c + 8, p.dropout);
            au[3] = dropout_pair<T>(au[3], idx_hi + c + 8, p.dropout);
          }
          warp_mma_rank_k16<T, BLayout::kNK, kRPad, L::kStride>(acc_u, au, as + la_off, kk);
        }
      });

  // ---- epilogue: u (rounded to x's dtype, as the reference) and lora_B rows n0.. into shared memory --------
  uint16_t* u_s = reinterpret_cast<uint16_t*>(mainloop.epilogue_smem());  // [kBlockM][kRStride]
  uint16_t* b_s = u_s + kBlockM * L::kRStride;                            // [kBlockN][kRStride]
  mainloop.template rank_epilogue<T, kRPad>(
      acc_u, 1.f, u_s, wm * kWarpM + wn * 16,
      [&] {
        const uint16_t* b_origin = p.lora_B + n0 * p.r;
        if (p.lora_B_async) {
          load_tile_async<kBlockN, kRPad>(b_s, b_origin, p.r, p.n - n0, p.r, tid);
          cp_async_commit();
          cp_async_wait<0>();
        } else {
          load_tile_sync<kBlockN, kRPad>(b_s, b_origin, p.r, p.n - n0, p.r, tid);
        }
      },
      p.u, m0, p.m, p.r, tid);

  // y = acc + s·(u·lora_Bᵀ) + bias: one more MMA pass per m16 tile, fp32 sums rounded once.
  const uint32_t us = smem_addr(u_s) + ldsm_a_offset(wm * kWarpM, lane, L::kRStride);
  const uint32_t bs = smem_addr(b_s) + ldsm_b_nk_offset(wn * kWarpN, lane, L::kRStride);
  const int g = lane >> 2, t = lane & 3;
  const bool pair_store = (p.n & 1) == 0;  // 4-byte aligned column pairs only when n is even

  float bias_v[kMmaN][2];
#pragma unroll
  for (int j = 0; j < kMmaN; ++j) {
    const int64_t col = n0 + wn * kWarpN + j * 8 + 2 * t;
    bias_v[j][0] = p.bias != nullptr && col < p.n ? Elem<T>::to_float(__ldg(p.bias + col)) : 0.f;
    bias_v[j][1] = p.bias != nullptr && col + 1 < p.n ? Elem<T>::to_float(__ldg(p.bias + col + 1)) : 0.f;
  }

#pragma unroll
  for (int i = 0; i < kMmaM; ++i) {
    float lora[kMmaN][4];
    warp_lora_expand<T, BLayout::kNK, kRPad, L::kRStride, L::kRStride>(lora, us, bs, i);
#pragma unroll
    for (int j = 0; j < kMmaN; ++j) {
      const int64_t col = n0 + wn * kWarpN + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the m16 tile
        const int64_t row = m0 + wm * kWarpM + i * 16 + g + 8 * h;
        if (row >= p.m || col >= p.n) continue;
        const float v0 = acc[i][j][2 * h] + p.scaling * lora[j][2 * h] + bias_v[j][0];
        const float v1 = acc[i][j][2 * h + 1] + p.scaling * lora[j][2 * h + 1] + bias_v[j][1];
        uint16_t* dst = p.y + row * p.n + col;
        if (pair_store) {
          *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack2(v0, v1);
        } else {
          dst[0] = Elem<T>::from_float(v0);
          if (col + 1 < p.n) dst[1] = Elem<T>::from_float(v1);
        }
      }
    }
  }
}

// The only launch site of qlora_fwd_kernel: one CTA per 128 x 128 tile of y (n fastest).
void launch_qlora_fwd(const QloraFwdParams& p, at::ScalarType dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)));
  launch_nf4_gemm<FwdTraits>("qlora_linear", p, dtype, grid, stream, [](auto elem, auto rank_bucket) {
    return qlora_fwd_kernel<decltype(elem), decltype(rank_bucket)::value>;
  });
}

// Op qlora_ext::_fused_fwd (schema: csrc/ops.cpp) -> (y [m, n], u [m, r]) in x's dtype.
// Device guard → checks → allocate → Params → launch.
std::tuple<at::Tensor, at::Tensor> fused_fwd(const at::Tensor& x, const OptionalTensorList& w,
                                             const at::Tensor& lora_A, const at::Tensor& lora_B,
                                             const std::optional<at::Tensor>& bias, double scaling, double dropout_p,
                                             int64_t seed) {
  constexpr const char* kOp = "qlora_linear";
  check_activation(kOp, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [m, n, k, r, has_bias, wt] = check_forward_args(kOp, x, w, lora_A, lora_B, bias, dropout_p);
  check_gemm_limits(kOp, m, kBlockM, wt.w_nf4);

  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor u = at::empty({m, r}, x.options());
  if (m == 0) return {y, u};

  // cp.async reads 16-byte chunks: a misaligned (but contiguous) view gets an aligned copy; these are
  // activation/adapter sized, never weight sized.
  const at::Tensor xa = aligned16(x.data_ptr()) ? x : x.clone();
  const at::Tensor la = aligned16(lora_A.data_ptr()) ? lora_A : lora_A.clone();

  QloraFwdParams p{};
  fill_nf4_gemm_base(p, wt.view(), la, lora_B, m, n, k, r, scaling, dropout_p, seed);
  p.x = reinterpret_cast<const uint16_t*>(xa.data_ptr());
  p.bias = has_bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
  p.y = reinterpret_cast<uint16_t*>(y.data_ptr());
  p.u = reinterpret_cast<uint16_t*>(u.data_ptr());
  launch_qlora_fwd(p, x.scalar_type(), c10::cuda::getCurrentCUDAStream());
  return {y, u};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_fused_fwd", &qlora_ext::fused_fwd); }
