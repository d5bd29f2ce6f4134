// Shared tile machinery and mainloop of the two NF4-decoding GEMMs (Ampere-style path: cp.async + ldmatrix +
// mma.sync, sm80+; also what runs on sm86/89/90):
//   qlora_fwd    y  = x·wᵀ  (+ LoRA)   W tile stored [n][k]: the MMA B operand as is        (BLayout::kNK)
//   qlora_bwd_dx dx = dy·w  (+ LoRA)   W tile stored [n][k]: read transposed by ldmatrix.trans (BLayout::kKN)
// Both decode packed NF4 from shared memory into a bf16/fp16 tile (never to global), then feed ldmatrix →
// mma.sync. A CTA is 8 warps in a 2 (M) x 4 (N) grid; each warp owns a 64x32 fp32 accumulator tile
// (4 m16 x 4 n8 MMA tiles). All shared tiles are row-major with 8 elements (16 B) of padding per row: the row
// pitch is then an odd number of 16-byte units, so the 8 rows an ldmatrix phase (or a 128-bit store phase)
// touches fall in 8 different bank groups — conflict-free without a swizzle.
// The k-loop itself (cp.async ring, one-step-ahead decode, barriers) is NF4Mainloop below; each kernel
// supplies only its dense tiles, its W tile origin, its MMAs and its epilogue.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dropout.cuh"
#include "common/elem.cuh"
#include "common/mma_sm80.cuh"
#include "common/nf4.cuh"

namespace qlora_ext {

// ---- CTA geometry (shared by both kernels) -------------------------------------------------------------
constexpr int kThreads = 256;          // 8 warps: enough MMA issue per SM at 1 CTA/SM, 256 threads = one
                                       // 16-byte packed-W chunk per thread per stage (see decode below)
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kBlockM = 128;           // CTA rows (m)
constexpr int kBlockN = 128;           // CTA output columns (n for forward, k for dx)
constexpr int kWarpM = kBlockM / kWarpsM;  // 64 rows per warp  = 4 m16 tiles
constexpr int kWarpN = kBlockN / kWarpsN;  // 32 cols per warp  = 4 n8 tiles
constexpr int kMmaM = kWarpM / 16;
constexpr int kMmaN = kWarpN / 8;
constexpr int kTileK = 64;             // reduction step per stage = NF4 blocksize
constexpr int kPad = 8;                // elements of row padding (16 B) in every shared tile
constexpr int kMaxStages = 4;          // cp.async ring depth when shared memory allows it
constexpr int kPackedStageBytes = 4096;  // packed W per stage: 128x64 or 64x128 nibbles = 256 threads x 16 B
static_assert(kWarpsM * kWarpsN * 32 == kThreads, "warp grid must cover the CTA");
static_assert(kPackedStageBytes == kThreads * 16, "one 16-byte packed chunk per thread per stage");

using Acc = float[kMmaM][kMmaN][4];    // per-warp accumulator tile, mma D-fragment order

// The part of the forward and dx kernels' Params they share (each kernel's Params derives from it and adds its
// activations and outputs): the frozen weight, the adapters, the sizes and the pipeline the launcher picked.
struct NF4GemmParamsBase {
  NF4View w;               // frozen weight [n, k]: packed nibbles + block scales (common/nf4.cuh)
  const uint16_t* lora_A;  // [r, k] row-major, 16-byte aligned
  const uint16_t* lora_B;  // [n, r] row-major
  int64_t m, n, k;
  int r;
  float scaling;           // s = lora_alpha / r (rsLoRA: / sqrt(r))
  DropoutParams dropout;   // the mask on x: applied to x in the forward, regenerated from (seed, row*k + col) in dx
  bool lora_B_async;       // r % 8 == 0 and lora_B 16-byte aligned: rows can be cp.async'd
  int stages;              // cp.async ring depth (2..4), chosen by the launcher from the device's smem
  int wdec_buffers;        // decoded-W buffers: 2 (decode overlaps the MMAs) or 1 (small-smem fallback)
};

// ---- ldmatrix lane addressing (byte offsets into a padded row-major tile of 2-byte elements) ---------------
// A operand, m16 x k16 at (row0, 0): lanes 0-15 point at rows 0-15 col 0, lanes 16-31 at rows 0-15 col 8,
// so registers 0..3 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
// = a[0..3] of mma.m16n8k16.
__device__ __forceinline__ int ldsm_a_offset(int row0, int lane, int stride) {
  return ((row0 + (lane & 15)) * stride + (lane >> 4) * 8) * 2;
}
// B operand from a tile stored [n][k] (k contiguous), two n8 tiles x k16 at (n0, 0): matrices are
// (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = {b0, b1} of n-tile 0, then n-tile 1.
__device__ __forceinline__ int ldsm_b_nk_offset(int n0, int lane, int stride) {
  return ((n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8) * 2;
}
// B operand from a tile stored [k][n] (n contiguous), read with .trans, k16 x two n8 tiles at (0, n0):
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) = same register order as above.
__device__ __forceinline__ int ldsm_b_kn_offset(int n0, int lane, int stride) {
  return (((lane & 7) + (((lane >> 3) & 1) << 3)) * stride + n0 + ((lane >> 4) << 3)) * 2;
}

enum class BLayout { kNK, kKN };  // how the B operand's shared tile is stored: [n][k] or [k][n]

// Byte step inside a B tile for k16 step kk and n16 pair jp.
template <BLayout kB, int kStride>
__device__ __forceinline__ constexpr int b_step(int kk, int jp) {
  return kB == BLayout::kNK ? (jp * 16 * kStride + kk * 16) * 2 : (kk * 16 * kStride + jp * 16) * 2;
}

template <BLayout kB>
__device__ __forceinline__ void ldsm_b(uint32_t (&b)[4], uint32_t addr) {
  if constexpr (kB == BLayout::kNK) ldsm_x4(b, addr);
  else ldsm_x4_trans(b, addr);
}

// ---- warp-level MMA steps ---------------------------------------------------------------------------------
// acc += A[64 warp rows][k16 step kk] · B[k16 step kk][32 warp cols]. a_base/b_base already include the
// warp's tile origin and the lane offset from the ldsm_*_offset helpers above.
template <typename T, BLayout kB, int kAStride, int kBStride>
__device__ __forceinline__ void warp_mma_k16(Acc& acc, uint32_t a_base, uint32_t b_base, int kk) {
  uint32_t a[kMmaM][4];
  uint32_t b[kMmaN / 2][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i) ldsm_x4(a[i], a_base + (i * 16 * kAStride + kk * 16) * 2);
#pragma unroll
  for (int jp = 0; jp < kMmaN / 2; ++jp) ldsm_b<kB>(b[jp], b_base + b_step<kB, kBStride>(kk, jp));
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j)
      mma_m16n8k16<T>(acc[i][j], a[i], b[j >> 1][(j & 1) * 2], b[j >> 1][(j & 1) * 2 + 1]);
}

// Zero the warp's base-GEMM accumulator and its rank-wide LoRA accumulator (u or g) before the mainloop.
template <int kN8>
__device__ __forceinline__ void zero_accumulators(Acc& acc, float (&acc_r)[kN8][4]) {
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < kN8; ++j) acc_r[j][0] = acc_r[j][1] = acc_r[j][2] = acc_r[j][3] = 0.f;
}

// One m16 A fragment against kN8 n8 tiles of B: acc[jn] += a · B[k16 step kk][8 jn .. 8 jn + 7].
template <typename T, BLayout kB, int kN8, int kBStride>
__device__ __forceinline__ void warp_mma_a_k16(float (&acc)[kN8][4], const uint32_t (&a)[4], uint32_t b_base,
                                               int kk) {
#pragma unroll
  for (int jp = 0; jp < kN8 / 2; ++jp) {
    uint32_t b[4];
    ldsm_b<kB>(b, b_base + b_step<kB, kBStride>(kk, jp));
    mma_m16n8k16<T>(acc[2 * jp], a, b[0], b[1]);
    mma_m16n8k16<T>(acc[2 * jp + 1], a, b[2], b[3]);
  }
}

// Rank-wide product of one m16 A fragment over all kRPad/8 n8 tiles: the LoRA shrink (u, g) riding on A fragments
// the main GEMM already staged.
template <typename T, BLayout kB, int kRPad, int kBStride>
__device__ __forceinline__ void warp_mma_rank_k16(float (&acc_r)[kRPad / 8][4], const uint32_t (&a)[4],
                                                  uint32_t b_base, int kk) {
  warp_mma_a_k16<T, kB, kRPad / 8, kBStride>(acc_r, a, b_base, kk);
}

// LoRA expand for one m16 tile i of the warp: out[j] = L[16 rows][kRPad] · R[kRPad][8j..8j+7] over the
// warp's 4 n8 tiles (L = u or g in shared memory, R = lora_B or lora_A tile). Fresh fp32 sums, so the caller
// can scale or mask the LoRA term separately from the base GEMM.
template <typename T, BLayout kB, int kRPad, int kAStride, int kBStride>
__device__ __forceinline__ void warp_lora_expand(float (&out)[kMmaN][4], uint32_t a_base, uint32_t b_base,
                                                 int i) {
#pragma unroll
  for (int j = 0; j < kMmaN; ++j) out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kRPad / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, a_base + (i * 16 * kAStride + kk * 16) * 2);
    warp_mma_a_k16<T, kB, kMmaN, kBStride>(out, a, b_base, kk);
  }
}

// Dropout applied to an A-fragment register (two adjacent columns of one row; idx = row*k + col of the low
// one): keep ? out_dtype(fp32(x) * fp32(1/(1-p))) : 0, the rounding of reference.dropout.
template <typename T>
__device__ __forceinline__ uint32_t dropout_pair(uint32_t v, uint64_t idx, const DropoutParams& d) {
  const float2 f = Elem<T>::unpack2(v);
  const float lo = d.keep(idx) ? __fmul_rn(f.x, d.inv_keep) : 0.f;
  const float hi = d.keep(idx + 1) ? __fmul_rn(f.y, d.inv_keep) : 0.f;
  return Elem<T>::pack2(lo, hi);
}

// Round a warp's rank-wide accumulators (one m16 tile x kRPad) times `mul` to T and store them into a
// padded [rows][kRPad + kPad] shared tile at row0 (C-fragment positions: rows g, g+8; cols 8 jn + 2t).
template <typename T, int kRPad>
__device__ __forceinline__ void store_rank_acc(const float (&acc_r)[kRPad / 8][4], float mul, uint16_t* tile,
                                               int row0, int lane) {
  constexpr int kStride = kRPad + kPad;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int jn = 0; jn < kRPad / 8; ++jn) {
    uint16_t* p = tile + (row0 + g) * kStride + jn * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(p) = Elem<T>::pack2(acc_r[jn][0] * mul, acc_r[jn][1] * mul);
    *reinterpret_cast<uint32_t*>(p + 8 * kStride) = Elem<T>::pack2(acc_r[jn][2] * mul, acc_r[jn][3] * mul);
  }
}

// Copy the CTA's [kBlockM][kRPad] rank tile (u or g) from shared memory to global out [m, r]; r may be odd,
// so element stores (this runs once per CTA row, on one CTA column only).
template <int kRPad>
__device__ __forceinline__ void write_rank_tile(uint16_t* out, const uint16_t* tile, int64_t m0, int64_t m, int r,
                                                int tid) {
  constexpr int kStride = kRPad + kPad;
  const int rows = static_cast<int>(m - m0 < kBlockM ? m - m0 : kBlockM);
  for (int e = tid; e < rows * r; e += kThreads) {
    const int row = e / r, col = e - row * r;
    out[(m0 + row) * r + col] = tile[row * kStride + col];
  }
}

// ---- global -> shared tile loaders ------------------------------------------------------------------------
// [kRows][kCols] tile of a row-major matrix of 2-byte elements (leading dimension ld) whose (0, 0) element is
// `origin` (always a valid element: it doubles as the dummy source of zero-fill copies). Rows >= rows_valid
// and columns >= cols_valid land as zeros. Async path: 16-byte cp.async, needs ld % 8 == 0, cols_valid % 8 == 0
// and a 16-byte-aligned origin.
template <int kRows, int kCols>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const uint16_t* origin, int64_t ld,
                                                int64_t rows_valid, int64_t cols_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kStride = kCols + kPad;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + tid;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = row < rows_valid && col < cols_valid;
      const uint16_t* src = valid ? origin + row * ld + col : origin;
      cp_async_16(smem_addr(tile + row * kStride + col), src, valid);
    }
  }
}

// Same tile through registers, one element per access: the fallback when the global rows are not 16-byte
// aligned (dy with n % 8 != 0, lora_B with r % 8 != 0). Plain st.shared: visible after the next barrier.
template <int kRows, int kCols>
__device__ __forceinline__ void load_tile_sync(uint16_t* tile, const uint16_t* origin, int64_t ld,
                                               int64_t rows_valid, int64_t cols_valid, int tid) {
  constexpr int kStride = kCols + kPad;
#pragma unroll 1
  for (int e = tid; e < kRows * kCols; e += kThreads) {
    const int row = e / kCols, col = e % kCols;
    tile[row * kStride + col] = (row < rows_valid && col < cols_valid) ? __ldg(origin + row * ld + col)
                                                                        : uint16_t(0);
  }
}

// ---- NF4 decode into shared memory ------------------------------------------------------------------------
// A packed W tile covers kWRows rows x kWCols columns of w [n, k] (kWCols = 64 forward, 128 dx), i.e.
// kWCols/64 whole NF4 blocks per row since k % 64 == 0. Thread tid owns one 16-byte chunk = 32 consecutive
// elements = half a block: row tid / kParts, part tid % kParts. It both cp.asyncs and decodes that chunk, so
// the packed bytes need no barrier — only the thread's own cp.async.wait_group.
template <int kWRows, int kWCols>
struct NF4TileDecoder {
  static constexpr int kParts = kWCols / 32;  // 16-byte chunks per W row
  static constexpr int kStride = kWCols + kPad;
  static_assert(kWRows * kParts == kThreads, "one packed chunk per thread");

  int row;          // row inside the tile
  int part;         // 32-element chunk inside the row
  int64_t k;        // columns of w

  __device__ __forceinline__ NF4TileDecoder(int tid, int64_t k_) : row(tid / kParts), part(tid % kParts), k(k_) {}

  // Issue the cp.async of this thread's chunk of the tile whose top-left element is (w_row0, w_col0).
  // Out-of-range rows/cols read as zero bytes (decoded with scale 0 below, so they stay finite).
  __device__ __forceinline__ void load(uint8_t* packed_stage, const NF4View& w, int64_t w_row0, int64_t w_col0,
                                       int64_t n, int tid) const {
    const int64_t r = w_row0 + row, c = w_col0 + part * 32;
    const bool valid = r < n && c < k;
    const uint8_t* src = valid ? w.w_nf4 + ((r * k + c) >> 1) : w.w_nf4;  // (r*k + c) even: c % 32 == 0
    cp_async_16(smem_addr(packed_stage + tid * 16), src, valid);
  }

  // Scale of the block this thread's chunk belongs to (0 outside the weight). Issued early by the caller so
  // the absmax / nested loads overlap with the MMAs of the current stage.
  __device__ __forceinline__ float scale(const NF4View& w, int64_t w_row0, int64_t w_col0, int64_t n) const {
    const int64_t r = w_row0 + row, c = w_col0 + part * 32;
    if (r >= n || c >= k) return 0.f;
    return nf4_block_scale(w, r * (k / kNF4BlockSize) + c / kNF4BlockSize);
  }

  // Decode the chunk: w = out_dtype(fp32(code[nibble] * scale)), bit-exact with bnb (no FMA: __fmul_rn, and
  // the bf16/fp16 conversion rounds to nearest even). Byte j holds element 2j in its high nibble, so byte j
  // becomes exactly output word j (element 2j in the low half). For 128-column tiles (dx) the 4 x 16-byte
  // stores of parts 2, 3 go in rotated order (q ^ 2), so the 8 lanes of a store phase — two rows x 4 parts —
  // never hit one bank group twice (chunks c and c + 8 of a row share a bank group).
  template <typename T>
  __device__ __forceinline__ void decode(uint16_t* wdec, const uint8_t* packed_stage, const float* code_s,
                                         float s, int tid) const {
    const uint4 packed = *reinterpret_cast<const uint4*>(packed_stage + tid * 16);
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    uint32_t out[16];
#pragma unroll
    for (int wi = 0; wi < 4; ++wi)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[wi] >> (8 * b)) & 0xFFu;
        const float even = __fmul_rn(code_s[byte >> 4], s);   // element 2j: high nibble
        const float odd = __fmul_rn(code_s[byte & 0xFu], s);   // element 2j+1: low nibble
        out[wi * 4 + b] = Elem<T>::pack2(even, odd);
      }
    uint16_t* dst = wdec + row * kStride + part * 32;
    // Rotation by 2 = q ^ 2; selecting between two compile-time indices keeps out[] in registers.
    const bool rotate = kParts > 2 && (part & 2) != 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 a = make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
      const int q2 = q ^ 2;
      const uint4 b = make_uint4(out[4 * q2], out[4 * q2 + 1], out[4 * q2 + 2], out[4 * q2 + 3]);
      *reinterpret_cast<uint4*>(dst + (rotate ? q2 : q) * 8) = rotate ? b : a;
    }
  }
};

// ---- the mainloop ---------------------------------------------------------------------------------------
// Shared-memory carve and tile shapes of one NF4 GEMM kernel instance (kernel traits). A kernel derives its own
// traits from this and adds its dense-tile offsets and epilogue layout. kDenseStageBytes: the kernel's dense
// tiles of one ring slot (A operand rows + one LoRA factor); the packed W chunk follows them in the slot.
//   smem = [code table][decoded W x wdec_buffers][ring: stages x (dense tiles | packed W)]
// The epilogue reuses everything after the code table.
template <int kRPad_, BLayout kB_, int kWRows_, int kWCols_, int kDenseStageBytes>
struct NF4GemmTraits {
  static constexpr int kRPad = kRPad_;              // r rounded up to the rank bucket
  static constexpr BLayout kB = kB_;                // how the decoded W tile is read as the MMA B operand
  static constexpr int kWRows = kWRows_;            // W tile: rows of w ...
  static constexpr int kWCols = kWCols_;            // ... x columns of w
  static constexpr int kWStride = kWCols + kPad;    // decoded-W row pitch (elements)
  static constexpr int kRStride = kRPad + kPad;     // row pitch of the rank-wide tiles (u / g, lora_B rows)
  static constexpr int kCodeBytes = 128;            // 16 fp32 codebook entries, padded
  static constexpr int kWdecBytes = kWRows * kWStride * 2;
  static constexpr int kPackedOffset = kDenseStageBytes;
  static constexpr int kStageBytes = kDenseStageBytes + kPackedStageBytes;
  static_assert(kDenseStageBytes % 16 == 0, "packed W chunks must stay 16-byte aligned");
};

// Top-left element (row of w, column of w) of one reduction step's W tile.
struct WTileOrigin {
  int64_t row, col;
};

// The pipeline both NF4 GEMMs run. Reduction step kt lives in ring slot kt % stages; its packed W is decoded
// into decoded-W buffer kt % 2 one step ahead of the MMAs that read it, so one barrier per step suffices:
//   prologue  steps 0 .. stages-2 in flight (one commit group each, empty past the end); decode step 0
//   step kt   barrier (step kt visible everywhere, step kt-1 fully consumed) -> scale of step kt+1 (its
//             absmax/nested loads overlap the MMAs) -> fetch step kt+stages-1 into step kt-1's slot ->
//             MMAs of step kt -> wait for step kt+1's group -> decode step kt+1
// So the packed W is prefetched stages-2 steps beyond the decode point, the dense tiles stages-1 beyond the
// MMAs. With a single decoded-W buffer (small-smem fallback) every warp must also be done reading it before
// the decode: one extra barrier per step. Each thread decodes exactly the 16 packed bytes it cp.async'd, so
// the packed W needs only that thread's own wait_group, never a barrier.
template <typename Traits>
struct NF4Mainloop {
  using Decoder = NF4TileDecoder<Traits::kWRows, Traits::kWCols>;

  float* code_s;      // [16] NF4 codebook
  uint16_t* wdec;     // [wdec_buffers][kWRows][kWStride] decoded W
  uint8_t* ring;      // [stages][kStageBytes]
  int stages;         // cp.async ring depth (2..4), chosen by the launcher
  bool double_wdec;   // 2 decoded-W buffers (else 1)
  int num_steps;      // reduction steps of kTileK
  Decoder dec;

  __device__ __forceinline__ NF4Mainloop(uint8_t* smem, int stages_, int wdec_buffers, int num_steps_, int64_t k,
                                         int tid)
      : code_s(reinterpret_cast<float*>(smem)),
        wdec(reinterpret_cast<uint16_t*>(smem + Traits::kCodeBytes)),
        ring(smem + Traits::kCodeBytes + wdec_buffers * Traits::kWdecBytes),
        stages(stages_),
        double_wdec(wdec_buffers == 2),
        num_steps(num_steps_),
        dec(tid, k) {}

  __device__ __forceinline__ uint8_t* stage(int s) const { return ring + s * Traits::kStageBytes; }
  __device__ __forceinline__ uint8_t* packed(int s) const { return stage(s) + Traits::kPackedOffset; }
  __device__ __forceinline__ uint16_t* wdec_buf(int kt) const {
    return wdec + (double_wdec ? kt & 1 : 0) * (Traits::kWRows * Traits::kWStride);
  }
  // Free for the epilogue once rank_epilogue has drained the ring.
  __device__ __forceinline__ uint8_t* epilogue_smem() const {
    return reinterpret_cast<uint8_t*>(code_s) + Traits::kCodeBytes;
  }

  // The whole reduction. The kernel supplies
  //   fetch_dense(stage, kt)      issue step kt's dense tiles into `stage` (cp.async, or st.shared fallback)
  //   w_origin(kt) -> WTileOrigin  where step kt's W tile starts in w [n, k]
  //   compute(stage, wdec, kt)    the MMAs of step kt on its dense tiles and decoded W
  template <typename T, typename FetchDense, typename WOriginFn, typename Compute>
  __device__ __forceinline__ void run(const NF4View& w, int64_t n, int tid, FetchDense&& fetch_dense,
                                      WOriginFn&& w_origin, Compute&& compute) const {
    // Rows >= n and columns >= k of a W tile arrive as zero bytes with scale 0, so the padded tail of the
    // reduction contributes exactly 0 (the dense tiles zero-fill their own tails).
    auto fetch = [&](int s, int kt) {
      fetch_dense(stage(s), kt);
      const WTileOrigin o = w_origin(kt);
      dec.load(packed(s), w, o.row, o.col, n, tid);
    };
    auto scale = [&](int kt) {
      const WTileOrigin o = w_origin(kt);
      return dec.scale(w, o.row, o.col, n);
    };

    if (tid < 16) code_s[tid] = w.code[tid];

    // Prologue.
    for (int s = 0; s < stages - 1; ++s) {
      if (s < num_steps) fetch(s, s);
      cp_async_commit();
    }
    const float scale0 = scale(0);
    cp_async_wait_dyn(stages - 2);  // own group 0 landed (the packed chunk this thread decodes)
    __syncthreads();                // code_s
    dec.template decode<T>(wdec_buf(0), packed(0), code_s, scale0, tid);

    int slot = 0;  // ring slot of step kt
    for (int kt = 0; kt < num_steps; ++kt) {
      __syncthreads();
      const int next_slot = slot + 1 == stages ? 0 : slot + 1;
      const float next_scale = kt + 1 < num_steps ? scale(kt + 1) : 0.f;
      {
        const int fetch_kt = kt + stages - 1;  // goes to the slot step kt-1 used
        if (fetch_kt < num_steps) fetch(slot == 0 ? stages - 1 : slot - 1, fetch_kt);
        cp_async_commit();
      }
      compute(stage(slot), wdec_buf(kt), kt);
      cp_async_wait_dyn(stages - 2);
      if (kt + 1 < num_steps) {
        if (!double_wdec) __syncthreads();  // single buffer: every warp is done reading it
        dec.template decode<T>(wdec_buf(kt + 1), packed(next_slot), code_s, next_scale, tid);
      }
      slot = next_slot;
    }
  }

  // Epilogue shell: drain the ring (after this every warp is past the mainloop, so epilogue_smem() is free),
  // round the warp's rank accumulators times `mul` into rank_s (u or g, in the activation dtype as the reference
  // rounds them), stage the second LoRA factor with load_factor() (which waits for its own copies), publish
  // both, and let the CTAs of grid column 0 write the rank tile to rank_out [m, r].
  template <typename T, int kRPad, typename LoadFactor>
  __device__ __forceinline__ void rank_epilogue(const float (&acc_r)[kRPad / 8][4], float mul, uint16_t* rank_s,
                                                int rank_row0, LoadFactor&& load_factor, uint16_t* rank_out,
                                                int64_t m0, int64_t m, int r, int tid) const {
    cp_async_wait<0>();
    __syncthreads();
    store_rank_acc<T, kRPad>(acc_r, mul, rank_s, rank_row0, tid & 31);
    load_factor();
    __syncthreads();
    if (blockIdx.x == 0) write_rank_tile<kRPad>(rank_out, rank_s, m0, m, r, tid);
  }
};

}  // namespace qlora_ext

// ---- host helpers ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common/dispatch.h"

namespace qlora_ext {

// Pipeline shape for one kernel instance: the deepest cp.async ring (<= kMaxStages) with a double-buffered
// decoded-W tile that fits the device's opt-in shared memory; failing that (99 KB parts, sm86/89, at r > 64)
// a single decoded-W buffer with two stages, which costs one extra barrier per step. stages == 0: nothing fits.
struct PipelineConfig {
  int stages;
  int wdec_buffers;
  int64_t smem_bytes;
};

inline PipelineConfig pick_pipeline(int64_t code_bytes, int64_t wdec_bytes, int64_t stage_bytes,
                                    int64_t epilogue_bytes, int64_t limit) {
  auto bytes = [&](int stages, int bufs) {
    return std::max(code_bytes + bufs * wdec_bytes + stages * stage_bytes, epilogue_bytes);
  };
  for (int s = kMaxStages; s >= 2; --s)
    if (bytes(s, 2) <= limit) return {s, 2, bytes(s, 2)};
  if (bytes(2, 1) <= limit) return {2, 1, bytes(2, 1)};
  return {0, 0, bytes(2, 1)};
}

// The pipeline for kernel traits L on a device with `smem_limit` bytes of opt-in shared memory per block;
// raises (naming op and r) when even the smallest does not fit.
template <typename L>
PipelineConfig pick_pipeline_for(const char* op, int r, int64_t smem_limit) {
  const PipelineConfig cfg =
      pick_pipeline(L::kCodeBytes, L::kWdecBytes, L::kStageBytes, L::kEpilogueBytes, smem_limit);
  TORCH_CHECK(cfg.stages >= 2, op, ": rank r = ", r, " needs ", cfg.smem_bytes,
              " bytes of shared memory per block, this device allows ", smem_limit);
  return cfg;
}

// The shared Params fields from the checked arguments (stages / wdec_buffers are the launcher's). lora_A must be
// 16-byte aligned (the caller passes an aligned copy when it is not).
inline void fill_nf4_gemm_base(NF4GemmParamsBase& p, const NF4View& w, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, int64_t m, int64_t n, int64_t k, int64_t r, double scaling,
                               double dropout_p, int64_t seed) {
  p.w = w;
  p.lora_A = reinterpret_cast<const uint16_t*>(lora_A.data_ptr());
  p.lora_B = reinterpret_cast<const uint16_t*>(lora_B.data_ptr());
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  p.dropout = make_dropout(dropout_p, seed);
  p.lora_B_async = r % 8 == 0 && (reinterpret_cast<uintptr_t>(lora_B.data_ptr()) & 15u) == 0;
}

// The launch of an NF4-mainloop kernel (forward and dx alike): rank bucket, ring depth for this device, smem
// attribute, launch on `stream`. Traits<kRPad> are the kernel's tile traits; kernel_for(T{}, rank_bucket) names its
// instantiation for activation type T (bf16 or fp16 by `dtype`). Params carries r, stages and wdec_buffers.
template <template <int> class Traits, class Params, class KernelFor>
void launch_nf4_gemm(const char* op, Params p, at::ScalarType dtype, dim3 grid, cudaStream_t stream,
                     KernelFor kernel_for) {
  const int64_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  dispatch_rank(p.r, [&](auto rank_bucket) {
    const PipelineConfig cfg = pick_pipeline_for<Traits<decltype(rank_bucket)::value>>(op, p.r, smem_limit);
    p.stages = cfg.stages;
    p.wdec_buffers = cfg.wdec_buffers;
    const int smem = static_cast<int>(cfg.smem_bytes);
    auto kernel = dtype == at::kBFloat16 ? kernel_for(__nv_bfloat16{}, rank_bucket) : kernel_for(__half{}, rank_bucket);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace qlora_ext
#endif
