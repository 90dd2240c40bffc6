// diffc::gemv (diffc/ops/gemv.py) for one row: y = act(x) @ W^T (* scale) + bias. act(x) is rounded to T
// (what eager stores before its GEMM), products are summed in float32 (in another order than the Triton
// kernel's), then * scale and + bias in float32 and one rounding to T: the Triton kernel's math.
// Each warp computes R output channels. Its lanes stream the R weight rows in 16-byte vectors (lane l takes
// vectors l, l + 32, ...), U vectors of each row in flight at once, against act(x), which the block stages in
// shared memory first; one warp reduction a channel at the end. The weights are read once, from DRAM: the
// kernel is a stream of them (FLUX.1's adaLN projections: 3.2 GB of fp8 weights a forward).
#include "common.cuh"

#define GEMV_MAX_K 8192  // act(x) staged in shared memory: 16 KB of bf16, 32 KB of float32

// float8_e4m3 weights (the fp8 tier's copies), 16 to a vector
struct fp8e4 { u8 bits; };

// a 16-byte vector of weights as floats: Vec<W>::N of them
template <typename W> __device__ __forceinline__ void decode(const Vec<W>& v, float (&out)[Vec<W>::N]) {
#pragma unroll
  for (int j = 0; j < Vec<W>::N; ++j) out[j] = to_float(v.v[j]);
}
template <> __device__ __forceinline__ void decode<fp8e4>(const Vec<fp8e4>& v, float (&out)[16]) {
  const u32* words = reinterpret_cast<const u32*>(v.v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // two e4m3 bytes -> f16x2 (the lower byte to the lower half) -> two floats
      u32 pair;
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pair) : "h"((u16)(words[i] >> (16 * h))));
      asm("cvt.f32.f16 %0, %1;" : "=f"(out[4 * i + 2 * h]) : "h"((u16)(pair & 0xFFFFu)));
      asm("cvt.f32.f16 %0, %1;" : "=f"(out[4 * i + 2 * h + 1]) : "h"((u16)(pair >> 16)));
    }
  }
}

// N values of T staged in shared memory at p (16-byte aligned), as floats
template <typename T, int N> __device__ __forceinline__ void load_shared(const T* p, float (&out)[N]) {
  constexpr int PER = Vec<T>::N;
#pragma unroll
  for (int k = 0; k < N; k += PER) {
    Vec<T> v;
    *reinterpret_cast<uint4*>(v.v) = *reinterpret_cast<const uint4*>(p + k);
#pragma unroll
    for (int j = 0; j < PER; ++j) out[k + j] = to_float(v.v[j]);
  }
}

// x: (K,) of T; w: (N, K) of W at row stride sw (unit column stride, rows 16-byte aligned, K a multiple of
// 16 / sizeof(W), K <= GEMV_MAX_K); scale: (N,) float32 or null; bias: (N,) of T or null; out: (N,) of T
template <typename T, typename W, int R, int U>
__device__ __forceinline__ void gemv(const T* __restrict__ x, const W* __restrict__ w, i64 sw,
                                     const float* __restrict__ scale, const T* __restrict__ bias, T* __restrict__ out,
                                     int N, int K, int silu) {
  constexpr int V = Vec<W>::N;
  __shared__ __align__(16) T xs[GEMV_MAX_K];
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float v = to_float(x[k]);
    if (silu) v = __fdividef(v, 1.0f + __expf(-v));  // rounded to T below, as eager's silu stores it
    xs[k] = from_float<T>(v);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
  if (n0 >= N) return;
  const W* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = w + (i64)min(n0 + r, N - 1) * sw;  // past N: the last row, not stored
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  const int vectors = K / V;
  for (int c0 = lane; c0 < vectors; c0 += 32 * U) {
    Vec<W> wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c < vectors) {
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = load16(rows[r] + (i64)c * V);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c < vectors) {
        float xv[V];
        load_shared<T, V>(xs + c * V, xv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[V];
          decode<W>(wv[u][r], wf);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[r] = fmaf(xv[j], wf[j], acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_reduce(acc[r], SumOp());
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      if (n < N) {
        float y = acc[r];
        if (scale != nullptr) y *= scale[n];
        if (bias != nullptr) y += to_float(bias[n]);
        out[n] = from_float<T>(y);
      }
    }
  }
}

// gemv_<x dtype>_<weight dtype>_<R>_<U>
#define GEMV(T, NAME, W, WNAME, R, U)                                                                          \
  extern "C" __global__ void __launch_bounds__(256) gemv_##NAME##_##WNAME##_##R##_##U(                      \
      const T* x, const W* w, i64 sw, const float* scale, const T* bias, T* out, int N, int K, int silu) {    \
    gemv<T, W, R, U>(x, w, sw, scale, bias, out, N, K, silu);                                                 \
  }
#define GEMV_ALL(R, U)                                                                                         \
  GEMV(bf16, bf16, bf16, bf16, R, U) GEMV(f16, f16, f16, f16, R, U) GEMV(float, f32, float, f32, R, U)        \
  GEMV(bf16, bf16, fp8e4, fp8, R, U) GEMV(f16, f16, fp8e4, fp8, R, U) GEMV(float, f32, fp8e4, fp8, R, U)

GEMV_ALL(4, 1)
#ifdef GEMV_SWEEP  // the instances bench/ops/bench_gemv.py sweeps
GEMV_ALL(1, 2) GEMV_ALL(1, 4) GEMV_ALL(2, 1) GEMV_ALL(2, 2) GEMV_ALL(2, 4) GEMV_ALL(4, 2) GEMV_ALL(8, 1)
#endif
