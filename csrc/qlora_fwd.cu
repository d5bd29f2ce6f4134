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
// The decode of k-tile kt+1 happens at the end of iteration kt, so the packed W is prefetched stages-2 k-tiles
// beyond that point, x and lora_A stages-1. Not yet tuned on hardware: 128x128 / 8 warps is the usual mma.sync
// sweet spot (Marlin, FlashAttention-2), and 4 stages is what fits at r = 128 on Hopper.
// Shared memory per CTA (bytes, 2 decoded-W buffers unless noted):
//   kRPad           16        32        64        128
//   4 stages     136320    145536    163968    200832     H100/H200 (227 KB opt-in): all; A100 (163 KB): r <= 64
//   3 stages          -         -         -    159872     A100, r > 64
//   2 stages      86656     91264    100480         -     sm86/89 (99 KB); r > 64 there: 1 buffer, 100480
// ptxas (nvcc 13.0, -O3, bf16 = fp16), registers per thread, 0 spill / 0 stack everywhere; 1 CTA/SM by smem:
//   sm_80:  168 / 167 / 214 / 233        sm_90a: 167 / 167 / 210 / 228          (kRPad 16 / 32 / 64 / 128)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/dropout.cuh"
#include "common/nf4.cuh"
#include "common/nf4_gemm.cuh"
#include "launchers.h"

namespace qlora {

// The whole host → kernel contract. Element pointers are raw 16-bit patterns of x's dtype (bf16 or fp16).
struct QloraFwdParams {
  const uint16_t* x;       // [m, k] row-major, 16-byte aligned
  NF4View w;               // frozen weight [n, k]: packed nibbles + block scales (nf4.cuh)
  const uint16_t* lora_A;  // [r, k] row-major, 16-byte aligned
  const uint16_t* lora_B;  // [n, r] row-major
  const uint16_t* bias;    // [n] or nullptr
  uint16_t* y;             // [m, n] out
  uint16_t* u;             // [m, r] out
  int64_t m, n, k;
  int r;
  float scaling;           // s = lora_alpha / r (rsLoRA: / sqrt(r))
  float inv_keep;          // fp32(1 / (1 - p)), the contract's dropout scale
  uint32_t dropout_key;    // dropout_key(seed)
  uint32_t dropout_thresh; // dropout_threshold(p)
  bool dropout;            // p > 0 (else no mask at all)
  bool lora_B_async;       // r % 8 == 0 and lora_B 16-byte aligned: rows can be cp.async'd
  int stages;              // cp.async ring depth (2..4), chosen by the launcher from the device's smem
  int wdec_buffers;        // decoded-W buffers: 2 (decode overlaps the MMAs) or 1 (small-smem fallback)
};

// Shared-memory layout, bytes. [code table][decoded W x wdec_buffers][ring: stages x (x | lora_A | packed W)].
// The epilogue reuses everything after the code table for u [128][kRPad] and lora_B [128][kRPad].
template <int kRPad>
struct FwdSmem {
  static constexpr int kStride = kTileK + kPad;                 // 72: x, lora_A and decoded-W row pitch
  static constexpr int kRStride = kRPad + kPad;                 // u and lora_B tiles in the epilogue
  static constexpr int kXBytes = kBlockM * kStride * 2;
  static constexpr int kABytes = kRPad * kStride * 2;
  static constexpr int kStageBytes = kXBytes + kABytes + kPackedStageBytes;
  static constexpr int kWdecBytes = kBlockN * kStride * 2;
  static constexpr int kCodeBytes = 128;                        // 16 fp32 codebook entries, padded
  static constexpr int kEpilogueBytes = kCodeBytes + (kBlockM + kBlockN) * kRStride * 2;
};

template <typename T,   // __nv_bfloat16 or __half: x, lora_A, lora_B, bias, y, u
          int kRPad>    // r rounded up to the rank bucket; LoRA tiles are zero beyond r
__global__ void __launch_bounds__(kThreads, 1) qlora_fwd_kernel(const __grid_constant__ QloraFwdParams p) {
  using L = FwdSmem<kRPad>;
  extern __shared__ __align__(128) uint8_t smem[];
  float* code_s = reinterpret_cast<float*>(smem);
  uint16_t* wdec = reinterpret_cast<uint16_t*>(smem + L::kCodeBytes);  // [wdec_buffers][kBlockN][kStride]
  uint8_t* ring = smem + L::kCodeBytes + p.wdec_buffers * L::kWdecBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  const int num_k_tiles = static_cast<int>(p.k / kTileK);
  const int stages = p.stages;
  const bool double_wdec = p.wdec_buffers == 2;

  auto x_tile = [&](int s) { return reinterpret_cast<uint16_t*>(ring + s * L::kStageBytes); };
  auto a_tile = [&](int s) { return reinterpret_cast<uint16_t*>(ring + s * L::kStageBytes + L::kXBytes); };
  auto packed = [&](int s) { return ring + s * L::kStageBytes + L::kXBytes + L::kABytes; };
  auto wdec_buf = [&](int kt) { return wdec + (double_wdec ? kt & 1 : 0) * (kBlockN * L::kStride); };

  // W tile = rows [n0, n0 + 128) x cols [k0, k0 + 64): thread tid owns row tid/2, half tid%2.
  const NF4TileDecoder<kBlockN, kTileK> dec(tid, p.k);

  // fetch: issue k-tile kt into ring slot s (rows >= m, W rows >= n, lora_A rows >= r arrive as zeros).
  auto fetch = [&](int s, int kt) {
    const int64_t k0 = int64_t(kt) * kTileK;
    load_tile_async<kBlockM, kTileK>(x_tile(s), p.x + m0 * p.k + k0, p.k, p.m - m0, kTileK, tid);
    load_tile_async<kRPad, kTileK>(a_tile(s), p.lora_A + k0, p.k, p.r, kTileK, tid);
    dec.load(packed(s), p.w, n0, k0, p.n, tid);
  };

  if (tid < 16) code_s[tid] = p.w.code[tid];

  Acc acc;
  float acc_u[kRPad / 8][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < kRPad / 8; ++j) acc_u[j][0] = acc_u[j][1] = acc_u[j][2] = acc_u[j][3] = 0.f;

  // Prologue: stages-1 k-tiles in flight (one commit group each, empty past the end), decode k-tile 0.
  for (int s = 0; s < stages - 1; ++s) {
    if (s < num_k_tiles) fetch(s, s);
    cp_async_commit();
  }
  const float scale0 = dec.scale(p.w, n0, 0, p.n);
  cp_async_wait_dyn(stages - 2);  // own group 0 landed (the packed chunk this thread decodes)
  __syncthreads();                // code_s
  dec.template decode<T>(wdec_buf(0), packed(0), code_s, scale0, tid);

  // Lane offsets (bytes) of the ldmatrix addresses; per-step offsets are compile-time constants.
  const int a_off = ldsm_a_offset(wm * kWarpM, lane, L::kStride);             // x rows of the warp
  const int au_off = ldsm_a_offset(wm * kWarpM + wn * 16, lane, L::kStride);  // the warp's 16 u rows
  const int w_off = ldsm_b_nk_offset(wn * kWarpN, lane, L::kStride);          // decoded W [n][k]
  const int la_off = ldsm_b_nk_offset(0, lane, L::kStride);                   // lora_A [r][k]

  // Dropout counters of the u A-fragment: rows g and g+8 of the warp's 16 u rows, column pair 2t (+8).
  const uint64_t u_row = uint64_t(m0 + wm * kWarpM + wn * 16 + (lane >> 2));
  const uint64_t idx_lo = u_row * uint64_t(p.k) + 2 * (lane & 3);
  const uint64_t idx_hi = idx_lo + 8 * uint64_t(p.k);

  int slot = 0;  // ring slot of k-tile kt
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    // k-tile kt's x / lora_A (every thread waited for it) and its decoded W are now visible to all, and
    // every warp has finished k-tile kt-1: its ring slot and decoded-W buffer may be overwritten.
    __syncthreads();
    const int next_slot = slot + 1 == stages ? 0 : slot + 1;
    const float next_scale = kt + 1 < num_k_tiles ? dec.scale(p.w, n0, int64_t(kt + 1) * kTileK, p.n) : 0.f;
    {
      const int fetch_kt = kt + stages - 1;  // goes to the slot k-tile kt-1 used
      if (fetch_kt < num_k_tiles) fetch(slot == 0 ? stages - 1 : slot - 1, fetch_kt);
      cp_async_commit();
    }

    const uint32_t xs = smem_addr(x_tile(slot));
    const uint32_t as = smem_addr(a_tile(slot));
    const uint32_t ws = smem_addr(wdec_buf(kt));
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
      warp_mma_k16<T, BLayout::kNK, L::kStride, L::kStride>(acc, xs + a_off, ws + w_off, kk);
      uint32_t au[4];
      ldsm_x4(au, xs + au_off + kk * 16 * 2);
      if (p.dropout) {
        const uint64_t c = uint64_t(kt) * kTileK + kk * 16;
        au[0] = dropout_pair<T>(au[0], idx_lo + c, p.dropout_key, p.dropout_thresh, p.inv_keep);
        au[1] = dropout_pair<T>(au[1], idx_hi + c, p.dropout_key, p.dropout_thresh, p.inv_keep);
        au[2] = dropout_pair<T>(au[2], idx_lo + c + 8, p.dropout_key, p.dropout_thresh, p.inv_keep);
        au[3] = dropout_pair<T>(au[3], idx_hi + c + 8, p.dropout_key, p.dropout_thresh, p.inv_keep);
      }
      warp_mma_rank_k16<T, BLayout::kNK, kRPad, L::kStride>(acc_u, au, as + la_off, kk);
    }

    // Decode k-tile kt+1 into the other buffer while the MMAs above drain (own packed chunk: only this
    // thread's wait_group is needed). With a single buffer every warp must first be done reading it.
    cp_async_wait_dyn(stages - 2);
    if (kt + 1 < num_k_tiles) {
      if (!double_wdec) __syncthreads();
      dec.template decode<T>(wdec_buf(kt + 1), packed(next_slot), code_s, next_scale, tid);
    }
    slot = next_slot;
  }

  // ---- epilogue ----------------------------------------------------------------------------------------
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with the ring and decoded W: reuse the space
  uint16_t* u_s = reinterpret_cast<uint16_t*>(smem + L::kCodeBytes);  // [kBlockM][kRStride]
  uint16_t* b_s = u_s + kBlockM * L::kRStride;                         // lora_B rows n0.. [kBlockN][kRStride]
  store_rank_acc<T, kRPad>(acc_u, 1.f, u_s, wm * kWarpM + wn * 16, lane);  // u in x's dtype, as the reference
  const uint16_t* b_origin = p.lora_B + n0 * p.r;
  if (p.lora_B_async) {
    load_tile_async<kBlockN, kRPad>(b_s, b_origin, p.r, p.n - n0, p.r, tid);
    cp_async_commit();
    cp_async_wait<0>();
  } else {
    load_tile_sync<kBlockN, kRPad>(b_s, b_origin, p.r, p.n - n0, p.r, tid);
  }
  __syncthreads();
  if (blockIdx.x == 0) write_rank_tile<kRPad>(p.u, u_s, m0, p.m, p.r, tid);

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

// The only launch site of qlora_fwd_kernel: rank bucket, dtype, ring depth, smem attribute, launch.
void launch_qlora_fwd(QloraFwdParams p, at::ScalarType dtype, cudaStream_t stream) {
  const int64_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const dim3 grid(static_cast<unsigned>(qlora_checks::ceil_div(p.n, kBlockN)),
                  static_cast<unsigned>(qlora_checks::ceil_div(p.m, kBlockM)));
  dispatch_rank(p.r, [&](auto rank_bucket) {
    constexpr int kRPad = decltype(rank_bucket)::value;
    using L = FwdSmem<kRPad>;
    const PipelineConfig cfg =
        pick_pipeline(L::kCodeBytes, L::kWdecBytes, L::kStageBytes, L::kEpilogueBytes, smem_limit);
    TORCH_CHECK(cfg.stages >= 2, "qlora_linear: rank r = ", p.r, " needs ", cfg.smem_bytes,
                " bytes of shared memory per block, this device allows ", smem_limit);
    p.stages = cfg.stages;
    p.wdec_buffers = cfg.wdec_buffers;
    const int smem = static_cast<int>(cfg.smem_bytes);
    auto kernel = dtype == at::kBFloat16 ? qlora_fwd_kernel<__nv_bfloat16, kRPad> : qlora_fwd_kernel<__half, kRPad>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace qlora

// Host wrapper (launchers.h): device guard → checks → allocate → Params → launch.
std::tuple<at::Tensor, at::Tensor> qlora_fwd_cuda(const at::Tensor& x, const at::Tensor& w_nf4,
                                                  const at::Tensor& absmax, const at::Tensor& code,
                                                  const std::optional<at::Tensor>& nested_absmax,
                                                  const std::optional<at::Tensor>& nested_code,
                                                  const std::optional<at::Tensor>& offset,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const std::optional<at::Tensor>& bias, double scaling,
                                                  double dropout_p, int64_t seed, int64_t blocksize) {
  namespace qc = qlora_checks;
  constexpr const char* op = "qlora_linear";
  qc::check_activation(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, k], got shape ", qc::shape_str(lora_A.sizes()));
  TORCH_CHECK(lora_B.dim() == 2, op, ": lora_B must be 2-D [n, r], got shape ", qc::shape_str(lora_B.sizes()));
  const int64_t m = x.size(0), k = x.size(1), r = lora_A.size(0), n = lora_B.size(0);
  qc::check_fast_path_sizes(op, k, r);
  qc::check_fast_blocksize(op, blocksize);
  qc::check_matrix(op, "lora_A", lora_A, x.scalar_type(), "[r, k]", r, k, x.device());
  qc::check_matrix(op, "lora_B", lora_B, x.scalar_type(), "[n, r]", n, r, x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    qc::check_device(op, "bias", *bias, x.device());
    qc::check_dtype(op, "bias", *bias, x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [n] = [", n, "], got ",
                qc::shape_str(bias->sizes()));
    qc::check_contiguous(op, "bias", *bias);
  }
  qc::check_nf4_weight(op, w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(qc::ceil_div(m, qlora::kBlockM) <= 65535, op, ": m = ", m, " exceeds the kernel's grid limit of ",
              int64_t(65535) * qlora::kBlockM, " rows");
  TORCH_CHECK(qlora::aligned16(w_nf4.data_ptr()), op, ": w_nf4 must start on a 16-byte boundary (got a view "
              "with a misaligned storage offset); pass w_nf4.clone()");

  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor u = at::empty({m, r}, x.options());
  if (m == 0) return {y, u};

  // cp.async reads 16-byte chunks: a misaligned (but contiguous) view gets an aligned copy; these are
  // activation/adapter sized, never weight sized.
  const at::Tensor xa = qlora::aligned16(x.data_ptr()) ? x : x.clone();
  const at::Tensor la = qlora::aligned16(lora_A.data_ptr()) ? lora_A : lora_A.clone();

  qlora::QloraFwdParams p{};
  p.x = reinterpret_cast<const uint16_t*>(xa.data_ptr());
  p.w = make_nf4_view(w_nf4, absmax, code, nested_absmax, nested_code, offset);
  p.lora_A = reinterpret_cast<const uint16_t*>(la.data_ptr());
  p.lora_B = reinterpret_cast<const uint16_t*>(lora_B.data_ptr());
  p.bias = has_bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
  p.y = reinterpret_cast<uint16_t*>(y.data_ptr());
  p.u = reinterpret_cast<uint16_t*>(u.data_ptr());
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  p.dropout = dropout_p > 0.0;
  p.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_key = dropout_key(seed);
  p.dropout_thresh = dropout_threshold(dropout_p);
  p.lora_B_async = r % 8 == 0 && qlora::aligned16(lora_B.data_ptr());
  qlora::launch_qlora_fwd(p, x.scalar_type(), at::cuda::getCurrentCUDAStream());
  return {y, u};
}
