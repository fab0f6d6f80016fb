// mlsys::bf16_linear(x (M, K) float, w (N, K) bf16) -> (M, N): the float linears of the decode step on a
// GEMV that streams the weight rows (AVX-512 only: elsewhere the op has no CPU kernel and gemv.py keeps F.linear).
#include "common.h"

namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlsys, lib) {
  lib.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
}

#if defined(__AVX512F__)
TORCH_LIBRARY_IMPL(mlsys, CPU, lib) {
  lib.impl("bf16_linear", &bf16_linear);
}
#endif
