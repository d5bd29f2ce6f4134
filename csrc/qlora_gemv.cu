// Small-m decode forward (1 <= m <= 32, no grad): u on cuBLAS, then one kernel launch for y.
//   u = dropout(x)·lora_Aᵀ  (cuBLAS, fp32-accumulated, rounded to x's dtype once; dropout by _lora_dropout),
//   y = x·wᵀ + s·(u·lora_Bᵀ) + bias   (this kernel; one rounding; the expand uses the rounded u).
// Twin: qlora_ext.reference.qlora_linear. Every decoded weight equals reference.dequantize_nf4 bit for bit.
//
// Why u is not computed in the kernel any more: it was (a lora warp per CTA, per-chunk partials, a last arrival
// announcing u to every rowgroup), and whenever u was complete only after a rowgroup's partial sums, the warp that
// completed u finalized every such rowgroup alone, one tile after another. On the H200 (2026-12-01 sweep) that
// took 0.11-0.19 ms for 4096→1024 (m = 1, 16; the decode alone is a few µs) and 0.41 / 0.79 ms for 14336→4096 /
// 28672→8192 at m = 16, r = 64, against 0.03-0.04 ms for the shapes where u was early. With u ready at launch
// every CTA finalizes its own tiles (S = 1) or the last split of a rowgroup does (S > 1), in parallel.
//
// Floors, H200, 4096 -> 14336 (n·k = 58.7 M weights):
//   bytes : NF4 29.4 MB + uint8 absmax 0.92 MB = 30.3 MB -> 7.1 us at the measured 4.27 TB/s.
//   decode: one 16-entry table lookup per weight, in the reference's rounding order (table = T(code[i]·scale),
//           built once per 64-block). prmt looks up 8 bytes, so a bf16 costs 2 prmt (byte planes, two table
//           halves, pick, interleave) + 1/4 lop3, the table 1/4 more: >= 2.5 ALU-pipe ops/weight. The ALU pipe is
//           16 lanes/clk per SM sub-partition -> 58.7 M x 2.5 / (16 x 528 x 1.98 GHz) = 8.8 us. That, not DRAM, is
//           the binding floor, so everything else stays off the ALU pipe: mma.sync for the multiply at every m
//           (m = 1 wastes 7/8 of an n8 tile, the tensor pipe is idle anyway), IMAD.HI (FMA pipe) for the decode's
//           shifts, LDS for x, cp.async for the weights, cursors instead of divisions.
//   ptxas/SASS (sm_90a, bf16, NT=1) per unit = 128 weights/thread: 272 prmt, ~52 lop3, 16 F2FP + ~45 other ALU
//   ops in the stream -> ~3.1 ALU ops/weight -> ~10.9 us ALU-bound; + ~1 us to fill the pipe, ~0.7 us epilogue.
//
// Work split. CTA b = (rowgroup rg = b / S, split ks = b % S), grid S·R <= #SMs, one CTA per SM:
//   - rowgroup rg owns tiles [rg·T/R, (rg+1)·T/R) of 16 rows of w; split ks owns chunks [ks·ck/S, (ks+1)·ck/S)
//     of 256 k. x's slice (m·k/S·2 bytes) lives in smem for the CTA's life; S = 1 unless it does not fit.
//   - a unit = 16 rows x 256 k (2 KB of NF4). The CTA's units (tile-major) are cut into DW equal contiguous
//     ranges, one per decode warp (DW = 12 for m <= 8, else 8; a multiple of 4, so every SM sub-partition's ALU
//     pipe gets the same work to +-1 unit). Each decode warp streams its range through a private 4-slot cp.async
//     ring (3 units = 6 KB in flight per warp, 6-9 MB on the chip: covers the DRAM latency).
//     A tile one warp covered alone goes to smem when done; tiles shared by warps are summed at the end from
//     per-warp head/tail slots in warp (= k) order. No float atomics: y is bit-reproducible run to run.
//   - warp DW, the lora warp, loads the CTA's lora_B rows and bias into smem for the epilogue; every CTA copies
//     u (zero-padded to r_pad ranks) into smem at the start.
//   - rowgroup finalization: y = acc + s·(lora_B rows · uᵀ) (one more mma, k = rank) + bias, rounded once.
//     S == 1: the CTA finalizes its tiles from smem. S > 1: partials go to ws_y and the last of the S arrivals on
//     the rowgroup's counter finalizes. Nothing ever waits for another CTA: no co-residency assumption, no
//     deadlock under any scheduling or sharing of the GPU.
//   - every counter is put back to zero by its last user: the counter block is the stream's (stream_counters,
//     path_ops.h), no memset runs per call.
//
// Register caps (the busiest SMSP's 16K-register bank): 13 warps -> 128, 9 warps -> 168 per thread; the build log
// (-Xptxas -v) has the counts, 0 spills required.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include <torch/library.h>

#include "common/checks.h"
#include "common/elem.cuh"
#include "common/mma_sm80.cuh"
#include "common/nf4.cuh"
#include "common/nf4_tensors.h"
#include "path_ops.h"

namespace qlora_ext {
namespace {

// Decode warps per CTA, a multiple of 4 so every SM sub-partition (and its ALU pipe) gets the same share; plus one
// lora warp (index = the decode-warp count). Registers come from the SMSP's 16K bank: 13 warps -> 4 on one SMSP ->
// 128 registers/thread, enough for m <= 8 (NT = 1: ~124); 9 warps -> 168 for NT = 2, 4 (144 / 168 used).
// More warps per SMSP hide more of the decode's prmt -> mma latency chain, so NT = 1 (the m = 1 decode) takes 12.
constexpr int decode_warps(int nt) { return nt == 1 ? 12 : 8; }
constexpr int kStages = 4;                  // cp.async ring per decode warp: 3 units (6 KB) in flight each
constexpr int kTileRows = 16;               // mma M
constexpr int kChunkK = 256;                // k per unit: 4 NF4 blocks, one per thread of a quad
constexpr int kRowBytes = kChunkK / 2;      // 128 packed bytes per row per unit
constexpr int kUnitBytes = kTileRows * kRowBytes;  // 2048
constexpr int kMaxM = 32;

// Host <-> kernel contract. T = x's dtype (bf16 or fp16) everywhere below.
struct GemvParams {
  const void* x;           // [m, k] T, row-major
  NF4View w;               // [n, k] NF4 storage (common/nf4.cuh)
  const void* lora_B;      // [n, r] T
  const void* bias;        // [n] T or nullptr
  void* y;                 // [m, n] T   (out)
  const void* u;           // [m, r] T   dropout(x)·lora_Aᵀ, written before the launch (stream order)
  // Workspace. ws_y is fully rewritten by every launch (S > 1 only). rg_count is zero on entry and put back to zero
  // by its last user, so the block can be reused by the next launch on the stream without a memset.
  float* ws_y;             // [S][tiles][32 lanes][4·NT] fp32 tile partials, mma C-fragment order
  int* rg_count;           // [R]      arrivals per rowgroup: its S partial sums
  int64_t n, k, nblocks;   // nblocks = n·k/64
  int m, r, r_pad, kb, ck, tiles;  // kb = k/64, ck = ceil(k/256), tiles = ceil(n/16), r_pad = ceil(r/16)·16
  int splits, rowgroups;   // S, R: grid = S·R CTAs, CTA b -> rowgroup b / S, split b % S
  int xs_stride;           // elements per smem row of x (ceil(ck/S)·256)
  int tail_segs;           // 16-byte segments per row in the last chunk: (k - (ck-1)·256) / 32
  int slot_bytes;          // stage slot: 2048 B of NF4 + 16 rows of absmax window
  int abs_bytes;           // absmax window bytes per row: 8 (uint8, double quant) or 32 (fp32)
  int off_stage, off_acc, off_lora_b, off_bias, off_u, off_nested, off_ncode, off_code, off_misc;  // smem carve
  float scaling;           // s
  uint32_t k3210;          // 0x32103210, the prmt identity selector, passed at run time so that ptxas keeps it in
                           // a register and the decode's selector build is one lop3 (two immediates do not fit)
};

// CTA-private flags in smem.
struct CtaMisc {
  int last;                // this CTA is the last arrival of its rowgroup
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

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

// mma.sync m16n8k16 through common/mma_sm80.cuh, taking the four A registers by value.
template <typename T>
__device__ __forceinline__ void mma4(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                     uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3};
  mma_m16n8k16<T>(d, a, b0, b1);
}

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
    const uint32_t e01 = Elem<T>::pack2(__fmul_rn(code[4 * q + 0], scale), __fmul_rn(code[4 * q + 1], scale));
    const uint32_t e23 = Elem<T>::pack2(__fmul_rn(code[4 * q + 2], scale), __fmul_rn(code[4 * q + 3], scale));
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
// ALU pipe: 16 prmt + 2 lop3 per 8 weights. The four right shifts are mul.hi by a power of two, which runs on
// the FMA pipe (IMAD.HI) instead of the ALU pipe that the prmt saturate.
__device__ __forceinline__ uint32_t shr_fma(uint32_t v, uint32_t pow2) {  // v >> log2(2^32 / pow2)
  uint32_t d;
  asm("mul.hi.u32 %0, %1, %2;" : "=r"(d) : "r"(v), "r"(pow2));
  return d;
}
__device__ __forceinline__ void decode_word(const BlockTable& tb, uint32_t w, uint32_t k3210, uint32_t (&out)[4]) {
  const uint32_t w_hi = w ^ 0x88888888u;
  uint32_t pick;  // ((w >> 1) & 0x44444444) | 0x32103210 in one lop3 (0x32103210 lives in a register)
  asm("lop3.b32 %0, %1, 0x44444444, %2, 0xEA;" : "=r"(pick) : "r"(shr_fma(w, 0x80000000u)), "r"(k3210));
  decode_half(tb, w, w_hi, pick, out[0], out[1]);
  decode_half(tb, shr_fma(w, 0x10000u), shr_fma(w_hi, 0x10000u), shr_fma(pick, 0x10000u), out[2], out[3]);
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
  c.rg = blockIdx.x / p.splits;  // rowgroup-major: the S splits of a rowgroup are neighbours in the launch order
  c.ks = blockIdx.x % p.splits;
  c.c0 = static_cast<int>(static_cast<int64_t>(c.ks) * p.ck / p.splits);
  c.cks = static_cast<int>(static_cast<int64_t>(c.ks + 1) * p.ck / p.splits) - c.c0;
  c.tau0 = rg_tile_begin(p, c.rg);
  c.ntiles = rg_tile_begin(p, c.rg + 1) - c.tau0;
  c.units = c.ntiles * c.cks;
  return c;
}

// Equal contiguous unit ranges for the decode warps.
template <int DW>
__device__ __forceinline__ int warp_unit_begin(int units, int w) {
  return static_cast<int>(static_cast<int64_t>(units) * w / DW);
}

// x slice in smem: [m][xs_stride] T, 16-byte chunk j of row mm at (j & ~7) | ((j ^ ((j>>3) & 3) ^ 4·mm) & 7).
// A quarter-warp reads chunks 32c + 8t + i for t = 0..3 of rows g, g+1: t and g&1 go into the xor, so the 8
// reads hit 8 different bank groups. mma columns nt·8+g >= m read row m-1 instead: they only feed output columns
// that are discarded, and a real (finite) row keeps NaN garbage out without a predicate or zero padding.
__device__ __forceinline__ int xs_chunk(int j, int mm) { return (j & ~7) | ((j ^ ((j >> 3) & 3) ^ (mm << 2)) & 7); }

__device__ __forceinline__ int x_row(int m, int nt) { return min(nt * 8 + ((threadIdx.x & 31) >> 2), m - 1); }

// ---------------------------------------------------------------------------------------------------------
// Decode warps: stream, decode, multiply
// ---------------------------------------------------------------------------------------------------------
// A unit = 16 rows x 256 k; a warp walks its range tile-major with two cursors (issue runs kStages-1 units ahead
// of decode). Tile-level values are recomputed only when a cursor enters a new tile: no divisions or 64-bit
// multiplies per unit.

// Issue side. Lanes 2q and 2q+1 own row q of the unit: instruction s copies segments 2s and 2s+1 (16 B each) of
// every row, i.e. one whole 32 B sector per row, from one base address plus an immediate. Segment s of row q
// lands at s ^ (q & 1): the decode reads segment 2t+h of rows g and g+1 in one quarter-warp and the xor keeps
// that conflict-free. The same lane pair copies the row's absmax: the unit's 4 blocks start at flat block
// row·kb + 4c, 4-aligned only when k % 256 == 0, so the pair copies the aligned window(s) covering them (the
// second only when misaligned; 4c keeps the low two bits, so that is fixed per row). Rows >= n and segments past
// k are not copied; the decode gives them a zero scale.
struct IssueCursor {
  int tl, cl;
  const uint8_t* src;  // w_nf4 at (row 16·tau + l/2, chunk c0) + 16·(l & 1)
  const uint8_t* asrc; // absmax bytes of this lane's aligned window (row 16·tau + l/2, chunk c0)
  int a_left;          // blocks from that window's first block to the end of absmax (clamped to 2^30)
  bool row_ok;         // row 16·tau + l/2 < n
  bool a_copy;         // row_ok, and this lane's window is needed (window 1 only when misaligned)
};

__device__ __forceinline__ void issue_enter_tile(const GemvParams& p, const CtaGeom& cta, IssueCursor& ic) {
  const int lane = threadIdx.x & 31, win = lane & 1;
  const int64_t row = static_cast<int64_t>(cta.tau0 + ic.tl) * kTileRows + (lane >> 1);
  ic.row_ok = row < p.n;
  const int64_t safe_row = ic.row_ok ? row : 0;  // keep pointers inside the tensors for rows never copied
  ic.src = p.w.w_nf4 + safe_row * (p.k / 2) + static_cast<int64_t>(cta.c0) * kRowBytes + 16 * win;
  const int64_t blk = row * p.kb + 4 * cta.c0;
  const int64_t start = (blk & ~int64_t(3)) + 4 * win;
  ic.a_copy = ic.row_ok && (win == 0 || (blk & 3) != 0);
  ic.a_left = static_cast<int>(min64(p.nblocks - start, int64_t(1) << 30));
  const int64_t safe = ic.a_copy ? start : 0;
  ic.asrc = p.w.absmax_q8 != nullptr ? p.w.absmax_q8 + safe
                                     : reinterpret_cast<const uint8_t*>(p.w.absmax_f32 + safe);
}

__device__ __forceinline__ void issue_unit(const GemvParams& p, const CtaGeom& cta, const IssueCursor& ic,
                                           unsigned char* slot, uint64_t pol) {
  const int lane = threadIdx.x & 31, h = lane & 1, q = lane >> 1;
  // only the last chunk of a row can be short (k % 256 != 0): it has tail_segs segments of 32 k
  const int nseg = cta.c0 + ic.cl == p.ck - 1 ? p.tail_segs : 8;
  const uint32_t dst = smem_addr(slot) + q * kRowBytes + ((h ^ (q & 1)) << 4);  // + 32·s: segment 2s+h
  const uint8_t* src = ic.src + ic.cl * kRowBytes;
  if (ic.row_ok) {
#pragma unroll
    for (int s = 0; s < 4; ++s)
      if (2 * s + h < nseg) cp_async_16_hint(dst + 32 * s, src + 32 * s, pol);
  }
  if (ic.a_copy) {
    const int left = ic.a_left - 4 * ic.cl;  // blocks left in absmax from this window's first block
    const uint32_t adst = smem_addr(slot) + kUnitBytes + q * p.abs_bytes;
    const bool full = left >= 4, some = left > 0;
    if (p.w.absmax_q8 != nullptr)
      cp_async_4_zfill(adst + 4 * h, some ? ic.asrc + 4 * ic.cl : ic.asrc, full ? 4 : (some ? left : 0));
    else
      cp_async_16_zfill(adst + 16 * h, some ? ic.asrc + 16 * ic.cl : ic.asrc, full ? 16 : (some ? 4 * left : 0));
  }
}

// Decode side: tile-level state of the current tile (rows g and g+8 of this thread, block t of each chunk).
struct DecodeCursor {
  int tl, cl;
  int rel0, rel1;      // flat block of (row, chunk c0, block t) minus 256·nested_lo, rows g and g+8
  int win0, win1;      // slot offsets of this thread's absmax in the rows' windows (window base ≡ block mod 4)
  bool ok0, ok1;       // rows g, g+8 < n
};

__device__ __forceinline__ void decode_enter_tile(const GemvParams& p, const CtaGeom& cta, DecodeCursor& dc,
                                                  int64_t nested_lo) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t row0 = static_cast<int64_t>(cta.tau0 + dc.tl) * kTileRows + g;
  const int64_t base = 4 * static_cast<int64_t>(cta.c0) + t - (nested_lo << kNF4NestedShift);
  dc.rel0 = static_cast<int>(row0 * p.kb + base);  // one CTA spans < 2^30 blocks (host check)
  dc.rel1 = static_cast<int>((row0 + 8) * p.kb + base);
  const int esize = p.w.absmax_q8 != nullptr ? 1 : 4;
  dc.win0 = kUnitBytes + g * p.abs_bytes + ((dc.rel0 - t) & 3) * esize + t * esize;
  dc.win1 = dc.win0 + 8 * p.abs_bytes;  // 8·kb ≡ 0 (mod 4): same offset in the window
  dc.ok0 = row0 < p.n;
  dc.ok1 = row0 + 8 < p.n;
}

// Scale of this thread's block in one row: bnb's rounding order (see nf4.cuh).
__device__ __forceinline__ float unit_scale(const GemvParams& p, const unsigned char* slot, int win, int rel,
                                            const float* nested_s, const float* ncode_s, float offset) {
  if (p.w.absmax_q8 != nullptr)
    return __fadd_rn(__fmul_rn(ncode_s[slot[win]], nested_s[rel >> kNF4NestedShift]), offset);
  return *reinterpret_cast<const float*>(slot + win);
}

// One unit: thread (g, t) decodes block t of rows g and g+8 (64 k each) and runs 16 k-steps of mma per n8 tile.
// k permutation: the mma k-slots (2t, 2t+1 | 2t+8, 2t+9) of step 2i (2i+1) hold physical k 64t + 8i + (0,1 | 2,3)
// ((4,5 | 6,7)), the same for w (A) and x (B): the sum is unchanged and a word of w meets one 16 B load of x.
// Blocks past k (ragged last chunk) and rows >= n get scale 0: their table is all zeros, whatever the slot holds.
template <typename T, int NT>
__device__ __forceinline__ void process_unit(const GemvParams& p, const CtaGeom& cta, const DecodeCursor& dc,
                                             const unsigned char* slot, const unsigned char* x_s,
                                             const float* code_s, const float* nested_s, const float* ncode_s,
                                             float offset, uint32_t k3210, float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool blk_ok = cta.c0 + dc.cl != p.ck - 1 || 2 * t < p.tail_segs;  // ragged last chunk: tail_segs/2 blocks
  const float s0 =
      dc.ok0 && blk_ok ? unit_scale(p, slot, dc.win0, dc.rel0 + 4 * dc.cl, nested_s, ncode_s, offset) : 0.f;
  const float s1 =
      dc.ok1 && blk_ok ? unit_scale(p, slot, dc.win1, dc.rel1 + 4 * dc.cl, nested_s, ncode_s, offset) : 0.f;
  float code[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(code_s)[q];  // smem broadcast
    code[4 * q + 0] = v.x; code[4 * q + 1] = v.y; code[4 * q + 2] = v.z; code[4 * q + 3] = v.w;
  }
  const BlockTable tb0 = make_table<T>(code, s0);
  const BlockTable tb1 = make_table<T>(code, s1);
  // x: row x_row(nt), 16 B chunk 32·cl + 8t + (i ^ t ^ 4(g&1)) (xs_chunk with (j>>3) & 3 == t). A clamped row
  // (column >= m) may have the other parity, so it reads another chunk of that row: finite, and discarded.
  const int row_bytes = p.xs_stride * 2;
  const int xsw = (t ^ ((g & 1) << 2)) << 4;
  const unsigned char* xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = x_s + x_row(p.m, nt) * row_bytes + (dc.cl * 32 + 8 * t) * 16;
  // w: segment (2t + h) ^ (g & 1) of rows g and g+8 ((g+8) & 1 == g & 1)
  const unsigned char* wrow = slot + g * kRowBytes + 32 * t;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int seg = (h ^ (g & 1)) << 4;
    const uint4 raw0 = *reinterpret_cast<const uint4*>(wrow + seg);
    const uint4 raw1 = *reinterpret_cast<const uint4*>(wrow + 8 * kRowBytes + seg);
    const uint32_t w0[4] = {raw0.x, raw0.y, raw0.z, raw0.w};
    const uint32_t w1[4] = {raw1.x, raw1.y, raw1.z, raw1.w};
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int i = 4 * h + jj;
      uint32_t a0[4], a1[4];
      decode_word(tb0, w0[jj], k3210, a0);
      decode_word(tb1, w1[jj], k3210, a1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 xf = *reinterpret_cast<const uint4*>(xrow[nt] + ((i << 4) ^ xsw));
        mma4<T>(acc[nt], a0[0], a1[0], a0[1], a1[1], xf.x, xf.y);
        mma4<T>(acc[nt], a0[2], a1[2], a0[3], a1[3], xf.z, xf.w);
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

// Issue unit u (the cursor's position) into its ring slot and advance the cursor.
__device__ __forceinline__ void issue_next(const GemvParams& p, const CtaGeom& cta, IssueCursor& ic, int u, int ua,
                                           int ub, unsigned char* ring, uint64_t pol) {
  issue_unit(p, cta, ic, ring + (static_cast<unsigned>(u - ua) % kStages) * p.slot_bytes, pol);
  if (++ic.cl == cta.cks) {
    ic.cl = 0;
    ++ic.tl;
    if (u + 1 < ub) issue_enter_tile(p, cta, ic);
  }
}

// Prologue of a decode warp: put its first kStages-1 units in flight (runs before the CTA waits for x).
__device__ __forceinline__ void decode_prologue(const GemvParams& p, const CtaGeom& cta, unsigned char* smem,
                                                IssueCursor& ic, int ua, int ub, uint64_t pol) {
  unsigned char* ring = smem + p.off_stage + (threadIdx.x / 32) * kStages * p.slot_bytes;
  if (ua < ub) {
    ic.tl = ua / cta.cks;
    ic.cl = ua - ic.tl * cta.cks;
    issue_enter_tile(p, cta, ic);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (ua + s < ub) issue_next(p, cta, ic, ua + s, ua, ub, ring, pol);
    cp_async_commit();
  }
}

// Main loop of a decode warp over units [ua, ub). A finished tile goes to acc_s when the warp covered it whole;
// the first (head) and last (tail) tile of the range may be shared with neighbours and go to the warp's slots.
template <typename T, int NT>
__device__ void decode_main(const GemvParams& p, const CtaGeom& cta, unsigned char* smem,
                            IssueCursor& ic, int ua, int ub, uint64_t pol, const float* nested_s, int64_t nested_lo,
                            float offset) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  unsigned char* ring = smem + p.off_stage + warp * kStages * p.slot_bytes;
  const float* code_s = reinterpret_cast<const float*>(smem + p.off_code);
  const float* ncode_s = reinterpret_cast<const float*>(smem + p.off_ncode);
  float* acc_s = reinterpret_cast<float*>(smem + p.off_acc);
  if (ua >= ub) return;
  const int first_tl = ua / cta.cks;
  auto owned = [&](int tl) { return ua <= tl * cta.cks && ub >= (tl + 1) * cta.cks; };

  DecodeCursor dc;
  dc.tl = first_tl;
  dc.cl = ua - first_tl * cta.cks;
  decode_enter_tile(p, cta, dc, nested_lo);
  float acc[NT][4] = {}, head[NT][4] = {};
  for (int u = ua; u < ub; ++u) {
    // refill the slot freed by the previous iteration, then wait for unit u (groups complete in order)
    if (u + kStages - 1 < ub) issue_next(p, cta, ic, u + kStages - 1, ua, ub, ring, pol);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    process_unit<T, NT>(p, cta, dc, ring + (static_cast<unsigned>(u - ua) % kStages) * p.slot_bytes, smem, code_s,
                        nested_s, ncode_s, offset, p.k3210, acc);
    __syncwarp();  // every lane is done with the slot before it is refilled
    if (++dc.cl == cta.cks && u + 1 < ub) {  // tile finished mid-range: all ours (-> smem) or our head
      if (owned(dc.tl)) {
        store_frag<NT>(acc_s + dc.tl * 32 * 4 * NT, acc);
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
      dc.cl = 0;
      ++dc.tl;
      decode_enter_tile(p, cta, dc, nested_lo);
    }
  }
  cp_async_wait<0>();
  __syncwarp();
  const int last_tl = dc.tl;
  if (owned(last_tl)) {
    store_frag<NT>(acc_s + last_tl * 32 * 4 * NT, acc);
  } else if (last_tl == first_tl) {
    store_frag<NT>(warp_slot(smem, p, warp, 0, NT), acc);  // the whole range sits inside one shared tile
  } else {
    store_frag<NT>(warp_slot(smem, p, warp, 1, NT), acc);  // tail
  }
  if (last_tl != first_tl && !owned(first_tl)) store_frag<NT>(warp_slot(smem, p, warp, 0, NT), head);
}

// ---------------------------------------------------------------------------------------------------------
// Epilogue: y tile = partial + s·(lora_B rows · uᵀ) + bias
// ---------------------------------------------------------------------------------------------------------
// lora_b_rows: lora_B row 16·tau (smem slice or global), row stride r. bias_rows: bias + 16·tau or nullptr.
// u_rows: [m][r_pad] in smem. lora_b_rows and bias_rows are generic pointers: smem (S == 1) or global (S > 1).
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
        const uint32_t* ur =
            reinterpret_cast<const uint32_t*>(u_rows + static_cast<int64_t>(mm) * p.r_pad + 16 * s + 2 * t);
        b0 = ur[0];
        b1 = ur[4];
      }
      mma4<T>(c2[nt], a[0], a[1], a[2], a[3], b0, b1);
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
        if (bb != nullptr) v += Elem<T>::to_float(bb[row]);
        reinterpret_cast<uint16_t*>(y)[static_cast<int64_t>(mm) * p.n + row0 + row] = Elem<T>::from_float(v);
      }
    }
}

// S > 1 (the last split of the rowgroup): sum the S partials of a tile from ws_y in split order; lora_B and bias
// from global, u from this CTA's smem copy.
template <typename T, int NT>
__device__ void finalize_tile_global(const GemvParams& p, int tau, const T* u_s) {
  float acc[NT][4] = {};
  for (int ks = 0; ks < p.splits; ++ks)
    add_frag<NT>(acc, p.ws_y + (static_cast<int64_t>(ks) * p.tiles + tau) * 32 * 4 * NT);
  const T* lora_b = reinterpret_cast<const T*>(p.lora_B) + static_cast<int64_t>(tau) * kTileRows * p.r;
  const T* bias = p.bias ? reinterpret_cast<const T*>(p.bias) + static_cast<int64_t>(tau) * kTileRows : nullptr;
  epilogue_tile<T, NT>(p, tau, acc, lora_b, bias, u_s);
}

// ---------------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------------
template <typename T, int NT, int DW = decode_warps(NT)>
__global__ void __launch_bounds__((DW + 1) * 32, 1) qlora_gemv_kernel(const __grid_constant__ GemvParams p) {
  constexpr int kLoraWarp = DW, kWarps = DW + 1, kThreads = kWarps * 32;
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
      const bool ok = j < cta.cks * 32 && kk < p.k;  // zeros past k (ragged last chunk, shorter split)
      cp_async_16_zfill(smem_addr(smem + mm * row_bytes + (xs_chunk(j, mm) << 4)),
                        x + (ok ? static_cast<int64_t>(mm) * p.k + kk : 0), ok ? 16 : 0);
    }
  }
  if (threadIdx.x < 16) reinterpret_cast<float*>(smem + p.off_code)[threadIdx.x] = __ldg(p.w.code + threadIdx.x);
  // nested_lo: the CTA's first flat block / 256. Block indices in the loop are kept relative to 256·nested_lo
  // (32-bit; host checks one CTA spans < 2^30 blocks).
  const int64_t nested_lo = (row_begin * p.kb + 4 * cta.c0) >> kNF4NestedShift;
  float offset = 0.f;
  if (p.w.absmax_q8 != nullptr) {
    for (int i = threadIdx.x; i < 256; i += kThreads)
      reinterpret_cast<float*>(smem + p.off_ncode)[i] = __ldg(p.w.nested_code + i);
    offset = __ldg(p.w.offset);
    if (cta.ntiles > 0) {
      const int64_t blk_last = (row_end - 1) * p.kb + min(4 * (cta.c0 + cta.cks), p.kb) - 1;
      const int cnt = static_cast<int>((blk_last >> kNF4NestedShift) - nested_lo + 1);  // <= nested_cap (host)
      for (int i = threadIdx.x; i < cnt; i += kThreads) nested_s[i] = __ldg(p.w.nested_absmax + nested_lo + i);
    }
  }
  if (threadIdx.x == 0) *misc = CtaMisc{};
  // u rows into smem, zero-padded to r_pad ranks (the expand's k); written by the previous launch on the stream.
  {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(p.u);
    uint16_t* u_s = reinterpret_cast<uint16_t*>(smem + p.off_u);
    for (int idx = threadIdx.x; idx < p.m * p.r_pad; idx += kThreads) {
      const int mm = idx / p.r_pad, rr = idx % p.r_pad;
      u_s[idx] = rr < p.r ? u[static_cast<int64_t>(mm) * p.r + rr] : uint16_t(0);
    }
  }
  // lora_B rows and bias of this CTA into smem for the epilogue (contiguous byte ranges, 32-byte aligned starts).
  if (warp == kLoraWarp && cta.ntiles > 0) {
    const int64_t lb_bytes = (row_end - row_begin) * p.r * 2;
    const unsigned char* lb_src = reinterpret_cast<const unsigned char*>(p.lora_B) + row_begin * p.r * 2;
    for (int64_t o = lane * 16; o < lb_bytes; o += 32 * 16)
      cp_async_16_zfill(smem_addr(smem + p.off_lora_b + o), lb_src + o, static_cast<int>(min64(16, lb_bytes - o)));
    if (p.bias != nullptr) {
      const int64_t b_bytes = (row_end - row_begin) * 2;
      const unsigned char* b_src = reinterpret_cast<const unsigned char*>(p.bias) + row_begin * 2;
      for (int64_t o = lane * 16; o < b_bytes; o += 32 * 16)
        cp_async_16_zfill(smem_addr(smem + p.off_bias + o), b_src + o, static_cast<int>(min64(16, b_bytes - o)));
    }
  }
  cp_async_commit();

  // 2. Decode warps start their weight stream before waiting for x.
  const int ua = warp < DW ? warp_unit_begin<DW>(cta.units, warp) : 0;
  const int ub = warp < DW ? warp_unit_begin<DW>(cta.units, warp + 1) : 0;
  const uint64_t pol = evict_first_policy();
  IssueCursor ic{};
  if (warp < DW) {
    decode_prologue(p, cta, smem, ic, ua, ub, pol);
    cp_async_wait<kStages - 1>();  // the x group (committed first) is complete
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();

  // 3. Main work: the decode warps stream w (the lora warp's smem loads are in already).
  if (warp < DW) decode_main<T, NT>(p, cta, smem, ic, ua, ub, pol, nested_s, nested_lo, offset);
  __syncthreads();

  // 4. Tiles shared by several decode warps: sum the contributions in warp (= k) order into acc_s.
  for (int tl = warp; tl < cta.ntiles; tl += kWarps) {
    const int lo = tl * cta.cks, hi = lo + cta.cks;
    bool single = false;
    for (int w = 0; w < DW; ++w) {
      const int wa = warp_unit_begin<DW>(cta.units, w), wb = warp_unit_begin<DW>(cta.units, w + 1);
      single |= wa < wb && wa <= lo && wb >= hi;
    }
    if (single) continue;
    float s[NT][4] = {};
    for (int w = 0; w < DW; ++w) {
      const int wa = warp_unit_begin<DW>(cta.units, w), wb = warp_unit_begin<DW>(cta.units, w + 1);
      if (wa < wb && wa < hi && wb > lo) add_frag<NT>(s, warp_slot(smem, p, w, wa / cta.cks == tl ? 0 : 1, NT));
    }
    store_frag<NT>(acc_s + tl * 32 * 4 * NT, s);
  }
  __syncthreads();

  // 5. Finalize. S == 1: straight from smem.
  const T* lora_b_s = reinterpret_cast<const T*>(smem + p.off_lora_b);
  const T* bias_s = p.bias ? reinterpret_cast<const T*>(smem + p.off_bias) : nullptr;
  const T* u_s = reinterpret_cast<const T*>(smem + p.off_u);
  if (p.splits == 1) {
    for (int tl = warp; tl < cta.ntiles; tl += kWarps) {
      float acc[NT][4];
      const float4* a4 = reinterpret_cast<const float4*>(acc_s + tl * 32 * 4 * NT) + lane * NT;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4 v = a4[nt];
        acc[nt][0] = v.x; acc[nt][1] = v.y; acc[nt][2] = v.z; acc[nt][3] = v.w;
      }
      epilogue_tile<T, NT>(p, cta.tau0 + tl, acc, lora_b_s + static_cast<int64_t>(tl) * kTileRows * p.r,
                           bias_s ? bias_s + tl * kTileRows : nullptr, u_s);
    }
    return;
  }
  // S > 1: publish this split's partials and arrive; the last of the S arrivals finalizes.
  if (cta.ntiles > 0) {
    const int n4 = cta.ntiles * 32 * NT;  // float4s
    float4* dst = reinterpret_cast<float4*>(p.ws_y + (static_cast<int64_t>(cta.ks) * p.tiles + cta.tau0) * 32 * 4 * NT);
    const float4* src = reinterpret_cast<const float4*>(acc_s);
    for (int i = threadIdx.x; i < n4; i += kThreads) dst[i] = src[i];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) misc->last = atomicAdd(p.rg_count + cta.rg, 1) == p.splits - 1;
  __syncthreads();
  if (!misc->last) return;
  __threadfence();
  for (int tl = warp; tl < cta.ntiles; tl += kWarps) finalize_tile_global<T, NT>(p, cta.tau0 + tl, u_s);
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
  const int64_t ck = ceil_div(k, kChunkK), tiles = ceil_div(n, kTileRows);
  const int64_t cks_max = ceil_div(ck, S), tcta_max = ceil_div(tiles, R);
  const int64_t r_pad = ceil_div(r, 16) * 16;
  GemvPlan pl{};
  pl.splits = S;
  pl.rowgroups = R;
  pl.xs_stride = static_cast<int>(cks_max * kChunkK);
  // nested groups spanned by a CTA: its blocks span at most rows·kb flat blocks
  pl.nested_cap = dq ? static_cast<int>(tcta_max * kTileRows * (k / 64) / 256 + 2) : 0;
  int64_t off = align_up(m * pl.xs_stride * 2, 128);
  pl.off_stage = static_cast<int>(off);
  off = align_up(off + int64_t(decode_warps(nt)) * kStages * slot_bytes, 128);
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

// One wave first: the smallest S (k splits) whose x slice fits next to the ring with R = SMs / S rowgroups (S > 1
// costs a round of partial sums through L2; with fewer tiles than SMs, k is split anyway so every SM gets work).
// Only if no single-wave configuration fits (huge n: the per-CTA partials and lora_B slice outgrow smem) are
// more rowgroups than SMs used.
GemvPlan plan_gemv(int64_t m, int64_t n, int64_t k, int64_t r, bool dq, int nt, int slot_bytes, int num_sms,
                   int64_t smem_limit) {
  const int64_t ck = ceil_div(k, kChunkK), tiles = ceil_div(n, kTileRows);
  const int64_t s_first = std::min<int64_t>(ck, tiles < num_sms ? std::max<int64_t>(1, num_sms / tiles) : 1);
  for (int waves = 1; waves <= 64; waves *= 2) {
    for (int64_t S = s_first; S <= ck; ++S) {
      const int64_t R = std::max<int64_t>(1, std::min<int64_t>(tiles, waves * num_sms / S));
      const GemvPlan pl = carve(m, n, k, r, dq, nt, slot_bytes, static_cast<int>(S), static_cast<int>(R));
      if (pl.smem <= smem_limit) return pl;
    }
  }
  TORCH_CHECK(false, "qlora_gemv: no launch configuration fits in ", smem_limit, " bytes of shared memory for m = ",
              m, ", n = ", n, ", k = ", k, ", r = ", r);
  return GemvPlan{};
}

// The one launcher: picks the instantiation (dtype x n8-tile count, m <= 8·NT), raises the smem limit, launches
// on the caller's stream and checks the launch. Block = decode warps + the lora warp.
void launch_qlora_gemv(const GemvParams& p, at::ScalarType dtype, int nt, int grid, int64_t smem,
                       cudaStream_t stream) {
  const bool bf16 = dtype == at::kBFloat16;
  void (*kernel)(GemvParams) = nullptr;
  switch (nt) {
    case 1: kernel = bf16 ? qlora_gemv_kernel<__nv_bfloat16, 1> : qlora_gemv_kernel<__half, 1>; break;
    case 2: kernel = bf16 ? qlora_gemv_kernel<__nv_bfloat16, 2> : qlora_gemv_kernel<__half, 2>; break;
    case 4: kernel = bf16 ? qlora_gemv_kernel<__nv_bfloat16, 4> : qlora_gemv_kernel<__half, 4>; break;
    default: TORCH_CHECK(false, "qlora_gemv: unsupported n8 tile count ", nt);
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, (decode_warps(nt) + 1) * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Op qlora_ext::_gemv_fwd (schema: csrc/ops.cpp) -> (y [m, n], u [m, r]) like _fused_fwd; decode-only fast path
// (1 <= m <= 32, no autograd). Twin: qlora_ext.reference.qlora_linear.
std::tuple<at::Tensor, at::Tensor> gemv_fwd(const at::Tensor& x, const OptionalTensorList& w,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const std::optional<at::Tensor>& bias, double scaling, double dropout_p,
                                            int64_t seed) {
  constexpr const char* kOp = "qlora_gemv";
  check_activation(kOp, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Device device = x.device();
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, kOp, ": m (rows of x) must satisfy 1 <= m <= ", kMaxM,
              " on the decode path, got m = ", x.size(0));
  const auto [m, n, k, r, has_bias, wt] = check_forward_args(kOp, x, w, lora_A, lora_B, bias, dropout_p);
  TORCH_CHECK(n * k / 2 < (int64_t(1) << 62) && n < (int64_t(1) << 31) - 16, kOp, ": weight too large");
  const bool dq = wt.double_quant;
  const KernelScope scope;  // the u product below is a kernel-internal op: no autograd, no autocast

  // 16-byte vector paths: x rows (k % 64 keeps every row aligned), w_nf4 rows (k/2 bytes), lora_B and bias
  // slices (start at row 16·tau: 32·tau·r and 32·tau bytes), fp32 absmax windows; uint8 absmax words: 4.
  check_aligned(kOp, "x", x, 16);
  check_aligned(kOp, "w_nf4", wt.w_nf4, 16);
  check_aligned(kOp, "lora_B", lora_B, 16);
  if (has_bias) check_aligned(kOp, "bias", *bias, 16);
  check_aligned(kOp, "absmax", wt.absmax, dq ? 4 : 16);

  // u first, on cuBLAS (see the header for why not in the kernel); the kernel reads it in stream order.
  const at::Tensor u = at::mm(dropout_p > 0 ? lora_dropout(x, dropout_p, seed) : x, lora_A.t());
  auto y = at::empty({m, n}, x.options());

  const int nt = m <= 8 ? 1 : (m <= 16 ? 2 : 4);
  const int abs_bytes = dq ? 8 : 32;
  const int slot_bytes = kUnitBytes + kTileRows * abs_bytes;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const GemvPlan pl = plan_gemv(m, n, k, r, dq, nt, slot_bytes, prop->multiProcessorCount, smem_limit);
  // Block indices inside a CTA are 32-bit offsets from its first block (see decode_enter_tile).
  TORCH_CHECK(ceil_div(ceil_div(n, kTileRows), pl.rowgroups) * kTileRows * (k / 64) + 512 < (int64_t(1) << 30), kOp,
              ": weight too large for the decode path (one CTA would span 2^30 NF4 blocks)");

  const int64_t ck = ceil_div(k, kChunkK), tiles = ceil_div(n, kTileRows);
  const int64_t r_pad = ceil_div(r, 16) * 16;
  // Workspace: the split partials (S > 1) in the stream's gemv scratch (path_ops.h), so a call allocates only y
  // and u; nothing in it needs zeroing (every byte read was written earlier in the launch).
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ws =
      pl.splits > 1 ? stream_scratch(ScratchSlot::kGemvPartials, int64_t(pl.splits) * tiles * 32 * 4 * nt * 4,
                                     x.options().dtype(at::kByte))
                    : at::Tensor();
  const at::Tensor counters = stream_counters(device, pl.rowgroups);

  GemvParams p{};
  p.x = x.data_ptr();
  p.w = wt.view();
  p.lora_B = lora_B.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.u = u.data_ptr();
  p.ws_y = ws.defined() ? reinterpret_cast<float*>(ws.data_ptr<uint8_t>()) : nullptr;
  p.rg_count = counters.data_ptr<int>();
  p.n = n;
  p.k = k;
  p.nblocks = n * (k / 64);
  p.m = static_cast<int>(m);
  p.r = static_cast<int>(r);
  p.r_pad = static_cast<int>(r_pad);
  p.kb = static_cast<int>(k / 64);
  p.ck = static_cast<int>(ck);
  p.tiles = static_cast<int>(tiles);
  p.splits = pl.splits;
  p.rowgroups = pl.rowgroups;
  p.xs_stride = pl.xs_stride;
  p.tail_segs = static_cast<int>((k - (ck - 1) * kChunkK) / 32);
  p.slot_bytes = slot_bytes;
  p.abs_bytes = abs_bytes;
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
  p.k3210 = 0x32103210u;

  // Ask for more than half the SM's smem so two CTAs never share an SM (grid = S·R <= #SMs is sized for one each).
  const int64_t smem = std::min(smem_limit, std::max<int64_t>(pl.smem, smem_limit / 2 + 128));
  launch_qlora_gemv(p, x.scalar_type(), nt, pl.splits * pl.rowgroups, smem, stream);
  return {y, u};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_gemv_fwd", &qlora_ext::gemv_fwd); }
