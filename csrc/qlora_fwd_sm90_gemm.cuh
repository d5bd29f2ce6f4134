// The Hopper forward's NF4 GEMM (qlora_fwd_sm90.h declares it, qlora_fwd_sm90.cu runs it): y += x·wᵀ on CUTLASS 4.2's
// warp-specialized TMA + RS-wgmma mixed-input GEMM. Included only by the instance units under csrc/instantiations/,
// one (dtype, tile, weight layout) each; the design (transposed problem, cluster, variants, shared memory) is in the
// header comment of qlora_fwd_sm90.cu.
#pragma once

#include <atomic>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "qlora_fwd_sm90.h"

namespace qlora_ext::sm90 {

// The CUTLASS types of one instance.
template <typename Half, Sm90Tile kTile, WLayout kW>
struct NF4GemmSm90Types {
  using TileShape = cute::conditional_t<kTile == Sm90Tile::k128x256, cute::Shape<cute::_128, cute::_256, cute::_64>,
                                        cute::Shape<cute::_128, cute::_128, cute::_64>>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  // A' = w [n, k] K-major (a RowMajor tag, or the repacked cute layout); B' = x [m, k] K-major (ColumnMajor K x m);
  // C' = D' = [n, m] column-major = y [m, n] row-major.
  using LayoutW = cute::conditional_t<kW == WLayout::kStored, cutlass::layout::RowMajor, RepackedWLayout>;
  using LayoutX = cutlass::layout::ColumnMajor;
  using LayoutY = cutlass::layout::ColumnMajor;
  static constexpr int kAlignW = 32, kAlignX = 8, kAlignY = 8;  // elements in 16 bytes: TMA's minimum

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,  // accumulator, epilogue compute
      Half, LayoutY, kAlignY,                                          // C = y as cuBLAS left it
      Half, LayoutY, kAlignY,                                          // D = y
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<nf4_t, Half>, LayoutW, kAlignW,  // A' = NF4 codes + one Half scale per 64 k (ConvertAndScale)
      Half, LayoutX, kAlignX,                      // B' = x
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const QloraFwdSm90Params& p, const cutlass::KernelHardwareInfo& hw) {
    const int m = int(p.m), n = int(p.n), k = int(p.k);
    typename Mainloop::StrideA stride_w{};
    if constexpr (kW == WLayout::kStored) {
      stride_w = cutlass::make_cute_packed_stride(typename Mainloop::StrideA{}, cute::make_shape(n, k, 1));
    } else {
      stride_w = repacked_w_layout(n, k);
    }
    const auto stride_x = cutlass::make_cute_packed_stride(typename Mainloop::StrideB{}, cute::make_shape(m, k, 1));
    const auto stride_scale = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                                               cute::make_shape(n, k / kNF4BlockSize, 1));
    const auto stride_y = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(n, m, 1));
    const uint8_t* w_bytes = kW == WLayout::kStored ? p.w.w_nf4 : p.w_repacked;
    Half* y = static_cast<Half*>(p.y);
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {reinterpret_cast<const nf4_t*>(w_bytes), stride_w, static_cast<const Half*>(p.x), stride_x,
         static_cast<const Half*>(p.w_scale), stride_scale, kNF4BlockSize},
        {{1.0f, 1.0f}, y, stride_y, y, stride_y},  // D = 1·acc + 1·C, in place (qlora_fwd_sm90.cu says why it is safe)
        hw};
  }
};

template <typename Half, Sm90Tile kTile, WLayout kW>
size_t NF4GemmSm90<Half, kTile, kW>::workspace_bytes(const QloraFwdSm90Params& p,
                                                     const cutlass::KernelHardwareInfo& hw) {
  using Types = NF4GemmSm90Types<Half, kTile, kW>;
  return Types::Gemm::get_workspace_size(Types::arguments(p, hw));
}

template <typename Half, Sm90Tile kTile, WLayout kW>
void NF4GemmSm90<Half, kTile, kW>::run(const QloraFwdSm90Params& p, const cutlass::KernelHardwareInfo& hw,
                                       cudaStream_t stream) {
  using Types = NF4GemmSm90Types<Half, kTile, kW>;
  using Kernel = typename Types::Kernel;
  typename Types::Gemm::Arguments args = Types::arguments(p, hw);
  TORCH_CHECK(Types::Gemm::can_implement(args) == cutlass::Status::kSuccess,
              "qlora_linear: the sm90 NF4 GEMM cannot run [m, n, k] = [", p.m, ", ", p.n, ", ", p.k,
              "] (CUTLASS can_implement failed: TMA alignment)");
  TORCH_CHECK(Kernel::initialize_workspace(args, p.gemm_workspace, stream) == cutlass::Status::kSuccess,
              "qlora_linear: CUTLASS could not initialize the sm90 GEMM workspace");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, p.gemm_workspace);
  // The dynamic shared memory opt-in is a per-device attribute of the function: set it once per device.
  static std::atomic<uint64_t> devices_done{0};
  const uint64_t bit = uint64_t(1) << (hw.device_id & 63);
  if ((devices_done.load() & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(Kernel::SharedStorageSize)));
    devices_done.fetch_or(bit);
  }
  const cutlass::Status status = Types::Gemm::run(params, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(status == cutlass::Status::kSuccess, "qlora_linear: the sm90 NF4 GEMM failed to launch (",
              cutlass::cutlassGetStatusString(status), ")");
}

}  // namespace qlora_ext::sm90
