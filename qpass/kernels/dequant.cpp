// The prefill / training base of 4-bit weights on CPU: the weights are unpacked by vector code straight
// into the activation dtype and multiplied. Inductor's code for the same unpack converts int32 to bf16 one
// element at a time, which costs about as much as the GEMM itself; this one writes 16 weights per instruction
// sequence.
//
// Three layouts, each with `<layout>_dequant` (the weight), `<layout>_mm` (x @ weight) and `<layout>_mm_lora`
// (x @ weight plus a LoRA, prefill):
//
//   gptq4:    gptqmodel's GPTQ packing. qweight (K/8, N) int32, q[k, n] = (qweight[k / 8, n] >> 4 * (k % 8)) & 15;
//             qzeros (G, N/8) int32, z[g, n] = (qzeros[g, n / 8] >> 4 * (n % 8)) & 15; scales (G, N).
//   awq4:     AutoAWQ's GEMM packing (autoawq, gptqmodel's AWQ classes, 4-bit). qweight (K, N/8) int32: column
//             8w + i of row k is nibble R[i] of word w, R = (0, 4, 1, 5, 2, 6, 3, 7); qzeros (G, N/8) the same
//             way; scales (G, N).
//   int4pack: aten's CPU int4pack layout as qpass.resident holds it. qweight (N, K/2) uint8: full blocks of
//             `block_n` columns store, k-major, column d and d + block_n/2 of the block in the low / high
//             nibble of one byte ((N/block_n, K, block_n/2) bytes); a tail block (N % block_n columns)
//             stores columns 2d and 2d+1 together. zero codes (G, N) uint8; scales (G, N).
//
//   W[k, n] = round_out(round_s(s[k / G, n] * (q[k, n] - z[k / G, n])))
//
// (q - z) is a small integer and s has at most 24 significant bits, so the product is exact in float32; it
// is rounded to the scales' dtype (the libraries multiply in that dtype) and then to the output dtype,
// round-to-nearest-even both times: the weight the library's dequantize gives, cast to the activation
// dtype as PEFT's layers do.
//
// `_mm` computes x @ W without the unpacked weight ever travelling through memory in full, two ways:
//   - bfloat16 x (gptq4, awq4, int4pack with 64-column blocks; an even group) on a CPU with AVX512-BF16: the
//     panel GEMM below, qpass's own micro-kernel; the unpack writes the micro-kernel's packed B directly.
//   - otherwise: each 512-column chunk of W is unpacked into a buffer that stays in cache and multiplied by the
//     GEMM library (oneDNN / MKL through at::mm). Half-precision x on a CPU where oneDNN has no fast
//     half-precision kernel (bf16 without AVX-512, f16 without AVX512-FP16) takes the "wide" GEMM: the
//     chunk holds the half-precision weights as float32 and x is widened, so at::mm runs in float32 (`wide`).
// Sibling sites (q/k/v) are passed together; their outputs are concatenated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "packed_check.h"
#include "vec.h"

namespace {

using namespace qpass_kernels;  // the vector operations (vec.h), nibble_shift, kNibbleShift

// F32_BF16 / F32_F16: the weight rounded to bfloat16 / float16 (the value the half-precision unpack gives),
// stored as float32 — the "wide" GEMM below.
enum Kind { F32 = 0, BF16 = 1, F16 = 2, F32_BF16 = 3, F32_F16 = 4 };
constexpr int rounding(int o) { return o == F32_BF16 ? BF16 : o == F32_F16 ? F16 : o; }  // the weight's values
constexpr int storage(int o) { return o >= F32_BF16 ? F32 : o; }                         // its buffer's dtype

// Half-precision x whose GEMM library has no fast kernel on this CPU: the "wide" GEMM — x and the unpacked
// weight (its half-precision values) in float32, multiplied by the float32 GEMM, rounded once. bf16 x bf16 and
// f16 x f16 products are exact in float32 and a half-precision GEMM accumulates in float32 too, so this is the
// same computation. oneDNN (what at::mm calls) says itself whether it has the kernel; Python's
// `kernels.wide_gemm`, which the backward uses, asks the same two questions. Without the kernel (bf16 on CPUs
// without AVX-512, fp16 without AVX512-FP16) oneDNN's half-precision GEMM is a reference loop, orders of
// magnitude slower than its float32 one.
bool onednn_has(const char* op) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(op, "").typed<bool()>().call();
}
bool wide(Kind o) {
  static const bool bf16 = !onednn_has("mkldnn::_is_mkldnn_bf16_supported");
  static const bool f16 = !onednn_has("mkldnn::_is_mkldnn_fp16_supported");
  return o == BF16 ? bf16 : o == F16 && f16;
}

Kind kind_of(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default: TORCH_CHECK(false, "qpass dequant kernels: ", what, " dtype ", t, " is not float32, bfloat16 or float16");
  }
  return F32;
}

template <int S>
inline float scale_at(const void* p, int64_t i) {
  if constexpr (S == F16) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  else if constexpr (S == BF16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  else return static_cast<const float*>(p)[i];
}

// Round a float32 to dtype K and back (an exact product -> the value the library's multiply gives).
template <int K>
inline float round_to(float v) {
  if constexpr (K == F16) return static_cast<float>(c10::Half(v));
  else if constexpr (K == BF16) return static_cast<float>(c10::BFloat16(v));
  else return v;
}

template <int O>
inline void store1(void* out, int64_t i, float v) {
  if constexpr (O == F16) static_cast<c10::Half*>(out)[i] = c10::Half(v);
  else if constexpr (O == BF16) static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v);
  else static_cast<float*>(out)[i] = v;
}

template <int S, int O>
inline void put1(void* out, int64_t i, float scale, int32_t code, int32_t zero) {
  store1<storage(O)>(out, i, round_to<rounding(O)>(round_to<S>(scale * static_cast<float>(code - zero))));
}

template <int K>
inline Vf round_to(Vf v) {
  if constexpr (K == F16) return round_half(v);
  else if constexpr (K == BF16) return round_bf16(v);
  else return v;
}

template <int O>
inline void store_as(void* out, int64_t i, Vf v) {
  if constexpr (O == F16) store(static_cast<c10::Half*>(out) + i, v);
  else if constexpr (O == BF16) store_finite(static_cast<c10::BFloat16*>(out) + i, v);  // weights are finite
  else store(static_cast<float*>(out) + i, v);
}

// kLanes weights: codes q (int32) minus zeros z, times scales s, rounded, stored at out[i].
// Rounding to the scales' dtype first matters only when the output dtype differs (round(round(v)) = round(v)).
template <int S, int O>
inline void put(void* out, int64_t i, Vf s, Vi q, Vi z) {
  constexpr int R = rounding(O), D = storage(O);
  Vf v = mul(s, to_float(subi(q, z)));
  if constexpr (S != R) v = round_to<S>(v);
  if constexpr (R != D) v = round_to<R>(v);  // wide: the half-precision value, stored as float32
  store_as<D>(out, i, v);
}

struct Site {
  const void* q;   // packed codes
  const void* z;   // zero points (packed int32 for gptq4, uint8 codes for int4pack)
  const void* s;   // scales
  int64_t n;       // out features
  int64_t col;     // first column in the concatenated output
};

struct Shape {
  int64_t K, G, block_n;
};

// Columns [n0, n1) of one site, the rows of groups [g0, g1), into out, whose column 0 is the site's column
// `origin` (row k of the site is row k of out).
using UnpackFn = void (*)(const Site&, const Shape&, int64_t n0, int64_t n1, void* out, int64_t ldo, int64_t origin,
                          int64_t g0, int64_t g1);

// The group's zero codes and scales (as float32) for columns [n0, n1), expanded once for its rows.
struct GroupParams {
  std::vector<int32_t> z;
  std::vector<float> s;
  GroupParams(int64_t n0, int64_t n1) : z(n1 - n0), s(n1 - n0) {}
};

// ---- gptq4 -------------------------------------------------------------------------------------------------

// Row by row: each packed row read front to back over the columns and its 8 rows of weights written front to
// back. (Walking 16-column strips down K instead would read a new page every few hundred bytes while the
// weights stream in from memory.)
template <int S, int O>
void gptq4_unpack(const Site& s, const Shape& sh, int64_t n0, int64_t n1, void* out, int64_t ldo, int64_t origin,
                  int64_t g0, int64_t g1) {
  const int32_t* qw = static_cast<const int32_t*>(s.q);
  const int32_t* qz = static_cast<const int32_t*>(s.z);
  const int64_t gw = sh.G / 8;  // words per group
  GroupParams p(n0, n1);
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t n = n0; n < n1; n++) {
      p.z[n - n0] = (qz[g * (s.n / 8) + n / 8] >> nibble_shift(false, n)) & 15;
      p.s[n - n0] = scale_at<S>(s.s, g * s.n + n);
    }
    for (int64_t w = g * gw; w < (g + 1) * gw; w++) {
      const int32_t* row = qw + w * s.n;
      int64_t n = n0;
      for (; n + kLanes <= n1; n += kLanes) {
        const Vi r = loadi(row + n), zv = loadi(p.z.data() + (n - n0));
        const Vf sv = load(p.s.data() + (n - n0));
        for (int j = 0; j < 8; j++) put<S, O>(out, (w * 8 + j) * ldo + n - origin, sv, and_(srli(r, 4 * j), set1i(15)), zv);
      }
      for (; n < n1; n++)
        for (int j = 0; j < 8; j++)
          put1<S, O>(out, (w * 8 + j) * ldo + n - origin, p.s[n - n0], (row[n] >> (4 * j)) & 15, p.z[n - n0]);
    }
  }
}

// ---- awq4 -------------------------------------------------------------------------------------------------

// Columns [n, n + kLanes) of one row of AWQ words from words = row + n / 8 (n a multiple of 8): lanes 8 i..8 i + 7
// read word i, each shifted to its column's nibble.
inline Vi awq_codes(const int32_t* words) { return and_(srlv(words_per_lane(words), loadi(kNibbleShift[1])), set1i(15)); }

// Row by row, as gptq4_unpack (AWQ's rows are K rows, each N / 8 words).
template <int S, int O>
void awq4_unpack(const Site& s, const Shape& sh, int64_t n0, int64_t n1, void* out, int64_t ldo, int64_t origin,
                 int64_t g0, int64_t g1) {
  const int32_t* qw = static_cast<const int32_t*>(s.q);
  const int32_t* qz = static_cast<const int32_t*>(s.z);
  const int64_t words = s.n / 8;
  GroupParams p(n0, n1);
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t n = n0; n < n1; n++) {
      p.z[n - n0] = (qz[g * words + n / 8] >> nibble_shift(true, n)) & 15;
      p.s[n - n0] = scale_at<S>(s.s, g * s.n + n);
    }
    for (int64_t k = g * sh.G; k < (g + 1) * sh.G; k++) {
      const int32_t* row = qw + k * words;
      int64_t n = n0;
      for (; n + kLanes <= n1; n += kLanes)  // n0 is a multiple of 8
        put<S, O>(out, k * ldo + n - origin, load(p.s.data() + (n - n0)), awq_codes(row + n / 8),
                  loadi(p.z.data() + (n - n0)));
      for (; n < n1; n++)
        put1<S, O>(out, k * ldo + n - origin, p.s[n - n0], (row[n / 8] >> nibble_shift(true, n)) & 15, p.z[n - n0]);
    }
  }
}

// ---- int4pack ----------------------------------------------------------------------------------------------

template <int S, int O>
void int4pack_unpack(const Site& s, const Shape& sh, int64_t n0, int64_t n1, void* out, int64_t ldo, int64_t origin,
                     int64_t g0, int64_t g1) {
  const uint8_t* bytes = static_cast<const uint8_t*>(s.q);
  const uint8_t* zc = static_cast<const uint8_t*>(s.z);
  const int64_t K = sh.K, G = sh.G, bn = sh.block_n, half = bn / 2;
  const int64_t full = s.n - s.n % bn;
  for (int64_t b0 = n0; b0 < n1; b0 += bn) {
    if (b0 >= full) {  // the tail block: columns 2d, 2d+1 in one byte
      const uint8_t* tail = bytes + full * K / 2;
      const int64_t width = (s.n - full) / 2;
      for (int64_t k = g0 * G; k < g1 * G; k++) {
        const int64_t g = k / G;
        for (int64_t d = 0; d < width; d++) {
          const uint8_t byte = tail[k * width + d];
          for (int h = 0; h < 2; h++) {
            const int64_t n = full + 2 * d + h;
            put1<S, O>(out, k * ldo + n - origin, scale_at<S>(s.s, g * s.n + n), (byte >> (4 * h)) & 15, zc[g * s.n + n]);
          }
        }
      }
      continue;
    }
    const uint8_t* block = bytes + (b0 / bn) * K * half;
    // aten's block for this instruction set (64 columns with AVX-512, 32 with AVX2): row k is 2 kLanes bytes,
    // column d + 2 kLanes in byte d's high nibble; 4 vectors of columns per row
    if (bn == 4 * kLanes) {
      for (int64_t g = g0; g < g1; g++) {
        Vi zv[4];
        Vf sv[4];
        for (int v = 0; v < 4; v++) {
          zv[v] = load_u8(zc + g * s.n + b0 + kLanes * v);
          alignas(64) float st[kLanes];
          for (int c = 0; c < kLanes; c++) st[c] = scale_at<S>(s.s, g * s.n + b0 + kLanes * v + c);
          sv[v] = load(st);
        }
        const Vi mask = set1i(15);
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
          const uint8_t* row = block + k * half;
          const Vi lo = load_u8(row), hi = load_u8(row + kLanes);
          const int64_t at = k * ldo + b0 - origin;
          put<S, O>(out, at, sv[0], and_(lo, mask), zv[0]);               // columns [0, kLanes)
          put<S, O>(out, at + kLanes, sv[1], and_(hi, mask), zv[1]);      // [kLanes, 2 kLanes)
          put<S, O>(out, at + 2 * kLanes, sv[2], srli(lo, 4), zv[2]);     // [2 kLanes, 3 kLanes)
          put<S, O>(out, at + 3 * kLanes, sv[3], srli(hi, 4), zv[3]);     // [3 kLanes, 4 kLanes)
        }
      }
      continue;
    }
    for (int64_t k = g0 * G; k < g1 * G; k++) {
      const int64_t g = k / G;
      for (int64_t d = 0; d < half; d++) {
        const uint8_t byte = block[k * half + d];
        for (int h = 0; h < 2; h++) {
          const int64_t n = b0 + h * half + d;
          put1<S, O>(out, k * ldo + n - origin, scale_at<S>(s.s, g * s.n + n), (byte >> (4 * h)) & 15, zc[g * s.n + n]);
        }
      }
    }
  }
}

// ---- the bfloat16 panel GEMM: the unpack inside the GEMM's own B packing ---------------------------------------
//
// For bfloat16 x on a CPU with AVX512-BF16, x @ W does not go through at::mm. `vdpbf16ps` multiplies pairs of
// bf16 (rows k and k+1 of W) and accumulates in float32, so B is wanted as "pair words": 32 bits holding W[k, n]
// (low half) and W[k+1, n] (high half). A GEMM library given a dense bf16 W first copies it into that form (its
// B packing); here the 4-bit codes are unpacked straight into it, a panel of 64 columns x up to kSliceRows rows
// at a time in a per-thread buffer (256 KiB, in L2), and every row block of x is multiplied against the panel
// while it is in cache. So the weight is written once, by the unpack, and read by the multiply: against
// unpack -> bf16 chunk -> at::mm, one write and one read of the chunk fewer, and the library's packing pass gone.
// The weights are the ones `_dequant` gives (same rounding); the sums are float32, rounded once to bf16.

// Rows [k0, k1) (whole groups) of columns [n0, n0 + 16 * nv) of a site into panel (pair words, row stride kPanel).
using PackFn = void (*)(const Site&, const Shape&, int64_t n0, int nv, int64_t k0, int64_t k1, int32_t* panel);

#if defined(__AVX512BF16__)

constexpr int64_t kPanel = 64;         // columns per panel: 4 vectors of 16 float32 sums per row of x
constexpr int64_t kSliceRows = 2048;   // rows of W per panel slice: 2048 x 64 bf16 = 256 KiB
constexpr int64_t kTileRows = 6;       // rows of x per tile: 6 x 4 accumulators + 4 panel vectors in registers

// 16 pair words: rows k (even) and k + 1 of 16 columns, each s * (q - z) rounded as put rounds.
template <int S>
inline __m512i pair16(__m512 s, __m512i q_even, __m512i q_odd, __m512i z) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512 e = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(q_even, z)));
  __m512 o = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(q_odd, z)));
  if constexpr (S != BF16) {
    e = round_to<S>(e);
    o = round_to<S>(o);
  }
  return _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(o, e)));
}

// Each group's zero codes and scales for the panel's columns, as vectors.
template <int S, bool AWQ>
inline void group_vectors(const Site& s, int64_t g, int64_t n0, int nv, __m512i* z, __m512* sc) {
  alignas(64) int32_t zs[kPanel];
  alignas(64) float ss[kPanel];
  const int32_t* qz = static_cast<const int32_t*>(s.z) + g * (s.n / 8);
  for (int64_t c = 0; c < 16 * nv; c++) {
    const int64_t n = n0 + c;
    zs[c] = (qz[n / 8] >> nibble_shift(AWQ, n)) & 15;
    ss[c] = scale_at<S>(s.s, g * s.n + n);
  }
  for (int j = 0; j < nv; j++) {
    z[j] = _mm512_load_si512(zs + 16 * j);
    sc[j] = _mm512_load_ps(ss + 16 * j);
  }
}

template <int S>
void gptq4_pack(const Site& s, const Shape& sh, int64_t n0, int nv, int64_t k0, int64_t k1, int32_t* panel) {
  const int32_t* qw = static_cast<const int32_t*>(s.q);
  const __m512i mask = _mm512_set1_epi32(15);
  __m512i z[4];
  __m512 sc[4];
  for (int64_t g = k0 / sh.G; g < k1 / sh.G; g++) {
    group_vectors<S, false>(s, g, n0, nv, z, sc);
    for (int64_t w = g * sh.G / 8; w < (g + 1) * sh.G / 8; w++) {
      const int32_t* row = qw + w * s.n + n0;
      int32_t* out = panel + (w * 8 - k0) / 2 * kPanel;  // 4 pair rows per packed row
      for (int j = 0; j < nv; j++) {
        const __m512i r = _mm512_loadu_si512(row + 16 * j);
        for (int i = 0; i < 4; i++)
          _mm512_store_si512(out + i * kPanel + 16 * j,
                             pair16<S>(sc[j], _mm512_and_si512(_mm512_srli_epi32(r, 8 * i), mask),
                                       _mm512_and_si512(_mm512_srli_epi32(r, 8 * i + 4), mask), z[j]));
      }
    }
  }
}

template <int S>
void awq4_pack(const Site& s, const Shape& sh, int64_t n0, int nv, int64_t k0, int64_t k1, int32_t* panel) {
  const int32_t* qw = static_cast<const int32_t*>(s.q);
  const int64_t words = s.n / 8;
  __m512i z[4];
  __m512 sc[4];
  for (int64_t g = k0 / sh.G; g < k1 / sh.G; g++) {
    group_vectors<S, true>(s, g, n0, nv, z, sc);
    for (int64_t k = g * sh.G; k < (g + 1) * sh.G; k += 2) {
      const int32_t* even = qw + k * words + n0 / 8;
      int32_t* out = panel + (k - k0) / 2 * kPanel;
      for (int j = 0; j < nv; j++)
        _mm512_store_si512(out + 16 * j, pair16<S>(sc[j], awq_codes(even + 2 * j), awq_codes(even + words + 2 * j), z[j]));
    }
  }
}

// int4pack (block_n == kPanel: AVX-512 CPUs): a full panel is one block, whose row k is 32 bytes (column d in
// the low nibble of byte d, column d + 32 in the high one), so rows k and k + 1 are one 64-byte load; the tail
// block (N % 64 columns) keeps columns 2d and 2d + 1 in byte d of its rows.
template <int S>
void int4pack_pack(const Site& s, const Shape& sh, int64_t n0, int nv, int64_t k0, int64_t k1, int32_t* panel) {
  const uint8_t* bytes = static_cast<const uint8_t*>(s.q);
  const uint8_t* zc = static_cast<const uint8_t*>(s.z);
  const int64_t K = sh.K, full = s.n - s.n % kPanel, width = (s.n - full) / 2;
  const __m512i mask = _mm512_set1_epi32(15);
  const __m512i half_of = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i nibble = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  auto tail16 = [&](const uint8_t* p) {  // 16 columns from 8 bytes of a tail row
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(half_of, b), nibble), mask);
  };
  __m512i z[4];
  __m512 sc[4];
  for (int64_t g = k0 / sh.G; g < k1 / sh.G; g++) {
    alignas(64) float ss[kPanel];
    for (int64_t c = 0; c < 16 * nv; c++) ss[c] = scale_at<S>(s.s, g * s.n + n0 + c);
    for (int j = 0; j < nv; j++) {
      z[j] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zc + g * s.n + n0 + 16 * j)));
      sc[j] = _mm512_load_ps(ss + 16 * j);
    }
    for (int64_t k = g * sh.G; k < (g + 1) * sh.G; k += 2) {
      int32_t* out = panel + (k - k0) / 2 * kPanel;
      if (n0 < full) {
        const uint8_t* row = bytes + n0 * K / 2 + k * (kPanel / 2);
        const __m128i* r = reinterpret_cast<const __m128i*>(row);
        const __m512i lo0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(r)), hi0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(r + 1));
        const __m512i lo1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(r + 2)), hi1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(r + 3));
        _mm512_store_si512(out, pair16<S>(sc[0], _mm512_and_si512(lo0, mask), _mm512_and_si512(lo1, mask), z[0]));
        _mm512_store_si512(out + 16, pair16<S>(sc[1], _mm512_and_si512(hi0, mask), _mm512_and_si512(hi1, mask), z[1]));
        _mm512_store_si512(out + 32, pair16<S>(sc[2], _mm512_srli_epi32(lo0, 4), _mm512_srli_epi32(lo1, 4), z[2]));
        _mm512_store_si512(out + 48, pair16<S>(sc[3], _mm512_srli_epi32(hi0, 4), _mm512_srli_epi32(hi1, 4), z[3]));
      } else {
        const uint8_t* row = bytes + full * K / 2 + k * width;
        for (int j = 0; j < nv; j++)
          _mm512_store_si512(out + 16 * j, pair16<S>(sc[j], tail16(row + 8 * j), tail16(row + width + 8 * j), z[j]));
      }
    }
  }
}

template <int S>
struct Int4packPack { static constexpr PackFn fn = int4pack_pack<S>; };
template <int S>
struct Gptq4Pack { static constexpr PackFn fn = gptq4_pack<S>; };
template <int S>
struct Awq4Pack { static constexpr PackFn fn = awq4_pack<S>; };

template <template <int> class F>
PackFn pick_pack(Kind s) {
  switch (s) {
    case F16: return F<F16>::fn;
    case BF16: return F<BF16>::fn;
    default: return F<F32>::fn;
  }
}

// acc[i][j] += rows i of a (pairs of bf16, row stride lda) times vector j of n pair rows of the panel.
template <int MR, int NV>
__attribute__((always_inline)) inline void accumulate(__m512 (&acc)[MR][NV], const uint16_t* a, int64_t lda,
                                                      const int32_t* panel, int64_t n) {
  const int32_t* ap[MR];
  for (int i = 0; i < MR; i++) ap[i] = reinterpret_cast<const int32_t*>(a + i * lda);
  for (int64_t kp = 0; kp < n; kp++) {
    const int32_t* b = panel + kp * kPanel;
    __m512bh bv[NV];
    for (int j = 0; j < NV; j++) bv[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(b + 16 * j));
    for (int i = 0; i < MR; i++) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(ap[i][kp]));
      for (int j = 0; j < NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
}

// MR rows of x times one panel slice of kps pair rows, NV vectors of columns; then (the last slice of a site
// with a low-rank term) MR rows of xe times the kpe pair rows after them. The sums start from zero (first
// slice) or from c (float32, row stride kPanel), and end in c or, after the last slice, rounded to bf16 in y.
template <int MR, int NV>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* xe, int64_t lde, const int32_t* panel, int64_t kps,
          int64_t kpe, bool first, bool last, float* c, uint16_t* y, int64_t ldy) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * kPanel + 16 * j);
  accumulate<MR, NV>(acc, x, ldx, panel, kps);
  if (kpe) accumulate<MR, NV>(acc, xe, lde, panel + kps * kPanel, kpe);
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) {
      if (last)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + 16 * j),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[i][j])));
      else
        _mm512_storeu_ps(c + i * kPanel + 16 * j, acc[i][j]);
    }
}

// All M rows against one panel slice: tiles of kTileRows rows, then the remainder.
template <int NV>
void rows(int64_t M, const uint16_t* x, int64_t ldx, const uint16_t* xe, int64_t lde, const int32_t* panel,
          int64_t kps, int64_t kpe, bool first, bool last, float* c, uint16_t* y, int64_t ldy) {
  int64_t m = 0;
  for (; m < M; m += kTileRows) {
    const int64_t r = std::min<int64_t>(kTileRows, M - m);
    const uint16_t *xm = x + m * ldx, *em = xe ? xe + m * lde : nullptr;
    float* cm = c ? c + m * kPanel : nullptr;
    uint16_t* ym = y + m * ldy;
    switch (r) {
      case 6: tile<6, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
      case 5: tile<5, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
      case 4: tile<4, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
      case 3: tile<3, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
      case 2: tile<2, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
      default: tile<1, NV>(xm, ldx, em, lde, panel, kps, kpe, first, last, cm, ym, ldy); break;
    }
  }
}

using RowsFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, const int32_t*, int64_t, int64_t,
                        bool, bool, float*, uint16_t*, int64_t);
constexpr RowsFn kRows[4] = {rows<1>, rows<2>, rows<3>, rows<4>};

#endif  // __AVX512BF16__

// ---- dispatch, checks, the two entry points per layout --------------------------------------------------------

template <int S, int O>
struct Gptq4 { static constexpr UnpackFn fn = gptq4_unpack<S, O>; };
template <int S, int O>
struct Awq4 { static constexpr UnpackFn fn = awq4_unpack<S, O>; };
template <int S, int O>
struct Int4pack { static constexpr UnpackFn fn = int4pack_unpack<S, O>; };

template <template <int, int> class F, int S>
UnpackFn pick_out(Kind o) {
  switch (o) {
    case F16: return F<S, F16>::fn;
    case BF16: return F<S, BF16>::fn;
    case F32_BF16: return F<S, F32_BF16>::fn;
    case F32_F16: return F<S, F32_F16>::fn;
    default: return F<S, F32>::fn;
  }
}

// The output kind of the unpack for x of dtype `out`: `mm` (a GEMM, not `_dequant`) with the wide GEMM, the
// half-precision values stored as float32.
Kind unpack_kind(at::ScalarType out, bool mm) {
  const Kind o = kind_of(out, "output");
  if (!mm || !wide(o)) return o;
  return o == BF16 ? F32_BF16 : F32_F16;
}

template <template <int, int> class F>
UnpackFn pick(Kind s, Kind o) {
  switch (s) {
    case F16: return pick_out<F, F16>(o);
    case BF16: return pick_out<F, BF16>(o);
    default: return pick_out<F, F32>(o);
  }
}

struct Sites {
  std::vector<Site> list;
  std::vector<UnpackFn> fns;
  std::vector<PackFn> packs;  // bf16 output, AVX512-BF16, even group: the panel GEMM's unpack (else empty)
  Shape shape;
  int64_t total = 0;
  int64_t step = 16;  // column granularity of the layout (a chunk or work item starts at a multiple of it)
  bool by_rows = true;  // the layout is read row by row (gptq4, awq4): threads split the groups, not the columns
  bool wide = false;    // half-precision x through the float32 GEMM (unpack_kind)
};

// gptq4 (awq = false) or awq4 (awq = true) sites: int32 codes, int32 zero points packed along N, scales.
Sites packed_sites(bool awq, const char* op, int64_t K, at::TensorList qweight, at::TensorList qzeros,
                   at::TensorList scales, int64_t group, at::ScalarType out, bool mm) {
  const std::vector<int64_t> ns = qpass_kernels::check_packed(op, awq, K, qweight, qzeros, scales, group);
  Sites r;
  r.shape = {K, group, 0};
  const Kind o = unpack_kind(out, mm);
  r.wide = storage(o) != o;
  for (size_t i = 0; i < ns.size(); i++) {
    r.list.push_back({qweight[i].data_ptr(), qzeros[i].data_ptr(), scales[i].data_ptr(), ns[i], r.total});
    const Kind sk = kind_of(scales[i].scalar_type(), "scales");
    r.fns.push_back(awq ? pick<Awq4>(sk, o) : pick<Gptq4>(sk, o));
#if defined(__AVX512BF16__)
    if (o == BF16 && group % 2 == 0) r.packs.push_back(awq ? pick_pack<Awq4Pack>(sk) : pick_pack<Gptq4Pack>(sk));
#endif
    r.total += ns[i];
  }
  return r;
}

Sites int4pack_sites(const char* op, int64_t K, at::TensorList qweight, at::TensorList scales,
                     at::TensorList zero_codes, int64_t group, int64_t block_n, at::ScalarType out, bool mm) {
  TORCH_CHECK(!qweight.empty() && qweight.size() == scales.size() && qweight.size() == zero_codes.size(), "qpass ",
              op, ": one qweight, scales and zero codes per site");
  TORCH_CHECK(group > 0 && K % group == 0 && (block_n == 32 || block_n == 64), "qpass ", op, ": group ", group,
              " must divide in_features ", K, " and block_n (", block_n, ") be 32 or 64");
  Sites r;
  r.shape = {K, group, block_n};
  r.step = block_n;
  r.by_rows = false;  // column blocks of block_n, each k-major
  const Kind o = unpack_kind(out, mm);
  r.wide = storage(o) != o;
  for (size_t i = 0; i < qweight.size(); i++) {
    const auto& qw = qweight[i];
    const auto& sc = scales[i];
    const auto& zc = zero_codes[i];
    const int64_t n = sc.dim() == 2 ? sc.size(1) : 0;
    TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kByte && zc.scalar_type() == at::kByte &&
                    qw.is_contiguous() && zc.is_contiguous() && sc.is_contiguous() && qw.numel() * 2 == n * K &&
                    n % 2 == 0 && sc.size(0) == K / group && zc.dim() == 2 && zc.size(0) == K / group &&
                    zc.size(1) == n,
                "qpass ", op, ": site ", i, " is not the int4pack layout (uint8 codes (N, K/2), scales (G, N), uint8 "
                "zero codes (G, N)) for K=", K, ", group ", group);
    r.list.push_back({qw.data_ptr(), zc.data_ptr(), sc.data_ptr(), n, r.total});
    r.fns.push_back(pick<Int4pack>(kind_of(sc.scalar_type(), "scales"), o));
#if defined(__AVX512BF16__)
    if (o == BF16 && block_n == kPanel && group % 2 == 0 && n % 16 == 0)
      r.packs.push_back(pick_pack<Int4packPack>(kind_of(sc.scalar_type(), "scales")));
#endif
    r.total += n;
  }
  if (r.packs.size() != r.list.size()) r.packs.clear();  // the panel GEMM for every site or none
  return r;
}

// Unpack columns [a, b) of site i into out (K x (b - a), leading dimension ldo), in parallel over groups of rows
// (by_rows layouts) or column blocks.
void unpack(const Sites& s, size_t i, int64_t a, int64_t b, void* out, int64_t ldo) {
  const int64_t groups = s.shape.K / s.shape.G;
  if (s.by_rows) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      s.fns[i](s.list[i], s.shape, a, b, out, ldo, a, g0, g1);
    });
    return;
  }
  const int64_t item = std::max<int64_t>(64, s.step);
  const int64_t items = (b - a + item - 1) / item;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; it++) {
      const int64_t n0 = a + it * item, n1 = std::min(b, n0 + item);
      s.fns[i](s.list[i], s.shape, n0, n1, out, ldo, a, 0, groups);
    }
  });
}

at::Tensor dequant(const Sites& s, at::ScalarType dtype, const at::TensorOptions& options) {
  at::Tensor w = at::empty({s.shape.K, s.total}, options.dtype(dtype));
  const int64_t esize = w.element_size();
  for (size_t i = 0; i < s.list.size(); i++)
    unpack(s, i, 0, s.list[i].n, static_cast<char*>(w.data_ptr()) + s.list[i].col * esize, s.total);
  return w;
}

#if defined(__AVX512BF16__)
// A site's low-rank term for the panel GEMM: xe (M, r_pad) bf16, r_pad = r rounded up to even (a zero column
// after an odd r), times w (r, N), given as int32 pair words (N, r_pad / 2): column n's rows 2e and 2e + 1 of w
// (`up_pairs`).
struct LowRank {
  at::Tensor xe, pairs;
};

// y (M, total) bf16 = x (M, K) @ W per site, plus low[i].xe @ w_i for the sites with a low-rank term.
void panel_mm(const Sites& s, const at::Tensor& x, const std::vector<LowRank>& low, at::Tensor& y) {
  const int64_t M = x.size(0), K = s.shape.K, G = s.shape.G;
  const int64_t slice = K <= kSliceRows ? K : std::max<int64_t>(G, kSliceRows / G * G);
  std::vector<int64_t> first_panel{0};  // panel index where each site starts
  for (const Site& site : s.list) first_panel.push_back(first_panel.back() + (site.n + kPanel - 1) / kPanel);
  int64_t rmax = 0;
  for (const auto& l : low) rmax = std::max<int64_t>(rmax, l.xe.defined() ? l.xe.size(1) : 0);
  const uint16_t* xd = static_cast<const uint16_t*>(x.data_ptr());
  uint16_t* yd = static_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, first_panel.back(), 1, [&](int64_t p0, int64_t p1) {
    // this thread's panel slice and, when K takes more than one slice, its float32 partial sums
    std::unique_ptr<int32_t[], decltype(&std::free)> buf(
        static_cast<int32_t*>(std::aligned_alloc(64, (slice + rmax) / 2 * kPanel * 4)), &std::free);
    std::vector<float> partial(slice < K ? M * kPanel : 0);
    size_t i = 0;
    for (int64_t p = p0; p < p1; p++) {
      while (p >= first_panel[i + 1]) i++;
      const Site& site = s.list[i];
      const int64_t n0 = (p - first_panel[i]) * kPanel;
      const int nv = static_cast<int>(std::min(kPanel, site.n - n0) / 16);
      const bool extra = i < low.size() && low[i].xe.defined();
      for (int64_t k0 = 0; k0 < K; k0 += slice) {
        const int64_t k1 = std::min(K, k0 + slice), kps = (k1 - k0) / 2;
        const bool last = k1 == K;
        s.packs[i](site, s.shape, n0, nv, k0, k1, buf.get());
        const int64_t kpe = last && extra ? low[i].xe.size(1) / 2 : 0;
        if (kpe) {  // the low-rank term's pair rows after the slice's
          const int32_t* pairs = low[i].pairs.data_ptr<int32_t>() + n0 * kpe;
          for (int64_t c = 0; c < 16 * nv; c++)
            for (int64_t e = 0; e < kpe; e++) buf[(kps + e) * kPanel + c] = pairs[c * kpe + e];
        }
        kRows[nv - 1](M, xd + k0, K, kpe ? static_cast<const uint16_t*>(low[i].xe.data_ptr()) : nullptr,
                      kpe ? low[i].xe.size(1) : 0, buf.get(), kps, kpe, k0 == 0, last,
                      partial.empty() ? nullptr : partial.data(), yd + site.col + n0, s.total);
      }
    }
  });
}

inline __m512 widen_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// sums[i][j] = dot(xw row i, a row j) over K: xw MB rows of float32 (row stride ldw, zero-padded to a multiple of
// 16), a CB rows (pointers) of float32 or bf16. Everything in locals so the 24 sums stay in registers.
template <int MB, int CB, typename AT>
void dot_block(const float* xw, int64_t ldw, const AT* const* a, int64_t K, float (&sums)[MB][CB]) {
  __m512 acc[MB][CB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < CB; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 av[CB];
    for (int j = 0; j < CB; j++) {
      if constexpr (std::is_same_v<AT, float>) av[j] = _mm512_maskz_loadu_ps(m, a[j] + k);
      else av[j] = widen_bf16(reinterpret_cast<const uint16_t*>(a[j] + k), m);
    }
    for (int i = 0; i < MB; i++) {
      const __m512 xv = _mm512_loadu_ps(xw + i * ldw + k);
      for (int j = 0; j < CB; j++) acc[i][j] = _mm512_fmadd_ps(xv, av[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < CB; j++) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

// LoRA's down-projection for the panel GEMM: xe (M, r_pad) bf16 = round(x (M, K) bf16 @ A^T), A (r, K) float32 or
// bf16, products and sums in float32 (x widened exactly), one rounding to bf16; a zero column after an odd r.
// Dot products along K: 4 rows of x (widened once into float32) by 6 rows of A, 24 float32 accumulators.
template <typename AT>
void down_projection(const at::Tensor& x, const at::Tensor& a, at::Tensor& xe) {
  constexpr int MB = 4, CB = 6;
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0), ld = xe.size(1);
  const uint16_t* xd = static_cast<const uint16_t*>(x.data_ptr());
  const AT* ad = static_cast<const AT*>(a.data_ptr());
  c10::BFloat16* out = static_cast<c10::BFloat16*>(xe.data_ptr());
  const int64_t K16 = (K + 15) / 16 * 16;
  at::parallel_for(0, (M + MB - 1) / MB, 1, [=](int64_t b0, int64_t b1) {
    std::vector<float> xw(MB * K16);  // the block's rows of x in float32, zero-padded to 16
    for (int64_t mb = b0; mb < b1; mb++) {
      const int64_t m0 = mb * MB, mr = std::min<int64_t>(MB, M - m0);
      for (int i = 0; i < MB; i++)
        for (int64_t k = 0; k < K16; k += 16) {
          const __mmask16 m = i < mr ? (K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1)) : 0;
          _mm512_storeu_ps(xw.data() + i * K16 + k, widen_bf16(xd + (m0 + i) * K + k, m));
        }
      for (int64_t c0 = 0; c0 < r; c0 += CB) {
        const int64_t cr = std::min<int64_t>(CB, r - c0);
        const AT* arows[CB];  // a short block repeats its last row
        for (int j = 0; j < CB; j++) arows[j] = ad + (c0 + std::min<int64_t>(j, cr - 1)) * K;
        float sums[MB][CB];
        dot_block<MB, CB, AT>(xw.data(), K16, arows, K, sums);
        for (int i = 0; i < mr; i++)
          for (int j = 0; j < cr; j++) out[(m0 + i) * ld + c0 + j] = c10::BFloat16(sums[i][j]);
      }
      if (ld > r)
        for (int i = 0; i < mr; i++) out[(m0 + i) * ld + r] = c10::BFloat16(0.0f);
    }
  });
}

// LoRA's up-projection weights for the panel GEMM: pair words of round_bf16(scaling * B^T), B (N, r) float32 or
// bf16 ((B * scaling) rounded to bf16, as the graph's fold computed it), laid out (N, r_pad / 2): column n's
// pairs contiguous, which is B's own row order (one vector conversion per 16 of a row's entries).
template <typename BT>
at::Tensor up_pairs(const at::Tensor& b, float scaling) {
  const int64_t n = b.size(0), r = b.size(1), e_rows = (r + 1) / 2;
  at::Tensor out = at::empty({n, e_rows}, b.options().dtype(at::kInt));
  const BT* bd = static_cast<const BT*>(b.data_ptr());
  int32_t* dst = out.data_ptr<int32_t>();
  const __m512 sv = _mm512_set1_ps(scaling);
  at::parallel_for(0, n, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++)
      for (int64_t e0 = 0; e0 < r; e0 += 16) {  // 16 entries of the row: 8 pair words
        const int64_t left = std::min<int64_t>(16, r - e0);
        const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
        __m512 v;
        if constexpr (std::is_same_v<BT, float>) v = _mm512_maskz_loadu_ps(m, bd + c * r + e0);
        else v = widen_bf16(reinterpret_cast<const uint16_t*>(bd + c * r + e0), m);
        const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(v, sv)));  // zeros past r
        _mm256_mask_storeu_epi32(dst + c * e_rows + e0 / 2, static_cast<__mmask8>((1u << ((left + 1) / 2)) - 1), h);
      }
  });
  return out;
}

#endif

// Columns of W per chunk: the unpacked chunk (K x 512; 1 MiB for K = 1024 in bf16) must stay in a core's L2
// while the GEMM library multiplies it.
constexpr int64_t kChunk = 512;

// x @ W, plus for site i (when given) extra_in[i] @ extra_w[i] in the same GEMM: the input is [x | extra_in[i]]
// and each unpacked chunk gets extra_w[i]'s columns as r_i more rows (K + r_i), so a low-rank term (LoRA's
// up-projection, scaled) rides along in the base GEMM's float32 accumulation instead of a GEMM of its own.
at::Tensor chunked_mm(const char* op, const at::Tensor& x, const Sites& s, at::TensorList extra_in,
                      at::TensorList extra_w) {
  TORCH_CHECK(extra_in.size() == extra_w.size() && (extra_in.empty() || extra_in.size() == s.list.size()), "qpass ",
              op, ": extra_in and extra_w need one tensor per site (or none)");
  if (s.wide && x.scalar_type() != at::kFloat) {  // the wide GEMM: x, the extras and the weight in float32
    std::vector<at::Tensor> ein, ew;
    for (const auto& e : extra_in) ein.push_back(e.scalar_type() == x.scalar_type() ? e.to(at::kFloat) : e);
    for (const auto& e : extra_w) ew.push_back(e.scalar_type() == x.scalar_type() ? e.to(at::kFloat) : e);
    return chunked_mm(op, x.to(at::kFloat), s, ein, ew).to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = s.shape.K;
  auto check_extra = [&](size_t i) {
    const int64_t r = extra_in[i].dim() == 2 ? extra_in[i].size(1) : -1;
    TORCH_CHECK(extra_in[i].dim() == 2 && extra_in[i].size(0) == M && extra_w[i].dim() == 2 &&
                    extra_w[i].size(0) == r && extra_w[i].size(1) == s.list[i].n &&
                    extra_in[i].scalar_type() == x.scalar_type() && extra_w[i].scalar_type() == x.scalar_type(),
                "qpass ", op, ": site ", i, ": extra_in must be (M, r) and extra_w (r, N=", s.list[i].n,
                ") in x's dtype ", x.scalar_type());
    return r;
  };
#if defined(__AVX512BF16__)
  if (!s.packs.empty()) {  // bf16: the panel GEMM (the unpack is its B packing)
    at::Tensor y = at::empty({M, s.total}, x.options());
    std::vector<LowRank> low(extra_in.size());
    for (size_t i = 0; i < extra_in.size(); i++) {
      const int64_t r = check_extra(i);
      if (!r) continue;
      low[i].xe = at::zeros({M, r + r % 2}, x.options());
      low[i].xe.narrow(1, 0, r).copy_(extra_in[i]);
      low[i].pairs = up_pairs<c10::BFloat16>(extra_w[i].t().contiguous(), 1.0f);  // bf16 * 1 rounds to itself
    }
    if (M) panel_mm(s, xc, low, y);
    return y;
  }
#endif
  if (extra_in.empty() && s.list.size() == 1 && s.total <= kChunk)
    return at::mm(xc, dequant(s, x.scalar_type(), x.options()));
  at::Tensor y = at::empty({M, s.total}, x.options());
  // [x | extra_in[i]]: x copied once into a buffer wide enough for every site's extra columns; site i reads
  // its first K + r_i columns (row stride K + max r)
  int64_t rmax = 0;
  for (const auto& e : extra_in) rmax = std::max<int64_t>(rmax, e.dim() == 2 ? e.size(1) : 0);
  at::Tensor xt;
  if (rmax) {
    xt = at::empty({M, K + rmax}, x.options());
    xt.narrow(1, 0, K).copy_(xc);
  }
  for (size_t i = 0; i < s.list.size(); i++) {
    const Site& site = s.list[i];
    at::Tensor xi = xc, ew;
    int64_t r = 0;
    if (!extra_in.empty()) {
      r = check_extra(i);
      ew = extra_w[i].contiguous();  // its rows are copied chunk by chunk
      if (r) {
        xt.narrow(1, K, r).copy_(extra_in[i]);
        xi = xt.narrow(1, 0, K + r);
      }
    }
    at::Tensor buf = at::empty({K + r, std::min(kChunk, site.n)}, x.options());
    for (int64_t a = 0; a < site.n; a += kChunk) {
      const int64_t b = std::min(site.n, a + kChunk);
      const at::Tensor w = b - a == buf.size(1) ? buf : at::empty({K + r, b - a}, x.options());
      unpack(s, i, a, b, w.data_ptr(), b - a);
      if (r) w.narrow(0, K, r).copy_(ew.narrow(1, a, b - a));
      at::Tensor out = y.narrow(1, site.col + a, b - a);  // written in place (row stride = all columns)
      at::mm_out(out, xi, w);
    }
  }
  return y;
}

// x @ W_i + scaling_i (x A_i^T) B_i^T per site, LoRA's up-projection in the base GEMM's accumulation (the
// `_mm_lora` ops: prefill, no gradient). A (r, K) and B (N, r) float32 or bfloat16, scaling one element.
// Roundings: t = x A^T in float32 (x cast to the adapter's dtype, as PEFT does), rounded to x's dtype;
// scaling * B rounded to x's dtype; their product
// summed with x W in float32 and rounded once. bf16 x with the panel GEMM: t and the pair words of
// scaling * B^T are computed here; otherwise the same two roundings in ATen, then the chunked GEMM's extras.
at::Tensor lora_mm(const char* op, const at::Tensor& x, const Sites& s, at::TensorList lora_a, at::TensorList lora_b,
                   at::TensorList scaling) {
  const size_t n = s.list.size();
  TORCH_CHECK(lora_a.size() == n && lora_b.size() == n && scaling.size() == n, "qpass ", op,
              ": one lora_a, lora_b and scaling per site");
  [[maybe_unused]] const int64_t M = x.size(0);  // the panel GEMM's (AVX512-BF16 builds)
  const int64_t K = s.shape.K;
  std::vector<at::Tensor> as, bs;
  std::vector<float> sc;
  for (size_t i = 0; i < n; i++) {
    const auto &a = lora_a[i], &b = lora_b[i];
    const int64_t r = a.dim() == 2 ? a.size(0) : -1;
    TORCH_CHECK(a.dim() == 2 && a.size(1) == K && b.dim() == 2 && b.size(0) == s.list[i].n && b.size(1) == r &&
                    a.scalar_type() == b.scalar_type() &&
                    (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) && scaling[i].numel() == 1,
                "qpass ", op, ": site ", i, ": lora_a must be (r, K=", K, "), lora_b (N=", s.list[i].n,
                ", r), both float32 or both bfloat16, and scaling one element");
    as.push_back(a.contiguous());
    bs.push_back(b.contiguous());
    sc.push_back(scaling[i].item<float>());
  }
  const at::Tensor xc = x.contiguous();
#if defined(__AVX512BF16__)
  if (!s.packs.empty()) {
    std::vector<LowRank> low(n);
    for (size_t i = 0; i < n; i++) {
      const int64_t r = as[i].size(0);
      if (!r) continue;
      low[i].xe = at::empty({M, r + r % 2}, x.options());
      const bool f32 = as[i].scalar_type() == at::kFloat;
      if (f32) down_projection<float>(xc, as[i], low[i].xe);
      else down_projection<c10::BFloat16>(xc, as[i], low[i].xe);
      low[i].pairs = f32 ? up_pairs<float>(bs[i], sc[i]) : up_pairs<c10::BFloat16>(bs[i], sc[i]);
    }
    at::Tensor y = at::empty({M, s.total}, x.options());
    if (M) panel_mm(s, xc, low, y);
    return y;
  }
#endif
  std::vector<at::Tensor> ein, ew;
  for (size_t i = 0; i < n; i++) {
    // t in the adapter's dtype (x cast to it, as PEFT does); a bf16 adapter under the wide GEMM in float32
    const at::ScalarType td = s.wide ? at::kFloat : as[i].scalar_type();
    ein.push_back(at::mm(xc.to(as[i].scalar_type()).to(td), as[i].to(td).t()).to(x.scalar_type()));
    ew.push_back(bs[i].mul(sc[i]).to(x.scalar_type()).t().contiguous());
  }
  return chunked_mm(op, xc, s, ein, ew);
}

// gptq4_* (AWQ = false) and awq4_* (AWQ = true): the same entry points over the two int32 packings.
template <bool AWQ>
at::Tensor packed_dequant(at::TensorList qweight, at::TensorList qzeros, at::TensorList scales, int64_t group,
                          at::ScalarType dtype) {
  const char* op = AWQ ? "awq4_dequant" : "gptq4_dequant";
  TORCH_CHECK(!qweight.empty(), "qpass ", op, ": no sites");
  const int64_t K = AWQ ? qweight[0].size(0) : qweight[0].size(0) * 8;
  return dequant(packed_sites(AWQ, op, K, qweight, qzeros, scales, group, dtype, false), dtype, qweight[0].options());
}

template <bool AWQ>
at::Tensor packed_mm(const at::Tensor& x, at::TensorList qweight, at::TensorList qzeros, at::TensorList scales,
                     int64_t group, at::TensorList extra_in, at::TensorList extra_w) {
  const char* op = AWQ ? "awq4_mm" : "gptq4_mm";
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qpass ", op, ": x must be a 2-D CPU tensor");
  return chunked_mm(op, x, packed_sites(AWQ, op, x.size(1), qweight, qzeros, scales, group, x.scalar_type(), true),
                    extra_in, extra_w);
}

template <bool AWQ>
at::Tensor packed_mm_lora(const at::Tensor& x, at::TensorList qweight, at::TensorList qzeros, at::TensorList scales,
                          int64_t group, at::TensorList lora_a, at::TensorList lora_b, at::TensorList scaling) {
  const char* op = AWQ ? "awq4_mm_lora" : "gptq4_mm_lora";
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qpass ", op, ": x must be a 2-D CPU tensor");
  return lora_mm(op, x, packed_sites(AWQ, op, x.size(1), qweight, qzeros, scales, group, x.scalar_type(), true),
                 lora_a, lora_b, scaling);
}

at::Tensor int4pack_dequant(at::TensorList qweight, at::TensorList scales, at::TensorList zero_codes, int64_t group,
                            int64_t block_n, at::ScalarType dtype) {
  TORCH_CHECK(!qweight.empty() && !scales.empty() && scales[0].dim() == 2, "qpass int4pack_dequant: no sites");
  const int64_t K = scales[0].size(0) * group;
  return dequant(int4pack_sites("int4pack_dequant", K, qweight, scales, zero_codes, group, block_n, dtype, false),
                 dtype, qweight[0].options());
}

at::Tensor int4pack_mm(const at::Tensor& x, at::TensorList qweight, at::TensorList scales, at::TensorList zero_codes,
                       int64_t group, int64_t block_n, at::TensorList extra_in, at::TensorList extra_w) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qpass int4pack_mm: x must be a 2-D CPU tensor");
  return chunked_mm("int4pack_mm", x, int4pack_sites("int4pack_mm", x.size(1), qweight, scales, zero_codes, group,
                                                     block_n, x.scalar_type(), true), extra_in, extra_w);
}

at::Tensor int4pack_mm_lora(const at::Tensor& x, at::TensorList qweight, at::TensorList scales,
                            at::TensorList zero_codes, int64_t group, int64_t block_n, at::TensorList lora_a,
                            at::TensorList lora_b, at::TensorList scaling) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qpass int4pack_mm_lora: x must be a 2-D CPU tensor");
  return lora_mm("int4pack_mm_lora", x, int4pack_sites("int4pack_mm_lora", x.size(1), qweight, scales, zero_codes,
                                                       group, block_n, x.scalar_type(), true), lora_a, lora_b, scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(qpass_kernels, CPU, m) {
  m.impl("gptq4_dequant", TORCH_FN(packed_dequant<false>));
  m.impl("gptq4_mm", TORCH_FN(packed_mm<false>));
  m.impl("awq4_dequant", TORCH_FN(packed_dequant<true>));
  m.impl("awq4_mm", TORCH_FN(packed_mm<true>));
  m.impl("int4pack_dequant", TORCH_FN(int4pack_dequant));
  m.impl("int4pack_mm", TORCH_FN(int4pack_mm));
  m.impl("gptq4_mm_lora", TORCH_FN(packed_mm_lora<false>));
  m.impl("awq4_mm_lora", TORCH_FN(packed_mm_lora<true>));
  m.impl("int4pack_mm_lora", TORCH_FN(int4pack_mm_lora));
}
