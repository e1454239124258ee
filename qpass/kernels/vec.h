// The vector operations qpass's CPU kernels are written in, one set per instruction-set path (packed_check.h):
// the kernels' loops are written once over `Vf` (float32 lanes) and `Vi` (int32 lanes); this file holds what
// differs between the paths, and nothing else does except loops that exist on one path only (the AVX512-BF16
// dot-product loops) and tuning constants.
//
//   AVX-512: 16 lanes, 32 vector registers.   AVX2 (+ FMA + F16C): 8 lanes, 16 registers.
//   portable: 16 lanes held in arrays, left to the compiler's vectorizer. 16, not 8, so that the loops' 16-lane
//   form is checked on every machine (the portable build runs in the tests: tests/test_kernels.py).
//
// Every operation is lane-wise unless it says otherwise; `n`-taking loads read the first n <= kLanes values
// (all of them for n >= kLanes) and zero the other lanes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "packed_check.h"

namespace qpass_kernels {

#if defined(__AVX512F__)

constexpr int kLanes = 16;
constexpr int kVecRegs = 32;
using Vf = __m512;
using Vi = __m512i;

inline __mmask16 first(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }
inline Vf zero() { return _mm512_setzero_ps(); }
inline Vf set1(float v) { return _mm512_set1_ps(v); }
inline Vf load(const float* p) { return _mm512_loadu_ps(p); }
inline Vf load(const float* p, int64_t n) { return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p); }
inline Vf widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline Vf load(const c10::BFloat16* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vf load(const c10::BFloat16* p, int64_t n) {
  if (n >= 16) return load(p);
  alignas(32) uint16_t tail[16] = {};
  std::memcpy(tail, p, sizeof(uint16_t) * n);
  return widen_bf16(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)));
}
inline Vf load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store(float* p, Vf v) { _mm512_storeu_ps(p, v); }
// lane i: v[i] rounded to nearest even as bfloat16 bits, in the low 16 bits (v[i] finite; the AVX2 twin is
// packed_check.h's bf16_bits8)
inline __m512i bf16_bits16(Vf v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}
inline void store_u16x16(c10::BFloat16* p, __m512i bits) {  // the low 16 bits of each lane
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}
// rounded to nearest even as c10::BFloat16 (NaN -> 0x7FC0)
inline void store(c10::BFloat16* p, Vf v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  store_u16x16(p, _mm512_mask_mov_epi32(bf16_bits16(v), nan, _mm512_set1_epi32(0x7FC0)));
}
inline Vf add(Vf a, Vf b) { return _mm512_add_ps(a, b); }
inline Vf fmadd(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
inline Vf fnmadd(Vf a, Vf b, Vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline Vf to_float(Vi v) { return _mm512_cvtepi32_ps(v); }
inline float reduce_add(Vf v) { return _mm512_reduce_add_ps(v); }
// lane i: base[idx[i]]
inline Vf gather(const float* base, const int32_t* idx) { return _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4); }
inline Vf mul(Vf a, Vf b) { return _mm512_mul_ps(a, b); }
inline Vi subi(Vi a, Vi b) { return _mm512_sub_epi32(a, b); }
inline Vi load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// to the nearest float16 / bfloat16 value and back (finite inputs), round to nearest even
inline Vf round_half(Vf v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
inline Vf round_bf16(Vf v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16)); }
inline void store(c10::Half* p, Vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// rounded to nearest even, v finite (no NaN fix-up: for values known finite, such as dequantized weights)
inline void store_finite(c10::BFloat16* p, Vf v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  store_u16x16(p, bf16_bits16(v));
#endif
}

inline Vi set1i(int32_t v) { return _mm512_set1_epi32(v); }
inline Vi loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
inline Vi loadi(const int32_t* p, int64_t n) { return _mm512_maskz_loadu_epi32(first(n), p); }
inline Vi srli(Vi v, int s) { return _mm512_srli_epi32(v, s); }
inline Vi srlv(Vi v, Vi s) { return _mm512_srlv_epi32(v, s); }
inline Vi and_(Vi a, Vi b) { return _mm512_and_si512(a, b); }
// lane i: words[i / 8] (two words of 8 nibbles)
inline Vi words_per_lane(const int32_t* words) {
  return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(words[0]), _mm512_set1_epi32(words[1]));
}

// Lane c of the result: the sum of v[c]'s 16 lanes, c < 16 (16 horizontal sums at once: four levels of
// pairwise permute-and-add, each halving the lanes a column occupies; 45 instructions). Overwrites v.
struct ReduceLanes {
  __m512i lo[4], hi[4];
  ReduceLanes() {
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
  Vf operator()(Vf* v) const {
    for (int L = 0, n = 16; L < 4; L++, n /= 2)
      for (int i = 0; i < n / 2; i++)
        v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], lo[L], v[2 * i + 1]),
                             _mm512_permutex2var_ps(v[2 * i], hi[L], v[2 * i + 1]));
    return v[0];
  }
};

#elif defined(QPASS_AVX2)

constexpr int kLanes = 8;
constexpr int kVecRegs = 16;
using Vf = __m256;
using Vi = __m256i;

inline __m256i first(int64_t n) {  // lanes < n all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vf zero() { return _mm256_setzero_ps(); }
inline Vf set1(float v) { return _mm256_set1_ps(v); }
inline Vf load(const float* p) { return _mm256_loadu_ps(p); }
inline Vf load(const float* p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(n)); }
inline Vf widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline Vf load(const c10::BFloat16* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vf load(const c10::BFloat16* p, int64_t n) {
  if (n >= 8) return load(p);
  alignas(16) uint16_t tail[8] = {};
  std::memcpy(tail, p, sizeof(uint16_t) * n);
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}
inline Vf load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store(float* p, Vf v) { _mm256_storeu_ps(p, v); }
// rounded to nearest even as c10::BFloat16 (NaN -> 0x7FC0)
inline void store(c10::BFloat16* p, Vf v) {
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  store_u16x8(p, _mm256_blendv_epi8(bf16_bits8(v), _mm256_set1_epi32(0x7FC0), nan));
}
inline Vf add(Vf a, Vf b) { return _mm256_add_ps(a, b); }
inline Vf fmadd(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline Vf fnmadd(Vf a, Vf b, Vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vf to_float(Vi v) { return _mm256_cvtepi32_ps(v); }
inline float reduce_add(Vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// lane i: base[idx[i]], element by element (the AVX2 gather instruction is microcoded on the CPUs this path serves)
inline Vf gather(const float* base, const int32_t* idx) {
  return _mm256_setr_ps(base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]], base[idx[4]], base[idx[5]],
                        base[idx[6]], base[idx[7]]);
}
inline Vf mul(Vf a, Vf b) { return _mm256_mul_ps(a, b); }
inline Vi subi(Vi a, Vi b) { return _mm256_sub_epi32(a, b); }
inline Vi load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
// to the nearest float16 / bfloat16 value and back (finite inputs), round to nearest even
inline Vf round_half(Vf v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
inline Vf round_bf16(Vf v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }
inline void store(c10::Half* p, Vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// rounded to nearest even, v finite (no NaN fix-up: for values known finite, such as dequantized weights)
inline void store_finite(c10::BFloat16* p, Vf v) { store_u16x8(p, bf16_bits8(v)); }

inline Vi set1i(int32_t v) { return _mm256_set1_epi32(v); }
inline Vi loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Vi loadi(const int32_t* p, int64_t n) { return n >= 8 ? loadi(p) : _mm256_maskload_epi32(p, first(n)); }
inline Vi srli(Vi v, int s) { return _mm256_srli_epi32(v, s); }
inline Vi srlv(Vi v, Vi s) { return _mm256_srlv_epi32(v, s); }
inline Vi and_(Vi a, Vi b) { return _mm256_and_si256(a, b); }
inline Vi words_per_lane(const int32_t* words) { return _mm256_set1_epi32(words[0]); }  // lane i: words[i / 8]

// Lane c of the result: the sum of v[c]'s 8 lanes, c < 8 (three levels of hadd within 128-bit halves, then the
// halves).
struct ReduceLanes {
  Vf operator()(Vf* v) const {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // v0..v3 per half
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // v4..v7 per half
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
};

#else  // portable

constexpr int kLanes = 16;
constexpr int kVecRegs = 32;
struct Vf { float l[16]; };
struct Vi { int32_t l[16]; };

#define QPASS_LANES(expr) for (int i = 0; i < 16; i++) expr;
inline Vf zero() { return Vf{}; }
inline Vf set1(float v) { Vf r; QPASS_LANES(r.l[i] = v) return r; }
template <typename T>
inline Vf load(const T* p, int64_t n) { Vf r{}; for (int i = 0; i < 16 && i < n; i++) r.l[i] = static_cast<float>(p[i]); return r; }
template <typename T>
inline Vf load(const T* p) { return load(p, 16); }
inline void store(float* p, Vf v) { std::memcpy(p, v.l, sizeof(v.l)); }
inline void store(c10::BFloat16* p, Vf v) { QPASS_LANES(p[i] = c10::BFloat16(v.l[i])) }  // nearest even
inline Vf add(Vf a, Vf b) { QPASS_LANES(a.l[i] += b.l[i]) return a; }
inline Vf fmadd(Vf a, Vf b, Vf c) { QPASS_LANES(c.l[i] += a.l[i] * b.l[i]) return c; }
inline Vf fnmadd(Vf a, Vf b, Vf c) { QPASS_LANES(c.l[i] -= a.l[i] * b.l[i]) return c; }
inline Vf to_float(Vi v) { Vf r; QPASS_LANES(r.l[i] = static_cast<float>(v.l[i])) return r; }
inline float reduce_add(Vf v) { float s = 0.f; QPASS_LANES(s += v.l[i]) return s; }
inline Vf gather(const float* base, const int32_t* idx) { Vf r; QPASS_LANES(r.l[i] = base[idx[i]]) return r; }
inline Vf mul(Vf a, Vf b) { QPASS_LANES(a.l[i] *= b.l[i]) return a; }
inline Vi subi(Vi a, Vi b) { QPASS_LANES(a.l[i] -= b.l[i]) return a; }
inline Vi load_u8(const uint8_t* p) { Vi r; QPASS_LANES(r.l[i] = p[i]) return r; }
inline Vf round_half(Vf v) { QPASS_LANES(v.l[i] = static_cast<float>(c10::Half(v.l[i]))) return v; }
inline Vf round_bf16(Vf v) { QPASS_LANES(v.l[i] = static_cast<float>(c10::BFloat16(v.l[i]))) return v; }
inline void store(c10::Half* p, Vf v) { QPASS_LANES(p[i] = c10::Half(v.l[i])) }
inline void store_finite(c10::BFloat16* p, Vf v) { store(p, v); }

inline Vi set1i(int32_t v) { Vi r; QPASS_LANES(r.l[i] = v) return r; }
inline Vi loadi(const int32_t* p, int64_t n) { Vi r{}; for (int i = 0; i < 16 && i < n; i++) r.l[i] = p[i]; return r; }
inline Vi loadi(const int32_t* p) { return loadi(p, 16); }
inline Vi srli(Vi v, int s) { QPASS_LANES(v.l[i] = static_cast<int32_t>(static_cast<uint32_t>(v.l[i]) >> s)) return v; }
inline Vi srlv(Vi v, Vi s) { QPASS_LANES(v.l[i] = static_cast<int32_t>(static_cast<uint32_t>(v.l[i]) >> s.l[i])) return v; }
inline Vi and_(Vi a, Vi b) { QPASS_LANES(a.l[i] &= b.l[i]) return a; }
inline Vi words_per_lane(const int32_t* words) { Vi r; QPASS_LANES(r.l[i] = words[i / 8]) return r; }
#undef QPASS_LANES

struct ReduceLanes {  // lane c of the result: the sum of v[c]'s lanes
  Vf operator()(const Vf* v) const {
    Vf r;
    for (int c = 0; c < 16; c++) r.l[c] = reduce_add(v[c]);
    return r;
  }
};

#endif

// The 4-bit code at nibble s of each lane (s = 4 j), as float32.
inline Vf nibble(Vi words, int s) { return to_float(and_(srli(words, s), set1i(15))); }

// Lane c: sum_j t[j] B[c, j] for the kLanes rows c of b (row stride r, float32 or bfloat16), r > 0.
template <typename T>
inline Vf up_rows(const ReduceLanes& reduce, const T* b, int64_t r, const float* t) {
  Vf v[kLanes];
  for (int c = 0; c < kLanes; c++) v[c] = zero();
  for (int64_t j = 0; j < r; j += kLanes) {
    const Vf tt = load(t + j, r - j);
    for (int c = 0; c < kLanes; c++) v[c] = fmadd(load(b + c * r + j, r - j), tt, v[c]);
  }
  return reduce(v);
}

// dot(a, b) over r values (a float32 or bfloat16, b float32), in float32: four chains (FMA latency).
template <typename T>
inline float dot(const T* a, const float* b, int64_t r) {
  Vf c0 = zero(), c1 = c0, c2 = c0, c3 = c0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= r; j += 4 * kLanes) {
    c0 = fmadd(load(a + j), load(b + j), c0);
    c1 = fmadd(load(a + j + kLanes), load(b + j + kLanes), c1);
    c2 = fmadd(load(a + j + 2 * kLanes), load(b + j + 2 * kLanes), c2);
    c3 = fmadd(load(a + j + 3 * kLanes), load(b + j + 3 * kLanes), c3);
  }
  for (; j < r; j += kLanes) c0 = fmadd(load(a + j, r - j), load(b + j, r - j), c0);
  return reduce_add(add(add(c0, c1), add(c2, c3)));
}

}  // namespace qpass_kernels
