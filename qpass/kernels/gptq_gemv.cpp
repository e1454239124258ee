// qpass_kernels::gptq4_gemv — a decode-step (few rows) matmul that reads 4-bit GPTQ weights in the library's
// own packing, so that no repacked copy of the weights is kept (see qpass/kernels/__init__.py).
//
//   y[m, n] = sum_k x[m, k] * s[k / G, n] * (q[k, n] - z[k / G, n])
//   q[k, n] = (qweight[k / 8, n] >> 4 * (k % 8)) & 15      (packed along K, gptqmodel's order)
//   z[g, n] = (qzeros[g, n / 8] >> 4 * (n % 8)) & 15        (packed along N; gptqmodel "v2" zeros)
//
// Per group, the codes minus zeros are exact small integers; they are converted to float32 and
// accumulated against x in float32, then scaled once per group (float32 throughout, one rounding per
// product-sum, like a float32 GEMM). Sibling sites that read the same input (q/k/v) run in one call: their
// output columns are concatenated, and their column blocks share one parallel loop.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "packed_check.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Site {
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  at::ScalarType sdt;
  int64_t n;    // out features of this site
  int64_t col;  // its first column in the output
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
    for (int j = 0; j < 8; j++) out[w * 8 + j] = (words[w] >> (4 * j)) & 15;
}

// Columns [n0, n0 + 16 * V) of one site, rows [m0, m0 + mr), mr <= MR.
template <int V, int MR>
void block(const Site& s, const float* x, float* y, int64_t ldy, int64_t m0, int mr, int64_t n0, int64_t K, int64_t G) {
  constexpr int W = 16 * V;
  float acc[MR][W];
  for (int m = 0; m < MR; m++)
    for (int c = 0; c < W; c++) acc[m][c] = 0.f;
  for (int64_t g = 0; g < K / G; g++) {
    int32_t zt[W];
    float st[W];
    load_zeros(s, g, n0, zt, W);
    load_scales(s, g * s.n + n0, st, W);
#if defined(__AVX512F__)
    __m512 part[MR][V];
    __m512i zv[V];
    for (int v = 0; v < V; v++) zv[v] = _mm512_loadu_si512(zt + 16 * v);
    for (int m = 0; m < MR; m++)
      for (int v = 0; v < V; v++) part[m][v] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32(15);
    for (int64_t w = g * G / 8; w < (g + 1) * G / 8; w++) {
      const int32_t* row = s.qweight + w * s.n + n0;
      __m512i r[V];
      for (int v = 0; v < V; v++) r[v] = _mm512_loadu_si512(row + 16 * v);
      for (int j = 0; j < 8; j++) {
        __m512 qf[V];
        for (int v = 0; v < V; v++)
          qf[v] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(r[v], 4 * j), mask), zv[v]));
        const int64_t k = w * 8 + j;
        for (int m = 0; m < mr; m++) {
          const __m512 xv = _mm512_set1_ps(x[(m0 + m) * K + k]);
          for (int v = 0; v < V; v++) part[m][v] = _mm512_fmadd_ps(xv, qf[v], part[m][v]);
        }
      }
    }
    for (int m = 0; m < mr; m++) {
      for (int v = 0; v < V; v++) {
        __m512 a = _mm512_loadu_ps(acc[m] + 16 * v);
        _mm512_storeu_ps(acc[m] + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(st + 16 * v), part[m][v], a));
      }
    }
#else  // portable: the same arithmetic, left to the compiler's vectorizer
    float part[MR][W];
    for (int m = 0; m < MR; m++)
      for (int c = 0; c < W; c++) part[m][c] = 0.f;
    for (int64_t w = g * G / 8; w < (g + 1) * G / 8; w++) {
      const int32_t* row = s.qweight + w * s.n + n0;
      for (int j = 0; j < 8; j++) {
        float qf[W];
        for (int c = 0; c < W; c++) qf[c] = static_cast<float>(((row[c] >> (4 * j)) & 15) - zt[c]);
        const int64_t k = w * 8 + j;
        for (int m = 0; m < mr; m++) {
          const float xv = x[(m0 + m) * K + k];
          for (int c = 0; c < W; c++) part[m][c] += xv * qf[c];
        }
      }
    }
    for (int m = 0; m < mr; m++)
      for (int c = 0; c < W; c++) acc[m][c] += st[c] * part[m][c];
#endif
  }
  for (int m = 0; m < mr; m++) std::memcpy(y + (m0 + m) * ldy + s.col + n0, acc[m], sizeof(float) * W);
}

at::Tensor gptq4_gemv(const at::Tensor& x, at::TensorList qweight, at::TensorList qzeros, at::TensorList scales,
                      int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "qpass gptq4_gemv: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<int64_t> ns = qpass_kernels::check_packed("gptq4_gemv", false, K, qweight, qzeros, scales, group);
  std::vector<Site> sites;
  int64_t total = 0;
  for (size_t i = 0; i < ns.size(); i++) {
    const auto& sc = scales[i];
    TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kBFloat16 || sc.scalar_type() == at::kFloat,
                "qpass gptq4_gemv: scales must be float16, bfloat16 or float32");
    sites.push_back({qweight[i].data_ptr<int32_t>(), qzeros[i].data_ptr<int32_t>(), sc.data_ptr(), sc.scalar_type(),
                     ns[i], total});
    total += ns[i];
  }
  at::Tensor y = at::empty({M, total}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Work items: (site, first column, width). One row uses 128-column blocks (8 accumulators) where they fit;
  // more rows use 64-column blocks, 4 rows at a time (register pressure); a site's last columns, 16 at a time.
  struct Item { int site; int64_t n0; int width; };
  std::vector<Item> items;
  for (size_t i = 0; i < sites.size(); i++) {
    for (int64_t n0 = 0; n0 < sites[i].n;) {
      const int64_t left = sites[i].n - n0;
      const int w = (M == 1 && left >= 128) ? 128 : left >= 64 ? 64 : 16;
      items.push_back({static_cast<int>(i), n0, w});
      n0 += w;
    }
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; it++) {
      const Item& item = items[it];
      const Site& s = sites[item.site];
      if (item.width == 128) {
        block<8, 1>(s, xp, yp, total, 0, 1, item.n0, K, group);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (item.width == 64) block<4, 4>(s, xp, yp, total, m0, mr, item.n0, K, group);
        else block<1, 4>(s, xp, yp, total, m0, mr, item.n0, K, group);
      }
    }
  });
  return y;
}

}  // namespace

// The schema is defined in Python (qpass/kernels/__init__.py, with the fake used while tracing).
TORCH_LIBRARY_IMPL(qpass_kernels, CPU, m) { m.impl("gptq4_gemv", TORCH_FN(gptq4_gemv)); }
