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
// ptxas (nvcc 13.0, -O3, bf16 = fp16), registers, 0 spill / 0 stack everywhere; 1 CTA/SM by smem:
//   sm_80:  196 / 202 / 199 / 249        sm_90a: 190 / 196 / 210 / 248          (kRPad 16 / 32 / 64 / 128)
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

struct QloraBwdDxParams {
  const uint16_t* dy;      // [m, n] row-major
  NF4View w;               // frozen weight [n, k]
  const uint16_t* lora_A;  // [r, k] row-major, 16-byte aligned
  const uint16_t* lora_B;  // [n, r] row-major
  uint16_t* dx;            // [m, k] out
  uint16_t* g;             // [m, r] out: s·dy·lora_B
  int64_t m, n, k;
  int r;
  float scaling;           // s
  float inv_keep;          // fp32(1 / (1 - p))
  uint32_t dropout_key;    // dropout_key(seed): the same mask forward applied to x
  uint32_t dropout_thresh; // dropout_threshold(p)
  bool dropout;            // p > 0
  bool dy_async;           // n % 8 == 0 and dy 16-byte aligned: dy rows can be cp.async'd
  bool lora_B_async;       // r % 8 == 0 and lora_B 16-byte aligned
  int stages;              // cp.async ring depth (2..4), chosen by the launcher
  int wdec_buffers;        // decoded-W buffers: 2 (decode overlaps the MMAs) or 1 (small-smem fallback)
};

// Shared-memory layout, bytes. [code table][decoded W x wdec_buffers][ring: stages x (dy | lora_B | packed W)].
// The epilogue reuses everything after the code table for g [128][kRPad] and lora_A [kRPad][128].
template <int kRPad>
struct DxSmem {
  static constexpr int kStride = kTileK + kPad;                 // 72: dy tile row pitch
  static constexpr int kWStride = kBlockN + kPad;               // 136: decoded W [64 n][128 k], lora_A tile
  static constexpr int kRStride = kRPad + kPad;                 // lora_B rows and g
  static constexpr int kDyBytes = kBlockM * kStride * 2;
  static constexpr int kBBytes = kTileK * kRStride * 2;
  static constexpr int kStageBytes = kDyBytes + kBBytes + kPackedStageBytes;
  static constexpr int kWdecBytes = kTileK * kWStride * 2;
  static constexpr int kCodeBytes = 128;
  static constexpr int kEpilogueBytes = kCodeBytes + kBlockM * kRStride * 2 + kRPad * kWStride * 2;
};

template <typename T,   // __nv_bfloat16 or __half: dy, lora_A, lora_B, dx, g
          int kRPad>    // r rounded up to the rank bucket
__global__ void __launch_bounds__(kThreads, 1) qlora_bwd_dx_kernel(const __grid_constant__ QloraBwdDxParams p) {
  using L = DxSmem<kRPad>;
  extern __shared__ __align__(128) uint8_t smem[];
  float* code_s = reinterpret_cast<float*>(smem);
  uint16_t* wdec = reinterpret_cast<uint16_t*>(smem + L::kCodeBytes);  // [wdec_buffers][kTileK][kWStride]
  uint8_t* ring = smem + L::kCodeBytes + p.wdec_buffers * L::kWdecBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t k0 = int64_t(blockIdx.x) * kBlockN;  // first dx column of this CTA
  const int num_n_tiles = static_cast<int>((p.n + kTileK - 1) / kTileK);
  const int stages = p.stages;
  const bool double_wdec = p.wdec_buffers == 2;

  auto dy_tile = [&](int s) { return reinterpret_cast<uint16_t*>(ring + s * L::kStageBytes); };
  auto b_tile = [&](int s) { return reinterpret_cast<uint16_t*>(ring + s * L::kStageBytes + L::kDyBytes); };
  auto packed = [&](int s) { return ring + s * L::kStageBytes + L::kDyBytes + L::kBBytes; };
  auto wdec_buf = [&](int kt) { return wdec + (double_wdec ? kt & 1 : 0) * (kTileK * L::kWStride); };

  // W tile = rows [kt*64, kt*64 + 64) x cols [k0, k0 + 128).
  const NF4TileDecoder<kTileK, kBlockN> dec(tid, p.k);

  // fetch: issue n-step kt into ring slot s. Everything past n (and rows >= m, cols >= k) arrives as zeros,
  // so the padded tail of the reduction contributes exactly 0.
  auto fetch = [&](int s, int kt) {
    const int64_t nn0 = int64_t(kt) * kTileK;
    const uint16_t* dy_origin = p.dy + m0 * p.n + nn0;
    if (p.dy_async) load_tile_async<kBlockM, kTileK>(dy_tile(s), dy_origin, p.n, p.m - m0, p.n - nn0, tid);
    else load_tile_sync<kBlockM, kTileK>(dy_tile(s), dy_origin, p.n, p.m - m0, p.n - nn0, tid);
    const uint16_t* b_origin = p.lora_B + nn0 * p.r;
    if (p.lora_B_async) load_tile_async<kTileK, kRPad>(b_tile(s), b_origin, p.r, p.n - nn0, p.r, tid);
    else load_tile_sync<kTileK, kRPad>(b_tile(s), b_origin, p.r, p.n - nn0, p.r, tid);
    dec.load(packed(s), p.w, nn0, k0, p.n, tid);
  };

  if (tid < 16) code_s[tid] = p.w.code[tid];

  Acc acc;
  float acc_g[kRPad / 8][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < kRPad / 8; ++j) acc_g[j][0] = acc_g[j][1] = acc_g[j][2] = acc_g[j][3] = 0.f;

  // Prologue: stages-1 n-steps in flight, decode n-step 0.
  for (int s = 0; s < stages - 1; ++s) {
    if (s < num_n_tiles) fetch(s, s);
    cp_async_commit();
  }
  const float scale0 = dec.scale(p.w, 0, k0, p.n);
  cp_async_wait_dyn(stages - 2);
  __syncthreads();  // code_s
  dec.template decode<T>(wdec_buf(0), packed(0), code_s, scale0, tid);

  const int a_off = ldsm_a_offset(wm * kWarpM, lane, L::kStride);             // dy rows of the warp
  const int ag_off = ldsm_a_offset(wm * kWarpM + wn * 16, lane, L::kStride);  // the warp's 16 g rows
  const int w_off = ldsm_b_kn_offset(wn * kWarpN, lane, L::kWStride);         // decoded W [n][k], .trans
  const int lb_off = ldsm_b_kn_offset(0, lane, L::kRStride);                  // lora_B rows [n][r], .trans

  int slot = 0;
  for (int kt = 0; kt < num_n_tiles; ++kt) {
    __syncthreads();  // as in qlora_fwd.cu: n-step kt visible everywhere, n-step kt-1 fully consumed
    const int next_slot = slot + 1 == stages ? 0 : slot + 1;
    const float next_scale = kt + 1 < num_n_tiles ? dec.scale(p.w, int64_t(kt + 1) * kTileK, k0, p.n) : 0.f;
    {
      const int fetch_kt = kt + stages - 1;
      if (fetch_kt < num_n_tiles) fetch(slot == 0 ? stages - 1 : slot - 1, fetch_kt);
      cp_async_commit();
    }

    const uint32_t dys = smem_addr(dy_tile(slot));
    const uint32_t bs = smem_addr(b_tile(slot));
    const uint32_t ws = smem_addr(wdec_buf(kt));
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
      warp_mma_k16<T, BLayout::kKN, L::kStride, L::kWStride>(acc, dys + a_off, ws + w_off, kk);
      uint32_t ag[4];
      ldsm_x4(ag, dys + ag_off + kk * 16 * 2);
      warp_mma_rank_k16<T, BLayout::kKN, kRPad, L::kRStride>(acc_g, ag, bs + lb_off, kk);
    }

    cp_async_wait_dyn(stages - 2);
    if (kt + 1 < num_n_tiles) {
      if (!double_wdec) __syncthreads();  // single buffer: every warp is done reading it
      dec.template decode<T>(wdec_buf(kt + 1), packed(next_slot), code_s, next_scale, tid);
    }
    slot = next_slot;
  }

  // ---- epilogue ----------------------------------------------------------------------------------------
  cp_async_wait<0>();
  __syncthreads();
  uint16_t* g_s = reinterpret_cast<uint16_t*>(smem + L::kCodeBytes);  // [kBlockM][kRStride]
  uint16_t* a_s = g_s + kBlockM * L::kRStride;                         // lora_A[:, k0:k0+128] [kRPad][kWStride]
  store_rank_acc<T, kRPad>(acc_g, p.scaling, g_s, wm * kWarpM + wn * 16, lane);  // g = dtype(s·dy·lora_B)
  load_tile_async<kRPad, kBlockN>(a_s, p.lora_A + k0, p.k, p.r, p.k - k0, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (blockIdx.x == 0) write_rank_tile<kRPad>(p.g, g_s, m0, p.m, p.r, tid);

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
        if (p.dropout) {  // the mask forward applied to x[row, col], regenerated from the counter
          const uint64_t idx = uint64_t(row) * uint64_t(p.k) + uint64_t(col);
          l0 = dropout_keep(p.dropout_key, p.dropout_thresh, idx) ? l0 * p.inv_keep : 0.f;
          l1 = dropout_keep(p.dropout_key, p.dropout_thresh, idx + 1) ? l1 * p.inv_keep : 0.f;
        }
        *reinterpret_cast<uint32_t*>(p.dx + row * p.k + col) =
            Elem<T>::pack2(acc[i][j][2 * h] + l0, acc[i][j][2 * h + 1] + l1);
      }
    }
  }
}

// The only launch site of qlora_bwd_dx_kernel: rank bucket, dtype, ring depth, smem attribute, launch.
void launch_qlora_bwd_dx(QloraBwdDxParams p, at::ScalarType dtype, cudaStream_t stream) {
  const int64_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const dim3 grid(static_cast<unsigned>(qlora_checks::ceil_div(p.k, kBlockN)),
                  static_cast<unsigned>(qlora_checks::ceil_div(p.m, kBlockM)));
  dispatch_rank(p.r, [&](auto rank_bucket) {
    constexpr int kRPad = decltype(rank_bucket)::value;
    using L = DxSmem<kRPad>;
    const PipelineConfig cfg =
        pick_pipeline(L::kCodeBytes, L::kWdecBytes, L::kStageBytes, L::kEpilogueBytes, smem_limit);
    TORCH_CHECK(cfg.stages >= 2, "qlora_linear_backward: rank r = ", p.r, " needs ", cfg.smem_bytes,
                " bytes of shared memory per block, this device allows ", smem_limit);
    p.stages = cfg.stages;
    p.wdec_buffers = cfg.wdec_buffers;
    const int smem = static_cast<int>(cfg.smem_bytes);
    auto kernel =
        dtype == at::kBFloat16 ? qlora_bwd_dx_kernel<__nv_bfloat16, kRPad> : qlora_bwd_dx_kernel<__half, kRPad>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace qlora

// Host wrapper (launchers.h): device guard → checks → allocate → Params → launch.
std::tuple<at::Tensor, at::Tensor> qlora_bwd_dx_cuda(const at::Tensor& dy, const at::Tensor& w_nf4,
                                                     const at::Tensor& absmax, const at::Tensor& code,
                                                     const std::optional<at::Tensor>& nested_absmax,
                                                     const std::optional<at::Tensor>& nested_code,
                                                     const std::optional<at::Tensor>& offset,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                     double scaling, double dropout_p, int64_t seed,
                                                     int64_t blocksize) {
  namespace qc = qlora_checks;
  constexpr const char* op = "qlora_linear_backward";
  qc::check_activation(op, "dy", dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, k], got shape ", qc::shape_str(lora_A.sizes()));
  const int64_t m = dy.size(0), n = dy.size(1), r = lora_A.size(0), k = lora_A.size(1);
  qc::check_fast_path_sizes(op, k, r);
  qc::check_fast_blocksize(op, blocksize);
  qc::check_matrix(op, "lora_A", lora_A, dy.scalar_type(), "[r, k]", r, k, dy.device());
  qc::check_matrix(op, "lora_B", lora_B, dy.scalar_type(), "[n, r]", n, r, dy.device());
  qc::check_nf4_weight(op, w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dy.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(qc::ceil_div(m, qlora::kBlockM) <= 65535, op, ": m = ", m, " exceeds the kernel's grid limit of ",
              int64_t(65535) * qlora::kBlockM, " rows");
  TORCH_CHECK(qlora::aligned16(w_nf4.data_ptr()), op, ": w_nf4 must start on a 16-byte boundary (got a view "
              "with a misaligned storage offset); pass w_nf4.clone()");

  at::Tensor dx = at::empty({m, k}, dy.options());
  at::Tensor g = at::empty({m, r}, dy.options());
  if (m == 0) return {dx, g};

  const at::Tensor la = qlora::aligned16(lora_A.data_ptr()) ? lora_A : lora_A.clone();  // adapter sized

  qlora::QloraBwdDxParams p{};
  p.dy = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  p.w = make_nf4_view(w_nf4, absmax, code, nested_absmax, nested_code, offset);
  p.lora_A = reinterpret_cast<const uint16_t*>(la.data_ptr());
  p.lora_B = reinterpret_cast<const uint16_t*>(lora_B.data_ptr());
  p.dx = reinterpret_cast<uint16_t*>(dx.data_ptr());
  p.g = reinterpret_cast<uint16_t*>(g.data_ptr());
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  p.dropout = dropout_p > 0.0;
  p.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_key = dropout_key(seed);
  p.dropout_thresh = dropout_threshold(dropout_p);
  p.dy_async = n % 8 == 0 && qlora::aligned16(dy.data_ptr());
  p.lora_B_async = r % 8 == 0 && qlora::aligned16(lora_B.data_ptr());
  qlora::launch_qlora_bwd_dx(p, dy.scalar_type(), at::cuda::getCurrentCUDAStream());
  return {dx, g};
}
