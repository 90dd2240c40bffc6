// Helpers shared by diffc's CUDA kernels (csrc/*.cu). Self-contained: no CUDA headers, so NVRTC needs
// no include path. The loader (diffc/ops/csrc.py) pastes this file where a kernel file includes it.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

// Element types: bits <-> float32. bf16 and f16 round to nearest even, as torch's casts do.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float to_float(f16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float f) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
  return r;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float f) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
  return r;
}


// 16 bytes of T: the unit of every global load (one 128-bit transaction per thread).
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T> __device__ __forceinline__ Vec<T> load16(const T* p) {
  Vec<T> r;
  *reinterpret_cast<uint4*>(r.v) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Vec<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v.v);
}

// f rounded to T and back (what a T tensor between two ops holds)
template <typename T> __device__ __forceinline__ float round_to(float f) { return to_float(from_float<T>(f)); }

// V values of M at p as floats; p 16-byte aligned, 16 / sizeof(M) divides V
template <typename M, int V> __device__ __forceinline__ void load_floats(const M* p, float (&out)[V]) {
  constexpr int PER = Vec<M>::N;
  static_assert(V % PER == 0, "whole 16-byte vectors of M");
#pragma unroll
  for (int k = 0; k < V; k += PER) {
    const Vec<M> v = load16(p + k);
#pragma unroll
    for (int j = 0; j < PER; ++j) out[k + j] = to_float(v.v[j]);
  }
}

// float8_e4m3fn: two floats -> two bytes (round to nearest even, saturating; sm_89+). lo lands first in memory.
__device__ __forceinline__ u16 fp8x2(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// Store N (4, 8 or 16) fp8 values of q[] at p (N-byte aligned).
template <int N> __device__ __forceinline__ void store_fp8(u8* p, const float* q) {
  u32 w[N / 4];
#pragma unroll
  for (int i = 0; i < N / 4; ++i)
    w[i] = (u32)fp8x2(q[4 * i], q[4 * i + 1]) | ((u32)fp8x2(q[4 * i + 2], q[4 * i + 3]) << 16);
  if constexpr (N == 4) {
    *reinterpret_cast<u32*>(p) = w[0];
  } else if constexpr (N == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op> __device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// op (MaxOp, SumOp) of v over the block; every thread gets it. smem: 32 floats, not reused by the block
// before every thread has returned (a second reduction takes its own). blockDim.x a multiple of 32; the
// lanes past the last warp contribute 0 (the identity of both: maxima here are of absolute values).
template <typename Op> __device__ __forceinline__ float block_reduce(float v, float* smem, Op op) {
  v = warp_reduce(v, op);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_reduce(lane < warps ? smem[lane] : 0.0f, op);
}

#define FP8_MAX 448.0f
#define SCALE_FLOOR 1e-12f

// The end of every rowwise fp8 kernel (one block per row): the row's scale max(amax, 1e-12) / 448 from each
// thread's amax, the thread's vectors r[i] (vector threadIdx.x + i * blockDim.x of the row, those < vectors)
// quantized into out_row, the scale into *scale_out. BY_INVERSE: q = x * (1 / scale), else q = x / scale; the
// divisions are the fast ones (div.full.f32), so each kernel computes what its Triton twin does.
template <bool BY_INVERSE, typename T, int NV>
__device__ __forceinline__ void store_row_fp8(const Vec<T> (&r)[NV], int vectors, float amax, float* smem,
                                              u8* out_row, float* scale_out) {
  constexpr int V = Vec<T>::N;
  const float s = __fdividef(fmaxf(block_reduce(amax, smem, MaxOp()), SCALE_FLOOR), FP8_MAX);
  const float inv = __fdividef(1.0f, s);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < vectors) {
      float q[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x = to_float(r[i].v[j]);
        q[j] = BY_INVERSE ? x * inv : __fdividef(x, s);  // |q| <= 448 but for rounding: the cvt saturates
      }
      store_fp8<V>(out_row + (i64)c * V, q);
    }
  }
  if (threadIdx.x == 0) *scale_out = s;
}

// tanh-GELU: v * sigmoid(2u) = v / (1 + 2^t), u = sqrt(2 / pi) * (v + 0.044715 v^3), t = -2 u log2(e) =
// v * (GELU_K0 + GELU_K1 v^2) with the constants folded (3 operations instead of 7), 2^t and the reciprocal the
// approximate special-function instructions (ex2.approx, rcp.approx, each one ulp or two), rounded to T (what a
// T op stores). The special-function unit is what bounds an fp8 feed-forward's GELU + quantize kernel (two of
// its instructions a value, at an eighth of the float32 rate), so nothing else goes to it; the float32 error
// of this form, a few ulps, is far below T's rounding. The fp8 Triton kernels compute the same expression
// (gelu_tanh_fp8_kernel in diffc/ops/gelu_tanh.py, quantize_rows_kernel in quantize_rows.py: the constants
// written out in each, as diffc's Triton kernels call no jitted helper).
#define GELU_K0 -2.302208198144325f    // -2 sqrt(2 / pi) log2(e)
#define GELU_K1 -0.1029432395800235f   // GELU_K0 * 0.044715
template <typename T> __device__ __forceinline__ T gelu_tanh(float v) {
  const float t = v * fmaf(GELU_K1, v * v, GELU_K0);
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(t));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return from_float<T>(v * r);
}
