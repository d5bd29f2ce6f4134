// Thin PTX wrappers for the Ampere-style tensor-core path (sm80+, also runs on sm86/89/90):
// cp.async brings global tiles into shared memory without a register round trip, ldmatrix turns
// shared-memory rows into mma fragments in one instruction, mma.sync does the 16x8x16 product.
// Each wrapper names its instruction as written in NVIDIA's PTX ISA so a reader can look it up.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora_ext {

// 32-bit shared-state-space address of a generic pointer: ldmatrix/cp.async take .shared addresses, and
// 32-bit arithmetic on them is cheaper than 64-bit generic pointers.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg.shared.global [dst], [src], 16, src_size — 16-byte async copy that bypasses L1 (.cg: the
// tiles are streamed once per CTA, L1 would only evict useful lines). src_size = 0 writes 16 zero bytes
// without reading src, which is how tails (rows >= m, cols >= k, rows >= n) become zero padding.
// cp_async_16_zfill is the general form: bytes past src_bytes (0..16) are zero-filled (a tensor's ragged tail).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  cp_async_16_zfill(dst, src, valid ? 16 : 0);
}

// cp.async.ca.shared.global [dst], [src], 4, src_size — 4-byte copy (sizes below 16 exist only as .ca), e.g.
// one aligned word of a uint8 absmax; bytes past src_bytes are zero-filled.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

// createpolicy.fractional.L2::evict_first.b64 — an L2 policy for data read exactly once (packed weights), so
// it does not displace what is re-read (activations, LoRA factors, workspaces).
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// cp.async.cg.shared.global.L2::cache_hint [dst], [src], 16, policy — 16-byte copy under an L2 policy.
__device__ __forceinline__ void cp_async_16_hint(uint32_t dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(pol)
               : "memory");
}

// cp.async.commit_group — closes the copies issued so far into one group (one pipeline stage).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// cp.async.wait_group N — waits until at most N of this thread's groups are still in flight. The "memory"
// clobber keeps the compiler from hoisting shared-memory reads of the landed stage above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// wait_group takes an immediate; the stage count is a runtime choice of the launcher (it depends on the
// device's shared memory), so map the few allowed values onto immediates.
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  if (n <= 0) cp_async_wait<0>();
  else if (n == 1) cp_async_wait<1>();
  else cp_async_wait<2>();
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 — four 8x8 b16 matrices; lane l supplies the address of row
// (l % 8) of matrix (l / 8); afterwards lane l holds, in register i, row l/4, columns 2(l%4), 2(l%4)+1 of
// matrix i. That is exactly an mma A fragment (row-major) or B fragment (stored [n][k]).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 — same addressing, but lane l receives rows 2(l%4),
// 2(l%4)+1 of column l/4: a B fragment read from a tile stored [k][n] (n contiguous) without a transposed
// copy in memory. Used where W is the B operand in its other orientation (dx = dy·w).
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 — d += a·b with fp32 accumulation.
// Fragments (PTX ISA "Matrix Fragments for mma.m16n8k16", g = lane/4, t = lane%4):
//   a[0]=(g, 2t..2t+1) a[1]=(g+8, 2t..) a[2]=(g, 2t+8..) a[3]=(g+8, 2t+8..)      A is 16x16, row-major
//   b0=(k 2t..2t+1, n g) b1=(k 2t+8.., n g)                                     B is 16x8
//   d[0..1]=(g, 2t..2t+1) d[2..3]=(g+8, 2t..2t+1)                                D is 16x8
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                "mma_m16n8k16: bf16 or fp16 operands");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace qlora_ext
