// What the Hopper forward's units share (sm_90a only): the host → device contract, the repacked weight layout, and
// the entry points of the NF4 GEMM instances.
//   qlora_fwd_sm90.cu                        the op, the scale-decode and repack kernels, the launcher
//   qlora_fwd_sm90_gemm.cuh                  the NF4 GEMM on CUTLASS's sm90 mixed-input mainloop (NF4GemmSm90)
//   instantiations/nf4_gemm_*_sm90.cu        one GEMM instance (dtype x tile x weight layout) per unit
// Why the instances have units of their own: a CUTLASS sm90 kernel takes ~25 s of nvcc; the eight in one unit made it
// the build's long pole (3.5 min of a 9.0a build on 16 cores), one per unit compile side by side.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/kernel_hardware_info.h>

#include "common/nf4.cuh"
#include "common/nf4_sm90.cuh"

namespace qlora_ext::sm90 {

enum class Sm90Tile : int { k128x256, k128x128 };
enum class WLayout : int { kStored, kRepacked };

// The whole host → device contract of the forward's kernels (scale decode, repack, NF4 GEMM).
struct QloraFwdSm90Params {
  const void* x;           // [m, k] row-major, x's dtype, 16-byte aligned
  NF4View w;               // frozen weight [n, k]: packed nibbles (bnb order) + block scales (common/nf4.cuh)
  void* w_scale;           // [k/64, n] workspace: block scales in x's dtype, n contiguous (the collective's MN-major)
  uint8_t* w_repacked;     // [n*k/2] workspace: w's bytes in fragment order (WLayout::kRepacked), else nullptr
  void* gemm_workspace;    // CUTLASS's workspace (tile scheduler); nullptr when it needs none
  void* y;                 // [m, n] row-major: s·u·lora_Bᵀ + bias on entry, + x·wᵀ on exit (C = D)
  int64_t m, n, k;
  Sm90Tile tile;           // GEMM tile (pick_tile)
  WLayout wlayout;         // how the GEMM reads w (env QLORA_EXT_SM90_WLAYOUT)
};

template <typename T>
struct CutlassHalf;  // the CUTLASS twin of a CUDA 16-bit type
template <>
struct CutlassHalf<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassHalf<__half> {
  using type = cutlass::half_t;
};

// The repacked weight: nf4_fragment_atom() (16 rows x 16 k = 128 bytes, one warp's wgmma fragments) tiled over
// [n, k] by cute::tile_to_shape. Written by the repack kernel, read by the GEMM's TMA.
using FragmentAtom = decltype(nf4_fragment_atom<cutlass::bfloat16_t>());
static_assert(cute::is_same_v<FragmentAtom, decltype(nf4_fragment_atom<cutlass::half_t>())>,
              "bf16 and fp16 wgmma fragments have the same thread-value layout");
static_assert(cute::size(FragmentAtom{}) == 256, "the repack moves 16 x 16 atoms");
using RepackedWLayout = decltype(cute::tile_to_shape(FragmentAtom{}, cute::make_shape(int{}, int{}, int{})));

__host__ __device__ inline RepackedWLayout repacked_w_layout(int64_t n, int64_t k) {
  return cute::tile_to_shape(FragmentAtom{}, cute::make_shape(int(n), int(k), 1));
}

// One NF4 GEMM instance (Half = cutlass::bfloat16_t or cutlass::half_t): y += x·wᵀ with y as C and D. Defined in
// qlora_fwd_sm90_gemm.cuh, explicitly instantiated under csrc/instantiations/.
template <typename Half, Sm90Tile kTile, WLayout kW>
struct NF4GemmSm90 {
  static size_t workspace_bytes(const QloraFwdSm90Params& p, const cutlass::KernelHardwareInfo& hw);
  static void run(const QloraFwdSm90Params& p, const cutlass::KernelHardwareInfo& hw, cudaStream_t stream);
};

}  // namespace qlora_ext::sm90
