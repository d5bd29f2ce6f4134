// NF4 as an element type of CUTLASS's sm90 mixed-input GEMM (RS wgmma, ConvertAndScale), for the *_sm90.cu units.
//
// CUTLASS 4.2's mixed-input mainloop (gemm/collective/sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp) brings
// the narrow operand into registers and, per 8 values of one thread's wgmma A fragment, calls
//   cutlass::LayoutAwareConvertImpl<SrcType, DstType, LayoutIn, LayoutOut>::convert(src, dst)
// (detail/collective/mixed_input_utils.hpp) and then multiplies by the group scale in the 16-bit type. Giving NF4 its
// own 4-bit type and specializing that hook for it is all the collective needs: no CUTLASS header is edited.
//
// Which nibble is which. bitsandbytes stores element 2j of a row in the HIGH nibble of byte j. CUTLASS's sub-byte
// convention is the opposite (element 2j in the low nibble), so where bnb stores element 2j CUTLASS sees element 2j+1
// and vice versa. Every byte holds two k-adjacent values of the same row, and in a wgmma A fragment a thread always holds
// k pairs (2t, 2t+1) of one row, so such a byte travels whole from global memory to the register word the hook
// receives, in both weight layouts the sm90 forward uses:
//   stored    TMA copies bnb's [n][k/2] bytes as they are; the smem->register copy moves whole bytes;
//   repacked  a per-call kernel moves bnb's bytes (never nibbles) into CUTLASS's fragment order (nf4_fragment_atom).
// Either way byte i of the 32-bit word holds fragment values 2i (high nibble) and 2i+1 (low nibble); the decoder
// below reads them in that order, so bnb's nibble order costs nothing.
//
// Decode = register table lookup with prmt (PTX ISA: "prmt"). A 16-bit code value has a low and a high byte; the 16
// low bytes form a table of 4 words, the 16 high bytes another. prmt picks 4 bytes out of 2 words (8 entries) by
// 3-bit indices, so a 16-entry lookup is two 8-entry lookups (entries 0-7, 8-15) and a third prmt choosing between
// them by code bit 3. Per 4 codes: 3 prmt for the low bytes, 3 for the high bytes, 2 to interleave them into two
// bf16x2/f16x2 words; plus 5 shared bit ops per 8 codes: about 21 instructions per 8 values (int4's lop3 path: ~11).
// The table entries are dtype(NF4 code); CUTLASS multiplies them by the block scale in the 16-bit type, so a weight is
// dtype(dtype(code) * dtype(scale)): code and scale are rounded to 16 bits before a product that is rounded again,
// where bitsandbytes rounds once (dtype(fp32(code * scale))). Some weights then differ from bnb's by about 1 ulp
// (nf4_probe.cu measured a relative Frobenius distance of 2.7e-3 in bf16); the kernel tests hold y to the ratio rule
// (tests/conftest.py), not to bit equality with bnb.
#pragma once

#include <cstdint>

// First the collective builders: CUTLASS's mixed_input_utils.hpp names cute's _1, _2, ... unqualified inside namespace
// cutlass and compiles only after a header that brings cute into that namespace (the builders do).
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cute/arch/mma_sm90.hpp>  // SM90::GMMA::rs_op_selector
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/detail/collective/mixed_input_utils.hpp>  // the LayoutAwareConvertImpl hook
#include <cutlass/half.h>
#include <cutlass/numeric_size.h>

namespace qlora_ext {

// A 4-bit NF4 code (index into the 16-entry codebook). Its own type, so no CUTLASS path for int4/uint4 changes;
// one storage byte like cutlass::integer_subbyte, with sizeof_bits == 4 (specialized right below).
struct nf4_t {
  uint8_t storage;
};

}  // namespace qlora_ext

// Declared before anything can instantiate the primary template for nf4_t (cute::sizeof_bits derives from it).
template <>
struct cutlass::sizeof_bits<qlora_ext::nf4_t> {
  static constexpr int value = 4;
};

namespace qlora_ext {

// bitsandbytes' NF4 codebook (reference.NF4_CODE), as exact fp32 hex literals.
constexpr float kNF4CodeF32[16] = {
    -0x1p+0f,          -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.946540p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f,
    -0x1.74f0e2p-4f,   0x0p+0f,         0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c3497p-2f,     0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f};

// fp32 -> 16-bit patterns, round to nearest even, at compile time (normal values and zero: all NF4 codes).
constexpr uint16_t bf16_bits_rne(float f) {
  const uint32_t b = __builtin_bit_cast(uint32_t, f);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
constexpr uint16_t fp16_bits_rne(float f) {
  const uint32_t b = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (b >> 16) & 0x8000u, mag = b & 0x7FFFFFFFu;
  if (mag == 0) return static_cast<uint16_t>(sign);
  const uint32_t exp16 = (mag >> 23) - 127u + 15u;  // the codes' exponents (-4 .. 0) are normal in fp16
  const uint32_t mant = mag & 0x7FFFFFu, rest = mant & 0x1FFFu;
  uint32_t h = (exp16 << 10) | (mant >> 13);
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still exact RNE
  return static_cast<uint16_t>(sign | h);
}

template <typename Half>  // cutlass::bfloat16_t or cutlass::half_t
constexpr uint16_t nf4_code_bits(int i) {
  if constexpr (cute::is_same_v<Half, cutlass::bfloat16_t>) return bf16_bits_rne(kNF4CodeF32[i]);
  else return fp16_bits_rne(kNF4CodeF32[i]);
}

// Word w of the low-byte (hi = 0) or high-byte (hi = 1) table: that byte of entries 4w .. 4w+3, entry 4w+j in byte j.
template <typename Half>
constexpr uint32_t nf4_table_word(int hi, int w) {
  uint32_t word = 0;
  for (int j = 0; j < 4; ++j) word |= uint32_t((nf4_code_bits<Half>(4 * w + j) >> (8 * hi)) & 0xFFu) << (8 * j);
  return word;
}

// Cross-check of the compile-time rounding against torch: torch.tensor(NF4_CODE).to(dtype).view(torch.int16).
static_assert(nf4_code_bits<cutlass::bfloat16_t>(1) == 0xBF32 && nf4_code_bits<cutlass::bfloat16_t>(8) == 0x3DA3 &&
                  nf4_code_bits<cutlass::bfloat16_t>(12) == 0x3EE2 && nf4_code_bits<cutlass::bfloat16_t>(14) == 0x3F39,
              "bf16 NF4 table");
static_assert(nf4_code_bits<cutlass::half_t>(1) == 0xB992 && nf4_code_bits<cutlass::half_t>(6) == 0xADD4 &&
                  nf4_code_bits<cutlass::half_t>(8) == 0x2D18 && nf4_code_bits<cutlass::half_t>(14) == 0x39C9,
              "fp16 NF4 table");
static_assert(nf4_table_word<cutlass::bfloat16_t>(0, 0) == 0xCA063280u &&
                  nf4_table_word<cutlass::bfloat16_t>(1, 3) == 0x3F3F3F3Eu,
              "table packing: entry 4w+j in byte j");

// Entry i of the table as 16 bits, for device code that checks a runtime codebook against it.
template <typename Half>
__host__ __device__ __forceinline__ uint16_t nf4_table_entry(int i) {
  constexpr uint32_t lo[4] = {nf4_table_word<Half>(0, 0), nf4_table_word<Half>(0, 1), nf4_table_word<Half>(0, 2),
                              nf4_table_word<Half>(0, 3)};
  constexpr uint32_t hi[4] = {nf4_table_word<Half>(1, 0), nf4_table_word<Half>(1, 1), nf4_table_word<Half>(1, 2),
                              nf4_table_word<Half>(1, 3)};
  uint32_t l = 0, h = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w)  // select, so the constant arrays are never indexed at run time
    if (w == i / 4) l = lo[w], h = hi[w];
  const int shift = 8 * (i % 4);
  return static_cast<uint16_t>(((l >> shift) & 0xFFu) | (((h >> shift) & 0xFFu) << 8));
}

// prmt.b32 d, a, b, c (default mode): byte j of d = byte (c's nibble j & 7) of {b, a}; nibble bit 3 would replicate
// that byte's sign bit, so lookups keep it clear.
__device__ __forceinline__ uint32_t prmt_b32(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// 0 in every lane (lanemask_eq and lanemask_lt never share a bit) that the compiler cannot prove is 0. XOR-ing the
// table words that prmt must take from registers with it stops ptxas from re-materializing them from uniform
// registers before every prmt (one extra move per lookup); the loop-invariant XORs are hoisted out of the k-loop.
__device__ __forceinline__ uint32_t unknown_zero() {
  uint32_t eq, lt;
  asm("mov.u32 %0, %%lanemask_eq;" : "=r"(eq));
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(lt));
  return eq & lt;
}

// 8 codes -> 8 values. q: byte i = (fragment value 2i in the high nibble, 2i+1 in the low nibble); out[i] = values
// 2i (low half) and 2i+1 (high half) as bf16x2 / f16x2.
template <typename Half>
__device__ __forceinline__ void nf4_decode8(uint32_t q, uint32_t (&out)[4]) {
  constexpr uint32_t kLo1 = nf4_table_word<Half>(0, 1), kLo3 = nf4_table_word<Half>(0, 3);
  constexpr uint32_t kHi1 = nf4_table_word<Half>(1, 1), kHi3 = nf4_table_word<Half>(1, 3);
  const uint32_t z = unknown_zero();
  const uint32_t lo0 = nf4_table_word<Half>(0, 0) ^ z, lo2 = nf4_table_word<Half>(0, 2) ^ z;
  const uint32_t hi0 = nf4_table_word<Half>(1, 0) ^ z, hi2 = nf4_table_word<Half>(1, 2) ^ z;
  const uint32_t index = q & 0x77777777u;                          // code bits 0-2: entry within a half table
  const uint32_t half = ((q >> 1) & 0x44444444u) | 0x32103210u;    // nibble j: j, or j + 4 when code bit 3 is set
#pragma unroll
  for (int g = 0; g < 2; ++g) {  // codes of bytes 2g, 2g+1 (prmt reads the selector's low 16 bits)
    const uint32_t s = index >> (16 * g), h = half >> (16 * g);
    // byte j of lo/hi = entry of nibble j, i.e. of values (4g+1, 4g, 4g+3, 4g+2)
    const uint32_t lo = prmt_b32(prmt_b32(lo0, kLo1, s), prmt_b32(lo2, kLo3, s), h);
    const uint32_t hi = prmt_b32(prmt_b32(hi0, kHi1, s), prmt_b32(hi2, kHi3, s), h);
    out[2 * g] = prmt_b32(lo, hi, 0x4051u);      // value 4g:   (lo[1], hi[1]); value 4g+1: (lo[0], hi[0])
    out[2 * g + 1] = prmt_b32(lo, hi, 0x6273u);  // value 4g+2: (lo[3], hi[3]); value 4g+3: (lo[2], hi[2])
  }
}

// The hook body for NF4 -> bf16 / fp16. LayoutAwareConvert hands it the 8 values of one 32-bit register, coalesced:
// anything else means the weight layout does not match what the decoder assumes, so the build fails.
template <typename Half, class LayoutIn, class LayoutOut>
struct NF4ConvertSm90 {
  template <class EngineIn, class EngineOut>
  CUTLASS_DEVICE static void convert(cute::Tensor<EngineIn, LayoutIn> const& src,
                                     cute::Tensor<EngineOut, LayoutOut>& dst) {
    static_assert(cute::is_same_v<typename EngineIn::value_type, nf4_t> &&
                  cute::is_same_v<typename EngineOut::value_type, Half>);
    static_assert(cute::is_same_v<LayoutIn, cute::Layout<cute::_8, cute::_1>> &&
                      cute::is_same_v<LayoutOut, cute::Layout<cute::_8, cute::_1>>,
                  "NF4 decoder: expects the 8 codes of one 32-bit register and 8 contiguous outputs");
    uint32_t words[4];
    nf4_decode8<Half>(cute::recast<uint32_t>(src)(0), words);
    auto&& out = cute::recast<uint32_t>(dst);
#pragma unroll
    for (int i = 0; i < 4; ++i) out(i) = words[i];
  }
};

// The weight layout of the "repacked" variant: one 16 (rows of w) x 16 (k) block, (row, k) -> 4-bit offset, such
// that the 8 values a thread holds for one m64n?k16 wgmma A fragment (one warp covers 16 rows) are one contiguous
// 32-bit word, in fragment order. Built by inverting one warp's slice of the RS wgmma A thread-value layout (the same
// atom as CUTLASS's compute_memory_reordering_atom with an identity value order). Tiled over [n, k] with
// cute::tile_to_shape, it is the gmem layout the mainloop's TMA reads; k-adjacent pairs (2i, 2i+1) stay in one byte.
template <typename Half>
CUTE_HOST_DEVICE constexpr auto nf4_fragment_atom() {
  using namespace cute;
  using Mma = decltype(SM90::GMMA::rs_op_selector<Half, Half, float, Shape<_64, _16, _32>>());
  auto tv = typename MMA_Traits<Mma>::ALayout{};                                  // (thread, value) -> (m64, k16)
  auto warp_tv = make_layout_like(composition(tv, make_shape(_32{}, _8{})));       // warp 0: rows 0..15
  auto mk_to_tv = right_inverse(warp_tv).with_shape(make_shape(_16{}, _16{}));     // (m16, k16) -> (thread, value)
  auto tv_to_offset = make_layout(make_shape(_32{}, _8{}), make_stride(_8{}, _1{}));  // thread t, value v -> 8t + v
  return composition(tv_to_offset, mk_to_tv);
}

}  // namespace qlora_ext

namespace cutlass {

template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<qlora_ext::nf4_t, cutlass::bfloat16_t, LayoutIn, LayoutOut>
    : qlora_ext::NF4ConvertSm90<cutlass::bfloat16_t, LayoutIn, LayoutOut> {};

template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<qlora_ext::nf4_t, cutlass::half_t, LayoutIn, LayoutOut>
    : qlora_ext::NF4ConvertSm90<cutlass::half_t, LayoutIn, LayoutOut> {};

}  // namespace cutlass
