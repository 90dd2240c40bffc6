// diffc::gelu_tanh_fp8 (diffc/ops/gelu_tanh.py): tanh-GELU of x + bias, rounded to x's dtype (what the
// bf16 op would store), quantized rowwise to float8_e4m3 (scale = max(amax, 1e-12) / 448).
// gelu_tanh (common.cuh) and the scale's divisions are the fast ones Triton's kernel uses. One block per
// row; thread t computes the row's 16-byte vectors t, t + blockDim.x, ... (NV of them) and keeps the rounded
// results packed until the store.
#include "common.cuh"

// x: (rows, N) contiguous; bias: (N,) of T (HAS_BIAS); N % (16 / sizeof(T)) == 0, 16-byte aligned
// out: float8_e4m3 (rows, N) contiguous; scale: (rows,) float32
template <typename T, int NV, bool HAS_BIAS>
__device__ __forceinline__ void gelu_tanh_fp8(const T* __restrict__ x, const T* __restrict__ bias,
                                              u8* __restrict__ out, float* __restrict__ scale, int N) {
  constexpr int V = Vec<T>::N;
  __shared__ float smem[32];
  const i64 row = blockIdx.x;
  const T* xr = x + row * (i64)N;
  const int vectors = N / V;
  Vec<T> a[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) a[i] = load16(xr + (i64)c * V);
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) {
      Vec<T> b;
      if constexpr (HAS_BIAS) b = load16(bias + (i64)c * V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float v = to_float(a[i].v[j]);
        if constexpr (HAS_BIAS) v += to_float(b.v[j]);
        const T y = gelu_tanh<T>(v);
        a[i].v[j] = y;
        amax = fmaxf(amax, fabsf(to_float(y)));
      }
    }
  }
  store_row_fp8<true>(a, vectors, amax, smem, out + row * (i64)N, scale + row);  // q = y * (1 / scale)
}

#define GELU_FP8(T, NAME, NV, MAX_THREADS)                                                                  \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                              \
      gelu_tanh_fp8_##NAME##_##NV(const T* x, const T* bias, u8* out, float* scale, int N) {             \
    if (bias != nullptr) gelu_tanh_fp8<T, NV, true>(x, bias, out, scale, N);                             \
    else gelu_tanh_fp8<T, NV, false>(x, bias, out, scale, N);                                             \
  }
#define GELU_FP8_ALL(T, NAME)                                                                   \
  GELU_FP8(T, NAME, 1, 1024) GELU_FP8(T, NAME, 2, 1024) GELU_FP8(T, NAME, 4, 1024) GELU_FP8(T, NAME, 8, 512) \
  GELU_FP8(T, NAME, 16, 256)

GELU_FP8_ALL(bf16, bf16)
GELU_FP8_ALL(f16, f16)
GELU_FP8_ALL(float, f32)
