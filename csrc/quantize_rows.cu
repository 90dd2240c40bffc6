// diffc::quantize_rows, quantize_rows_cat and quantize_rows_cat_gelu (diffc/ops/quantize_rows.py): rowwise
// float8_e4m3 quantization of an activation, or of the concatenation [a | b] of two along their last dimension
// without writing it, b optionally the tanh-GELU of h + bias (GELU_B: FLUX.1's single-block MLP).
// scale = max(amax(row), 1e-12) / 448; q = clamp(x / scale, -448, 448) rounded to nearest even; the two
// divisions are the fast ones (div.full.f32) Triton's kernel uses, so both give the same bits
// (store_row_fp8, common.cuh).
// One block per row; thread t holds the row's 16-byte vectors t, t + blockDim.x, ... (NV of them), packed
// in registers from the load to the store, so the row is read once.
#include "common.cuh"

// a: (rows, KA) at row stride stride_a elements; b: (rows, KB) at row stride stride_b (KB = 0: no b); unit
// column strides, rows 16-byte aligned, KA and KB multiples of 16 / sizeof(T)
// out: float8_e4m3 (rows, KA + KB) contiguous; scale: (rows,) float32
// bias: (KB,) of T or null, read with GELU_B only
template <typename T, int NV, bool GELU_B>
__device__ __forceinline__ void quantize_rows(const T* __restrict__ a, i64 stride_a, int KA, const T* __restrict__ b,
                                              i64 stride_b, int KB, const T* __restrict__ bias, u8* __restrict__ out,
                                              float* __restrict__ scale) {
  constexpr int V = Vec<T>::N;
  __shared__ float smem[32];
  const i64 row = blockIdx.x;
  const T* ar = a + row * stride_a;
  const T* br = b + row * stride_b - KA;  // indexed by the column of the concatenation
  const int split = KA / V, vectors = (KA + KB) / V;
  Vec<T> r[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) r[i] = load16((c < split ? ar : br) + (i64)c * V);
  }
  if constexpr (GELU_B) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c >= split && c < vectors) {
        Vec<T> bb;
        if (bias != nullptr) bb = load16(bias + (i64)(c - split) * V);
#pragma unroll
        for (int j = 0; j < V; ++j)
          r[i].v[j] = gelu_tanh<T>(to_float(r[i].v[j]) + (bias != nullptr ? to_float(bb.v[j]) : 0.0f));
      }
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (threadIdx.x + i * blockDim.x < vectors) {
#pragma unroll
      for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(to_float(r[i].v[j])));
    }
  }
  store_row_fp8<false>(r, vectors, amax, smem, out + row * (i64)(KA + KB), scale + row);
}

// quantize_rows_<dtype>_<NV> (b as it is) and quantize_rows_gelu_<dtype>_<NV> (b = gelu_tanh(h + bias))
#define QUANTIZE_ROWS(T, NAME, NV, MAX_THREADS)                                                             \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                              \
      quantize_rows_##NAME##_##NV(const T* a, i64 stride_a, int KA, const T* b, i64 stride_b, int KB,     \
                                  const T* bias, u8* out, float* scale) {                                 \
    quantize_rows<T, NV, false>(a, stride_a, KA, b, stride_b, KB, bias, out, scale);                      \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                              \
      quantize_rows_gelu_##NAME##_##NV(const T* a, i64 stride_a, int KA, const T* b, i64 stride_b, int KB, \
                                       const T* bias, u8* out, float* scale) {                            \
    quantize_rows<T, NV, true>(a, stride_a, KA, b, stride_b, KB, bias, out, scale);                       \
  }
#define QUANTIZE_ROWS_ALL(T, NAME)                                                                        \
  QUANTIZE_ROWS(T, NAME, 1, 1024) QUANTIZE_ROWS(T, NAME, 2, 1024) QUANTIZE_ROWS(T, NAME, 4, 1024)        \
  QUANTIZE_ROWS(T, NAME, 8, 512) QUANTIZE_ROWS(T, NAME, 16, 256)

QUANTIZE_ROWS_ALL(bf16, bf16)
QUANTIZE_ROWS_ALL(f16, f16)
QUANTIZE_ROWS_ALL(float, f32)
