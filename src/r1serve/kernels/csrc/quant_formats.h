// The packed weight formats the quantized GEMM (quant_gemm.h) streams, one layout per family
// of checkpoint blocks. No ATen here: the ARM harness builds this without torch.
//
// A weight (N, K) is stored in row blocks of 16 output rows, one after the other; a block is
// a run of units over its K columns, and a unit is one group of 32 columns (the G formats) or
// a super-block of 8 groups, 256 columns, behind a header of per-row super-scales (the K
// formats). A group's tile holds the codes u of 16 rows x 32 columns, interleaved so that one
// register load feeds dot products for kLanes rows with no shuffle:
//
//   4-bit codes: bytes 0..255 are 4 chunks of 64; chunk c holds columns 8c..8c+7:
//                byte 64c + 4r + j   low nibble  = u[r][8c + j]      (j < 4)
//                                    high nibble = u[r][8c + 4 + j]
//   8-bit codes: bytes 0..511 are 8 chunks of 64; chunk c holds columns 4c..4c+3:
//                byte 64c + 4r + j   = u[r][4c + j]
//
// then the group's per-row scales:
//
//   G4 (Q4_0, Q4_1, int4)    codes(4) | scale[16] fp16 | min[16] fp16            320 B / group
//   G8 (Q8_0, Q5_0, Q5_1,    codes(8) | scale[16] fp16 | min[16] fp16            576 B / group
//       int8)                w = scale * u + min
//   K4 (Q4_K)                header d[16] fp16 | dmin[16] fp16                    64 B / unit
//                            then per group: codes(4) | sc[16] i8 | m[16] i8     288 B / group
//                            w = (d * sc) * u - dmin * m
//   K8 (Q5_K, Q6_K, Q3_K,    header d[16] fp16 | dmin[16] fp16                    64 B / unit
//       Q2_K)                then per group: codes(8) | sc[2][16] i8 | m[2][16] i8   576 B / group
//                            w = (d * sc[h]) * u - dmin * m[h], h = the column's half of
//                            the group (columns 0..15: chunks 0..3; 16..31: chunks 4..7)
//
// The K formats keep a super-block's two levels of scales as the checkpoint has them (a
// float16 per row and super-block, a small integer per row and group), so the weights are
// exactly the checkpoint's: d * sc is exact in float32, and the kernel forms it there. Each
// block format's codes and scales map onto one of these (gguf_repack.h); Q6_K's signed codes
// q - 32 become u = q with m = sc and dmin = 32 d, Q3_K's q - 4 likewise with dmin = 4 d.
// K8's codes are therefore at most 63 (Format::kMaxCode); the kernels rely on it.
//
// Padding rows (N..16 NB) have zero codes and scales; padding columns (K..32 G, G formats
// only: the K formats need K % 256 == 0) meet zero activations.
#pragma once

#include <cstdint>

namespace r1serve_kernels {

constexpr int64_t kRows = 16, kGroup = 32, kSuperGroups = 8;

enum class Fmt : int { G4 = 0, G8 = 1, K4 = 2, K8 = 3 };

template <Fmt F>
struct Format {
  static constexpr bool kTwoLevel = F == Fmt::K4 || F == Fmt::K8;
  static constexpr int kBits = F == Fmt::G4 || F == Fmt::K4 ? 4 : 8;
  // The largest code: K8 holds blocks of 6 bits and fewer (Q6_K is the widest), and the
  // GEMM takes its products through the narrow dot product that this bounds (quant_gemm.h).
  static constexpr int kMaxCode = kBits == 4 ? 15 : F == Fmt::K8 ? 63 : 255;
  static constexpr int kHalves = F == Fmt::K8 ? 2 : 1;  // scale groups per 32 columns
  static constexpr int64_t kGroupsPerUnit = kTwoLevel ? kSuperGroups : 1;
  static constexpr int64_t kHeaderBytes = kTwoLevel ? 4 * kRows : 0;
  static constexpr int64_t kCodeBytes = kRows * kGroup * kBits / 8;
  static constexpr int64_t kScaleBytes = kTwoLevel ? 2 * kHalves * kRows : 4 * kRows;
  static constexpr int64_t kTileBytes = kCodeBytes + kScaleBytes;
  static constexpr int64_t kUnitBytes = kHeaderBytes + kGroupsPerUnit * kTileBytes;
  static constexpr int64_t kUnitCols = kGroupsPerUnit * kGroup;
};

// Units per row block of a K-column weight, and the bytes of one row block.
inline int64_t units_of(Fmt f, int64_t K) {
  const int64_t cols = f == Fmt::K4 || f == Fmt::K8 ? kGroup * kSuperGroups : kGroup;
  return (K + cols - 1) / cols;
}

inline int64_t unit_bytes(Fmt f) {
  switch (f) {
    case Fmt::G4: return Format<Fmt::G4>::kUnitBytes;
    case Fmt::G8: return Format<Fmt::G8>::kUnitBytes;
    case Fmt::K4: return Format<Fmt::K4>::kUnitBytes;
    default: return Format<Fmt::K8>::kUnitBytes;
  }
}

inline int64_t block_bytes(Fmt f, int64_t K) { return units_of(f, K) * unit_bytes(f); }

// Where code u[r][k] of a group's tile lives (k in 0..31): the byte, and for 4-bit codes the
// nibble (0 low, 1 high).
inline int64_t code_byte(int bits, int64_t r, int64_t k, int* nibble) {
  if (bits == 4) {
    *nibble = (k % 8) / 4;
    return 64 * (k / 8) + 4 * r + k % 4;
  }
  *nibble = 0;
  return 64 * (k / 4) + 4 * r + k % 4;
}

}  // namespace r1serve_kernels
