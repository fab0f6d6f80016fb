// Low-bit matmuls on the CPU in llama.cpp's block formats (any M: decode and prefill), and their dequantization:
//   mlsys::q4_1_linear(x (M, K), qs (T, K/32, 256) uint8, d, m (T, K/32, 16) fp16, n) -> (M, n)
//   mlsys::q8_0_linear(x (M, K), qs (T, K/32, 512) int8,  d (T, K/32, 16) fp16, n)    -> (M, n)
//   mlsys::q{4_1,8_0}_dequantize(...) -> (n, K) in a float dtype (long prefill: dequantize once, then a GEMM)
//
// Blocks of 32 input columns. Q4_1: w = d * q + m with q in [0, 15]; Q8_0: w = d * q, q int8 (the GGUF's grids).
// The weights are in tiles of 16 output rows (T = ceil(n / 16)), laid out for the instructions that read them
// (see `tile` below; blockquant.py packs and unpacks the layout). The (d, m) terms factor out of a block:
//   sum_j w_j x_j = d * sum_j q_j x_j + m * sum_j x_j,
// and the activations are rounded to int16 per block, so each block is an exact integer dot product
// (AVX-512 VNNI vpdpwssd, AVX2 vpmaddwd, or scalar), scaled once per block. The result is F.linear(x, dequantized w)
// up to that rounding and the fp32 summation order.
#include "common.h"

namespace {

// ---- activations: each row rounded to int16 per block of 32, dx = max|x_block| / 32767 (a relative rounding
// of 2^-16 of the block's largest value, far below the bf16 the model computes in; int8 activations,
// llama.cpp's choice, moved greedy tokens within a few steps here). Every path below multiplies these
// integers exactly, so the paths differ only in the fp32 summation order of the block terms.
struct XQ {
  std::vector<int16_t> q;     // (M, K) quantized activations
  std::vector<float> dx;      // (M, G) activation scale per block
  std::vector<float> s;       // (M, G) float block sums of x (Q4_1's m term)
};

// x (M, K) of float, bf16 or fp16 -> the calling thread's reused XQ (no allocation per call once warm)
template <typename T>
const XQ& quantize_x(const T* x, int64_t M, int64_t K) {
  const int64_t G = K / QK;
  thread_local XQ o;
  o.q.resize(M * K);
  o.s.resize(M * G);
  o.dx.resize(M * G);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      float xb[QK];
      float amax = 0, sum = 0;
      for (int j = 0; j < QK; ++j) {
        xb[j] = static_cast<float>(x[r * K + g * QK + j]);
        amax = std::max(amax, std::fabs(xb[j]));
        sum += xb[j];
      }
      const float dx = amax / 32767, id = dx > 0 ? 1 / dx : 0;
      o.dx[r * G + g] = dx;
      o.s[r * G + g] = sum;
      int16_t* q = o.q.data() + r * K + g * QK;
      for (int j = 0; j < QK; ++j) q[j] = static_cast<int16_t>(std::nearbyint(xb[j] * id));
    }
  }
  return o;
}

const XQ& dispatch_x(const at::Tensor& x, int64_t M, int64_t K) {
  switch (x.scalar_type()) {
    case at::kFloat: return quantize_x(x.data_ptr<float>(), M, K);
    case at::kBFloat16: return quantize_x(x.data_ptr<at::BFloat16>(), M, K);
    case at::kHalf: return quantize_x(x.data_ptr<at::Half>(), M, K);
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
}

// ---- one tile: 16 output rows x all K, for the M activation rows. Per block of 32 columns the tile holds its
// 16 x 32 weights as 16 column pairs x 16 rows x 2 (blockquant.py packs it): after widening to int16 a 64-byte
// vector is one column pair for all 16 rows, row j in 32-bit lane j, so a multiply-add of adjacent int16 pairs
// against the activation pair broadcast to every lane adds that pair's products into each row's own lane: no
// horizontal sums, and the tile's 16 scales (d, m) load as one vector per block.
//   Q8_0: 512 bytes per block, chunk c (32 bytes) = column pair c.
//   Q4_1: 256 bytes per block, chunk c (32 bytes) = pair c in the low nibbles and pair c + 8 in the high ones.
// Per block the int32 lane sums become floats once: acc += isum * (d * dx) (+ m * sum(x_block) for Q4_1).
constexpr int64_t TILE = 16;
constexpr int64_t PF_BYTES = 2048;   // software prefetch distance in a tile's weight stream

template <bool Q4>
constexpr int64_t block_bytes() { return Q4 ? 256 : 512; }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// vpdpwssd: 32 int16 products per instruction, accumulated in place; its 4-5 cycle latency would cap one chain at
// a quarter of the throughput, so a single activation row spreads a block over NC independent accumulators
template <int M, bool Q4>
void tile(const int16_t* xqq, const float* xdx, const float* xs, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m, float* y, int64_t N,
          int64_t rows) {
  const int64_t G = K / QK;
  constexpr int NC = M == 1 ? 4 : 2;
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = qs + g * block_bytes<Q4>();
    for (int64_t off = 0; off < block_bytes<Q4>(); off += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + PF_BYTES + off, _MM_HINT_T0);
    __m512i is[M][NC];
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < NC; ++c) is[r][c] = _mm512_setzero_si512();
    // the activation pairs of this block, as int32 words: xr[c] = (x[2c], x[2c + 1])
    auto xpair = [&](int r, int c) {
      return _mm512_set1_epi32(reinterpret_cast<const int32_t*>(xqq + r * K + g * QK)[c]);
    };
    if constexpr (Q4) {
      for (int c = 0; c < 8; ++c) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c)));
        const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi16(0x0F)), hi = _mm512_srli_epi16(b, 4);
        for (int r = 0; r < M; ++r) {
          is[r][(2 * c) % NC] = _mm512_dpwssd_epi32(is[r][(2 * c) % NC], lo, xpair(r, c));
          is[r][(2 * c + 1) % NC] = _mm512_dpwssd_epi32(is[r][(2 * c + 1) % NC], hi, xpair(r, c + 8));
        }
      }
    } else {
      for (int c = 0; c < 16; ++c) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c)));
        for (int r = 0; r < M; ++r) is[r][c % NC] = _mm512_dpwssd_epi32(is[r][c % NC], w, xpair(r, c));
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * TILE)));
    for (int r = 0; r < M; ++r) {
      __m512i t = is[r][0];
      for (int c = 1; c < NC; ++c) t = _mm512_add_epi32(t, is[r][c]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dv, _mm512_set1_ps(xdx[r * G + g])), acc[r]);
    }
    if constexpr (Q4) {
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * TILE)));
      for (int r = 0; r < M; ++r) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r * G + g]), acc[r]);
    }
  }
  const __mmask16 keep = rows >= TILE ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  for (int r = 0; r < M; ++r) _mm512_mask_storeu_ps(y + r * N, keep, acc[r]);
}
#elif defined(__AVX2__)
// vpmaddwd: 16 int16 products per instruction into 8 int32 lanes, so a tile is two halves of 8 rows; the running
// sums are plain adds (one-cycle chains)
template <int M, bool Q4>
void tile(const int16_t* xqq, const float* xdx, const float* xs, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m, float* y, int64_t N,
          int64_t rows) {
  const int64_t G = K / QK;
  __m256 acc[M][2];
  for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = qs + g * block_bytes<Q4>();
    for (int64_t off = 0; off < block_bytes<Q4>(); off += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + PF_BYTES + off, _MM_HINT_T0);
    __m256i is[M][2];
    for (int r = 0; r < M; ++r) is[r][0] = is[r][1] = _mm256_setzero_si256();
    auto xpair = [&](int r, int c) {
      return _mm256_set1_epi32(reinterpret_cast<const int32_t*>(xqq + r * K + g * QK)[c]);
    };
    for (int h = 0; h < 2; ++h) {   // rows 8h .. 8h + 7: the second 16 bytes of each 32-byte chunk
      if constexpr (Q4) {
        for (int c = 0; c < 8; ++c) {
          const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * c + 16 * h)));
          const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F)), hi = _mm256_srli_epi16(b, 4);
          for (int r = 0; r < M; ++r)
            is[r][h] = _mm256_add_epi32(is[r][h], _mm256_add_epi32(_mm256_madd_epi16(lo, xpair(r, c)),
                                                                  _mm256_madd_epi16(hi, xpair(r, c + 8))));
        }
      } else {
        for (int c = 0; c < 16; ++c) {
          const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * c + 16 * h)));
          for (int r = 0; r < M; ++r) is[r][h] = _mm256_add_epi32(is[r][h], _mm256_madd_epi16(w, xpair(r, c)));
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g * TILE + 8 * h)));
      for (int r = 0; r < M; ++r)
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r][h]), _mm256_mul_ps(dv, _mm256_set1_ps(xdx[r * G + g])),
                                    acc[r][h]);
      if constexpr (Q4) {
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + g * TILE + 8 * h)));
        for (int r = 0; r < M; ++r) acc[r][h] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[r * G + g]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < M; ++r) {
    float lanes[TILE];
    _mm256_storeu_ps(lanes, acc[r][0]);
    _mm256_storeu_ps(lanes + 8, acc[r][1]);
    std::memcpy(y + r * N, lanes, sizeof(float) * std::min(rows, TILE));
  }
}
#else
// the same integer sums, one weight at a time
template <int M, bool Q4>
void tile(const int16_t* xqq, const float* xdx, const float* xs, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m, float* y, int64_t N,
          int64_t rows) {
  const int64_t G = K / QK;
  for (int r = 0; r < M; ++r) {
    for (int64_t j = 0; j < std::min(rows, TILE); ++j) {
      float a = 0;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* p = qs + g * block_bytes<Q4>();
        const int16_t* xr = xqq + r * K + g * QK;
        int32_t isum = 0;
        for (int c = 0; c < 16; ++c)
          for (int e = 0; e < 2; ++e) {
            const int32_t w = Q4 ? ((p[((c % 8) * TILE + j) * 2 + e] >> (c < 8 ? 0 : 4)) & 0x0F)
                                 : static_cast<int8_t>(p[(c * TILE + j) * 2 + e]);
            isum += w * xr[2 * c + e];
          }
        a += isum * (h2f(d[g * TILE + j]) * xdx[r * G + g]);
        if (Q4) a += h2f(m[g * TILE + j]) * xs[r * G + g];
      }
      y[r * N + j] = a;
    }
  }
}
#endif


// x (M, K); qs (T, K/32, bytes per block); d, m (T, K/32, 16) fp16; N the output rows (the last tile may be
// padded) -> (M, N) in x's dtype. Tiles are split over torch's intra-op threads. Any M: rows go in chunks of
// ROWS (their int16 activations stay in L2 while every tile passes), and within a tile 8 at a time (a tile's
// weights, K/32 x 320 bytes, stay in L1/L2 for the next 8), so prefill runs the same integer arithmetic as decode.
constexpr int64_t ROWS = 64;

template <bool Q4>
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor* m, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), "mlsys low-bit kernels are CPU kernels");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "x must be (M, K) with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), G = K / QK, T = (N + TILE - 1) / TILE;
  TORCH_CHECK(qs.scalar_type() == (Q4 ? at::kByte : at::kChar), Q4 ? "qs must be uint8" : "qs must be int8");
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == T && qs.size(1) == G && qs.size(2) == block_bytes<Q4>() &&
              qs.is_contiguous(), "qs must be (ceil(N/16), K/32, bytes per block)");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 3 && d.size(0) == T && d.size(1) == G &&
              d.size(2) == TILE && d.is_contiguous(), "d must be (ceil(N/16), K/32, 16) fp16");
  if (m) TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == at::kHalf && m->is_contiguous(), "m like d");
  const at::Tensor xc = x.contiguous();
  const XQ& xq = dispatch_x(xc, M, K);
  Out out(x, M, N);
  float* yp = out.yp;
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m ? m->data_ptr<at::Half>() : nullptr;
  const int16_t* xqq = xq.q.data();
  const float *xdx = xq.dx.data(), *xs = xq.s.data();
  for (int64_t c0 = 0; c0 < M; c0 += ROWS) {
    const int64_t c1 = std::min(M, c0 + ROWS);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r0 = c0; r0 < c1; r0 += MAX_M)
          dispatch_m(std::min(MAX_M, c1 - r0), [&](auto m_const) {
            constexpr int MM = decltype(m_const)::value;
            tile<MM, Q4>(xqq + r0 * K, xdx + r0 * G, xs + r0 * G, K, qp + t * G * block_bytes<Q4>(),
                         dp + t * G * TILE, mp ? mp + t * G * TILE : nullptr, yp + r0 * N + t * TILE, N, N - t * TILE);
          });
    });
  }
  return out.finish();
}

// ---- the tiles back to a dense (n, K) weight in the activation dtype, for prefill's GEMM: w = d q (+ m) in fp32,
// then cast (as blockquant.py's torch path does). One pass, threaded over tiles; each (tile, block) is first
// unpacked into a (row, column) buffer, so that the scale-and-cast loop runs over 32 contiguous values per row
// and vectorizes (reading the stored (column pair, row, e) order directly is a gather per value).
template <bool Q4, typename T>
void dequant_tile(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t G, int64_t K, int64_t rows, T* out) {
  using Q = std::conditional_t<Q4, uint8_t, int8_t>;
  alignas(64) Q pr[TILE][QK];   // (row, column) of one (tile, block)
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = qs + g * block_bytes<Q4>();
    // stored as (column pair c, row j) byte pairs: a (16 x 16) transpose of 16-bit pairs into (row, pair); a q4
    // byte's low nibble is column pair c, its high nibble pair c + 8
    const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
    for (int j = 0; j < TILE; ++j) {
      uint16_t* r = reinterpret_cast<uint16_t*>(pr[j]);
      if constexpr (Q4) {
        for (int c = 0; c < 8; ++c) {
          const uint16_t v = u[c * TILE + j];
          r[c] = v & 0x0F0F;
          r[c + 8] = (v >> 4) & 0x0F0F;
        }
      } else {
        for (int c = 0; c < 16; ++c) r[c] = u[c * TILE + j];
      }
    }
    for (int64_t j = 0; j < std::min(rows, TILE); ++j) {
      const float dj = h2f(d[g * TILE + j]), mj = Q4 ? h2f(m[g * TILE + j]) : 0.f;
      T* o = out + j * K + g * QK;
      const Q* q = pr[j];
      for (int k = 0; k < QK; ++k) o[k] = static_cast<T>(static_cast<float>(q[k]) * dj + mj);
    }
  }
}

template <bool Q4>
at::Tensor tiled_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor* m, int64_t N,
                            at::ScalarType dtype) {
  TORCH_CHECK(qs.device().is_cpu() && qs.dim() == 3 && qs.size(2) == block_bytes<Q4>() && qs.is_contiguous() &&
              d.sizes() == at::IntArrayRef({qs.size(0), qs.size(1), TILE}) && d.scalar_type() == at::kHalf &&
              d.is_contiguous() && (N + TILE - 1) / TILE == qs.size(0), "qs (ceil(n/16), K/32, bytes), d (.., 16)");
  if (m) TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == at::kHalf && m->is_contiguous(), "m like d");
  const int64_t T = qs.size(0), G = qs.size(1), K = G * QK;
  at::Tensor w = at::empty({N, K}, qs.options().dtype(dtype));
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m ? m->data_ptr<at::Half>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "block_dequantize", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        dequant_tile<Q4>(qp + t * G * block_bytes<Q4>(), dp + t * G * TILE, mp ? mp + t * G * TILE : nullptr, G, K,
                         N - t * TILE, wp + t * TILE * K);
    });
  });
  return w;
}

at::Tensor q4_1_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n,
                           at::ScalarType dtype) {
  return tiled_dequantize<true>(qs, d, &m, n, dtype);
}

at::Tensor q8_0_dequantize(const at::Tensor& qs, const at::Tensor& d, int64_t n, at::ScalarType dtype) {
  return tiled_dequantize<false>(qs, d, nullptr, n, dtype);
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n) {
  return tiled_linear<true>(x, qs, d, &m, n);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n) {
  return tiled_linear<false>(x, qs, d, nullptr, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlsys, lib) {
  lib.def("q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m, int n) -> Tensor");
  lib.def("q8_0_linear(Tensor x, Tensor qs, Tensor d, int n) -> Tensor");
  lib.def("q4_1_dequantize(Tensor qs, Tensor d, Tensor m, int n, ScalarType dtype) -> Tensor");
  lib.def("q8_0_dequantize(Tensor qs, Tensor d, int n, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mlsys, CPU, lib) {
  lib.impl("q4_1_linear", &q4_1_linear);
  lib.impl("q8_0_linear", &q8_0_linear);
  lib.impl("q4_1_dequantize", &q4_1_dequantize);
  lib.impl("q8_0_dequantize", &q8_0_dequantize);
}
