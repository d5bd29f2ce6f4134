// One instance of the Hopper forward's NF4 GEMM (csrc/qlora_fwd_sm90.h says why each has a unit of its own).
#include "qlora_fwd_sm90_gemm.cuh"

template struct qlora_ext::sm90::NF4GemmSm90<cutlass::bfloat16_t, qlora_ext::sm90::Sm90Tile::k128x256, qlora_ext::sm90::WLayout::kRepacked>;
