// What the kernels in this folder share: includes, the block size, fp16 loads, prefetch, the output buffer,
// and the compile-time row count. Built by projects/infer/kernels.py (-march=native; see its docstring).
#pragma once
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

// Weights are read once per call and usually come from DRAM: the hardware prefetcher alone leaves the
// memory system idle between rows, so bf16_linear asks for the row PF ahead (cache lines into L2).
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
  at::Tensor finish() {  // aten's copy converts (vectorised, and threaded for prefill's large outputs)
    if (y.scalar_type() != at::kFloat) y.copy_(at::from_blob(yp, y.sizes(), y.options().dtype(at::kFloat)));
    return y;
  }
};
thread_local std::vector<float> Out::scratch;

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

}  // namespace
