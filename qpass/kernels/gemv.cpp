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
//  * The loops are written once over vec.h's vectors, whose build the compiler's target picks (-march=native):
//    AVX-512 (16 lanes), AVX2 + FMA + F16C without AVX-512 (8 lanes, QPASS_AVX2) or portable C++. Only the
//    bfloat16 loop is AVX512-BF16's alone; elsewhere bfloat16 x takes the float32 loop, x widened once. What
//    the paths tune differently (registers per pass, AWQ rows per pass, prefetch) is a named constant.
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
#include "vec.h"

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

using namespace qpass_kernels;  // the vector operations (vec.h), kAwqNibble

// What the row kernels read about x.
struct Input {
  const float* x = nullptr;         // (M, K) float32
  const uint32_t* pairs = nullptr;  // (M, K / 2), bf16 loop. GPTQ: for word row w, pair 4w + j (j < 4) =
                                    // x[8w + j] | x[8w + j + 4] << 16; AWQ: pair i = x[2i] | x[2i + 1] << 16
  int64_t M = 0, K = 0;
  bool bf16 = false;
};

// ---- row kernels: part[m * ldp + c] += sum_k x[m0 + m, k] * (c + q[k, n0 + c]) over word rows w0..w0+nr-1,
// ---- columns c < 16 V, rows m < mr of x

// Vectors of partial sums one pass holds in registers per row of x: all 16 V columns where the registers allow,
// else chunks of them (the codes, the words and x's broadcast take the other registers).
template <int V, int MR>
constexpr int chunk_vectors() {
  constexpr int all = 16 * V / kLanes;
  constexpr int cap = kVecRegs >= 32 ? all : (MR == 1 ? 4 : 2);
  return all < cap ? all : cap;
}

template <int V, int MR>
inline void rows_f32(const Site& s, const Input& in, float* part, int64_t ldp, int64_t w0, int nr, int64_t n0,
                     int64_t m0, int mr) {
  constexpr int NV = chunk_vectors<V, MR>();
  for (int c0 = 0; c0 < 16 * V; c0 += kLanes * NV) {
    Vf p[MR][NV];
    for (int m = 0; m < mr; m++)
      for (int v = 0; v < NV; v++) p[m][v] = load(part + m * ldp + c0 + kLanes * v);
    for (int64_t w = w0; w < w0 + nr; w++) {
      const int32_t* row = s.qweight + w * s.n + n0 + c0;
      Vi r[NV];
      for (int v = 0; v < NV; v++) r[v] = loadi(row + kLanes * v);
      for (int j = 0; j < 8; j++) {
        if constexpr (MR == 1) {  // one code vector live at a time (fewer registers: no copies on AVX2)
          const Vf xv = set1(in.x[m0 * in.K + 8 * w + j]);
          for (int v = 0; v < NV; v++) p[0][v] = fmadd(xv, nibble(r[v], 4 * j), p[0][v]);
        } else {  // the code vectors made once for all rows
          Vf qf[NV];
          for (int v = 0; v < NV; v++) qf[v] = nibble(r[v], 4 * j);
          for (int m = 0; m < mr; m++) {
            const Vf xv = set1(in.x[(m0 + m) * in.K + 8 * w + j]);
            for (int v = 0; v < NV; v++) p[m][v] = fmadd(xv, qf[v], p[m][v]);
          }
        }
      }
    }
    for (int m = 0; m < mr; m++)
      for (int v = 0; v < NV; v++) store(part + m * ldp + c0 + kLanes * v, p[m][v]);
  }
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
  constexpr int RM = kVecRegs >= 32 ? MR : 1;  // rows of x per pass, 8 accumulators each
  // accumulator j holds nibble j of the block's words, lane l (+ kLanes h) word l (+ kLanes h): AwqSlots.f32
  for (int h = 0; kLanes * h < nw; h++) {
    const int live = std::min(kLanes, nw - kLanes * h);
    for (int mm = 0; mm < mr; mm += RM) {
      const int rm = std::min(RM, mr - mm);
      Vf p[RM][8];
      for (int m = 0; m < rm; m++)
        for (int j = 0; j < 8; j++) p[m][j] = load(part + (mm + m) * ldp + 16 * j + kLanes * h);
      for (int64_t k = k0; k < k0 + nr; k++) {
        const Vi r = loadi(words + k * wpr + kLanes * h, live);
        Vf xv[RM];
        for (int m = 0; m < rm; m++) xv[m] = set1(in.x[(m0 + mm + m) * in.K + k]);
        for (int j = 0; j < 8; j++) {
          const Vf qf = nibble(r, 4 * j);
          for (int m = 0; m < rm; m++) p[m][j] = fmadd(xv[m], qf, p[m][j]);
        }
      }
      for (int m = 0; m < rm; m++)
        for (int j = 0; j < 8; j++) store(part + (mm + m) * ldp + 16 * j + kLanes * h, p[m][j]);
    }
  }
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
  for (int blk = 0; blk < B; blk++) live[blk] = first(blk == B - 1 ? nw : 16);
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
constexpr bool kAwqPrefetch = true;  // see segment_awq
#else
constexpr int kAwqRows = 64;
constexpr bool kAwqPrefetch = false;
#endif

constexpr int kRows = 8;  // word rows (32 of K) per pass over the partial sums

inline Vf load_scales(const Site& s, int64_t i) {
  switch (s.sdt) {
    case at::kHalf: return load(static_cast<const c10::Half*>(s.scales) + i);
    case at::kBFloat16: return load(static_cast<const c10::BFloat16*>(s.scales) + i);
    default: return load(static_cast<const float*>(s.scales) + i);
  }
}

// acc[i] += s * (p[i] - (c + z) * sum), i < 16: group g's correction of columns [n0, n0 + 16).
inline void correct16(const Site& s, int64_t g, int64_t n0, const float* p, float* acc, float c, float sum) {
  const int32_t* words = s.qzeros + g * (s.n / 8) + n0 / 8;
  const Vi shift = loadi(kNibbleShift[s.awq]);
  for (int h = 0; h < 16 / kLanes; h++) {  // kLanes columns (kLanes / 8 zeros words) at a time
    const Vf z = to_float(and_(srlv(words_per_lane(words + h * kLanes / 8), shift), set1i(15)));
    const Vf d = fnmadd(add(z, set1(c)), set1(sum), load(p + kLanes * h));
    store(acc + kLanes * h, fmadd(load_scales(s, g * s.n + n0 + kLanes * h), d, load(acc + kLanes * h)));
  }
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
      // AVX2 (kAwqPrefetch): the same block's lines of the next kAwqRows rows, one sweep ahead: the sweep reads
      // kAwqRows rows a 64-byte line at a time, kAwqRows streams too many for the hardware prefetcher. (GPTQ's
      // loop reads few enough streams for it, and is left to it.)
      if (kAwqPrefetch)
        for (int64_t i = k + kAwqRows; i < std::min<int64_t>(k + kAwqRows + nr, in.K); i++)
          __builtin_prefetch(s.qweight + i * wpr + b0, 0, 3);
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
#if defined(__AVX512BF16__)
      if (in.bf16) {
        const int64_t t = n0 % 128 / 16;
        const float* acc4 = block + 16 * 4 * (t % 2);
        const __m512i pick = _mm512_load_si512(slots.pick[t / 2]);
        const __m512 j01 = _mm512_permutex2var_ps(_mm512_loadu_ps(acc4), pick, _mm512_loadu_ps(acc4 + 16));
        const __m512 j23 = _mm512_permutex2var_ps(_mm512_loadu_ps(acc4 + 32), pick, _mm512_loadu_ps(acc4 + 48));
        _mm512_store_ps(v, _mm512_mask_blend_ps(slots.odd_pair, j01, j23));
      } else
#endif
        for (int h = 0; h < 16 / kLanes; h++) store(v + kLanes * h, gather(block, at + n0 % 128 + kLanes * h));
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

// ---- the call, in phases ------------------------------------------------------------------------------------

// The sites of one call, their output columns concatenated in order, and their LoRAs' rows of t.
struct Call {
  std::vector<Site> sites;
  int64_t total = 0;   // output columns
  int64_t rt = 0;      // rows of t: the sum of the LoRA ranks
  int64_t widest = 0;  // the widest site's N
  bool lora = false;

  // The site whose LoRA holds row j of t (and of the stacked A rows).
  const Site& lora_owner(int64_t j) const {
    return *std::find_if(sites.begin(), sites.end(), [j](const Site& c) {
      return j >= c.lora.t_offset && j < c.lora.t_offset + c.lora.r; });
  }
};

Call make_call(const char* op, bool awq, const std::vector<int64_t>& ns, at::TensorList qweight,
               at::TensorList qzeros, at::TensorList scales, const std::vector<Lora>& loras) {
  Call call;
  call.lora = !loras.empty();
  for (size_t i = 0; i < ns.size(); i++) {
    const auto& sc = scales[i];
    TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kBFloat16 || sc.scalar_type() == at::kFloat,
                "qpass ", op, ": scales must be float16, bfloat16 or float32");
    Site site{qweight[i].data_ptr<int32_t>(), qzeros[i].data_ptr<int32_t>(), sc.data_ptr(), sc.scalar_type(), ns[i],
              call.total, Lora{}, awq};
    if (call.lora) {
      site.lora = loras[i];
      site.lora.t_offset = call.rt;
      call.rt += site.lora.r;
    }
    call.sites.push_back(site);
    call.total += ns[i];
    call.widest = std::max(call.widest, ns[i]);
  }
  return call;
}

// x as float32 (exact from bfloat16) and, for the bf16 loop, as pairs (Input): cheap next to the weights, made
// once per call. The returned Input points into xf and pairs.
Input make_input(const at::Tensor& x, bool awq, std::vector<float>& xf, std::vector<uint32_t>& pairs) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  xf.resize(static_cast<size_t>(M * K));
  pairs.resize(bf16 && kBf16Loop ? static_cast<size_t>(M * K / 2) : 0);
  if (bf16) {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * K; i++) xf[i] = c10::BFloat16(xb[i], c10::BFloat16::from_bits());
    if (kBf16Loop && awq)
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
  return in;
}

// Thread p of T's word rows [rows p / T, rows (p + 1) / T), cut at group boundaries, each with its sums of x.
std::vector<Segment> thread_segments(const Input& in, int64_t group, int p, int T) {
  const int64_t rows = in.K / 8, w_end = rows * (p + 1) / T;
  std::vector<Segment> segs;
  for (int64_t w0 = rows * p / T; w0 < w_end;) {
    const int64_t g = w0 * 8 / group, w1 = std::min(w_end, (g + 1) * group / 8);
    std::vector<float> sums(static_cast<size_t>(in.M), 0.f);
    for (int64_t m = 0; m < in.M; m++)
      for (int64_t k = 8 * w0; k < 8 * w1; k++) sums[m] += in.x[m * in.K + k];
    segs.push_back({g, w0, w1, std::move(sums)});
    w0 = w1;
  }
  return segs;
}

// What thread p reads of the LoRAs after its base work: the A rows of its share of t, the B rows of its columns.
Prefetch lora_prefetch(const Call& call, const std::vector<Segment>& segs, int64_t K, int p, int T) {
  Prefetch pf;
  for (int64_t j = call.rt * p / T, e = call.rt * (p + 1) / T; j < e;) {
    const Site& s = call.lora_owner(j);
    const int64_t stop = std::min(e, s.lora.t_offset + s.lora.r), es = s.lora.bf16 ? 2 : 4;
    pf.add(static_cast<const char*>(s.lora.a) + (j - s.lora.t_offset) * K * es, (stop - j) * K * es);
    j = stop;
  }
  for (const Site& s : call.sites) {
    const auto [nb, ne] = thread_columns(s.n, p, T);
    const int64_t es = s.lora.bf16 ? 2 : 4;
    pf.add(static_cast<const char*>(s.lora.b) + nb * s.lora.r * es, (ne - nb) * s.lora.r * es);
    for (const Segment& seg : segs) pf.total += 4 * (seg.w1 - seg.w0) * s.n;  // word rows x N words (GPTQ)
  }                                                                           // = K rows x N/8 words (AWQ)
  return pf;
}

// Thread p's rows of t = x A^T (M, rt).
void lora_down(const Call& call, const Input& in, float* t, int p, int T) {
  for (int64_t j = call.rt * p / T; j < call.rt * (p + 1) / T; j++) {
    const Site& s = call.lora_owner(j);
    const int64_t row = (j - s.lora.t_offset) * in.K;
    for (int64_t m = 0; m < in.M; m++)
      t[m * call.rt + j] = s.lora.bf16 ? dot(static_cast<const c10::BFloat16*>(s.lora.a) + row, in.x + m * in.K, in.K)
                                       : dot(static_cast<const float*>(s.lora.a) + row, in.x + m * in.K, in.K);
  }
}

// y's buffer: bfloat16 (x was) or float32.
struct Output {
  at::BFloat16* bf16;
  float* f32;
  void put(int64_t i, Vf v) const {
    if (bf16 != nullptr) store(bf16 + i, v);
    else store(f32 + i, v);
  }
};

// Thread p's share of every site's columns: the T threads' partial sums (acc, (T, M, total)) added, plus
// scaling t B^T, stored once in y's dtype; kLanes columns at a time (the up-projection's kLanes dots at once).
// Whole vectors: thread_columns hands out blocks of 16 columns, and N is a multiple of 16 (check_packed).
static_assert(16 % kLanes == 0, "a block of 16 columns is whole vectors");
void finish_columns(const Call& call, int64_t M, const float* acc, const float* t, int p, int T, const Output& y,
                    const ReduceLanes& reduce) {
  const int64_t total = call.total;
  for (const Site& s : call.sites) {
    const auto [n_begin, n_end] = thread_columns(s.n, p, T);
    const Lora& l = s.lora;
    for (int64_t m = 0; m < M; m++) {
      const float* tm = t + m * call.rt + l.t_offset;
      const float* am = acc + m * total + s.col;  // thread q's sums at am + q M total
      const int64_t out = m * total + s.col;
      for (int64_t n = n_begin; n < n_end; n += kLanes) {
        Vf v = load(am + n);
        for (int q = 1; q < T; q++) v = add(v, load(am + q * M * total + n));
        if (call.lora) {
          const Vf u = l.bf16 ? up_rows(reduce, static_cast<const c10::BFloat16*>(l.b) + n * l.r, l.r, tm)
                              : up_rows(reduce, static_cast<const float*>(l.b) + n * l.r, l.r, tm);
          v = fmadd(set1(l.scaling), u, v);
        }
        y.put(out + n, v);
      }
    }
  }
}

// gptq4_gemv (AWQ = false) and awq4_gemv (AWQ = true); `loras`: one per site, or none.
// One parallel region (each fork/join has a fixed cost, and a decode step makes several of these calls):
//  1. thread p: its word rows of every site (cut into segments at group boundaries) into its own partial sums;
//     then its share of LoRA's t = x A^T (A and B prefetched meanwhile);
//  2. after a barrier, thread p: its share of each site's columns (finish_columns).
template <bool AWQ>
at::Tensor gemv(const char* op, const at::Tensor& x, const std::vector<int64_t>& ns, at::TensorList qweight,
                at::TensorList qzeros, at::TensorList scales, int64_t group, const std::vector<Lora>& loras) {
  TORCH_CHECK(group % 8 == 0, "qpass ", op, ": group ", group, " must be a multiple of 8");
  const Call call = make_call(op, AWQ, ns, qweight, qzeros, scales, loras);
  std::vector<float> xf;
  std::vector<uint32_t> pairs;
  const Input in = make_input(x, AWQ, xf, pairs);
  const int64_t M = in.M, total = call.total;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), in.K / 8)));
  std::vector<float> acc(static_cast<size_t>(threads * M * total), 0.f);
  std::vector<float> t(static_cast<size_t>(M * call.rt));
  at::Tensor y = at::empty({M, total}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const Output out{bf16 ? y.data_ptr<at::BFloat16>() : nullptr, bf16 ? nullptr : y.data_ptr<float>()};
  static const ReduceLanes reduce;
#pragma omp parallel num_threads(threads)
  {
    const int p = omp_get_thread_num(), T = omp_get_num_threads();
    const std::vector<Segment> segs = thread_segments(in, group, p, T);
    Prefetch pf = call.lora ? lora_prefetch(call, segs, in.K, p, T) : Prefetch{};
    std::vector<float> part(static_cast<size_t>(M * awq_ldp(call.widest)));  // AWQ: whole blocks (GPTQ needs N)
    for (const Site& s : call.sites)
      for (const Segment& seg : segs)
        (AWQ ? segment_awq : segment)(s, in, seg, part.data(), acc.data() + p * M * total, total,
                                      call.lora ? &pf : nullptr);
    lora_down(call, in, t.data(), p, T);
#pragma omp barrier
    finish_columns(call, M, acc.data(), t.data(), p, T, out, reduce);
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
