// What both of qpass's kernels over gptqmodel / AutoAWQ int32 packings share (gemv.cpp, dequant.cpp): the
// instruction set they are built for, the AWQ column interleave, and the input check (one message per way a
// site can be wrong, naming the op and the site).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

// Each vector loop has an AVX-512 build, an AVX2 build (QPASS_AVX2: AVX2 + FMA + F16C without AVX-512; 8
// lanes) and portable C++, picked by the compiler's target (-march=native, or
// the path QPASS_CPU_ISA forces: qpass/kernels/__init__.py). QPASS_ISA names the path taken; the library
// exports it as qpass_isa() (gemv.cpp), which qpass.kernels.isa() reads.
#if defined(__AVX512F__)
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define QPASS_ISA "avx512-bf16"
#else
#define QPASS_ISA "avx512"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QPASS_AVX2 1
#define QPASS_ISA "avx2"
#else
#define QPASS_ISA "portable"
#endif

namespace qpass_kernels {

// AutoAWQ's GEMM packing interleaves the 8 columns of a word: column i sits in nibble kAwqNibble[i].
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

#if defined(QPASS_AVX2)
// float32 -> bfloat16 bits in the low 16 of each lane, rounded to nearest even (finite inputs).
inline __m256i bf16_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

// The 8 lanes of b (each <= 0xFFFF) as 8 uint16 at out.
inline void store_u16x8(void* out, __m256i b) {
  _mm_storeu_si128(static_cast<__m128i*>(out), _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
#endif

// The shift of column n's nibble in a word packed along N (GPTQ/AWQ zero points, AWQ codes): column n % 8 of the
// word, in AutoAWQ's interleave for AWQ.
inline int nibble_shift(bool awq, int64_t n) { return 4 * (awq ? kAwqNibble[n % 8] : n % 8); }

// The same for 16 columns at once: lane i holds nibble_shift(awq, i) (GPTQ: kNibbleShift[0], AWQ: [1]).
alignas(64) constexpr int32_t kNibbleShift[2][16] = {{0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28},
                                                     {0, 16, 4, 20, 8, 24, 12, 28, 0, 16, 4, 20, 8, 24, 12, 28}};

// Checks `op`'s per-site lists for 4-bit GPTQ packing (awq = false: int32 qweight (K/8, N)) or AWQ packing
// (awq = true: int32 qweight (K, N/8)) with in_features K: one qweight, qzeros (G, N/8) and scales (G, N) per
// site, contiguous, on CPU; the group divides K (GPTQ: and is a multiple of 8); N a multiple of 16.
// Returns each site's out_features N.
inline std::vector<int64_t> check_packed(const char* op, bool awq, int64_t K, at::TensorList qweight,
                                         at::TensorList qzeros, at::TensorList scales, int64_t group) {
  TORCH_CHECK(!qweight.empty() && qweight.size() == qzeros.size() && qweight.size() == scales.size(), "qpass ", op,
              ": one qweight, qzeros and scales per site");
  TORCH_CHECK(group > 0 && (awq || group % 8 == 0) && K % group == 0, "qpass ", op, ": group ", group,
              awq ? " must divide in_features " : " must be a multiple of 8 dividing in_features ", K);
  std::vector<int64_t> ns;
  for (size_t i = 0; i < qweight.size(); i++) {
    const auto& qw = qweight[i];
    const auto& qz = qzeros[i];
    const auto& sc = scales[i];
    const int64_t n = sc.dim() == 2 ? sc.size(1) : 0;
    const bool shape = awq ? qw.dim() == 2 && qw.size(0) == K && qw.size(1) * 8 == n
                           : qw.dim() == 2 && qw.size(0) * 8 == K && qw.size(1) == n;
    TORCH_CHECK(qw.device().is_cpu() && shape && qw.scalar_type() == at::kInt && qz.scalar_type() == at::kInt &&
                    qw.is_contiguous() && qz.is_contiguous() && sc.is_contiguous() && n % 16 == 0 &&
                    qz.dim() == 2 && qz.size(0) == K / group && qz.size(1) * 8 == n && sc.size(0) == K / group,
                "qpass ", op, ": site ", i, " is not ",
                awq ? "4-bit AWQ packing (int32 qweight (K, N/8)" : "4-bit GPTQ packing (int32 qweight (K/8, N)",
                ", qzeros (G, N/8), scales (G, N), N a multiple of 16) for K=", K, ", group ", group);
    ns.push_back(n);
  }
  return ns;
}

}  // namespace qpass_kernels
