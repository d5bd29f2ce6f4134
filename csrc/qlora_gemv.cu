// Small-m decode forward (1 <= m <= 32, no grad), one kernel launch:
//   u = dropout(x)·lora_Aᵀ  (rounded to x's dtype),   y = x·wᵀ + s·(u·lora_Bᵀ) + bias.
// Twin: qlora_ext.reference.qlora_linear (same outputs; u identical up to fp32 summation order).
//
// Floors, H200, 4096 -> 14336 (n·k = 58.7 M weights):
//   bytes  : NF4 29.4 MB + uint8 absmax 0.92 MB = 30.3 MB -> 7.1 us at the measured 4.27 TB/s.
//   decode : a 16-entry table lookup per weight. The table is built once per 64-block (16 FMUL + 8 cvt +
//            8 prmt) and indexed with prmt (an 8-byte lookup), so one bf16 costs 2 prmt plus 1/4 of a
//            selector op: ~2.5 ALU-pipe ops/weight = 147 M ops / (64 ALU lanes x 132 SMs x 1.98 GHz) = 8.8 us.
//            The ALU pipe, not DRAM, is the binding floor; everything else in the kernel stays off that pipe
//            (mma for the multiply at any m, LDS for x, cp.async for the weights).
//   so the plan: stream w with cp.async (16 B, evict-first) through a 3-stage ring per warp, decode with prmt,
//   multiply with mma.sync m16n8k16 (w rows = M, x rows = N padded to 8·NT, k = K), reduce deterministically.
//
// Work split. CTA b = (split ks = b / R, rowgroup rg = b % R), grid S·R <= #SMs (one CTA per SM):
//   - rowgroup rg owns tiles [rg·T/R, (rg+1)·T/R) of 16 rows of w; split ks owns chunks [ks·ck/S, (ks+1)·ck/S)
//     of 256 k. S = 1 unless x's slice (m·k_split·2 B, kept in smem for the CTA's life) does not fit.
//   - a unit = 16 rows x 256 k (2 KB of NF4). The CTA's units (tile-major) are cut into 12 equal contiguous
//     ranges, one per decode warp (3 per SM sub-partition, so every ALU pipe gets the same work to +-1 unit).
//     A tile covered by one warp is written to smem when done; a tile shared by warps is summed at the end from
//     per-warp head/tail slots in warp (= k) order. No float atomics anywhere: y is bit-reproducible.
//   - warp 12 ("lora warp") computes u: job (u-tile j of 16 rank rows, chunk c) = mma of lora_A rows with
//     dropout(x) from the same smem slice; per-chunk partials go to ws_u, the last job of a u-tile sums them
//     in chunk order, rounds, writes u and u_pad. It then tells every rowgroup "u is written" by one arrival
//     on rg_count[rg]. Jobs are spread over the CTAs of a split (16 jobs for r = 16, k = 4096).
//   - y of a rowgroup is finalized once its S partials and u's arrival are in: the expand s·u·lora_Bᵀ is one
//     more mma (k = r) over lora_B rows and u_pad, then + bias, one rounding to x's dtype.
//     S == 1 (the decode case): the lora warp reads rg_count near the end of the CTA; u has been written long
//     before (u jobs take ~3 us, the stream ~9 us), so the CTA finalizes straight from smem. If u is late, or
//     S > 1, partials go to ws_y and the last arrival (CTA or the u-finisher) finalizes. Nobody ever waits
//     on another CTA, so no co-residency assumption and no deadlock under any scheduling.
//   - every counter is returned to zero by its last user, so the counter block is cached per (device, stream)
//     and no memset runs per call (a fresh zeroed block is used while a CUDA graph is being captured).
//
// Prediction, 4096 -> 14336, r = 16: m = 1 ~10 us, m = 16 ~11 us of kernel (ALU floor 8.8 us + ~1 us pipeline
// fill + ~0.5 us epilogue; m = 16 adds the 128 KB x slice per SM at start); ~1.5 us more in a launch-to-launch
// measurement. Target 14 us; cuBLAS bf16 41 us.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/dropout.cuh"
#include "common/nf4.cuh"
#include "launchers.h"

namespace {

constexpr int kDecodeWarps = 12;            // 3 per sub-partition: the decode is ALU-bound, balance per SMSP
constexpr int kLoraWarp = kDecodeWarps;     // the 13th warp: u jobs, "is u written?", u -> smem
constexpr int kWarps = kDecodeWarps + 1;
constexpr int kThreads = kWarps * 32;       // 416
constexpr int kStages = 3;                  // cp.async ring per decode warp: 2 units (4 KB) in flight each
constexpr int kTileRows = 16;               // mma M
constexpr int kChunkK = 256;                // k per unit: 4 NF4 blocks, one per thread of a quad
constexpr int kRowBytes = kChunkK / 2;      // 128 packed bytes per row per unit
constexpr int kUnitBytes = kTileRows * kRowBytes;  // 2048
constexpr int kMaxM = 32;

// Host <-> kernel contract. T = x's dtype (bf16 or fp16) everywhere below.
struct GemvParams {
  const void* x;           // [m, k] T, row-major
  NF4View w;               // [n, k] NF4 storage (common/nf4.cuh)
  const void* lora_A;      // [r, k] T
  const void* lora_B;      // [n, r] T
  const void* bias;        // [n] T or nullptr
  void* y;                 // [m, n] T   (out)
  void* u;                 // [m, r] T   (out)
  // Workspace. ws_* and u_pad are fully rewritten by every launch. *_count are zero on entry and are put back
  // to zero by their last user, so the block can be reused by the next launch on the stream without a memset.
  float* ws_y;             // [S][tiles][32 lanes][4·NT] fp32 tile partials, mma C-fragment order
  float* ws_u;             // [utiles][ck][32 lanes][4·NT] fp32 per-chunk partials of uᵀ
  void* u_pad;             // [m][r_pad] T: rounded u, zero in columns r..r_pad-1 (B operand of the expand)
  int* rg_count;           // [R]      arrivals per rowgroup: S partial sums + 1 "u written"
  int* utile_count;        // [utiles] arrivals per 16-rank u tile: one per chunk job
  int* u_count;            // [1]      finished u tiles
  int64_t n, k, nblocks;   // nblocks = n·k/64
  int m, r, r_pad, kb, ck, tiles, utiles;  // kb = k/64, ck = ceil(k/256), tiles = ceil(n/16), r_pad = utiles·16
  int splits, rowgroups;   // S, R
  int xs_stride;           // elements per smem row of x (ceil(ck/S)·256)
  int slot_bytes;          // stage slot: 2048 B of NF4 + 16 rows of absmax window
  int abs_bytes;           // absmax window bytes per row: 8 (uint8, double quant) or 32 (fp32)
  int nested_cap;          // floats reserved for the CTA's nested_absmax slice
  int off_stage, off_acc, off_lora_b, off_bias, off_u, off_nested, off_ncode, off_code, off_misc;  // smem carve
  float scaling;           // s
  float dropout_scale;     // fp32(1/(1-p))
  uint32_t dropout_key, dropout_thresh;
  int dropout;             // p > 0
};

// CTA-private flags in smem.
struct CtaMisc {
  int progress;            // units finished by the decode warps (tells the lora warp when the end is near)
  int u_in_smem;           // lora warp saw "u written" and copied u_pad into smem
  int last;                // this CTA is the last arrival of its rowgroup
  int pad;
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------------------
// prmt.b32 (default mode): byte i of d = byte sel_i of {b, a}; only sel[15:0] is read. A selector with bit 3
// set may sign-replicate; every such lane below is discarded by the next prmt, so either semantics is fine.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// createpolicy.fractional.L2::evict_first: the packed weights are read exactly once; keep x, lora_A/B, u and
// the workspace resident in L2 instead.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// cp.async.cg (16 B, L1 bypass) with an L2 cache policy: one weight segment.
__device__ __forceinline__ void cp_async_16_hint(uint32_t dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(pol)
               : "memory");
}
// cp.async.cg with src-size: bytes past src_bytes are zero-filled (bounds of a tensor's tail, x past k).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// cp.async.ca 4 B (the only sizes below 16 are .ca): one aligned word of the uint8 absmax.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ld.acquire.gpu: read a counter another CTA released with fence + atomic; later loads see what it published.
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// ld.global.nc.v4: lora_A rows (read once, 16 B aligned).
__device__ __forceinline__ uint4 ldg_128(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <typename T> struct DType;
template <> struct DType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // cvt.rn.bf16x2.f32: RNE, as torch
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  static __device__ __forceinline__ float value(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  // mma.sync m16n8k16, fp32 accumulate in place.
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct DType<__half> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ float value(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------------------
// NF4 decode: per-block table in byte planes, looked up with prmt
// ---------------------------------------------------------------------------------------------------------
// Entries e_i = T(fp32(code[i] * scale)) — the reference's rounding order (no FMA, RNE to T), so every decoded
// weight equals reference.dequantize_nf4 bit for bit. prmt looks up 8 bytes, so the 16 entries are split into
// byte planes: lo[q] byte j = low byte of e_{4q+j}, hi[q] byte j = high byte.
struct BlockTable {
  uint32_t lo[4];
  uint32_t hi[4];
};

template <typename T>
__device__ __forceinline__ BlockTable make_table(const float (&code)[16], float scale) {
  BlockTable tb;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t e01 = DType<T>::pack2(__fmul_rn(code[4 * q + 0], scale), __fmul_rn(code[4 * q + 1], scale));
    const uint32_t e23 = DType<T>::pack2(__fmul_rn(code[4 * q + 2], scale), __fmul_rn(code[4 * q + 3], scale));
    tb.lo[q] = prmt(e01, e23, 0x6420u);
    tb.hi[q] = prmt(e01, e23, 0x7531u);
  }
  return tb;
}

// Four nibbles (the selector's low 16 bits) -> four entries. s_lo = raw nibbles (valid where n < 8), s_hi = n^8
// (valid where n >= 8), pick byte i = i + 4·bit3(n_i) chooses between the two 8-entry halves. Raw order of a
// packed halfword: nibbles (k1, k0, k3, k2) (element 2j is the high nibble of byte j), so lo/hi hold
// (k1, k0, k3, k2) and the last two prmt interleave them into T pairs (k0, k1) and (k2, k3).
__device__ __forceinline__ void decode_half(const BlockTable& tb, uint32_t s_lo, uint32_t s_hi, uint32_t pick,
                                            uint32_t& e01, uint32_t& e23) {
  const uint32_t lo = prmt(prmt(tb.lo[0], tb.lo[1], s_lo), prmt(tb.lo[2], tb.lo[3], s_hi), pick);
  const uint32_t hi = prmt(prmt(tb.hi[0], tb.hi[1], s_lo), prmt(tb.hi[2], tb.hi[3], s_hi), pick);
  e01 = prmt(lo, hi, 0x4051u);
  e23 = prmt(lo, hi, 0x6273u);
}

// One 32-bit word = 8 consecutive k of one row -> out[p] = T pair (k_{2p}, k_{2p+1}), low half first.
// 16 prmt + 2 lop3 + 3 shifts per 8 weights.
__device__ __forceinline__ void decode_word(const BlockTable& tb, uint32_t w, uint32_t (&out)[4]) {
  const uint32_t w_hi = w ^ 0x88888888u;
  const uint32_t pick = ((w >> 1) & 0x44444444u) | 0x32103210u;
  decode_half(tb, w, w_hi, pick, out[0], out[1]);
  decode_half(tb, w >> 16, w_hi >> 16, pick >> 16, out[2], out[3]);
}

// ---------------------------------------------------------------------------------------------------------
// CTA geometry
// ---------------------------------------------------------------------------------------------------------
struct CtaGeom {
  int ks, rg;        // split, rowgroup
  int c0, cks;       // chunks [c0, c0 + cks) of 256 k
  int tau0, ntiles;  // tiles [tau0, tau0 + ntiles) of 16 rows
  int units;         // ntiles · cks, tile-major
};

__device__ __forceinline__ int rg_tile_begin(const GemvParams& p, int rg) {
  return static_cast<int>(static_cast<int64_t>(rg) * p.tiles / p.rowgroups);
}

__device__ __forceinline__ CtaGeom cta_geom(const GemvParams& p) {
  CtaGeom c;
  c.ks = blockIdx.x / p.rowgroups;
  c.rg = blockIdx.x % p.rowgroups;
  c.c0 = static_cast<int>(static_cast<int64_t>(c.ks) * p.ck / p.splits);
  c.cks = static_cast<int>(static_cast<int64_t>(c.ks + 1) * p.ck / p.splits) - c.c0;
  c.tau0 = rg_tile_begin(p, c.rg);
  c.ntiles = rg_tile_begin(p, c.rg + 1) - c.tau0;
  c.units = c.ntiles * c.cks;
  return c;
}

// Equal contiguous unit ranges for the decode warps.
__device__ __forceinline__ int warp_unit_begin(int units, int w) {
  return static_cast<int>(static_cast<int64_t>(units) * w / kDecodeWarps);
}

// x slice in smem: [m][xs_stride] T. 16-byte chunk j of row mm lives at chunk (j & ~7) | ((j ^ (j>>3) ^ 4·mm) & 7):
// a quarter-warp reads chunks 32c + 8t + i for t = 0..3 and rows g, g+1 — the XOR spreads them over 8 bank groups.
__device__ __forceinline__ int xs_chunk(int j, int mm) { return (j & ~7) | ((j ^ (j >> 3) ^ (mm << 2)) & 7); }

// B operand for word i (8 k) of this thread's NF4 block in local chunk cl: x[nt·8+g][cl·256 + 64t + 8i, +8).
// Rows >= m read as zero (they only feed discarded output columns, but must not carry NaN garbage).
template <int NT>
__device__ __forceinline__ void load_x_frags(const unsigned char* x_s, int row_bytes, int m, int cl, int i,
                                             uint4 (&xf)[NT]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int mm = nt * 8 + g;
    xf[nt] = make_uint4(0u, 0u, 0u, 0u);
    if (mm < m) xf[nt] = *reinterpret_cast<const uint4*>(x_s + mm * row_bytes + (xs_chunk(cl * 32 + 8 * t + i, mm) << 4));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode warps: stream, decode, multiply
// ---------------------------------------------------------------------------------------------------------
// Issue one unit (16 rows x 256 k) into a stage slot. Lane l copies row 4j + l/8, segment l%8, j = 0..3: each
// instruction covers 4 full rows = whole 32 B sectors. Segment s of row q lands at s ^ (q & 1): the decode reads
// segments 2t+h of rows g and g+1 in one quarter-warp, the XOR makes that conflict-free.
// The absmax of the unit's 4 blocks per row is at flat block blk0 = row·kb + 4c, not 4-aligned when k % 256 != 0,
// so the lane pair of a row copies the aligned window(s) covering it (2nd only when misaligned).
// Rows >= n and segments past k are not copied; the decode gives those a zero scale.
__device__ __forceinline__ void issue_unit(const GemvParams& p, const CtaGeom& cta, int unit, unsigned char* slot,
                                           uint64_t pol) {
  const int lane = threadIdx.x & 31;
  const int tl = unit / cta.cks, c = cta.c0 + unit % cta.cks;
  const int64_t row0 = static_cast<int64_t>(cta.tau0 + tl) * kTileRows;
  const int64_t k_left = p.k - static_cast<int64_t>(c) * kChunkK;       // >= 64 since c < ck
  const int seg_valid = static_cast<int>(min64(kRowBytes, k_left / 2)) / 16;
  const uint32_t slot_s = smem_u32(slot);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = 4 * j + (lane >> 3), seg = lane & 7;
    const int64_t grow = row0 + row;
    if (grow < p.n && seg < seg_valid) {
      const uint8_t* src = p.w.w_nf4 + grow * (p.k / 2) + static_cast<int64_t>(c) * kRowBytes + seg * 16;
      cp_async_16_hint(slot_s + row * kRowBytes + ((seg ^ (row & 1)) << 4), src, pol);
    }
  }
  const int row = lane >> 1, win = lane & 1;
  const int64_t grow = row0 + row;
  if (grow < p.n) {
    const int64_t blk0 = grow * p.kb + 4 * c;
    if (win == 0 || (blk0 & 3) != 0) {
      const int64_t start = (blk0 & ~int64_t(3)) + 4 * win;  // first block of this aligned window
      const int64_t avail = p.nblocks - start;                // blocks left in the tensor
      const uint32_t dst = slot_s + kUnitBytes + row * p.abs_bytes;
      if (p.w.absmax_q8 != nullptr) {
        const int bytes = static_cast<int>(max64(0, min64(4, avail)));
        cp_async_4_zfill(dst + 4 * win, p.w.absmax_q8 + (bytes > 0 ? start : 0), bytes);
      } else {
        const int bytes = static_cast<int>(max64(0, min64(16, 4 * avail)));
        cp_async_16_zfill(dst + 16 * win, p.w.absmax_f32 + (bytes > 0 ? start : 0), bytes);
      }
    }
  }
}

// Scale of this thread's block in one row of the unit, bnb's rounding order (see nf4.cuh); 0 for rows >= n and
// blocks past k (a zero table turns whatever stale bytes the slot holds into zeros).
__device__ __forceinline__ float unit_scale(const GemvParams& p, const unsigned char* slot, int row, int64_t grow,
                                            int c, bool valid, const float* nested_s, int64_t nested_lo,
                                            const float* ncode_s, float offset) {
  if (!valid) return 0.f;
  const int t = threadIdx.x & 3;
  const int64_t blk0 = grow * p.kb + 4 * c;
  const int idx = static_cast<int>(blk0 & 3) + t;
  const unsigned char* win = slot + kUnitBytes + row * p.abs_bytes;
  if (p.w.absmax_q8 != nullptr) {
    const int q8 = win[idx];
    const int64_t blk = blk0 + t;
    return __fadd_rn(__fmul_rn(ncode_s[q8], nested_s[(blk >> nf4::kNestedShift) - nested_lo]), offset);
  }
  return reinterpret_cast<const float*>(win)[idx];
}

// One unit: thread (g, t) decodes block t of rows g and g+8 (64 k each) and runs 16 k-steps of mma per n8 tile.
// k permutation: mma k-slots (2t, 2t+1 | 2t+8, 2t+9) of step 2i (2i+1) hold physical k 64t + 8i + (0,1 | 2,3)
// ((4,5 | 6,7)) — the same for w (A) and x (B), so the sum is unchanged and x is one 16 B smem load per word.
template <typename T, int NT>
__device__ __forceinline__ void process_unit(const GemvParams& p, const CtaGeom& cta, int unit,
                                             const unsigned char* slot, const unsigned char* x_s,
                                             const float* code_s, const float* nested_s, int64_t nested_lo,
                                             const float* ncode_s, float offset, float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tl = unit / cta.cks, cl = unit % cta.cks, c = cta.c0 + cl;
  const int64_t row0 = static_cast<int64_t>(cta.tau0 + tl) * kTileRows;
  const bool blk_ok = 4 * c + t < p.kb;  // ragged last chunk when k % 256 != 0
  const float s0 = unit_scale(p, slot, g, row0 + g, c, blk_ok && row0 + g < p.n, nested_s, nested_lo, ncode_s, offset);
  const float s1 = unit_scale(p, slot, g + 8, row0 + g + 8, c, blk_ok && row0 + g + 8 < p.n, nested_s, nested_lo,
                              ncode_s, offset);
  float code[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(code_s)[q];  // smem broadcast
    code[4 * q + 0] = v.x; code[4 * q + 1] = v.y; code[4 * q + 2] = v.z; code[4 * q + 3] = v.w;
  }
  const BlockTable tb0 = make_table<T>(code, s0);
  const BlockTable tb1 = make_table<T>(code, s1);
  const int row_bytes = p.xs_stride * 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int seg = ((2 * t + h) ^ (g & 1)) << 4;  // (g+8) & 1 == g & 1
    const uint4 raw0 = *reinterpret_cast<const uint4*>(slot + g * kRowBytes + seg);
    const uint4 raw1 = *reinterpret_cast<const uint4*>(slot + (g + 8) * kRowBytes + seg);
    const uint32_t w0[4] = {raw0.x, raw0.y, raw0.z, raw0.w};
    const uint32_t w1[4] = {raw1.x, raw1.y, raw1.z, raw1.w};
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      uint4 xf[NT];
      load_x_frags<NT>(x_s, row_bytes, p.m, cl, 4 * h + jj, xf);
      uint32_t a0[4], a1[4];
      decode_word(tb0, w0[jj], a0);
      decode_word(tb1, w1[jj], a1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        DType<T>::mma(acc[nt], a0[0], a1[0], a0[1], a1[1], xf[nt].x, xf[nt].y);
        DType<T>::mma(acc[nt], a0[2], a1[2], a0[3], a1[3], xf[nt].z, xf[nt].w);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void store_frag(float* dst, const float (&acc)[NT][4]) {  // [lane][4·NT] order
  float4* d = reinterpret_cast<float4*>(dst) + (threadIdx.x & 31) * NT;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) d[nt] = make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
}
template <int NT>
__device__ __forceinline__ void add_frag(float (&acc)[NT][4], const float* src) {
  const float4* s = reinterpret_cast<const float4*>(src) + (threadIdx.x & 31) * NT;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float4 v = s[nt];
    acc[nt][0] += v.x; acc[nt][1] += v.y; acc[nt][2] += v.z; acc[nt][3] += v.w;
  }
}

// Head/tail slots of decode warp w at the end (its stage ring is free by then).
__device__ __forceinline__ float* warp_slot(unsigned char* smem, const GemvParams& p, int w, int which, int nt) {
  return reinterpret_cast<float*>(smem + p.off_stage + w * kStages * p.slot_bytes) + which * 32 * 4 * nt;
}

template <typename T, int NT>
__device__ void decode_warp(const GemvParams& p, const CtaGeom& cta, unsigned char* smem, CtaMisc* misc,
                            int ua, int ub, uint64_t pol, const float* nested_s, int64_t nested_lo, float offset) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  unsigned char* ring = smem + p.off_stage + warp * kStages * p.slot_bytes;
  const unsigned char* x_s = smem;
  const float* code_s = reinterpret_cast<const float*>(smem + p.off_code);
  const float* ncode_s = reinterpret_cast<const float*>(smem + p.off_ncode);
  float* acc_s = reinterpret_cast<float*>(smem + p.off_acc);
  const int first_tl = ua / cta.cks;
  auto owned = [&](int tl) { return ua <= tl * cta.cks && ub >= (tl + 1) * cta.cks; };

  float acc[NT][4] = {}, head[NT][4] = {};
  int cur = first_tl;
  for (int u = ua; u < ub; ++u) {
    // refill the slot freed by the previous iteration, then wait for unit u (groups complete in order)
    const int nxt = u + kStages - 1;
    if (nxt < ub) issue_unit(p, cta, nxt, ring + ((nxt - ua) % kStages) * p.slot_bytes, pol);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const int tl = u / cta.cks;
    if (tl != cur) {  // tile boundary: a finished tile is either all ours (-> smem) or our head (-> registers)
      if (owned(cur)) {
        store_frag<NT>(acc_s + cur * 32 * 4 * NT, acc);
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) head[nt][e] = acc[nt][e];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      cur = tl;
    }
    process_unit<T, NT>(p, cta, u, ring + ((u - ua) % kStages) * p.slot_bytes, x_s, code_s, nested_s, nested_lo,
                        ncode_s, offset, acc);
    __syncwarp();  // every lane is done with the slot before it is refilled
    if (lane == 0) atomicAdd(&misc->progress, 1);
  }
  cp_async_wait<0>();
  __syncwarp();
  if (ua < ub) {
    if (owned(cur)) {
      store_frag<NT>(acc_s + cur * 32 * 4 * NT, acc);
    } else if (cur == first_tl) {
      store_frag<NT>(warp_slot(smem, p, warp, 0, NT), acc);  // the whole range sits inside one shared tile
    } else {
      store_frag<NT>(warp_slot(smem, p, warp, 1, NT), acc);  // tail
    }
    if (cur != first_tl && !owned(first_tl)) store_frag<NT>(warp_slot(smem, p, warp, 0, NT), head);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Epilogue: y tile = partial + s·(lora_B rows · uᵀ) + bias
// ---------------------------------------------------------------------------------------------------------
// lora_b_rows: lora_B row 16·tau (smem slice or global), row stride r. bias_rows: bias + 16·tau or nullptr.
// u_rows: [m][r_pad] (smem or global). Generic pointers: the common path reads smem, the rare ones global.
template <typename T, int NT>
__device__ void epilogue_tile(const GemvParams& p, int tau, const float (&acc)[NT][4], const T* lora_b_rows,
                              const T* bias_rows, const T* u_rows) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(tau) * kTileRows;
  const int rows_valid = static_cast<int>(min64(kTileRows, p.n - row0));
  const uint16_t* lb = reinterpret_cast<const uint16_t*>(lora_b_rows);
  float c2[NT][4] = {};
  for (int s = 0; s < p.r_pad / 16; ++s) {
    uint32_t a[4];  // A = lora_B[16 rows][16 ranks], register q: row g + 8(q&1), ranks 16s + 2t + 8(q>>1) + {0,1}
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = g + 8 * (q & 1), col = 16 * s + 2 * t + 8 * (q >> 1);
      const bool rv = row < rows_valid;
      const uint32_t lo = (rv && col < p.r) ? lb[row * p.r + col] : 0u;  // r may be odd: 16-bit loads
      const uint32_t hi = (rv && col + 1 < p.r) ? lb[row * p.r + col + 1] : 0u;
      a[q] = lo | (hi << 16);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {  // B = uᵀ: column nt·8+g, ranks 16s + 2t (+8) — 4-byte aligned pairs
      const int mm = nt * 8 + g;
      uint32_t b0 = 0u, b1 = 0u;
      if (mm < p.m) {
        const uint32_t* ur = reinterpret_cast<const uint32_t*>(u_rows + static_cast<int64_t>(mm) * p.r_pad + 16 * s + 2 * t);
        b0 = ur[0];
        b1 = ur[4];
      }
      DType<T>::mma(c2[nt], a[0], a[1], a[2], a[3], b0, b1);
    }
  }
  T* y = reinterpret_cast<T*>(p.y);
  const uint16_t* bb = reinterpret_cast<const uint16_t*>(bias_rows);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), mm = nt * 8 + 2 * t + (e & 1);
      if (row < rows_valid && mm < p.m) {
        float v = acc[nt][e] + p.scaling * c2[nt][e];
        if (bb != nullptr) v += DType<T>::value(bb[row]);
        reinterpret_cast<uint16_t*>(y)[static_cast<int64_t>(mm) * p.n + row0 + row] = DType<T>::bits(v);
      }
    }
}

// Rare path (u late, or S > 1): sum the S partials of a tile from ws_y in split order, operands from global.
template <typename T, int NT>
__device__ void finalize_tile_global(const GemvParams& p, int tau) {
  float acc[NT][4] = {};
  for (int ks = 0; ks < p.splits; ++ks)
    add_frag<NT>(acc, p.ws_y + (static_cast<int64_t>(ks) * p.tiles + tau) * 32 * 4 * NT);
  const T* lora_b = reinterpret_cast<const T*>(p.lora_B) + static_cast<int64_t>(tau) * kTileRows * p.r;
  const T* bias = p.bias ? reinterpret_cast<const T*>(p.bias) + static_cast<int64_t>(tau) * kTileRows : nullptr;
  epilogue_tile<T, NT>(p, tau, acc, lora_b, bias, reinterpret_cast<const T*>(p.u_pad));
}

// ---------------------------------------------------------------------------------------------------------
// Lora warp: u = dropout(x)·lora_Aᵀ
// ---------------------------------------------------------------------------------------------------------
// dropout(x) for one B fragment (8 consecutive k of row mm, starting at kk0): keep ? T(fp32(x)·fp32(1/(1-p))) : 0,
// the counter-based mask of common/dropout.cuh.
template <typename T>
__device__ __forceinline__ uint4 dropout_frag(const GemvParams& p, uint4 v, int mm, int64_t kk0) {
  uint32_t wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    uint32_t out = 0u;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint64_t idx = static_cast<uint64_t>(mm) * static_cast<uint64_t>(p.k) + static_cast<uint64_t>(kk0 + 2 * e + hh);
      const uint16_t xb = static_cast<uint16_t>(wv[e] >> (16 * hh));
      const uint16_t db = dropout_keep(p.dropout_key, p.dropout_thresh, idx)
                              ? DType<T>::bits(__fmul_rn(DType<T>::value(xb), p.dropout_scale))
                              : uint16_t(0);
      out |= static_cast<uint32_t>(db) << (16 * hh);
    }
    wv[e] = out;
  }
  return make_uint4(wv[0], wv[1], wv[2], wv[3]);
}

// Last u job of u-tile j: sum the ck chunk partials in chunk order, round, write u and u_pad; the last u tile
// then announces "u written" to every rowgroup (finalizing those whose partials are already all in).
template <typename T, int NT>
__device__ void finish_utile(const GemvParams& p, int j) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float s[NT][4] = {};
  for (int c = 0; c < p.ck; ++c)
    add_frag<NT>(s, p.ws_u + (static_cast<int64_t>(j) * p.ck + c) * 32 * 4 * NT);
  uint16_t* u_out = reinterpret_cast<uint16_t*>(p.u);
  uint16_t* u_pad = reinterpret_cast<uint16_t*>(p.u_pad);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rr = 16 * j + g + 8 * (e >> 1), mm = nt * 8 + 2 * t + (e & 1);  // uᵀ[rr][mm]
      if (mm < p.m) {
        const uint16_t b = rr < p.r ? DType<T>::bits(s[nt][e]) : uint16_t(0);
        if (rr < p.r) u_out[static_cast<int64_t>(mm) * p.r + rr] = b;
        u_pad[static_cast<int64_t>(mm) * p.r_pad + rr] = b;
      }
    }
  if (lane == 0) p.utile_count[j] = 0;  // all ck arrivals are in: reset for the next launch
  __threadfence();
  __syncwarp();
  int old = 0;
  if (lane == 0) old = atomicAdd(p.u_count, 1);
  old = __shfl_sync(0xffffffffu, old, 0);
  if (old != p.utiles - 1) return;
  // u is complete. Arrive on every rowgroup; the arrival that completes one finalizes it.
  if (lane == 0) *p.u_count = 0;
  __threadfence();
  for (int base = 0; base < p.rowgroups; base += 32 * 4) {
    int olds[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // four independent atomics per lane in flight
      const int rg = base + 32 * q + lane;
      olds[q] = rg < p.rowgroups ? atomicAdd(p.rg_count + rg, 1) : -1;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      unsigned done = __ballot_sync(0xffffffffu, olds[q] == p.splits);
      while (done != 0u) {
        const int rg = base + 32 * q + __ffs(done) - 1;
        done &= done - 1u;
        __threadfence();
        for (int tau = rg_tile_begin(p, rg); tau < rg_tile_begin(p, rg + 1); ++tau) finalize_tile_global<T, NT>(p, tau);
        if (lane == 0) p.rg_count[rg] = 0;
      }
    }
  }
}

// Jobs (u-tile j, chunk c) of this CTA's split, dealt round-robin over its rowgroups. Same fragment scheme as
// the decode (A = lora_A rows, straight bf16/fp16 from global), B = dropout(x) from the smem slice.
template <typename T, int NT>
__device__ void lora_jobs(const GemvParams& p, const CtaGeom& cta, const unsigned char* x_s) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_bytes = p.xs_stride * 2;
  const T* A = reinterpret_cast<const T*>(p.lora_A);
  const int jobs = p.utiles * cta.cks;
  for (int v = cta.rg; v < jobs; v += p.rowgroups) {
    const int j = v / cta.cks, cl = v % cta.cks, c = cta.c0 + cl;
    const int rr0 = 16 * j + g, rr1 = rr0 + 8;
    const int64_t kblk = static_cast<int64_t>(c) * kChunkK + 64 * t;  // this thread's 64-wide block of k
    const bool ok0 = kblk < p.k && rr0 < p.r, ok1 = kblk < p.k && rr1 < p.r;
    float acc[NT][4] = {};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 a0[4], a1[4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {  // 8 loads in flight before the first use
        const int64_t kk = kblk + 32 * h + 8 * ii;
        a0[ii] = ok0 ? ldg_128(A + rr0 * p.k + kk) : make_uint4(0u, 0u, 0u, 0u);
        a1[ii] = ok1 ? ldg_128(A + rr1 * p.k + kk) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int i = 4 * h + ii;
        uint4 xf[NT];
        load_x_frags<NT>(x_s, row_bytes, p.m, cl, i, xf);
        if (p.dropout) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            if (nt * 8 + g < p.m) xf[nt] = dropout_frag<T>(p, xf[nt], nt * 8 + g, kblk + 8 * i);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          DType<T>::mma(acc[nt], a0[ii].x, a1[ii].x, a0[ii].y, a1[ii].y, xf[nt].x, xf[nt].y);
          DType<T>::mma(acc[nt], a0[ii].z, a1[ii].z, a0[ii].w, a1[ii].w, xf[nt].z, xf[nt].w);
        }
      }
    }
    store_frag<NT>(p.ws_u + (static_cast<int64_t>(j) * p.ck + c) * 32 * 4 * NT, acc);
    __threadfence();
    __syncwarp();
    int old = 0;
    if (lane == 0) old = atomicAdd(p.utile_count + j, 1);
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old == p.ck - 1) {
      __threadfence();
      finish_utile<T, NT>(p, j);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 1) qlora_gemv_kernel(const __grid_constant__ GemvParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const CtaGeom cta = cta_geom(p);
  CtaMisc* misc = reinterpret_cast<CtaMisc*>(smem + p.off_misc);
  float* acc_s = reinterpret_cast<float*>(smem + p.off_acc);
  float* nested_s = reinterpret_cast<float*>(smem + p.off_nested);
  const int row_bytes = p.xs_stride * 2;
  // rows of this CTA that exist (the last rowgroup may end inside a tile)
  const int64_t row_begin = static_cast<int64_t>(cta.tau0) * kTileRows;
  const int64_t row_end = min64(p.n, static_cast<int64_t>(cta.tau0 + cta.ntiles) * kTileRows);

  // 1. Shared inputs: x slice (cp.async, zero past k), code tables and this CTA's nested_absmax slice.
  {
    const T* x = reinterpret_cast<const T*>(p.x);
    const int row_chunks = p.xs_stride / 8;
    for (int idx = threadIdx.x; idx < p.m * row_chunks; idx += kThreads) {
      const int mm = idx / row_chunks, j = idx % row_chunks;
      const int64_t kk = static_cast<int64_t>(cta.c0) * kChunkK + 8 * j;
      const bool ok = j < cta.cks * 32 && kk < p.k;
      cp_async_16_zfill(smem_u32(smem + mm * row_bytes + (xs_chunk(j, mm) << 4)),
                        x + static_cast<int64_t>(mm) * p.k + (ok ? kk : 0), ok ? 16 : 0);
    }
  }
  if (threadIdx.x < 16) reinterpret_cast<float*>(smem + p.off_code)[threadIdx.x] = __ldg(p.w.code + threadIdx.x);
  int64_t nested_lo = 0;
  float offset = 0.f;
  if (p.w.absmax_q8 != nullptr) {
    for (int i = threadIdx.x; i < 256; i += kThreads)
      reinterpret_cast<float*>(smem + p.off_ncode)[i] = __ldg(p.w.nested_code + i);
    offset = __ldg(p.w.offset);
    if (cta.ntiles > 0) {
      const int64_t blk_first = row_begin * p.kb + 4 * cta.c0;
      const int64_t blk_last = (row_end - 1) * p.kb + min(4 * (cta.c0 + cta.cks), p.kb) - 1;
      nested_lo = blk_first >> nf4::kNestedShift;
      const int cnt = static_cast<int>((blk_last >> nf4::kNestedShift) - nested_lo + 1);  // <= nested_cap (host)
      for (int i = threadIdx.x; i < cnt; i += kThreads) nested_s[i] = __ldg(p.w.nested_absmax + nested_lo + i);
    }
  }
  if (threadIdx.x == 0) *misc = CtaMisc{0, 0, 0, 0};
  // lora_B rows and bias of this CTA into smem for the epilogue (contiguous byte ranges, 32-byte aligned starts).
  if (warp == kLoraWarp && cta.ntiles > 0) {
    const int64_t lb_bytes = (row_end - row_begin) * p.r * 2;
    const unsigned char* lb_src = reinterpret_cast<const unsigned char*>(p.lora_B) + row_begin * p.r * 2;
    for (int64_t o = lane * 16; o < lb_bytes; o += 32 * 16)
      cp_async_16_zfill(smem_u32(smem + p.off_lora_b + o), lb_src + o, static_cast<int>(min64(16, lb_bytes - o)));
    if (p.bias != nullptr) {
      const int64_t b_bytes = (row_end - row_begin) * 2;
      const unsigned char* b_src = reinterpret_cast<const unsigned char*>(p.bias) + row_begin * 2;
      for (int64_t o = lane * 16; o < b_bytes; o += 32 * 16)
        cp_async_16_zfill(smem_u32(smem + p.off_bias + o), b_src + o, static_cast<int>(min64(16, b_bytes - o)));
    }
  }
  cp_async_commit();

  // 2. Decode warps start their weight stream before waiting for x.
  const int ua = warp < kDecodeWarps ? warp_unit_begin(cta.units, warp) : 0;
  const int ub = warp < kDecodeWarps ? warp_unit_begin(cta.units, warp + 1) : 0;
  const uint64_t pol = evict_first_policy();
  if (warp < kDecodeWarps) {
    unsigned char* ring = smem + p.off_stage + warp * kStages * p.slot_bytes;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (ua + s < ub) issue_unit(p, cta, ua + s, ring + s * p.slot_bytes, pol);
      cp_async_commit();
    }
    cp_async_wait<kStages - 1>();  // the x group (committed first) is complete
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();

  // 3. Main work: decode warps stream w; the lora warp computes u, then checks whether u has been announced
  //    for this rowgroup (S == 1) and, if so, copies u_pad next to the partials.
  if (warp < kDecodeWarps) {
    decode_warp<T, NT>(p, cta, smem, misc, ua, ub, pol, nested_s, nested_lo, offset);
  } else {
    lora_jobs<T, NT>(p, cta, smem);
    if (p.splits == 1 && cta.ntiles > 0) {
      // Read the counter ~2 units before the decode warps finish: late enough that u is long written (it is
      // the first thing every CTA does), early enough that the load and copy hide under the last units.
      const int threshold = max(0, cta.units - 2 * kDecodeWarps);
      while (*reinterpret_cast<volatile int*>(&misc->progress) < threshold) __nanosleep(256);
      if (ld_acquire(p.rg_count + cta.rg) >= 1) {  // every lane acquires: its own u_pad loads follow
        const int64_t u_vec = static_cast<int64_t>(p.m) * p.r_pad * 2 / 16;
        const uint4* src = reinterpret_cast<const uint4*>(p.u_pad);
        uint4* dst = reinterpret_cast<uint4*>(smem + p.off_u);
        for (int64_t i = lane; i < u_vec; i += 32) dst[i] = src[i];
        __syncwarp();
        if (lane == 0) misc->u_in_smem = 1;
      }
    }
  }
  __syncthreads();

  // 4. Tiles shared by several decode warps: sum the contributions in warp (= k) order into acc_s.
  for (int tl = warp; tl < cta.ntiles; tl += kWarps) {
    const int lo = tl * cta.cks, hi = lo + cta.cks;
    bool single = false;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const int wa = warp_unit_begin(cta.units, w), wb = warp_unit_begin(cta.units, w + 1);
      single |= wa < wb && wa <= lo && wb >= hi;
    }
    if (single) continue;
    float s[NT][4] = {};
    for (int w = 0; w < kDecodeWarps; ++w) {
      const int wa = warp_unit_begin(cta.units, w), wb = warp_unit_begin(cta.units, w + 1);
      if (wa < hi && wb > lo) add_frag<NT>(s, warp_slot(smem, p, w, wa / cta.cks == tl ? 0 : 1, NT));
    }
    store_frag<NT>(acc_s + tl * 32 * 4 * NT, s);
  }
  __syncthreads();

  // 5. Finalize. Common case (S == 1, u announced): straight from smem.
  const T* lora_b_s = reinterpret_cast<const T*>(smem + p.off_lora_b);
  const T* bias_s = p.bias ? reinterpret_cast<const T*>(smem + p.off_bias) : nullptr;
  if (p.splits == 1 && misc->u_in_smem) {
    for (int tl = warp; tl < cta.ntiles; tl += kWarps) {
      float acc[NT][4];
      const float4* a4 = reinterpret_cast<const float4*>(acc_s + tl * 32 * 4 * NT) + lane * NT;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4 v = a4[nt];
        acc[nt][0] = v.x; acc[nt][1] = v.y; acc[nt][2] = v.z; acc[nt][3] = v.w;
      }
      epilogue_tile<T, NT>(p, cta.tau0 + tl, acc, lora_b_s + static_cast<int64_t>(tl) * kTileRows * p.r,
                           bias_s ? bias_s + tl * kTileRows : nullptr, reinterpret_cast<const T*>(smem + p.off_u));
    }
    if (threadIdx.x == 0) p.rg_count[cta.rg] = 0;  // u's arrival was the only one: reset for the next launch
    return;
  }
  // Otherwise publish this split's partials and arrive; the last of the S + 1 arrivals finalizes.
  if (cta.ntiles > 0) {
    const int n4 = cta.ntiles * 32 * NT;  // float4s
    float4* dst = reinterpret_cast<float4*>(p.ws_y + (static_cast<int64_t>(cta.ks) * p.tiles + cta.tau0) * 32 * 4 * NT);
    const float4* src = reinterpret_cast<const float4*>(acc_s);
    for (int i = threadIdx.x; i < n4; i += kThreads) dst[i] = src[i];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) misc->last = atomicAdd(p.rg_count + cta.rg, 1) == p.splits;
  __syncthreads();
  if (!misc->last) return;
  __threadfence();
  for (int tl = warp; tl < cta.ntiles; tl += kWarps) finalize_tile_global<T, NT>(p, cta.tau0 + tl);
  if (threadIdx.x == 0) p.rg_count[cta.rg] = 0;
}

// ---------------------------------------------------------------------------------------------------------
// Host: plan, workspace, launcher
// ---------------------------------------------------------------------------------------------------------
int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

struct GemvPlan {
  int splits, rowgroups, xs_stride, nested_cap;
  int64_t smem;
  int off_stage, off_acc, off_lora_b, off_bias, off_u, off_nested, off_ncode, off_code, off_misc;
};

// Smem carve for (S, R); the regions are 128-byte aligned.
GemvPlan carve(int64_t m, int64_t n, int64_t k, int64_t r, bool dq, int nt, int slot_bytes, int S, int R) {
  const int64_t ck = qlora_checks::ceil_div(k, kChunkK), tiles = qlora_checks::ceil_div(n, kTileRows);
  const int64_t cks_max = qlora_checks::ceil_div(ck, S), tcta_max = qlora_checks::ceil_div(tiles, R);
  const int64_t r_pad = qlora_checks::ceil_div(r, 16) * 16;
  GemvPlan pl{};
  pl.splits = S;
  pl.rowgroups = R;
  pl.xs_stride = static_cast<int>(cks_max * kChunkK);
  // nested groups spanned by a CTA: its blocks span at most rows·kb flat blocks
  pl.nested_cap = dq ? static_cast<int>(tcta_max * kTileRows * (k / 64) / 256 + 2) : 0;
  int64_t off = align_up(m * pl.xs_stride * 2, 128);
  pl.off_stage = static_cast<int>(off);
  off = align_up(off + int64_t(kDecodeWarps) * kStages * slot_bytes, 128);
  pl.off_acc = static_cast<int>(off);
  off = align_up(off + tcta_max * 32 * 4 * nt * 4, 128);
  pl.off_lora_b = static_cast<int>(off);
  off = align_up(off + align_up(tcta_max * kTileRows * r * 2, 16), 128);
  pl.off_bias = static_cast<int>(off);
  off = align_up(off + align_up(tcta_max * kTileRows * 2, 16), 128);
  pl.off_u = static_cast<int>(off);
  off = align_up(off + m * r_pad * 2, 128);
  pl.off_nested = static_cast<int>(off);
  off = align_up(off + int64_t(pl.nested_cap) * 4, 128);
  pl.off_ncode = static_cast<int>(off);
  off = align_up(off + (dq ? 256 * 4 : 0), 128);
  pl.off_code = static_cast<int>(off);
  off = align_up(off + 16 * 4, 128);
  pl.off_misc = static_cast<int>(off);
  pl.smem = off + static_cast<int64_t>(sizeof(CtaMisc));
  return pl;
}

// Smallest S whose x slice fits (S > 1 costs a round of partial sums through L2); with few tiles, split k
// anyway so every SM gets work. R = SMs / S rowgroups (one CTA per SM); more only if a CTA's acc does not fit.
GemvPlan plan_gemv(int64_t m, int64_t n, int64_t k, int64_t r, bool dq, int nt, int slot_bytes, int num_sms,
                   int64_t smem_limit) {
  const int64_t ck = qlora_checks::ceil_div(k, kChunkK), tiles = qlora_checks::ceil_div(n, kTileRows);
  const int64_t s_fill = tiles < num_sms ? std::max<int64_t>(1, num_sms / tiles) : 1;
  for (int64_t S = std::min(s_fill, ck); S <= ck; ++S) {
    int64_t R = std::max<int64_t>(1, std::min<int64_t>(tiles, num_sms / S));
    for (;;) {
      const GemvPlan pl = carve(m, n, k, r, dq, nt, slot_bytes, static_cast<int>(S), static_cast<int>(R));
      if (pl.smem <= smem_limit) return pl;
      const GemvPlan x_only = carve(m, n, k, r, dq, nt, slot_bytes, static_cast<int>(S), static_cast<int>(tiles));
      if (x_only.smem > smem_limit || R == tiles) break;  // only a smaller x slice (larger S) can help
      R = std::min<int64_t>(tiles, 2 * R);
    }
  }
  TORCH_CHECK(false, "qlora_gemv: no launch configuration fits in ", smem_limit, " bytes of shared memory for m = ",
              m, ", n = ", n, ", k = ", k, ", r = ", r);
  return GemvPlan{};
}

// The counter block is self-cleaning, so one block per (device, stream) serves every launch on that stream (they
// are ordered). While a graph is being captured a fresh zeroed block is used (captured memset, not cached).
at::Tensor gemv_counters(const at::Device& device, cudaStream_t stream, int64_t needed) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  const auto opts = at::TensorOptions().dtype(at::kInt).device(device);
  if (status != cudaStreamCaptureStatusNone) return at::zeros({needed}, opts);
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // leaked: no exit-time frees
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = (*cache)[{device.index(), stream}];
  if (!t.defined() || t.numel() < needed) t = at::zeros({std::max<int64_t>(needed, 1024)}, opts);
  return t;
}

template <typename T, int NT>
void launch_typed(const GemvParams& p, int grid, int64_t smem, cudaStream_t stream) {
  auto kernel = qlora_gemv_kernel<T, NT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The one launcher: dtype x n8-tile count (m <= 8·NT).
void launch_qlora_gemv(const GemvParams& p, at::ScalarType dtype, int nt, int grid, int64_t smem,
                       cudaStream_t stream) {
  const bool bf16 = dtype == at::kBFloat16;
  switch (nt) {
    case 1: bf16 ? launch_typed<__nv_bfloat16, 1>(p, grid, smem, stream) : launch_typed<__half, 1>(p, grid, smem, stream); break;
    case 2: bf16 ? launch_typed<__nv_bfloat16, 2>(p, grid, smem, stream) : launch_typed<__half, 2>(p, grid, smem, stream); break;
    case 4: bf16 ? launch_typed<__nv_bfloat16, 4>(p, grid, smem, stream) : launch_typed<__half, 4>(p, grid, smem, stream); break;
    default: TORCH_CHECK(false, "qlora_gemv: unsupported n8 tile count ", nt);
  }
}

void check_aligned(const char* name, const void* ptr, int64_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % bytes == 0, "qlora_gemv: ", name, " must be ", bytes,
              "-byte aligned for vector loads (pass a contiguous tensor with its own storage, e.g. .clone())");
}

}  // namespace

// Host wrapper. Twin: qlora_ext.reference.qlora_linear; decode-only fast path (1 <= m <= 32, no autograd).
std::tuple<at::Tensor, at::Tensor> qlora_gemv_cuda(const at::Tensor& x, const at::Tensor& w_nf4,
                                                   const at::Tensor& absmax, const at::Tensor& code,
                                                   const std::optional<at::Tensor>& nested_absmax,
                                                   const std::optional<at::Tensor>& nested_code,
                                                   const std::optional<at::Tensor>& offset,
                                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                   const std::optional<at::Tensor>& bias, double scaling,
                                                   double dropout_p, int64_t seed, int64_t blocksize) {
  using namespace qlora_checks;
  constexpr const char* op = "qlora_gemv";
  check_activation(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Device device = x.device();
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= kMaxM, op, ": m (rows of x) must satisfy 1 <= m <= ", kMaxM,
              " on the decode path, got m = ", m);
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2, op, ": lora_A and lora_B must be 2-D, got ",
              shape_str(lora_A.sizes()), " and ", shape_str(lora_B.sizes()));
  const int64_t r = lora_A.size(0), n = lora_B.size(0);
  check_fast_path_sizes(op, k, r);
  check_fast_blocksize(op, blocksize);
  check_nf4_weight(op, w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, device);
  check_matrix(op, "lora_A", lora_A, x.scalar_type(), "[r, k]", r, k, device);
  check_matrix(op, "lora_B", lora_B, x.scalar_type(), "[n, r]", n, r, device);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_device(op, "bias", *bias, device);
    check_dtype(op, "bias", *bias, x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [n] = [", n, "], got ",
                shape_str(bias->sizes()));
    check_contiguous(op, "bias", *bias);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(n * k / 2 < (int64_t(1) << 62) && n < (int64_t(1) << 31) - 16, op, ": weight too large");
  const bool dq = absmax.scalar_type() == at::kByte;

  // 16-byte vector paths: x/lora_A rows (k % 64 keeps every row aligned), w_nf4 rows (k/2 bytes), lora_B and
  // bias slices (start at row 16·tau: 32·tau·r and 32·tau bytes), fp32 absmax windows; uint8 absmax words: 4.
  check_aligned("x", x.data_ptr(), 16);
  check_aligned("w_nf4", w_nf4.data_ptr(), 16);
  check_aligned("lora_A", lora_A.data_ptr(), 16);
  check_aligned("lora_B", lora_B.data_ptr(), 16);
  if (has_bias) check_aligned("bias", bias->data_ptr(), 16);
  check_aligned("absmax", absmax.data_ptr(), dq ? 4 : 16);

  auto y = at::empty({m, n}, x.options());
  auto u = at::empty({m, r}, x.options());

  const int nt = m <= 8 ? 1 : (m <= 16 ? 2 : 4);
  const int abs_bytes = dq ? 8 : 32;
  const int slot_bytes = kUnitBytes + kTileRows * abs_bytes;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const GemvPlan pl = plan_gemv(m, n, k, r, dq, nt, slot_bytes, prop->multiProcessorCount, smem_limit);

  const int64_t ck = ceil_div(k, kChunkK), tiles = ceil_div(n, kTileRows);
  const int64_t utiles = ceil_div(r, 16), r_pad = utiles * 16;
  // Workspace: one allocation, nothing in it needs zeroing (every byte read was written earlier in the launch).
  const int64_t ws_y_bytes = align_up(int64_t(pl.splits) * tiles * 32 * 4 * nt * 4, 256);
  const int64_t ws_u_bytes = align_up(utiles * ck * 32 * 4 * nt * 4, 256);
  const int64_t u_pad_bytes = align_up(m * r_pad * 2, 256);
  auto ws = at::empty({ws_y_bytes + ws_u_bytes + u_pad_bytes}, x.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto counters = gemv_counters(device, stream, pl.rowgroups + utiles + 1);

  GemvParams p{};
  p.x = x.data_ptr();
  p.w = make_nf4_view(w_nf4, absmax, code, nested_absmax, nested_code, offset);
  p.lora_A = lora_A.data_ptr();
  p.lora_B = lora_B.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.u = u.data_ptr();
  unsigned char* ws_base = ws.data_ptr<uint8_t>();
  p.ws_y = reinterpret_cast<float*>(ws_base);
  p.ws_u = reinterpret_cast<float*>(ws_base + ws_y_bytes);
  p.u_pad = ws_base + ws_y_bytes + ws_u_bytes;
  int* cnt = counters.data_ptr<int>();
  p.rg_count = cnt;
  p.utile_count = cnt + pl.rowgroups;
  p.u_count = cnt + pl.rowgroups + utiles;
  p.n = n;
  p.k = k;
  p.nblocks = n * (k / 64);
  p.m = static_cast<int>(m);
  p.r = static_cast<int>(r);
  p.r_pad = static_cast<int>(r_pad);
  p.kb = static_cast<int>(k / 64);
  p.ck = static_cast<int>(ck);
  p.tiles = static_cast<int>(tiles);
  p.utiles = static_cast<int>(utiles);
  p.splits = pl.splits;
  p.rowgroups = pl.rowgroups;
  p.xs_stride = pl.xs_stride;
  p.slot_bytes = slot_bytes;
  p.abs_bytes = abs_bytes;
  p.nested_cap = pl.nested_cap;
  p.off_stage = pl.off_stage;
  p.off_acc = pl.off_acc;
  p.off_lora_b = pl.off_lora_b;
  p.off_bias = pl.off_bias;
  p.off_u = pl.off_u;
  p.off_nested = pl.off_nested;
  p.off_ncode = pl.off_ncode;
  p.off_code = pl.off_code;
  p.off_misc = pl.off_misc;
  p.scaling = static_cast<float>(scaling);
  p.dropout = dropout_p > 0.0 ? 1 : 0;
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.dropout_key = dropout_key(seed);
  p.dropout_thresh = dropout_threshold(dropout_p);

  // Ask for more than half the SM's smem so two CTAs never share an SM (grid = S·R <= #SMs is sized for one each).
  const int64_t smem = std::min(smem_limit, std::max<int64_t>(pl.smem, smem_limit / 2 + 128));
  launch_qlora_gemv(p, x.scalar_type(), nt, pl.splits * pl.rowgroups, smem, stream);
  return {y, u};
}
