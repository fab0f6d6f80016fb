// Low-bit matmuls for small M (batch-1..8 decode) on the CPU, in llama.cpp's block formats.
//
//   mlsys::q4_1_linear(x (M, K) float, qs (N, K/2) uint8, d (N, K/32) fp16, m (N, K/32) fp16) -> (M, N)
//   mlsys::q8_0_linear(x (M, K) float, qs (N, K) int8, d (N, K/32) fp16)                    -> (M, N)
//   mlsys::bf16_linear(x (M, K) float, w (N, K) bf16)                                       -> (M, N)  (AVX-512)
//   mlsys::decode_attention(q, k, v, mask): one query position per row over the allowed cache slots
//
// Blocks of 32 input columns. Q4_1: w = d * q + m with q in [0, 15]; the 16 bytes of a block hold column j
// in the low nibble of byte j and column j + 16 in the high nibble (GGUF's layout). Q8_0: w = d * q, q int8.
// With AVX-512 VNNI: weights widened to int16 in registers, activations rounded to int16 per block (2^-16 of
// the block's max), integer dot products (vpdpwssd). Otherwise: weights expanded to fp32, fp32 activations.
// Either way the result is F.linear(x, dequantized w) up to that rounding and fp32 summation order. The (d, m) terms factor out of a block:
//   sum_j w_j x_j = d * sum_j q_j x_j + m * sum_j x_j,
// so each block costs one dequantize-free fp32 dot of q with x, then one fma by d (and one by m for Q4_1).
// Rows are split over torch's intra-op threads; the M activation rows stay in L1 while a weight row streams.
// Built by projects/infer/kernels.py (torch.utils.cpp_extension, -march=native); AVX-512, AVX2 or scalar.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <type_traits>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;
constexpr int64_t MAX_M = 8;

// fp16 -> fp32 in one instruction (c10's portable conversion is a software routine, per block too slow)
#if defined(__F16C__)
inline float h2f(at::Half h) { return _cvtsh_ss(h.x); }
#else
inline float h2f(at::Half h) { return static_cast<float>(h); }
#endif

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
// 16 uint8 -> 16 floats
inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
inline __m512 s8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
#endif

// one output row n for all M activation rows: Q4_1 (M a template parameter: accumulators stay in registers)
template <int M>
void q4_1_row(const float* x, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m,
              const float* xsum, float* y, int64_t N) {
  const int64_t G = K / QK;
  float mterm[M] = {0};
#if defined(__AVX512F__)
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + g * 16));
    const __m512 wlo = u8_to_ps(_mm_and_si128(v, low));                    // columns 0..15 of the block
    const __m512 whi = u8_to_ps(_mm_and_si128(_mm_srli_epi16(v, 4), low)); // columns 16..31
    const __m512 dg = _mm512_set1_ps(h2f(d[g]));
    const float mg = h2f(m[g]);
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * K + g * QK;
      __m512 t = _mm512_mul_ps(wlo, _mm512_loadu_ps(xr));
      t = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xr + 16), t);
      acc[r] = _mm512_fmadd_ps(dg, t, acc[r]);
      mterm[r] += mg * xsum[r * G + g];
    }
  }
  for (int r = 0; r < M; ++r) y[r * N] = hsum(acc[r]) + mterm[r];
#elif defined(__AVX2__)
  __m256 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + g * 16));
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    const __m256 dg = _mm256_set1_ps(h2f(d[g]));
    const float mg = h2f(m[g]);
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * K + g * QK;
      __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xr));
      t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), t);
      t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), t);
      t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), t);
      acc[r] = _mm256_fmadd_ps(dg, t, acc[r]);
      mterm[r] += mg * xsum[r * G + g];
    }
  }
  for (int r = 0; r < M; ++r) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[r]);
    float s = 0;
    for (float l : lanes) s += l;
    y[r * N] = s + mterm[r];
  }
#else
  for (int r = 0; r < M; ++r) {
    float s = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float* xr = x + r * K + g * QK;
      float t = 0;
      for (int j = 0; j < 16; ++j) t += (qs[g * 16 + j] & 0x0F) * xr[j] + (qs[g * 16 + j] >> 4) * xr[j + 16];
      s += h2f(d[g]) * t + h2f(m[g]) * xsum[r * G + g];
    }
    y[r * N] = s;
  }
#endif
}

// one output row n for all M activation rows: Q8_0
template <int M>
void q8_0_row(const float* x, int64_t K, const int8_t* qs, const at::Half* d, float* y, int64_t N) {
  const int64_t G = K / QK;
#if defined(__AVX512F__)
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m128i* p = reinterpret_cast<const __m128i*>(qs + g * QK);
    const __m512 w0 = s8_to_ps(_mm_loadu_si128(p)), w1 = s8_to_ps(_mm_loadu_si128(p + 1));
    const __m512 dg = _mm512_set1_ps(h2f(d[g]));
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * K + g * QK;
      __m512 t = _mm512_mul_ps(w0, _mm512_loadu_ps(xr));
      t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), t);
      acc[r] = _mm512_fmadd_ps(dg, t, acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) y[r * N] = hsum(acc[r]);
#elif defined(__AVX2__)
  __m256 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 dg = _mm256_set1_ps(h2f(d[g]));
    __m256 w[4];
    for (int k = 0; k < 4; ++k)
      w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(qs + g * QK + 8 * k))));
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * K + g * QK;
      __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
      for (int k = 1; k < 4; ++k) t = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + 8 * k), t);
      acc[r] = _mm256_fmadd_ps(dg, t, acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[r]);
    float s = 0;
    for (float l : lanes) s += l;
    y[r * N] = s;
  }
#else
  for (int r = 0; r < M; ++r) {
    float s = 0;
    for (int64_t g = 0; g < G; ++g) {
      float t = 0;
      for (int j = 0; j < QK; ++j) t += qs[g * QK + j] * x[r * K + g * QK + j];
      s += h2f(d[g]) * t;
    }
    y[r * N] = s;
  }
#endif
}


// Weights are read once per call and usually come from DRAM: the hardware prefetcher alone leaves the
// memory system idle between rows, so each row asks for the row PF ahead (cache lines into L2).
constexpr int64_t PF = 8;
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

// The (M, N) result in x's dtype: float rows written in place for float x, else through a reused scratch
struct Out {
  at::Tensor y;
  float* yp;
  thread_local static std::vector<float> scratch;
  Out(const at::Tensor& x, int64_t M, int64_t N) : y(at::empty({M, N}, x.options())) {
    if (x.scalar_type() == at::kFloat) {
      yp = y.data_ptr<float>();
    } else {
      scratch.resize(M * N);
      yp = scratch.data();
    }
  }
  at::Tensor finish() {
    const int64_t n = y.numel();
    if (y.scalar_type() == at::kBFloat16) {
      at::BFloat16* o = y.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) o[i] = at::BFloat16(yp[i]);
    } else if (y.scalar_type() == at::kHalf) {
      at::Half* o = y.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; ++i) o[i] = at::Half(yp[i]);
    }
    return y;
  }
};
thread_local std::vector<float> Out::scratch;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- integer dot products (AVX-512 VNNI). The activation row is quantized per block of 32 to int16
// (dx = max|x_block| / 32767: a relative rounding of 2^-16 of the block's largest value, far below the bf16
// the model computes in; int8 activations, llama.cpp's choice, moved greedy tokens within a few steps here),
// the block's 32 weights are widened to int16, and one vpdpwssd multiplies and adds all 32 pairs. The
// block's int32 lanes become floats once, scaled by d_w * dx.
#define MLSYS_VNNI 1

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
      for (int j = 0; j < QK; ++j) o.q[r * K + g * QK + j] = static_cast<int16_t>(std::nearbyint(xb[j] * id));
    }
  }
  return o;
}

// a Q4_1 block's 16 bytes -> its 32 weights as int16, in column order: bytes widened to 16 bits, then the low
// nibbles (columns 0..15) and the high nibbles (columns 16..31; a shift, the byte's top bits are zero)
inline __m512i q4_widen(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, _mm256_set1_epi16(0x0F))),
                            _mm256_srli_epi16(b, 4), 1);
}
inline __m512i q8_widen(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Blocks two at a time into two accumulators: each block's multiply-add into its accumulator depends on the
// previous one (4 cycles), so one accumulator would cap a core at one block per 4 cycles
template <int M, bool Q4>
inline void blocks_vnni(const XQ& xq, int64_t K, const void* qs, const at::Half* d, __m512* acc0, __m512* acc1) {
  const int64_t G = K / QK;
  auto widen = [&](int64_t g) {
    if constexpr (Q4) return q4_widen(static_cast<const uint8_t*>(qs) + g * 16);
    else return q8_widen(static_cast<const int8_t*>(qs) + g * QK);
  };
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    const __m512i w0 = widen(g), w1 = widen(g + 1);
    const float d0 = h2f(d[g]), d1 = h2f(d[g + 1]);
    for (int r = 0; r < M; ++r) {
      const int16_t* xr = xq.q.data() + r * K + g * QK;
      const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xr));
      const __m512i p1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(xr + QK));
      acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(d0 * xq.dx[r * G + g]), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(d1 * xq.dx[r * G + g + 1]), acc1[r]);
    }
  }
  if (g < G) {
    const __m512i w0 = widen(g);
    const float d0 = h2f(d[g]);
    for (int r = 0; r < M; ++r) {
      const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0,
                                             _mm512_loadu_si512(xq.q.data() + r * K + g * QK));
      acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(d0 * xq.dx[r * G + g]), acc0[r]);
    }
  }
}

template <int M>
void q4_1_row_vnni(const XQ& xq, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m, float* y,
                   int64_t N) {
  const int64_t G = K / QK;
  __m512 acc0[M], acc1[M];
  for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  blocks_vnni<M, true>(xq, K, qs, d, acc0, acc1);
  for (int r = 0; r < M; ++r) {
    float t = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
    const float* xs = xq.s.data() + r * G;   // the m term: sum over blocks of m * (sum of the block's x)
    __m512 mt = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
      mt = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g))),
                           _mm512_loadu_ps(xs + g), mt);
    t += _mm512_reduce_add_ps(mt);
    for (; g < G; ++g) t += h2f(m[g]) * xs[g];
    y[r * N] = t;
  }
}

template <int M>
void q8_0_row_vnni(const XQ& xq, int64_t K, const int8_t* qs, const at::Half* d, float* y, int64_t N) {
  __m512 acc0[M], acc1[M];
  for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  blocks_vnni<M, false>(xq, K, qs, d, acc0, acc1);
  for (int r = 0; r < M; ++r) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

const XQ& dispatch_x(const at::Tensor& x, int64_t M, int64_t K) {
  switch (x.scalar_type()) {
    case at::kFloat: return quantize_x(x.data_ptr<float>(), M, K);
    case at::kBFloat16: return quantize_x(x.data_ptr<at::BFloat16>(), M, K);
    case at::kHalf: return quantize_x(x.data_ptr<at::Half>(), M, K);
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
}

#endif

// calls f(std::integral_constant<int, M>) for M in 1..MAX_M
template <typename F>
void dispatch_m(int64_t M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "M must be in 1..8");
  }
}

void check(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t K, int64_t qs_cols) {
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), "mlsys low-bit kernels are CPU kernels");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, K)");
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  TORCH_CHECK(x.size(0) <= MAX_M, "M must be <= 8 (larger M: dequantize and use a GEMM)");
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) == qs_cols && qs.is_contiguous(), "qs has the wrong shape");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == qs.size(0) && d.size(1) == K / QK,
              "d must be (N, K/32) fp16");
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  const int64_t K = x.size(1), M = x.size(0), N = qs.size(0), G = K / QK;
  check(x, qs, d, K, K / 2);
  TORCH_CHECK(qs.scalar_type() == at::kByte, "qs must be uint8");
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(), "m like d");
#ifdef MLSYS_VNNI
  const at::Tensor xc = x.contiguous();
  const XQ& xq = dispatch_x(xc, M, K);
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half *dp = d.data_ptr<at::Half>(), *mp = m.data_ptr<at::Half>();
  Out out(x, M, N);
  float* yp = out.yp;
  dispatch_m(M, [&](auto m_const) {
    constexpr int MM = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (n + PF < n1) {
          prefetch(qp + (n + PF) * (K / 2), K / 2);
          prefetch(dp + (n + PF) * G, 2 * G);
          prefetch(mp + (n + PF) * G, 2 * G);
        }
        q4_1_row_vnni<MM>(xq, K, qp + n * (K / 2), dp + n * G, mp + n * G, yp + n, N);
      }
    });
  });
  return out.finish();
#else
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  const at::Tensor xsum = xf.view({M, G, QK}).sum(-1).contiguous();  // (M, G): the m term's block sums
  const float *xp = xf.data_ptr<float>(), *sp = xsum.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half *dp = d.data_ptr<at::Half>(), *mp = m.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  dispatch_m(M, [&](auto m_const) {
    constexpr int MM = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        q4_1_row<MM>(xp, K, qp + n * (K / 2), dp + n * G, mp + n * G, sp, yp + n, N);
    });
  });
  return y.to(x.scalar_type());
#endif
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  const int64_t K = x.size(1), M = x.size(0), N = qs.size(0), G = K / QK;
  check(x, qs, d, K, K);
  TORCH_CHECK(qs.scalar_type() == at::kChar, "qs must be int8");
  const int8_t* qp = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
#ifdef MLSYS_VNNI
  const at::Tensor xc = x.contiguous();
  const XQ& xq = dispatch_x(xc, M, K);
  Out out(x, M, N);
  float* yp = out.yp;
  dispatch_m(M, [&](auto m_const) {
    constexpr int MM = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (n + PF < n1) {
          prefetch(qp + (n + PF) * K, K);
          prefetch(dp + (n + PF) * G, 2 * G);
        }
        q8_0_row_vnni<MM>(xq, K, qp + n * K, dp + n * G, yp + n, N);
      }
    });
  });
  return out.finish();
#else
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  float* yp = y.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  dispatch_m(M, [&](auto m_const) {
    constexpr int MM = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) q8_0_row<MM>(xp, K, qp + n * K, dp + n * G, yp + n, N);
    });
  });
  return y.to(x.scalar_type());
#endif
}


#if defined(__AVX512F__)
// ---- bf16 weights (N, K), K % 32 == 0: y = x w^T for small M. A bf16 is the top half of an fp32, so 16
// weights widen with one zero-extension and one shift; fp32 multiply-adds with the fp32 activation rows.
template <int M>
void bf16_row(const float* x, int64_t K, const at::BFloat16* w, float* y, int64_t N) {
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m256i* p = reinterpret_cast<const __m256i*>(w + k);
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p + 1)), 16));
    for (int r = 0; r < M; ++r) {
      acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), acc[r]);
      acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) y[r * N] = _mm512_reduce_add_ps(acc[r]);
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_linear is a CPU kernel");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w must be (N, K) bf16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && w.size(1) == K && K % 32 == 0 && M <= MAX_M, "x (M <= 8, K), K % 32 == 0");
  thread_local std::vector<float> xf;
  xf.resize(M * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bf16_linear", [&] {
    const at::Tensor xc = x.contiguous();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  });
  Out out(x, M, N);
  float* yp = out.yp;
  const float* xp = xf.data();  // the calling thread's buffer (a thread_local named inside the lambda would not be)
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  dispatch_m(M, [&](auto m_const) {
    constexpr int MM = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (n + PF < n1) prefetch(wp + (n + PF) * K, 2 * K);
        bf16_row<MM>(xp, K, wp + n * K, yp + n, N);
      }
    });
  });
  return out.finish();
}
#endif

// ---- decode attention: one query position per row (T = 1), grouped-query heads, over the cache slots the
// mask allows (only those are read). q (B, Hkv, R, D) with R = query heads per kv head; k, v (B, Hkv, S, D)
// the static cache; mask (B or 1, S) bool. Per (row, kv head): scores of the R queries against each allowed
// slot, a softmax in fp32, the weighted sum of values. Work is split over (row, kv head) pairs.
// a row of D values -> fp32 (bf16 is the top half of an fp32: widen and shift, 16 at a time)
template <typename T>
inline void to_f32(const T* p, float* out, int64_t D) {
  for (int64_t j = 0; j < D; ++j) out[j] = static_cast<float>(p[j]);
}
#if defined(__AVX512F__)
template <>
inline void to_f32<at::BFloat16>(const at::BFloat16* p, float* out, int64_t D) {
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j));
    _mm512_storeu_ps(out + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; j < D; ++j) out[j] = static_cast<float>(p[j]);
}
#endif

template <typename T>
void attend_head(const T* q, const T* k, const T* v, const bool* mask, T* out, int64_t R, int64_t S, int64_t D,
                 float scale) {
  constexpr int64_t MAX_R = 16, MAX_D = 256;
  thread_local std::vector<float> sc;  // (R, S) scores, then weights
  sc.resize(R * S);
  float qf[MAX_R * MAX_D], acc[MAX_R * MAX_D], row[MAX_D];
  for (int64_t i = 0; i < R * D; ++i) { qf[i] = static_cast<float>(q[i]) * scale; acc[i] = 0; }
  // pass 1: scores of the allowed slots (each key row converted to fp32 once, used by all R queries)
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    to_f32(k + s * D, row, D);
    for (int64_t r = 0; r < R; ++r) {
      float t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < D; ++j) t += qf[r * D + j] * row[j];
      sc[r * S + s] = t;
    }
  }
  // softmax per query over the allowed slots
  float den[MAX_R];
  for (int64_t r = 0; r < R; ++r) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) if (mask[s]) mx = std::max(mx, sc[r * S + s]);
    float sum = 0;
    for (int64_t s = 0; s < S; ++s) {
      const float w = mask[s] ? std::exp(sc[r * S + s] - mx) : 0.f;
      sc[r * S + s] = w;
      sum += w;
    }
    den[r] = sum > 0 ? 1 / sum : 0;
  }
  // pass 2: weighted sum of the allowed value rows
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    to_f32(v + s * D, row, D);
    for (int64_t r = 0; r < R; ++r) {
      const float w = sc[r * S + s];
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) acc[r * D + j] += w * row[j];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < D; ++j) out[r * D + j] = static_cast<T>(acc[r * D + j] * den[r]);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q (B, Hkv, R, D), k and v (B', Hkv, S, D)");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) >= B && k.size(1) == H && k.size(3) == D, "k/v shapes do not match q");
  TORCH_CHECK(R <= 16 && D <= 256, "decode_attention supports up to 16 query heads per kv head and head_dim 256");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) == S &&
              (mask.size(0) == 1 || mask.size(0) == B), "mask must be (B or 1, S) bool");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D &&
              k.strides() == v.strides(), "k and v must be contiguous per head (B, Hkv, S, D) slices");
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty_like(qc);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t *qp = qc.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool* mp = mc.data_ptr<bool>();
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        attend_head(qp + i * R * D, kp + b * ks0 + h * ks1, vp + b * ks0 + h * ks1,
                    mp + (mask.size(0) == 1 ? 0 : b) * S, op + i * R * D, R, S, D, scale);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mlsys, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  lib.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  lib.def("q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("q8_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(mlsys, CPU, lib) {
  lib.impl("q4_1_linear", &q4_1_linear);
  lib.impl("q8_0_linear", &q8_0_linear);
  lib.impl("decode_attention", &decode_attention);
#if defined(__AVX512F__)
  lib.impl("bf16_linear", &bf16_linear);
#endif
}
