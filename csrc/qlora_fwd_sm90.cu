// QLoRA forward for Hopper (sm_90a), version 1: the frozen NF4 product on CUTLASS 4.2's warp-specialized
// TMA + RS-wgmma mixed-input GEMM, the LoRA products on cuBLAS.
//   u = dropout(x)·lora_Aᵀ              [m, r]  cuBLAS (with dropout: the _lora_dropout kernel's mask first)
//   y = s·u·lora_Bᵀ + bias              [m, n]  cuBLAS, written first
//   y += x·wᵀ                                   the NF4 GEMM below: y is its C operand (beta = 1) and its D
// In place (C = D = y) is safe: every output tile is owned by one CTA, whose epilogue reads a C subtile before it
// computes and stores the D subtile at the same addresses; no split-k / stream-k partial ever re-reads C.
// Twin (the spec): qlora_ext.reference.qlora_linear. Floors (scripts/probe_sm90.py times all three): cuBLAS bf16 x·wᵀ on
// the dequantized weight (what the NF4 GEMM alone should match) and the decode + cuBLAS forward (_decode_gemm_fwd,
// csrc/decode_gemm.cpp: 90-99 % of cuBLAS from m = 2048; what this path has to beat).
//
// The NF4 GEMM runs transposed, yᵀ[n, m] = w[n, k]·x[m, k]ᵀ (problem M' = n, N' = m, K = k): the mixed-input collective
// converts only its A operand in registers and wants it K-major, which w is, and the epilogue's column-major D' is y
// row-major. Per k-tile of 64 (= one NF4 block, so one scale per row of w): TMA brings the packed w tile, the x tile
// (multicast to both CTAs of a 2x1 cluster, which share the same m rows) and one row of the scale tensor; the two
// consumer warpgroups decode w in registers (common/nf4_sm90.cuh: prmt table lookup, then the 16-bit scale multiply
// CUTLASS does for ConvertAndScale) one wgmma k-block ahead of the RS wgmmas that use it.
//
// Variants (tests/test_sm90.py checks every one, scripts/probe_sm90.py times them against each other):
//   tile    128(n) x 256(m) x 64 or 128 x 128 x 64, both cluster 2x1, KernelTmaWarpSpecializedCooperative (2 consumer
//           warpgroups of 64 n-rows each), persistent tile scheduler. pick_tile() chooses; QLORA_EXT_SM90_TILE
//           overrides. 128x256 halves the decode work per MMA (nf4_probe.cu: it stays within 3 % of uniform int4 there,
//           128x128 loses 9-20 %), 128x128 keeps more SMs busy when 128x256 tiles do not fill the GPU.
//   weights stored: TMA reads bnb's bytes as they are, K-major [n][k/2]. A thread's 8 values of one wgmma k-block
//           then sit in 4 separate bytes of shared memory (rows g, g+8 x k-pairs 2t, 2t+8), so CUTLASS's copy does
//           4 one-byte loads per 8 values. repacked (the default where n % 16 == 0, see pick_wlayout): a per-call
//           kernel moves the bytes (never splitting one) into CUTLASS's fragment order (nf4_fragment_atom), one 32-bit
//           load per 8 values, at the price of 1 B/weight more traffic per call (read + write of the packed weight)
//           and a workspace. QLORA_EXT_SM90_WLAYOUT=stored|repacked overrides.
//   Both decode with the same converter: in either layout byte i of a thread's word holds fragment values 2i, 2i+1.
//   SASS of this build (per consumer thread and k-tile, 32 weights): stored 16 LDS.U8 + 12 PRMT to assemble the words,
//   repacked 4 LDS.32; the k-tile loop is ~155 vs ~130 instructions at 128x256 (~137 vs ~124 at 128x128), of which the
//   decode is 64 PRMT + 16 HMUL2 in both. Whether the stored variant's extra ~20 % hides under the wgmmas is what the
//   probe measures.
//
// Workspace: the paths' shared scratch (stream_scratch, csrc/path_ops.h; counted by qlora_ext.workspace_bytes(), freed
// by qlora_ext.release_workspace()), one byte buffer per device for this path, grown to the largest layer seen:
// [scales [k/64][n] in x's dtype][repacked w, n*k/2 B (repacked only)][CUTLASS workspace].
//
// Files: this one holds the op, the scale and repack kernels and the launcher; the NF4 GEMM is
// qlora_fwd_sm90_gemm.cuh, one instance per unit under csrc/instantiations/ (qlora_fwd_sm90.h says why).
//
// Alignment (TMA: 16-byte base and row pitch of every tensor it reads or writes): k % 64 == 0 (the NF4 block; also makes
// w's rows 16-byte multiples), n % 8 == 0 (rows of y and of the scale tensor), n % 16 == 0 with repacked weights (the
// 16-row atom); x is copied when its base is not 16-byte aligned, w_nf4 must be. m, n, k fit int32; repacked: n*k < 2^31.
//
// Shared memory (StageCountAutoCarveout: as many mainloop stages as fit beside the epilogue's C and D buffers, 34816 B;
// one CTA per SM, 384 threads = 1 producer + 2 consumer warpgroups):
//   tile      bytes per stage: w 128x64/2 + x N'x64x2 + 128 scales x2     stages   SharedStorageSize
//   128x256   4096 + 32768 + 256 = 37120                                  5        221184
//   128x128   4096 + 16384 + 256 = 20736                                  9        222208
// Registers: the build log (-Xptxas=-v; the launch bound is 168, consumers raise theirs with setmaxnreg); 0 spills.
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/elem.cuh"
#include "common/nf4.cuh"
#include "common/nf4_sm90.cuh"
#include "common/nf4_tensors.h"
#include "path_ops.h"
#include "qlora_fwd_sm90.h"

namespace qlora_ext {
namespace {

using namespace sm90;

// ---- per-call scale decode: absmax (fp32, or double-quantized uint8) -> [k/64][n] in x's dtype ------------------
// The collective multiplies each decoded code by a scale of the 16-bit type, read by TMA as one [n] row per k-tile.
// Rounding: scale = dtype(nf4_block_scale), bnb's exact fp32 scale rounded to 16 bits, and the collective multiplies
// it by the 16-bit table entry (common/nf4_sm90.cuh): bf16(code) x bf16(scale) rounds twice where bnb rounds the fp32
// product once (up to ~1 ulp apart per weight), so the kernels' tests hold y to the ratio rule, not to bnb's bits.
// The decoder's table is compiled in (bnb's NF4 codebook): a `code` tensor that does not round to it would decode
// wrongly, so the kernel checks it and then writes NaN scales instead (y becomes NaN: loud, and no host sync).
// 32 rows x 32 blocks per CTA through shared memory: absmax is read along a row, the scales written along n.
// Grid: x = row tiles (2^31 - 1 of them allowed), y = block tiles (k up to 2^26).
constexpr int kScaleTile = 32;

template <typename T>  // __nv_bfloat16 or __half
__global__ void __launch_bounds__(kScaleTile * 8) nf4_scale_kernel(const __grid_constant__ QloraFwdSm90Params p) {
  __shared__ float tile[kScaleTile][kScaleTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kScaleTile + tx;
  const int64_t blocks_per_row = p.k / kNF4BlockSize;
  const int64_t row0 = int64_t(blockIdx.x) * kScaleTile, kb0 = int64_t(blockIdx.y) * kScaleTile;
  const bool code_ok = __syncthreads_and(
      tid >= 16 || Elem<T>::from_float(__ldg(p.w.code + tid)) == nf4_table_entry<typename CutlassHalf<T>::type>(tid));
#pragma unroll
  for (int i = 0; i < kScaleTile / 8; ++i) {
    const int r = ty + 8 * i;
    const int64_t row = row0 + r, kb = kb0 + tx;
    if (row < p.n && kb < blocks_per_row) tile[r][tx] = nf4_block_scale(p.w, row * blocks_per_row + kb);
  }
  __syncthreads();
  uint16_t* out = static_cast<uint16_t*>(p.w_scale);
#pragma unroll
  for (int i = 0; i < kScaleTile / 8; ++i) {
    const int c = ty + 8 * i;
    const int64_t row = row0 + tx, kb = kb0 + c;
    if (row < p.n && kb < blocks_per_row)
      out[kb * p.n + row] = Elem<T>::from_float(code_ok ? tile[tx][c] : __int_as_float(0x7FC00000));
  }
}

// ---- per-call repack (WLayout::kRepacked): bnb bytes -> the fragment-ordered layout the GEMM's TMA reads ------------
// The layout: repacked_w_layout (qlora_fwd_sm90.h), 16 x 16 atoms of one warp's wgmma fragments, 128 bytes each,
// atoms consecutive along n. One thread per atom: it loads the atom's 16 row pieces (8 bytes each), moves every
// byte to its fragment position in registers (compile-time positions: the loops unroll, the atom layout is static;
// bytes move whole, their nibble order is bnb's) and stores the atom's 128 bytes.
// Which thread takes which atom decides the speed. A CTA takes 32 n-atoms x 8 k-atoms, a warp 32 consecutive
// n-atoms of one k-atom: its stores fill 4 KB of consecutive destination, and the CTA's 8 warps read 64
// consecutive bytes of each source row (two full sectors; the next CTA along k reads the next 64). The previous order, consecutive threads along k,
// read perfectly but sent each warp's 32 stores 8·n bytes apart (a DRAM page each): 44 µs for 4096 x 14336 and
// 172 µs for 28672 x 8192 on the H200 (1.4 TB/s); the traffic floor is 29 + 29 MB, ~14 µs. The first version
// (bytes gathered through shared memory one at a time) took 65-86 µs.
constexpr int kRepackAtomsN = 32, kRepackAtomsK = 8;  // atoms per CTA: one warp per k-atom
constexpr int kRepackThreads = kRepackAtomsN * kRepackAtomsK;

__global__ void __launch_bounds__(kRepackThreads) nf4_repack_kernel(const __grid_constant__ QloraFwdSm90Params p) {
  const int64_t atom_n = int64_t(blockIdx.y) * kRepackAtomsN + threadIdx.x % kRepackAtomsN;
  const int64_t atom_k = int64_t(blockIdx.x) * kRepackAtomsK + threadIdx.x / kRepackAtomsN;
  if (atom_n >= p.n / 16 || atom_k >= p.k / 16) return;
  const int64_t row0 = atom_n * 16, k0 = atom_k * 16;
  uint2 in[16];  // row r of the atom: 16 k = 8 packed bytes
#pragma unroll
  for (int r = 0; r < 16; ++r) in[r] = *reinterpret_cast<const uint2*>(p.w.w_nf4 + ((row0 + r) * p.k + k0) / 2);
  uint32_t out[32] = {};
#pragma unroll
  for (int r = 0; r < 16; ++r) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {  // byte b of row r: elements 2b (high nibble) and 2b + 1
      const int dst = FragmentAtom{}(r, 2 * b) / 2;
      const uint32_t byte = ((b < 4 ? in[r].x : in[r].y) >> (8 * (b % 4))) & 0xFFu;
      out[dst / 4] |= byte << (8 * (dst % 4));
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(p.w_repacked + repacked_w_layout(p.n, p.k)(int(row0), int(k0), 0) / 2);
#pragma unroll
  for (int c = 0; c < 8; ++c) dst[c] = make_uint4(out[4 * c], out[4 * c + 1], out[4 * c + 2], out[4 * c + 3]);
}

// f(NF4GemmSm90<...>{}) for the instance serving (dtype, tile, weight layout): the 2 x 2 x 2 instances of
// csrc/instantiations/.
template <typename F>
void dispatch_gemm(at::ScalarType dtype, Sm90Tile tile, WLayout wlayout, F&& f) {
  dispatch_half(dtype, [&](auto tag) {
    using Half = typename CutlassHalf<decltype(tag)>::type;
    auto with_tile = [&](auto tile_tag) {
      constexpr Sm90Tile kTile = decltype(tile_tag)::value;
      if (wlayout == WLayout::kStored) f(NF4GemmSm90<Half, kTile, WLayout::kStored>{});
      else f(NF4GemmSm90<Half, kTile, WLayout::kRepacked>{});
    };
    if (tile == Sm90Tile::k128x256) with_tile(std::integral_constant<Sm90Tile, Sm90Tile::k128x256>{});
    else with_tile(std::integral_constant<Sm90Tile, Sm90Tile::k128x128>{});
  });
}

// ---- configuration -----------------------------------------------------------------------------------------------
// The one place the tile is chosen. First guess, before measurements of this kernel: 128x256 (the probe's fastest
// tile at m >= 2048), unless its tiles would leave SMs idle, then 128x128 (twice as many tiles). Override:
// QLORA_EXT_SM90_TILE=128x256|128x128 (read on every call, so a benchmark can switch it).
Sm90Tile pick_tile(int64_t m, int64_t n, int sm_count) {
  if (const char* env = std::getenv("QLORA_EXT_SM90_TILE"); env != nullptr && *env != '\0') {
    const std::string v(env);
    if (v == "128x256") return Sm90Tile::k128x256;
    if (v == "128x128") return Sm90Tile::k128x128;
    TORCH_CHECK(false, "qlora_linear: QLORA_EXT_SM90_TILE must be 128x256 or 128x128, got '", v, "'");
  }
  const int64_t wide_tiles = ceil_div(n, 128) * ceil_div(m, 256);
  return wide_tiles >= sm_count ? Sm90Tile::k128x256 : Sm90Tile::k128x128;
}

// Default: repacked where it can be (n % 16 == 0), else stored. The GEMM reads the repacked layout 6-20 % faster
// (H200 probe, 2026-12-01); the repack costs a read and a write of the packed weight per call, ~14 µs at the
// traffic floor for 4096 x 14336. QLORA_EXT_SM90_WLAYOUT=stored | repacked overrides (read on every call).
WLayout pick_wlayout(int64_t n) {
  const char* env = std::getenv("QLORA_EXT_SM90_WLAYOUT");
  if (env == nullptr || *env == '\0') return n % 16 == 0 ? WLayout::kRepacked : WLayout::kStored;
  if (std::string(env) == "stored") return WLayout::kStored;
  TORCH_CHECK(std::string(env) == "repacked", "qlora_linear: QLORA_EXT_SM90_WLAYOUT must be stored or repacked, got '",
              env, "'");
  return WLayout::kRepacked;
}

// ---- workspace -----------------------------------------------------------------------------------------------------
constexpr int64_t kCarveAlign = 256;  // every workspace region starts on a 256-byte boundary (TMA wants 16)

int64_t carve_bytes(int64_t bytes) { return ceil_div(bytes, kCarveAlign) * kCarveAlign; }

// ---- launcher --------------------------------------------------------------------------------------------------------
// The only launch site of this file's kernels: scale decode, repack (kRepacked), NF4 GEMM, in stream order.
void launch_qlora_fwd_sm90(const QloraFwdSm90Params& p, at::ScalarType dtype, const cutlass::KernelHardwareInfo& hw,
                           cudaStream_t stream) {
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kScaleTile)),
                    static_cast<unsigned>(ceil_div(p.k / kNF4BlockSize, kScaleTile)));
    nf4_scale_kernel<T><<<grid, dim3(kScaleTile, 8), 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (p.wlayout == WLayout::kRepacked) {
    // x along k (neighbouring CTAs share source lines), y along n: n * k < 2^31 and k >= 64 keep y < 2^16.
    const dim3 grid(static_cast<unsigned>(ceil_div(p.k / 16, kRepackAtomsK)),
                    static_cast<unsigned>(ceil_div(p.n / 16, kRepackAtomsN)));
    nf4_repack_kernel<<<grid, kRepackThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dispatch_gemm(dtype, p.tile, p.wlayout, [&](auto gemm) { decltype(gemm)::run(p, hw, stream); });
}

// Op qlora_ext::_sm90_fwd (schema: csrc/ops.cpp) -> (y [m, n], u [m, r]) in x's dtype; the contract of _fused_fwd.
// Device guard → checks → allocate → LoRA products (cuBLAS, into y) → Params → launch.
std::tuple<at::Tensor, at::Tensor> sm90_fwd(const at::Tensor& x, const OptionalTensorList& w, const at::Tensor& lora_A,
                                            const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                            double scaling, double dropout_p, int64_t seed) {
  constexpr const char* kOp = "qlora_linear";
  check_activation(kOp, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [m, n, k, r, has_bias, wt] = check_forward_args(kOp, x, w, lora_A, lora_B, bias, dropout_p);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, kOp, ": the sm90 path runs on compute capability 9.0 (H100/H200) "
              "only, this GPU is ", prop->major, ".", prop->minor);
  const WLayout wlayout = pick_wlayout(n);
  const int64_t n_multiple = wlayout == WLayout::kRepacked ? 16 : 8;
  TORCH_CHECK(n % n_multiple == 0, kOp, ": the sm90 path needs out_features n % ", n_multiple, " == 0 (TMA rows of ",
              wlayout == WLayout::kRepacked ? "the repacked weight" : "y", "), got n = ", n);
  constexpr int64_t kInt32Max = 2147483647;
  TORCH_CHECK(m <= kInt32Max && n <= kInt32Max && k <= kInt32Max, kOp, ": the sm90 path needs m, n, k < 2^31, got [m, n, k] = [",
              m, ", ", n, ", ", k, "]");
  TORCH_CHECK(wlayout != WLayout::kRepacked || n * k <= kInt32Max, kOp,
              ": repacked weights need n * k < 2^31 (32-bit layout offsets), got ", n * k);
  check_aligned(kOp, "w_nf4", wt.w_nf4, 16);

  if (m == 0) return {at::empty({m, n}, x.options()), at::empty({m, r}, x.options())};

  // LoRA products on cuBLAS. u in x's dtype (as the reference rounds it); y = s·u·lora_Bᵀ + bias rounded once, from
  // addmm's fp32 epilogue. Without bias a zero bias takes its place: beta stays 1, y is never read uninitialized.
  const at::Tensor x_drop = dropout_p > 0.0 ? lora_dropout(x, dropout_p, seed) : x;
  const at::Tensor u = at::mm(x_drop, lora_A.t());
  at::Tensor y = at::addmm(has_bias ? *bias : at::zeros({n}, x.options()), u, lora_B.t(), 1.0, scaling);
  if (!y.is_contiguous()) y = y.contiguous();

  const at::Tensor xa = aligned16(x.data_ptr()) ? x : x.clone();  // TMA: 16-byte aligned base
  const cutlass::KernelHardwareInfo hw{x.device().index(), prop->multiProcessorCount};

  // The workspace pointers are set below, once the sizes (which depend on the problem and the variant) are known.
  QloraFwdSm90Params p{.x = xa.data_ptr(), .w = wt.view(), .w_scale = nullptr, .w_repacked = nullptr,
                       .gemm_workspace = nullptr, .y = y.data_ptr(), .m = m, .n = n, .k = k,
                       .tile = pick_tile(m, n, prop->multiProcessorCount), .wlayout = wlayout};

  // Workspace: scales, repacked weight, CUTLASS's own (sizes from the problem only; pointers set after carving).
  const int64_t scale_bytes = carve_bytes(n * (k / kNF4BlockSize) * 2);
  const int64_t repack_bytes = wlayout == WLayout::kRepacked ? carve_bytes(n * k / 2) : 0;
  size_t gemm_bytes = 0;
  dispatch_gemm(x.scalar_type(), p.tile, p.wlayout, [&](auto gemm) { gemm_bytes = decltype(gemm)::workspace_bytes(p, hw); });
  const at::Tensor ws = stream_scratch(ScratchSlot::kSm90, scale_bytes + repack_bytes +
                                       carve_bytes(static_cast<int64_t>(gemm_bytes)), x.options().dtype(at::kByte));
  uint8_t* base = ws.data_ptr<uint8_t>();
  p.w_scale = base;
  p.w_repacked = wlayout == WLayout::kRepacked ? base + scale_bytes : nullptr;
  p.gemm_workspace = gemm_bytes > 0 ? base + scale_bytes + repack_bytes : nullptr;

  launch_qlora_fwd_sm90(p, x.scalar_type(), hw, c10::cuda::getCurrentCUDAStream());
  return {y, u};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_sm90_fwd", &qlora_ext::sm90_fwd); }
