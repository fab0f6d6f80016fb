// mlsys::decode_attention(q, k, v, mask): one query position per row over the cache slots the mask allows.
#include "common.h"

namespace {

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

TORCH_LIBRARY_FRAGMENT(mlsys, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(mlsys, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
}
