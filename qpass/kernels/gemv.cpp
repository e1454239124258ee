// qpass_kernels::{gptq4,awq4}_gemv — a decode-step (few rows) matmul that reads 4-bit GPTQ or AWQ weights in
// the library's own packing, so that no repacked copy of the weights is kept (see qpass/kernels/__init__.py);
// optionally with each site's LoRA added in the same call.
//
//   y[m, n] = sum_k x[m, k] * s[k / G, n] * (q[k, n] - z[k / G, n])  (+ scaling * sum_j B[n, j] t[m, j])
//   GPTQ (gptqmodel):  q[k, n] = (qweight[k / 8, n] >> 4 * (k % 8)) & 15          (packed along K)
//   AWQ (AutoAWQ's GEMM packing, also gptqmodel's AWQ classes):
//                      q[k, n] = (qweight[k, n / 8] >> 4 * nib(n % 8)) & 15       (packed along N, interleaved:
//                      nib = {0, 4, 1, 5, 2, 6, 3, 7}, column i of a word sits in nibble nib(i))
//   z[g, n] = (qzeros[g, n / 8] >> 4 * (n % 8)) & 15 (GPTQ, "v2" zeros), >> 4 * nib(n % 8) (AWQ)
//   t[m, j] = sum_k A[j, k] x[m, k]                          (LoRA's down-projection, in float32;
//                                                             A, B float32 or bfloat16)
//
// Arithmetic. The codes are exact small integers. Per group, sum_k x (c + q) is accumulated in float32, and
// the offset comes off once: sum x (q - z) = sum x (c + q) - (c + z) sum x, then times the group's scale.
//  * float32 x (float16 x is passed as float32): c = 0, the codes converted to float32, one FMA per code.
//  * bfloat16 x on CPUs with AVX512-BF16: c = 16. Two codes per 32-bit lane become the bfloat16 numbers 16 + q
//    (the code put in the mantissa under the exponent of 16: a shift and one bitwise op for 32 codes), and
//    vdpbf16ps multiplies them with pairs of x, accumulating in float32 (bf16 x bf16 products are exact).
//    About a third of the instructions per code of the float32 loop. A GPTQ word already holds 8 rows of
//    one column, so its pairs are rows (k, k + 4) of a word; an AWQ word holds 8 columns of one row, so two
//    rows' words are first interleaved 16 bits at a time (vpunpcklwd / vpunpckhwd: two instructions per
//    2 x 16 words), pairing rows (k, k + 1) of the same columns.
//  * Each loop has three builds, picked by the compiler's target (-march=native): AVX-512 (16 lanes), AVX2 +
//    FMA + F16C without AVX-512 (8 lanes, QPASS_AVX2; bfloat16 x takes the float32 loop, x widened once) and
//    portable C++.
// The error is a few float32 ulps of sum |x| s (c + q + z) (tests/test_kernels.py), far below a bfloat16
// output's rounding.
//
// Memory order. A decode step streams the whole model's weights from memory, so the reads run along the
// packed rows: each thread takes a contiguous range of rows and reads it front to back, a few rows at a time
// across all of a site's columns (GPTQ: 8 word rows = 64 of K; AWQ: 64 rows of K; 32 N bytes either way), the
// partial sums in registers over those rows, then in a per-thread buffer; then takes each group's scale and
// zero offset off at once. An AWQ block of 16 words (128 columns) keeps 8 accumulators by nibble, so its
// partial sums sit out of column order (AwqSlots) until the group's correction reads them back in order. One
// pass then adds the threads' sums and LoRA's up-projection and stores in x's dtype, 16 columns at a time
// (the 16 dot products of B's rows with t reduced together by a permute tree, not one horizontal sum and
// scalar store per column). All of it in one parallel region (a decode step makes one call per sibling group
// and layer, and each fork/join has a fixed cost). Walking each 128-column block down all K rows instead
// would touch a new page every 512 bytes and stall on memory once the weights no longer fit in cache.
// Sibling sites that read the same input (q/k/v) run in one call, their output columns concatenated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "packed_check.h"

namespace {

struct Lora {
  const void* a = nullptr;  // (r, K) row-major, float32 or bfloat16 (as b)
  const void* b = nullptr;  // (N, r) row-major
  bool bf16 = false;        // A and B are bfloat16 (an adapter kept in the model's dtype), else float32
  float scaling = 0.f;
  int64_t r = 0;
  int64_t t_offset = 0;  // this site's first column in the (M, sum r) buffer t
};

struct Site {
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  at::ScalarType sdt;
  int64_t n;    // out features of this site
  int64_t col;  // its first column in the output
  Lora lora;
  bool awq = false;  // AWQ packing (qweight (K, N/8), interleaved), else GPTQ (qweight (K/8, N))
};

using qpass_kernels::kAwqNibble;

// The shift of column n's code or zero point in its word.
inline int zero_shift(const Site& s, int64_t n) { return qpass_kernels::nibble_shift(s.awq, n); }

// What the row kernels read about x.
struct Input {
  const float* x = nullptr;         // (M, K) float32
  const uint32_t* pairs = nullptr;  // (M, K / 2), bf16 loop. GPTQ: for word row w, pair 4w + j (j < 4) =
                                    // x[8w + j] | x[8w + j + 4] << 16; AWQ: pair i = x[2i] | x[2i + 1] << 16
  int64_t M = 0, K = 0;
  bool bf16 = false;
};

// count scales from flat index i, as float32 (the switch stays outside the loop).
inline void load_scales(const Site& s, int64_t i, float* out, int count) {
  switch (s.sdt) {
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(s.scales) + i;
      for (int c = 0; c < count; c++) out[c] = static_cast<float>(p[c]);
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(s.scales) + i;
      for (int c = 0; c < count; c++) out[c] = static_cast<float>(p[c]);
      break;
    }
    default: std::memcpy(out, static_cast<const float*>(s.scales) + i, sizeof(float) * count);
  }
}

// The zero codes of group g, columns [n0, n0 + count) (n0 and count multiples of 8).
inline void load_zeros(const Site& s, int64_t g, int64_t n0, int32_t* out, int count) {
  const int32_t* words = s.qzeros + g * (s.n / 8) + n0 / 8;
  for (int w = 0; w < count / 8; w++)
    for (int j = 0; j < 8; j++) out[w * 8 + j] = (words[w] >> zero_shift(s, j)) & 15;
}

#if defined(__AVX512F__)
// n <= 16 values from p as float32, zeros after them (bfloat16 -> float32 is exact).
inline __m512 load16(const float* p, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  __m256i h;
  if (n >= 16) {
    h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    alignas(32) uint16_t tail[16] = {};
    std::memcpy(tail, p, sizeof(uint16_t) * n);
    h = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(QPASS_AVX2)
// n <= 8 values from p as float32, zeros after them.
inline __m256 load8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  alignas(32) float tail[8] = {};
  std::memcpy(tail, p, sizeof(float) * n);
  return _mm256_load_ps(tail);
}
inline __m256 load8(const c10::BFloat16* p, int64_t n) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tail[8] = {};
    std::memcpy(tail, p, sizeof(uint16_t) * n);
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// Lane c of the result: the sum of v[c]'s 8 lanes (three levels of hadd within 128-bit halves, then the halves).
inline __m256 reduce8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // v0..v3 per half
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // v4..v7 per half
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// dot(a, b) over r values (a float32 or bfloat16, b float32), in float32.
template <typename T>
inline float dot(const T* a, const float* b, int64_t r) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < r; j += 16) acc = _mm512_fmadd_ps(load16(a + j, r - j), load16(b + j, r - j), acc);
  return _mm512_reduce_add_ps(acc);
#elif defined(QPASS_AVX2)
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;  // four chains: FMA latency, not one long chain
  int64_t j = 0;
  for (; j + 32 <= r; j += 32) {
    c0 = _mm256_fmadd_ps(load8(a + j, 8), _mm256_loadu_ps(b + j), c0);
    c1 = _mm256_fmadd_ps(load8(a + j + 8, 8), _mm256_loadu_ps(b + j + 8), c1);
    c2 = _mm256_fmadd_ps(load8(a + j + 16, 8), _mm256_loadu_ps(b + j + 16), c2);
    c3 = _mm256_fmadd_ps(load8(a + j + 24, 8), _mm256_loadu_ps(b + j + 24), c3);
  }
  for (; j < r; j += 8) c0 = _mm256_fmadd_ps(load8(a + j, r - j), load8(b + j, r - j), c0);
  return hsum8(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
#else
  float acc = 0.f;
  for (int64_t j = 0; j < r; j++) acc += static_cast<float>(a[j]) * b[j];
  return acc;
#endif
}

#if defined(__AVX512F__)
// Lane c of the result: the sum of v[c]'s 16 lanes (16 horizontal sums at once: four levels of pairwise
// permute-and-add, each halving the lanes a column occupies; 45 instructions for 16 columns).
struct Reduce16 {
  __m512i lo[4], hi[4];
  Reduce16() {
    for (int L = 0; L < 4; L++) {
      const int cols = 1 << L, span = 16 >> L, half = span / 2;  // per input vector: cols columns of span lanes
      alignas(64) int32_t l[16], h[16];
      for (int i = 0; i < 16; i++) {
        const int c = i / half, k = i % half;
        const int base = c < cols ? c * span : 16 + (c - cols) * span;
        l[i] = base + k, h[i] = base + k + half;
      }
      lo[L] = _mm512_load_si512(l), hi[L] = _mm512_load_si512(h);
    }
  }
  __m512 operator()(__m512* v) const {
    for (int L = 0, n = 16; L < 4; L++, n /= 2)
      for (int i = 0; i < n / 2; i++)
        v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], lo[L], v[2 * i + 1]),
                             _mm512_permutex2var_ps(v[2 * i], hi[L], v[2 * i + 1]));
    return v[0];
  }
};

// sum_j t[j] B[c, j] for the 16 rows c of b (row stride r, float32 or bfloat16), r > 0.
template <typename T>
inline __m512 up16(const Reduce16& reduce, const T* b, int64_t r, const float* t) {
  __m512 v[16];
  for (int c = 0; c < 16; c++) v[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < r; j += 16) {
    const __m512 tt = load16(t + j, r - j);
    for (int c = 0; c < 16; c++) v[c] = _mm512_fmadd_ps(load16(b + c * r + j, r - j), tt, v[c]);
  }
  return reduce(v);
}

// 16 float32 to bfloat16, rounded to nearest even as c10::BFloat16 (NaN -> 0x7FC0).
inline void store_bf16(at::BFloat16* out, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}
#elif defined(QPASS_AVX2)
// sum_j t[j] B[c, j] for the 8 rows c of b (row stride r, float32 or bfloat16), r > 0.
template <typename T>
inline __m256 up8(const T* b, int64_t r, const float* t) {
  __m256 v[8];
  for (int c = 0; c < 8; c++) v[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < r; j += 8) {
    const __m256 tt = load8(t + j, r - j);
    for (int c = 0; c < 8; c++) v[c] = _mm256_fmadd_ps(load8(b + c * r + j, r - j), tt, v[c]);
  }
  return reduce8(v);
}

// 8 float32 to bfloat16, rounded to nearest even as c10::BFloat16 (NaN -> 0x7FC0).
inline void store_bf16(at::BFloat16* out, __m256 v) {
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  qpass_kernels::store_u16x8(out, _mm256_blendv_epi8(qpass_kernels::bf16_bits8(v), _mm256_set1_epi32(0x7FC0), nan));
}
#endif

// ---- row kernels: part[m * ldp + c] += sum_k x[m0 + m, k] * (c + q[k, n0 + c]) over word rows w0..w0+nr-1,
// ---- columns c < 16 V, rows m < mr of x

template <int V, int MR>
inline void rows_f32(const Site& s, const Input& in, float* part, int64_t ldp, int64_t w0, int nr, int64_t n0,
                     int64_t m0, int mr) {
#if defined(__AVX512F__)
  __m512 p[MR][V];
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < V; v++) p[m][v] = _mm512_loadu_ps(part + m * ldp + 16 * v);
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t w = w0; w < w0 + nr; w++) {
    const int32_t* row = s.qweight + w * s.n + n0;
    __m512i r[V];
    for (int v = 0; v < V; v++) r[v] = _mm512_loadu_si512(row + 16 * v);
    for (int j = 0; j < 8; j++) {
      __m512 qf[V];
      for (int v = 0; v < V; v++) qf[v] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(r[v], 4 * j), mask));
      for (int m = 0; m < mr; m++) {
        const __m512 xv = _mm512_set1_ps(in.x[(m0 + m) * in.K + 8 * w + j]);
        for (int v = 0; v < V; v++) p[m][v] = _mm512_fmadd_ps(xv, qf[v], p[m][v]);
      }
    }
  }
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < V; v++) _mm512_storeu_ps(part + m * ldp + 16 * v, p[m][v]);
#elif defined(QPASS_AVX2)
  // 16 registers: the columns in chunks of NV vectors of 8, all mr rows' sums of a chunk held in registers.
  constexpr int NV = 2 * V < (MR == 1 ? 4 : 2) ? 2 * V : (MR == 1 ? 4 : 2);
  const __m256i mask = _mm256_set1_epi32(15);
  for (int c0 = 0; c0 < 16 * V; c0 += 8 * NV) {
    __m256 p[MR][NV];
    for (int m = 0; m < mr; m++)
      for (int v = 0; v < NV; v++) p[m][v] = _mm256_loadu_ps(part + m * ldp + c0 + 8 * v);
    for (int64_t w = w0; w < w0 + nr; w++) {
      const int32_t* row = s.qweight + w * s.n + n0 + c0;
      __m256i r[NV];
      for (int v = 0; v < NV; v++) r[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * v));
      for (int j = 0; j < 8; j++) {
        __m256 qf[NV];
        for (int v = 0; v < NV; v++) qf[v] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(r[v], 4 * j), mask));
        for (int m = 0; m < mr; m++) {
          const __m256 xv = _mm256_broadcast_ss(in.x + (m0 + m) * in.K + 8 * w + j);
          for (int v = 0; v < NV; v++) p[m][v] = _mm256_fmadd_ps(xv, qf[v], p[m][v]);
        }
      }
    }
    for (int m = 0; m < mr; m++)
      for (int v = 0; v < NV; v++) _mm256_storeu_ps(part + m * ldp + c0 + 8 * v, p[m][v]);
  }
#else  // portable: the same arithmetic, left to the compiler's vectorizer
  for (int64_t w = w0; w < w0 + nr; w++) {
    const int32_t* row = s.qweight + w * s.n + n0;
    for (int j = 0; j < 8; j++)
      for (int m = 0; m < mr; m++) {
        const float xv = in.x[(m0 + m) * in.K + 8 * w + j];
        for (int c = 0; c < 16 * V; c++) part[m * ldp + c] += xv * static_cast<float>((row[c] >> (4 * j)) & 15);
      }
  }
#endif
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Loop = true;
constexpr float kCodeOffset = 16.f;  // the bf16 loop's c

// The bfloat16 numbers 16 + q[8w + j] (low half of each lane) and 16 + q[8w + j + 4] (high half) from the
// words r: each 16-bit half holds four codes; code j moves to mantissa bits 3-6, under 16's exponent.
template <int J>
inline __m512i codes16(__m512i r) {
  const __m512i sh = J == 0 ? _mm512_slli_epi16(r, 3) : _mm512_srli_epi16(r, 4 * J - 3);
  return _mm512_ternarylogic_epi32(sh, _mm512_set1_epi32(0x00780078), _mm512_set1_epi32(0x41804180), 0xEA);  // (a & b) | c
}

template <int J, int V, int MR>
inline void dp_step(const __m512i (&r)[V], __m512 (&p)[MR][V], const Input& in, int64_t w, int64_t m0, int mr) {
  __m512i b[V];
  for (int v = 0; v < V; v++) b[v] = codes16<J>(r[v]);
  for (int m = 0; m < mr; m++) {
    const __m512i xv = _mm512_set1_epi32(static_cast<int>(in.pairs[(m0 + m) * (in.K / 2) + w * 4 + J]));
    for (int v = 0; v < V; v++) p[m][v] = _mm512_dpbf16_ps(p[m][v], (__m512bh)b[v], (__m512bh)xv);
  }
}

template <int V, int MR>
inline void rows_bf16(const Site& s, const Input& in, float* part, int64_t ldp, int64_t w0, int nr, int64_t n0,
                      int64_t m0, int mr) {
  __m512 p[MR][V];
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < V; v++) p[m][v] = _mm512_loadu_ps(part + m * ldp + 16 * v);
  for (int64_t w = w0; w < w0 + nr; w++) {
    const int32_t* row = s.qweight + w * s.n + n0;
    __m512i r[V];
    for (int v = 0; v < V; v++) r[v] = _mm512_loadu_si512(row + 16 * v);
    dp_step<0>(r, p, in, w, m0, mr);
    dp_step<1>(r, p, in, w, m0, mr);
    dp_step<2>(r, p, in, w, m0, mr);
    dp_step<3>(r, p, in, w, m0, mr);
  }
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < V; v++) _mm512_storeu_ps(part + m * ldp + 16 * v, p[m][v]);
}
#else
constexpr bool kBf16Loop = false;
constexpr float kCodeOffset = 0.f;
#endif

// Word rows [w0, w0 + nr) at once: the partial sums stay in registers across them.
template <int V, int MR>
inline void rows(const Site& s, const Input& in, float* part, int64_t ldp, int64_t w0, int nr, int64_t n0, int64_t m0,
                 int mr) {
#if defined(__AVX512BF16__)
  if (in.bf16) return rows_bf16<V, MR>(s, in, part, ldp, w0, nr, n0, m0, mr);
#endif
  rows_f32<V, MR>(s, in, part, ldp, w0, nr, n0, m0, mr);
}

#if defined(__AVX512F__)
// The first w (<= 16) lanes: the words of a block that exist (the last block of a row may be shorter).
inline __mmask16 live_words(int w) {
  return w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1);
}
#endif

// Row stride of the AWQ partial sums: N rounded up to whole blocks of 128 columns.
inline int64_t awq_ldp(int64_t n) { return (n + 127) / 128 * 128; }

// ---- AWQ row kernels: the block's 128 partial sums part[m * ldp + slot] += sum_k x[m0 + m, k] * (c + q[k, column])
// ---- over rows k0..k0+nr-1, words l < nw <= 16 of a block (128 columns), rows m < mr of x; which slot holds
// ---- which column depends on the loop (AwqSlots).

template <int MR>
inline void awq_rows_f32(const Site& s, const Input& in, float* part, int64_t ldp, int64_t k0, int nr, int64_t b0,
                         int nw, int64_t m0, int mr) {
  const int32_t* words = s.qweight + b0;
  const int64_t wpr = s.n / 8;
#if defined(__AVX512F__)
  const __mmask16 live = live_words(nw);
  __m512 p[MR][8];
  for (int m = 0; m < mr; m++)
    for (int j = 0; j < 8; j++) p[m][j] = _mm512_loadu_ps(part + m * ldp + 16 * j);
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t k = k0; k < k0 + nr; k++) {
    const __m512i r = _mm512_maskz_loadu_epi32(live, words + k * wpr);
    __m512 xv[MR];
    for (int m = 0; m < mr; m++) xv[m] = _mm512_set1_ps(in.x[(m0 + m) * in.K + k]);
    for (int j = 0; j < 8; j++) {
      const __m512 qf = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(r, 4 * j), mask));
      for (int m = 0; m < mr; m++) p[m][j] = _mm512_fmadd_ps(xv[m], qf, p[m][j]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int j = 0; j < 8; j++) _mm512_storeu_ps(part + m * ldp + 16 * j, p[m][j]);
#elif defined(QPASS_AVX2)
  // The same slots as the 16-lane loop (accumulator j = nibble j, lane = word), 8 words at a time, one row of
  // x at a time (8 accumulators).
  const __m256i mask = _mm256_set1_epi32(15);
  for (int h = 0; 8 * h < nw; h++) {
    const int live = std::min(8, nw - 8 * h);
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int m = 0; m < mr; m++) {
      __m256 p[8];
      for (int j = 0; j < 8; j++) p[j] = _mm256_loadu_ps(part + m * ldp + 16 * j + 8 * h);
      for (int64_t k = k0; k < k0 + nr; k++) {
        const int* at = words + k * wpr + 8 * h;
        const __m256i r = live == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)) : _mm256_maskload_epi32(at, lanes);
        const __m256 xv = _mm256_broadcast_ss(in.x + (m0 + m) * in.K + k);
        for (int j = 0; j < 8; j++)
          p[j] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(r, 4 * j), mask)), p[j]);
      }
      for (int j = 0; j < 8; j++) _mm256_storeu_ps(part + m * ldp + 16 * j + 8 * h, p[j]);
    }
  }
#else
  for (int64_t k = k0; k < k0 + nr; k++)
    for (int l = 0; l < nw; l++) {
      const int32_t word = words[k * wpr + l];
      for (int j = 0; j < 8; j++)
        for (int m = 0; m < mr; m++)
          part[m * ldp + 16 * j + l] += in.x[(m0 + m) * in.K + k] * static_cast<float>((word >> (4 * j)) & 15);
    }
#endif
}

#if defined(__AVX512BF16__)
// Nibble J of each 16-bit half of the interleaved rows u, v as bfloat16 pairs 16 + q[k], 16 + q[k + 1], times
// the pair (x[k], x[k + 1]), into block `blk`'s accumulators.
template <int J, int MR, int B>
inline void awq_dp_step(__m512i u, __m512i v, __m512 (&p)[MR][B][8], const __m512i (&xv)[MR], int blk, int mr) {
  const __m512i a = codes16<J>(u), b = codes16<J>(v);
  for (int m = 0; m < mr; m++) {
    p[m][blk][J] = _mm512_dpbf16_ps(p[m][blk][J], (__m512bh)a, (__m512bh)xv[m]);
    p[m][blk][4 + J] = _mm512_dpbf16_ps(p[m][blk][4 + J], (__m512bh)b, (__m512bh)xv[m]);
  }
}

// B blocks of 16 words at once (the last one nw words): one row of x takes two (16 accumulators), more rows one.
template <int MR, int B>
inline void awq_rows_bf16(const Site& s, const Input& in, float* part, int64_t ldp, int64_t k0, int nr, int64_t b0,
                          int nw, int64_t m0, int mr) {
  const int32_t* words = s.qweight + b0;
  const int64_t wpr = s.n / 8;
  __mmask16 live[B];
  for (int blk = 0; blk < B; blk++) live[blk] = live_words(blk == B - 1 ? nw : 16);
  __m512 p[MR][B][8];
  for (int m = 0; m < mr; m++)
    for (int blk = 0; blk < B; blk++)
      for (int j = 0; j < 8; j++) p[m][blk][j] = _mm512_loadu_ps(part + m * ldp + 128 * blk + 16 * j);
  for (int64_t k = k0; k < k0 + nr; k += 2) {  // nr is even (segments are whole word rows of 8)
    __m512i xv[MR];
    for (int m = 0; m < mr; m++)
      xv[m] = _mm512_set1_epi32(static_cast<int>(in.pairs[(m0 + m) * (in.K / 2) + k / 2]));
    for (int blk = 0; blk < B; blk++) {
      const __m512i a = _mm512_maskz_loadu_epi32(live[blk], words + k * wpr + 16 * blk);
      const __m512i b = _mm512_maskz_loadu_epi32(live[blk], words + (k + 1) * wpr + 16 * blk);
      // the two rows' 16-bit halves interleaved: per 128 bits, u's lanes are (row k | row k + 1) of word 0's
      // low half, word 0's high half, word 1's low, word 1's high; v the same for words 2 and 3 (AwqSlots)
      const __m512i u = _mm512_unpacklo_epi16(a, b), v = _mm512_unpackhi_epi16(a, b);
      awq_dp_step<0>(u, v, p, xv, blk, mr);
      awq_dp_step<1>(u, v, p, xv, blk, mr);
      awq_dp_step<2>(u, v, p, xv, blk, mr);
      awq_dp_step<3>(u, v, p, xv, blk, mr);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int blk = 0; blk < B; blk++)
      for (int j = 0; j < 8; j++) _mm512_storeu_ps(part + m * ldp + 128 * blk + 16 * j, p[m][blk][j]);
}
#endif

template <int MR>
inline void awq_rows(const Site& s, const Input& in, float* part, int64_t ldp, int64_t k0, int nr, int64_t b0, int nw,
                     int64_t m0, int mr) {
#if defined(__AVX512BF16__)
  if (in.bf16) return awq_rows_bf16<MR, 1>(s, in, part, ldp, k0, nr, b0, nw, m0, mr);
#endif
  awq_rows_f32<MR>(s, in, part, ldp, k0, nr, b0, nw, m0, mr);
}

// Where column c (< 128) of an AWQ block keeps its partial sum (accumulator i, lane l: slot 16 i + l).
//  * float32 loop: accumulator j holds nibble j of the block's 16 words (lane = word).
//  * bfloat16 loop: accumulators 0-3 hold nibble J (u) of words 0-1 of each 128-bit quarter (lane 4 quarter +
//    2 word + half, the half adding 4 to the nibble), 4-7 the same for words 2-3 (v).
struct AwqSlots {
  alignas(64) int32_t f32[128], bf16[128];
  // bfloat16 loop, 16 columns (words 2t, 2t + 1: quarter t / 2, accumulators 4 (t % 2) + J): two permutes
  // pick them from accumulators J = 0, 1 and J = 2, 3 (lane `pick`, + 16 for the odd J), a blend (`odd_pair`,
  // J >= 2) joins them. Three instructions: a gather here costs far more.
  alignas(64) int32_t pick[4][16];
  uint16_t odd_pair = 0;
  AwqSlots() {
    for (int c = 0; c < 128; c++) {
      const int word = c / 8, nib = kAwqNibble[c % 8];
      f32[c] = 16 * nib + word;
      const int quarter = word / 4, pair = word % 4 / 2, w2 = word % 2, half = nib / 4;
      bf16[c] = 16 * (4 * pair + nib % 4) + 4 * quarter + 2 * w2 + half;
      if (c < 16) {
        for (int q = 0; q < 4; q++) pick[q][c] = 16 * (nib % 2) + 4 * q + 2 * w2 + half;
        if (nib % 4 >= 2) odd_pair |= static_cast<uint16_t>(1u << c);
      }
    }
  }
};

// AWQ rows of K per pass over the partial sums: each pass reloads the block's partial sums, so more rows amortise
// that; each row is also a stream the sweep reads a line at a time, and the AVX2 loop (8 accumulators of 8 words)
// does best with fewer. Each is the fastest of the sizes tried on its path (benchmarks/README.md, "Kernel tuning
// figures").
#if defined(QPASS_AVX2)
constexpr int kAwqRows = 16;
#else
constexpr int kAwqRows = 64;
#endif

constexpr int kRows = 8;  // word rows (32 of K) per pass over the partial sums

// acc[i] += s * (p[i] - (c + z) * sum), i < 16: group g's correction of columns [n0, n0 + 16).
inline void correct16(const Site& s, int64_t g, int64_t n0, const float* p, float* acc, float c, float sum) {
#if defined(__AVX512F__)
  const int32_t* words = s.qzeros + g * (s.n / 8) + n0 / 8;
  const __m512i zw = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(words[0]), _mm512_set1_epi32(words[1]));
  const __m512i shift = s.awq ? _mm512_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28, 0, 16, 4, 20, 8, 24, 12, 28)
                              : _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512 z = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(zw, shift), _mm512_set1_epi32(15)));
  const int64_t i = g * s.n + n0;
  __m512 sc;
  switch (s.sdt) {
    case at::kHalf:
      sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const c10::Half*>(s.scales) + i)));
      break;
    case at::kBFloat16:
      sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const c10::BFloat16*>(s.scales) + i))), 16));
      break;
    default: sc = _mm512_loadu_ps(static_cast<const float*>(s.scales) + i);
  }
  const __m512 d = _mm512_fnmadd_ps(_mm512_add_ps(z, _mm512_set1_ps(c)), _mm512_set1_ps(sum), _mm512_loadu_ps(p));
  _mm512_storeu_ps(acc, _mm512_fmadd_ps(sc, d, _mm512_loadu_ps(acc)));
#elif defined(QPASS_AVX2)
  const int32_t* words = s.qzeros + g * (s.n / 8) + n0 / 8;
  const __m256i shift = s.awq ? _mm256_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28) : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  for (int h = 0; h < 2; h++) {  // 8 columns (one zeros word) at a time
    const __m256 z = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(words[h]), shift), _mm256_set1_epi32(15)));
    const int64_t i = g * s.n + n0 + 8 * h;
    __m256 sc;
    switch (s.sdt) {
      case at::kHalf:
        sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const c10::Half*>(s.scales) + i)));
        break;
      case at::kBFloat16:
        sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const c10::BFloat16*>(s.scales) + i))), 16));
        break;
      default: sc = _mm256_loadu_ps(static_cast<const float*>(s.scales) + i);
    }
    const __m256 d = _mm256_fnmadd_ps(_mm256_add_ps(z, _mm256_set1_ps(c)), _mm256_set1_ps(sum), _mm256_loadu_ps(p + 8 * h));
    _mm256_storeu_ps(acc + 8 * h, _mm256_fmadd_ps(sc, d, _mm256_loadu_ps(acc + 8 * h)));
  }
#else
  int32_t zt[16];
  float st[16];
  load_zeros(s, g, n0, zt, 16);
  load_scales(s, g * s.n + n0, st, 16);
  for (int i = 0; i < 16; i++) acc[i] += st[i] * (p[i] - (c + static_cast<float>(zt[i])) * sum);
#endif
}

// A thread's word rows [w0, w1), all within group g, and sum of x over them per row of x (the same for every
// site: made once per call).
struct Segment {
  int64_t g, w0, w1;
  std::vector<float> sums;  // (M)
};

// LoRA's A and B rows a thread reads after its base work (t = x A^T, then the up-projection of its columns),
// pulled into L2 by software prefetch while that base work runs, paced by the weight bytes read so far. The
// base loop is bound by unpacking the codes and leaves memory bandwidth over; A and B read in passes of their
// own are bound by bandwidth. Pacing by bytes spreads the prefetches over the whole base work.
struct Prefetch {
  std::vector<std::pair<const char*, int64_t>> ranges;  // (first byte, bytes), in the order they are read
  size_t range = 0;
  int64_t offset = 0, lines = 0, issued = 0;
  int64_t total = 0, done = 0;  // the thread's weight bytes in phase 1, and read so far
  void add(const void* p, int64_t bytes) {
    if (bytes <= 0) return;
    ranges.push_back({static_cast<const char*>(p), bytes});
    lines += (bytes + 63) / 64;
  }
  // `bytes` more weight bytes read: prefetch the same share of the lines.
  void advance(int64_t bytes) {
    done += bytes;
    const int64_t due = total > 0 ? std::min(lines, lines * done / total) : lines;
    for (; issued < due; issued++) {
      __builtin_prefetch(ranges[range].first + offset, 0, 2);
      offset += 64;
      if (offset >= ranges[range].second) range++, offset = 0;
    }
  }
};

// Thread p of T's columns [begin, end) of a site of n columns in phase 2: whole blocks of 16, the last thread
// to the end.
inline std::pair<int64_t, int64_t> thread_columns(int64_t n, int p, int T) {
  const int64_t blocks = n / 16;
  return {16 * (blocks * p / T), p == T - 1 ? n : 16 * (blocks * (p + 1) / T)};
}

// Segment `seg` of site s: acc (M, ldy) += s * (sum x (c + q) - (c + z) sum x); pf (if any) advanced by the
// weight bytes read.
void segment(const Site& s, const Input& in, const Segment& seg, float* part, float* acc, int64_t ldy, Prefetch* pf) {
  const int64_t M = in.M, N = s.n;
  std::fill(part, part + M * N, 0.f);
  for (int64_t w = seg.w0; w < seg.w1; w += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, seg.w1 - w));
    for (int64_t n0 = 0; n0 < N;) {
      const int64_t left = N - n0;
      if (M == 1 && left >= 128) {  // one row of x: 8 accumulators
        rows<8, 1>(s, in, part + n0, N, w, nr, n0, 0, 1);
        if (pf) pf->advance(4 * nr * 128);
        n0 += 128;
        continue;
      }
      const int width = left >= 64 ? 64 : 16;  // more rows: 4 at a time (register pressure); last columns 16 at a time
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (width == 64) rows<4, 4>(s, in, part + m0 * N + n0, N, w, nr, n0, m0, mr);
        else rows<1, 4>(s, in, part + m0 * N + n0, N, w, nr, n0, m0, mr);
      }
      if (pf) pf->advance(4 * nr * width);
      n0 += width;
    }
  }
  const float c = in.bf16 ? kCodeOffset : 0.f;
  for (int64_t m = 0; m < M; m++)
    for (int64_t n0 = 0; n0 < N; n0 += 16)
      correct16(s, seg.g, n0, part + m * N + n0, acc + m * ldy + s.col + n0, c, seg.sums[m]);
}

// AWQ's segment: the same sums, a block of 128 columns at a time; part (M, N rounded up to 128) holds each
// block's sums out of column order (AwqSlots), read back in column order for the correction.
void segment_awq(const Site& s, const Input& in, const Segment& seg, float* part, float* acc, int64_t ldy,
                 Prefetch* pf) {
  static const AwqSlots slots;
  const int64_t M = in.M, N = s.n, ldp = awq_ldp(N), wpr = N / 8;
  std::fill(part, part + M * ldp, 0.f);
  for (int64_t k = 8 * seg.w0; k < 8 * seg.w1; k += kAwqRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kAwqRows, 8 * seg.w1 - k));
    for (int64_t b0 = 0; b0 < wpr; b0 += 16) {
      const int nw = static_cast<int>(std::min<int64_t>(16, wpr - b0));
#if defined(QPASS_AVX2)
      // The same block's lines of the next kAwqRows rows, one sweep ahead: the sweep reads kAwqRows rows a
      // 64-byte line at a time, kAwqRows streams too many for the hardware prefetcher. (GPTQ's loop reads few
      // enough streams for it, and is left to it.)
      for (int64_t i = k + kAwqRows; i < std::min<int64_t>(k + kAwqRows + nr, in.K); i++)
        __builtin_prefetch(s.qweight + i * wpr + b0, 0, 3);
#endif
      if (M == 1) {
#if defined(__AVX512BF16__)
        if (in.bf16 && wpr - b0 > 16) {  // two blocks (the second may be a tail)
          const int second = static_cast<int>(std::min<int64_t>(16, wpr - b0 - 16));
          awq_rows_bf16<1, 2>(s, in, part + 8 * b0, ldp, k, nr, b0, second, 0, 1);
          if (pf) pf->advance(4 * nr * (16 + second));
          b0 += 16;
          continue;
        }
#endif
        awq_rows<1>(s, in, part + 8 * b0, ldp, k, nr, b0, nw, 0, 1);
        if (pf) pf->advance(4 * nr * nw);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 2)
        awq_rows<2>(s, in, part + m0 * ldp + 8 * b0, ldp, k, nr, b0, nw, m0, static_cast<int>(std::min<int64_t>(2, M - m0)));
      if (pf) pf->advance(4 * nr * nw);
    }
  }
  const float c = in.bf16 ? kCodeOffset : 0.f;
  const int32_t* at = in.bf16 ? slots.bf16 : slots.f32;
  alignas(64) float v[16];
  for (int64_t m = 0; m < M; m++)
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const float* block = part + m * ldp + n0 / 128 * 128;
#if defined(__AVX512F__)
      if (in.bf16) {
        const int64_t t = n0 % 128 / 16;
        const float* acc4 = block + 16 * 4 * (t % 2);
        const __m512i pick = _mm512_load_si512(slots.pick[t / 2]);
        const __m512 j01 = _mm512_permutex2var_ps(_mm512_loadu_ps(acc4), pick, _mm512_loadu_ps(acc4 + 16));
        const __m512 j23 = _mm512_permutex2var_ps(_mm512_loadu_ps(acc4 + 32), pick, _mm512_loadu_ps(acc4 + 48));
        _mm512_store_ps(v, _mm512_mask_blend_ps(slots.odd_pair, j01, j23));
      } else {
        _mm512_store_ps(v, _mm512_i32gather_ps(_mm512_load_si512(at + n0 % 128), block, 4));
      }
#else
      for (int i = 0; i < 16; i++) v[i] = block[at[n0 % 128 + i]];
#endif
      correct16(s, seg.g, n0, v, acc + m * ldy + s.col + n0, c, seg.sums[m]);
    }
}

// The LoRA of each site, from tensors: A (r, K) and B (N, r) contiguous, both float32 or both bfloat16, and a
// one-element float32 scaling (empty lists: no LoRA).
std::vector<Lora> lora_from_tensors(const char* op, int64_t K, const std::vector<int64_t>& ns, at::TensorList lora_a,
                                    at::TensorList lora_b, at::TensorList scaling) {
  std::vector<Lora> loras;
  if (lora_a.empty()) return loras;
  TORCH_CHECK(lora_a.size() == ns.size() && lora_b.size() == ns.size() && scaling.size() == ns.size(),
              "qpass ", op, ": one lora_a, lora_b and scaling per site, or none");
  for (size_t i = 0; i < ns.size(); i++) {
    const auto &a = lora_a[i], &b = lora_b[i], &s = scaling[i];
    const int64_t r = a.dim() == 2 ? a.size(0) : -1;
    const bool half = a.scalar_type() == at::kBFloat16;
    TORCH_CHECK((a.scalar_type() == at::kFloat || half) && b.scalar_type() == a.scalar_type() &&
                    s.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() && a.device().is_cpu() &&
                    b.device().is_cpu() && s.device().is_cpu() && r > 0 && a.size(1) == K && b.dim() == 2 &&
                    b.size(0) == ns[i] && b.size(1) == r && s.numel() == 1,
                "qpass ", op, ": site ", i, "'s LoRA must be contiguous CPU tensors A (r, ", K, "), B (", ns[i],
                ", r), both float32 or both bfloat16, and a one-element float32 scaling");
    loras.push_back(Lora{a.data_ptr(), b.data_ptr(), half, s.data_ptr<float>()[0], r, 0});
  }
  return loras;
}

// The LoRA of each site, from one adapter pool (qpass.pool: every LoRA tensor of a model in one flat float32 or
// bfloat16 tensor) and the float32 pool of scalings: `lora` holds, per site, A's and B's offsets in `pool`
// (elements), the rank r and the scaling's index in `scalings`.
std::vector<Lora> lora_from_pool(const char* op, int64_t K, const std::vector<int64_t>& ns, const at::Tensor& pool,
                                 const at::Tensor& scalings, at::IntArrayRef lora) {
  TORCH_CHECK(static_cast<int64_t>(lora.size()) == 4 * static_cast<int64_t>(ns.size()),
              "qpass ", op, ": lora must hold (A offset, B offset, r, scaling index) per site");
  const bool half = pool.scalar_type() == at::kBFloat16;
  TORCH_CHECK((pool.scalar_type() == at::kFloat || half) && pool.dim() == 1 && pool.is_contiguous() &&
                  pool.device().is_cpu() && scalings.scalar_type() == at::kFloat && scalings.dim() == 1 &&
                  scalings.is_contiguous() && scalings.device().is_cpu(),
              "qpass ", op, ": the adapter pool must be a contiguous 1-D float32 or bfloat16 CPU tensor and the "
              "scalings a contiguous 1-D float32 CPU tensor");
  const int64_t es = half ? 2 : 4;
  const char* base = static_cast<const char*>(pool.data_ptr());
  std::vector<Lora> loras;
  for (size_t i = 0; i < ns.size(); i++) {
    const int64_t a = lora[4 * i], b = lora[4 * i + 1], r = lora[4 * i + 2], si = lora[4 * i + 3];
    TORCH_CHECK(r > 0 && a >= 0 && b >= 0 && a + r * K <= pool.numel() && b + ns[i] * r <= pool.numel() &&
                    si >= 0 && si < scalings.numel(),
                "qpass ", op, ": site ", i, "'s LoRA lies outside the adapter pool (", pool.numel(), " elements)");
    loras.push_back(Lora{base + a * es, base + b * es, half, scalings.data_ptr<float>()[si], r, 0});
  }
  return loras;
}

// gptq4_gemv (AWQ = false) and awq4_gemv (AWQ = true); `loras`: one per site, or none.
template <bool AWQ>
at::Tensor gemv(const char* op, const at::Tensor& x, const std::vector<int64_t>& ns, at::TensorList qweight,
                at::TensorList qzeros, at::TensorList scales, int64_t group, std::vector<Lora> loras) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group % 8 == 0, "qpass ", op, ": group ", group, " must be a multiple of 8");
  const bool lora = !loras.empty();
  std::vector<Site> sites;
  int64_t total = 0, rt = 0, widest = 0;
  for (size_t i = 0; i < ns.size(); i++) {
    const auto& sc = scales[i];
    TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kBFloat16 || sc.scalar_type() == at::kFloat,
                "qpass ", op, ": scales must be float16, bfloat16 or float32");
    Site site{qweight[i].data_ptr<int32_t>(), qzeros[i].data_ptr<int32_t>(), sc.data_ptr(), sc.scalar_type(), ns[i],
              total, Lora{}, AWQ};
    if (lora) {
      site.lora = loras[i];
      site.lora.t_offset = rt;
      rt += site.lora.r;
    }
    sites.push_back(site);
    total += ns[i];
    widest = std::max(widest, ns[i]);
  }

  // x as float32 (exact from bfloat16) and, for the bf16 loop, as pairs: cheap next to the weights, done once.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  std::vector<float> xf(static_cast<size_t>(M * K));
  std::vector<uint32_t> pairs(bf16 && kBf16Loop ? static_cast<size_t>(M * K / 2) : 0);
  if (bf16) {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * K; i++) xf[i] = c10::BFloat16(xb[i], c10::BFloat16::from_bits());
    if (kBf16Loop && AWQ)
      for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < K / 2; i++)
          pairs[m * (K / 2) + i] = xb[m * K + 2 * i] | static_cast<uint32_t>(xb[m * K + 2 * i + 1]) << 16;
    else if (kBf16Loop)
      for (int64_t m = 0; m < M; m++)
        for (int64_t w = 0; w < K / 8; w++)
          for (int j = 0; j < 4; j++)
            pairs[m * (K / 2) + w * 4 + j] = xb[m * K + 8 * w + j] | static_cast<uint32_t>(xb[m * K + 8 * w + j + 4]) << 16;
  } else {
    std::memcpy(xf.data(), x.data_ptr<float>(), sizeof(float) * M * K);
  }
  Input in;
  in.M = M, in.K = K, in.x = xf.data(), in.pairs = pairs.data();
  in.bf16 = bf16 && kBf16Loop;

  // One parallel region (each fork/join has a fixed cost, and a decode step makes several of these calls):
  // 1. thread p: word rows [rows p / T, rows (p + 1) / T) of every site (cut into segments at group
  //    boundaries) into its own partial sums; and its share of LoRA's t = x A^T.
  // 2. after a barrier, thread p: its share of each site's columns: the threads' sums + scaling t B^T,
  //    stored once in x's dtype.
  const int64_t rows = K / 8;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)));
  std::vector<float> acc(static_cast<size_t>(threads * M * total), 0.f);
  std::vector<float> t(static_cast<size_t>(M * rt));
  at::Tensor y = at::empty({M, total}, x.options());
  at::BFloat16* yb = bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
#if defined(__AVX512F__)
  static const Reduce16 reduce;
#endif
#pragma omp parallel num_threads(threads)
  {
    const int p = omp_get_thread_num(), T = omp_get_num_threads();
    std::vector<float> part(static_cast<size_t>(M * awq_ldp(widest)));  // AWQ: whole blocks (GPTQ needs N)
    const int64_t w_end = rows * (p + 1) / T;
    std::vector<Segment> segs;
    for (int64_t w0 = rows * p / T; w0 < w_end;) {
      const int64_t g = w0 * 8 / group, w1 = std::min(w_end, (g + 1) * group / 8);
      std::vector<float> sums(static_cast<size_t>(M), 0.f);
      for (int64_t m = 0; m < M; m++)
        for (int64_t k = 8 * w0; k < 8 * w1; k++) sums[m] += xf[m * K + k];
      segs.push_back({g, w0, w1, std::move(sums)});
      w0 = w1;
    }
    // Row j of t (and of the stacked A rows) belongs to the site whose LoRA rows [t_offset, t_offset + r) hold it.
    const auto owner = [&sites](int64_t j) -> const Site& {
      return *std::find_if(sites.begin(), sites.end(), [j](const Site& c) {
        return j >= c.lora.t_offset && j < c.lora.t_offset + c.lora.r; });
    };
    Prefetch pf;
    if (lora) {
      for (int64_t j = rt * p / T, e = rt * (p + 1) / T; j < e;) {  // the A rows of this thread's share of t
        const Site& s = owner(j);
        const int64_t stop = std::min(e, s.lora.t_offset + s.lora.r), es = s.lora.bf16 ? 2 : 4;
        pf.add(static_cast<const char*>(s.lora.a) + (j - s.lora.t_offset) * K * es, (stop - j) * K * es);
        j = stop;
      }
      for (const Site& s : sites) {  // the B rows of this thread's columns (phase 2)
        const auto [nb, ne] = thread_columns(s.n, p, T);
        const int64_t es = s.lora.bf16 ? 2 : 4;
        pf.add(static_cast<const char*>(s.lora.b) + nb * s.lora.r * es, (ne - nb) * s.lora.r * es);
        for (const Segment& seg : segs) pf.total += 4 * (seg.w1 - seg.w0) * s.n;  // word rows x N words (GPTQ)
      }                                                                           // = K rows x N/8 words (AWQ)
    }
    for (const Site& s : sites)
      for (const Segment& seg : segs)
        (AWQ ? segment_awq : segment)(s, in, seg, part.data(), acc.data() + p * M * total, total, lora ? &pf : nullptr);
    for (int64_t j = rt * p / T; j < rt * (p + 1) / T; j++) {
      const Site& s = owner(j);
      const int64_t row = (j - s.lora.t_offset) * K;
      for (int64_t m = 0; m < M; m++)
        t[m * rt + j] = s.lora.bf16 ? dot(static_cast<const c10::BFloat16*>(s.lora.a) + row, xf.data() + m * K, K)
                                    : dot(static_cast<const float*>(s.lora.a) + row, xf.data() + m * K, K);
    }
#pragma omp barrier
    for (const Site& s : sites) {  // thread p: its share of every site's columns, in blocks of 16
      const auto [n_begin, n_end] = thread_columns(s.n, p, T);
      for (int64_t m = 0; m < M; m++) {
        const float* tm = t.data() + m * rt + s.lora.t_offset;
        const float* am = acc.data() + m * total + s.col;  // thread q's sums at am + q M total
        int64_t n = n_begin;
#if defined(__AVX512F__)
        for (; n + 16 <= n_end; n += 16) {  // 16 columns: sums, up-projection (16 dots at once), one rounding
          __m512 v = _mm512_loadu_ps(am + n);
          for (int q = 1; q < T; q++) v = _mm512_add_ps(v, _mm512_loadu_ps(am + q * M * total + n));
          if (lora) {
            const int64_t at = n * s.lora.r;
            const __m512 u = s.lora.bf16 ? up16(reduce, static_cast<const c10::BFloat16*>(s.lora.b) + at, s.lora.r, tm)
                                         : up16(reduce, static_cast<const float*>(s.lora.b) + at, s.lora.r, tm);
            v = _mm512_fmadd_ps(_mm512_set1_ps(s.lora.scaling), u, v);
          }
          if (yb != nullptr) store_bf16(yb + m * total + s.col + n, v);
          else _mm512_storeu_ps(yf + m * total + s.col + n, v);
        }
#elif defined(QPASS_AVX2)
        for (; n + 8 <= n_end; n += 8) {  // 8 columns: sums, up-projection (8 dots at once), one rounding
          __m256 v = _mm256_loadu_ps(am + n);
          for (int q = 1; q < T; q++) v = _mm256_add_ps(v, _mm256_loadu_ps(am + q * M * total + n));
          if (lora) {
            const int64_t at = n * s.lora.r;
            const __m256 u = s.lora.bf16 ? up8(static_cast<const c10::BFloat16*>(s.lora.b) + at, s.lora.r, tm)
                                         : up8(static_cast<const float*>(s.lora.b) + at, s.lora.r, tm);
            v = _mm256_fmadd_ps(_mm256_set1_ps(s.lora.scaling), u, v);
          }
          if (yb != nullptr) store_bf16(yb + m * total + s.col + n, v);
          else _mm256_storeu_ps(yf + m * total + s.col + n, v);
        }
#endif
        for (; n < n_end; n++) {
          float v = 0.f;
          for (int q = 0; q < T; q++) v += am[q * M * total + n];
          if (lora) {
            const int64_t at = n * s.lora.r;
            v += s.lora.scaling * (s.lora.bf16 ? dot(static_cast<const c10::BFloat16*>(s.lora.b) + at, tm, s.lora.r)
                                               : dot(static_cast<const float*>(s.lora.b) + at, tm, s.lora.r));
          }
          if (yb != nullptr) yb[m * total + s.col + n] = c10::BFloat16(v);  // round to nearest even
          else yf[m * total + s.col + n] = v;
        }
      }
    }
  }
  return y;
}

at::Tensor check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "qpass ", op, ": x must be a 2-D float32 or bfloat16 CPU tensor");
  return x.contiguous();
}

template <bool AWQ>
at::Tensor int4_gemv(const at::Tensor& x_in, at::TensorList qweight, at::TensorList qzeros, at::TensorList scales,
                     int64_t group, at::TensorList lora_a, at::TensorList lora_b, at::TensorList scaling) {
  const char* op = AWQ ? "awq4_gemv" : "gptq4_gemv";
  const at::Tensor x = check_x(op, x_in);
  const std::vector<int64_t> ns = qpass_kernels::check_packed(op, AWQ, x.size(1), qweight, qzeros, scales, group);
  return gemv<AWQ>(op, x, ns, qweight, qzeros, scales, group, lora_from_tensors(op, x.size(1), ns, lora_a, lora_b, scaling));
}

template <bool AWQ>
at::Tensor int4_gemv_pooled(const at::Tensor& x_in, at::TensorList qweight, at::TensorList qzeros,
                            at::TensorList scales, int64_t group, const at::Tensor& pool, const at::Tensor& scalings,
                            at::IntArrayRef lora) {
  const char* op = AWQ ? "awq4_gemv_pooled" : "gptq4_gemv_pooled";
  const at::Tensor x = check_x(op, x_in);
  const std::vector<int64_t> ns = qpass_kernels::check_packed(op, AWQ, x.size(1), qweight, qzeros, scales, group);
  return gemv<AWQ>(op, x, ns, qweight, qzeros, scales, group, lora_from_pool(op, x.size(1), ns, pool, scalings, lora));
}

// Whether this build has the bfloat16 loop (the compiler targeted a CPU with AVX512-BF16); x picks the device.
bool gemv_bf16_loop(const at::Tensor&) { return kBf16Loop; }

}  // namespace

// The instruction-set path this library was compiled for (QPASS_ISA, packed_check.h): a plain C function, so
// that qpass.kernels.isa() can ask the library itself (ctypes) what its build took.
extern "C" __attribute__((visibility("default"))) const char* qpass_isa() { return QPASS_ISA; }

// The schemas are defined in Python (qpass/kernels/__init__.py, with the fakes used while tracing).
TORCH_LIBRARY_IMPL(qpass_kernels, CPU, m) {
  m.impl("gptq4_gemv", TORCH_FN(int4_gemv<false>));
  m.impl("awq4_gemv", TORCH_FN(int4_gemv<true>));
  m.impl("gptq4_gemv_pooled", TORCH_FN(int4_gemv_pooled<false>));
  m.impl("awq4_gemv_pooled", TORCH_FN(int4_gemv_pooled<true>));
  m.impl("gemv_bf16_loop", TORCH_FN(gemv_bf16_loop));
}
