// diffc::adaln_modulate(_fp8) and diffc::gated_residual_adaln(_fp8) (diffc/ops/adaln_modulate.py,
// gated_residual.py): the token rows of Triton's adaln_rows_kernel, the same math in the same order.
//   RESIDUAL: x = round_T(x + y * gate) (gate + gate_bias with GATE_BIAS; the product rounded to T with
//             ROUND_PRODUCT), stored to res
//   h = (x - mean) * rsqrt(var + eps), the LayerNorm without affine, in float32
//   scale, shift (+ their float32 bias rows with MOD_BIAS); ROUND_MODULATE: h, 1 + scale and the product
//   rounded to T as eager bf16 math rounds them, else all of it in float32
//   out = round_T(h * (1 + scale) + shift), or with QUANT that row quantized to float8_e4m3 (scale to qs)
// Multiplies and adds are rounded one by one (no FMA), as the separate ops of eager are.
// One block per row; thread t holds the row's 16-byte vectors t, t + blockDim.x, ... (NV of them) from the
// load to the store. The modulation rows (B, 1 | S, C) are read through the cache like the Triton kernel's.
#include "common.cuh"

#define F_RESIDUAL 1
#define F_GATE 2
#define F_ROUND_PRODUCT 4
#define F_ROUND_MODULATE 8
#define F_QUANT 16
#define F_MOD_BIAS 32
#define F_GATE_BIAS 64

// x, y, res: (B, S, C) of T at element strides (s?_b, s?_s, 1); gate, scale, shift: (B, 1 | S, C) of M (stride 0
// where broadcast); out: T, or float8_e4m3 with F_QUANT (qs: (B * S,) float32); biases: (C,) float32 or null.
// Every row start 16-byte aligned (8-byte for an fp8 out), C a multiple of 16 / sizeof(T).
template <typename T, typename M, int NV>
__device__ __forceinline__ void adaln_rows(const T* __restrict__ x, const T* __restrict__ y, const M* __restrict__ gate,
                                           const M* __restrict__ scale, const M* __restrict__ shift, T* __restrict__ res,
                                           void* __restrict__ out, float* __restrict__ qs,
                                           const float* __restrict__ scale_bias, const float* __restrict__ shift_bias,
                                           const float* __restrict__ gate_bias, int S, int C, float eps, i64 sx_b,
                                           i64 sx_s, i64 sy_b, i64 sy_s, i64 sg_b, i64 sg_s, i64 sc_b, i64 sc_s,
                                           i64 sh_b, i64 sh_s, i64 sr_b, i64 sr_s, i64 so_b, i64 so_s, int flags) {
  constexpr int V = Vec<T>::N;
  __shared__ float smem[3][32];  // one per reduction: mean, variance, amax
  const i64 row = blockIdx.x, b = row / S, s = row % S;
  const int vectors = C / V;
  Vec<T> r[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) r[i] = load16(x + b * sx_b + s * sx_s + (i64)c * V);
  }
  if (flags & F_RESIDUAL) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < vectors) {
        const Vec<T> yv = load16(y + b * sy_b + s * sy_s + (i64)c * V);
        float g[V], gb[V];
        if (flags & F_GATE) {
          load_floats<M, V>(gate + b * sg_b + s * sg_s + (i64)c * V, g);
          if (flags & F_GATE_BIAS) load_floats<float, V>(gate_bias + (i64)c * V, gb);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float v = to_float(yv.v[j]);
          if (flags & F_GATE) {  // _rn: each operation rounded on its own, as eager's separate ops (no FMA)
            v = __fmul_rn((flags & F_GATE_BIAS) ? gb[j] + g[j] : g[j], v);
            if (flags & F_ROUND_PRODUCT) v = round_to<T>(v);
          }
          r[i].v[j] = from_float<T>(__fadd_rn(to_float(r[i].v[j]), v));
        }
        store16(res + b * sr_b + s * sr_s + (i64)c * V, r[i]);
      }
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (threadIdx.x + i * blockDim.x < vectors) {
#pragma unroll
      for (int j = 0; j < V; ++j) sum += to_float(r[i].v[j]);
    }
  }
  const float mean = block_reduce(sum, smem[0], SumOp()) / C;
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (threadIdx.x + i * blockDim.x < vectors) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = to_float(r[i].v[j]) - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_reduce(sq, smem[1], SumOp()) / C + eps);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) {
      float sc[V], sh[V];
      load_floats<M, V>(scale + b * sc_b + s * sc_s + (i64)c * V, sc);
      load_floats<M, V>(shift + b * sh_b + s * sh_s + (i64)c * V, sh);
      if (flags & F_MOD_BIAS) {
        float bsc[V], bsh[V];
        load_floats<float, V>(scale_bias + (i64)c * V, bsc);
        load_floats<float, V>(shift_bias + (i64)c * V, bsh);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          sc[j] = bsc[j] + sc[j];
          sh[j] = bsh[j] + sh[j];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float h = __fmul_rn(to_float(r[i].v[j]) - mean, rstd);
        float o;
        if (flags & F_ROUND_MODULATE) {
          h = round_to<T>(h);
          h = round_to<T>(h * round_to<T>(1.0f + sc[j]));
          o = h + sh[j];
        } else {
          o = __fadd_rn(__fmul_rn(h, 1.0f + sc[j]), sh[j]);
        }
        r[i].v[j] = from_float<T>(o);
        amax = fmaxf(amax, fabsf(to_float(r[i].v[j])));
      }
    }
  }
  if (flags & F_QUANT) {
    store_row_fp8<false>(r, vectors, amax, smem[2], static_cast<u8*>(out) + b * so_b + s * so_s, qs + row);
  } else {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < vectors) store16(static_cast<T*>(out) + b * so_b + s * so_s + (i64)c * V, r[i]);
    }
  }
}

// adaln_rows_<activation dtype>_<modulation dtype>_<NV>
#define ADALN_ROWS(T, M, NAME, NV, MAX_THREADS)                                                                  \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS) adaln_rows_##NAME##_##NV(                          \
      const T* x, const T* y, const M* gate, const M* scale, const M* shift, T* res, void* out, float* qs,     \
      const float* scale_bias, const float* shift_bias, const float* gate_bias, int S, int C, float eps,       \
      i64 sx_b, i64 sx_s, i64 sy_b, i64 sy_s, i64 sg_b, i64 sg_s, i64 sc_b, i64 sc_s, i64 sh_b, i64 sh_s,      \
      i64 sr_b, i64 sr_s, i64 so_b, i64 so_s, int flags) {                                                     \
    adaln_rows<T, M, NV>(x, y, gate, scale, shift, res, out, qs, scale_bias, shift_bias, gate_bias, S, C, eps, \
                         sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, sc_b, sc_s, sh_b, sh_s, sr_b, sr_s, so_b, so_s,   \
                         flags);                                                                              \
  }
#define ADALN_ROWS_ALL(T, M, NAME)                                                                     \
  ADALN_ROWS(T, M, NAME, 1, 1024) ADALN_ROWS(T, M, NAME, 2, 1024) ADALN_ROWS(T, M, NAME, 4, 1024)      \
  ADALN_ROWS(T, M, NAME, 8, 512) ADALN_ROWS(T, M, NAME, 16, 256)

ADALN_ROWS_ALL(bf16, bf16, bf16_bf16)
ADALN_ROWS_ALL(bf16, float, bf16_f32)
ADALN_ROWS_ALL(f16, f16, f16_f16)
ADALN_ROWS_ALL(f16, float, f16_f32)
