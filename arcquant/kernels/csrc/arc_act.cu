// ARC activation quantization on CUDA: one thread per 16-block of the augmented row.
//
//   x (M, K) bf16/fp16, starts (K/16,) int32: first channel of each main block (the 'blocks'
//   order moves whole aligned 16-blocks); augmented block b >= K/16 is the residual of main
//   block b - s/16 (the tail repeats the last s main columns).
//   Per block: amax -> E4M3 scale s_b = rne(amax/6 * gs) -> codes of x * (gs / s_b);
//   tail: residual r = x - (code * s_b) / gs, quantized the same way.
//   out: 0 int8 (2 * E2M1 value) + scales, 1 float16 code * s_b (exact) in the tensor-core GEMV's
//        depth order (each 8 columns as 0, 4, 1, 5, 2, 6, 3, 7: arc_gemv.cu, decode8), 2 bfloat16
//        code * s_b (exact, natural order), 3 packed codes (8 bytes per block, element 2i in the low nibble) + scales.
//   gs: gs_mode 0 one value, 1 per row, 2 computed here per row as 2688 / max|x[m]| (also written
//   to gs_out).
// Same operation order as arcquant.arc.quantize_activation and the Triton kernel
// (act_quant.py): IEEE divisions, no FMA contraction, RNE E4M3 (hardware convert, satfinite).
//
// Why CUDA: the Triton kernel is instruction-bound (Nsight Compute, H200, M = K = 4096: issue
// slots 87% busy, DRAM 5%, ~220 thread instructions per element): its (blocks, 16) tile puts a
// 16-block across threads (shuffles for every reduction, scalar 2-byte gathers). Here a thread
// owns its block: two 16-byte loads, register-only reductions, one 16-byte (int8), two
// (16-bit) or one 8-byte (packed) store.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <type_traits>
#include "arc_launch.cuh"

namespace {

template <typename T>
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) f[j] = __bfloat162float(h[j]);
    else f[j] = __half2float(h[j]);
  }
}

template <typename T>
__device__ __forceinline__ float act_to_f(T v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
  else return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T act_from_f(float v) {                    // round to nearest even
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

__device__ __forceinline__ float e4m3_rne(float v, uint32_t& bits) {   // v >= 0
  const __nv_fp8_storage_t b = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  bits = b;
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
}

// |q| -> E2M1 magnitude, round to nearest, ties to even code, saturating at 6, NaN -> 0. The grid
// has step 0.5 below 2, 1 below 4 and 2 above: step p / 2 with p = 2^floor(log2 |q|), at least 1.
// P = p * 1.5 * 2^22 (exact) lies in the binade whose ulp is p / 2, so one round-to-nearest-even
// of |q| + P rounds |q| to that step (ties to even multiples: the even codes) and subtracting P is
// exact; above 8 the step grows with p, the result stays >= 8 and is clamped to 6. Two FMAs and
// the exponent mask instead of two compares and four selects around a multiply-rint-multiply (v12,
// measured issue-bound: results/ncu-act-v24-h200.txt). The same decisions as the 7 thresholds of
// formats/e2m1.py (tests/test_formats.py: every tie and its neighbours): 0.25 -> 0, 0.75 -> 1,
// 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 7 -> 6.
__device__ __forceinline__ float e2m1_mag(float q) {                    // of |q|
  const float p = fmaxf(__uint_as_float(__float_as_uint(q) & 0x7F800000u), 1.f);   // the mask drops the sign
  const float r = __fmaf_rn(p, -6291456.f, __fmaf_rn(p, 6291456.f, fabsf(q)));    // 6291456 = 1.5 * 2^22
  return q == q ? fminf(r, 6.f) : 0.f;
}

// E2M1 magnitude -> its 3-bit code: 2v < 2 -> 2v (0, 1), else 2 * exponent + mantissa bit of 2v.
__device__ __forceinline__ uint32_t e2m1_code(float v) {
  const float v2 = __fmul_rn(v, 2.f);
  return v2 < 2.f ? (uint32_t)v2 : (__float_as_uint(v2) >> 22) - 254u;
}

// 16 values -> E2M1 values (signed), codes (nibbles, when CODES) and the block scale.
template <bool CODES>
__device__ __forceinline__ void quant16(const float* x, float gs, float* val, uint32_t* code, float& s,
                                        uint32_t& sbits) {
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(x[j]));
  s = e4m3_rne(__fmul_rn(__fdiv_rn(amax, 6.f), gs), sbits);
  const float recip = s > 0.f ? __fdiv_rn(gs, s) : 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float q = __fmul_rn(x[j], recip);
    const float m = e2m1_mag(q);
    val[j] = copysignf(m, q);                                      // -0 keeps its sign, as the reference
    if (CODES) code[j] = e2m1_code(m) | ((__float_as_uint(q) >> 31) << 3);
  }
}

// One augmented 16-block v (the residual taken here when tail) -> output block o of xq / scales.
template <int OUT>
__device__ __forceinline__ void emit_block(float* v, bool tail, float gs, size_t o, void* __restrict__ xq,
                                           uint8_t* __restrict__ scales) {
  float val[16], s;
  uint32_t code[16], sbits;
  quant16<OUT == 3>(v, gs, val, code, s, sbits);
  if (tail) {                                                    // residual against the rounded scale
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = __fsub_rn(v[j], __fdiv_rn(val[j] * s, gs));
    quant16<OUT == 3>(v, gs, val, code, s, sbits);
  }
  if (OUT == 0) {
    uint4 w;
    uint32_t* wb = reinterpret_cast<uint32_t*>(&w);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= (uint32_t)(uint8_t)(int8_t)(2.f * val[4 * q + j]) << (8 * j);
      wb[q] = word;
    }
    reinterpret_cast<uint4*>(xq)[o] = w;
  } else if (OUT == 1 || OUT == 2) {                            // fp16 ("mma") / bf16
    using O = typename std::conditional<OUT == 2, __nv_bfloat16, __half>::type;
    uint4 w[2];
    O* h = reinterpret_cast<O*>(w);
#pragma unroll
    for (int j = 0; j < 16; ++j) {                              // fp16: the MMA GEMV's order (8 columns
      if constexpr (OUT == 2) h[j] = __float2bfloat16(val[j] * s);   // as 0, 4, 1, 5, 2, 6, 3, 7)
      else h[(j & 8) | ((j & 3) << 1) | ((j >> 2) & 1)] = __float2half(val[j] * s);
    }
    reinterpret_cast<uint4*>(xq)[2 * o] = w[0];
    reinterpret_cast<uint4*>(xq)[2 * o + 1] = w[1];
  } else {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      lo |= code[j] << (4 * j);
      hi |= code[8 + j] << (4 * j);
    }
    reinterpret_cast<uint2*>(xq)[o] = make_uint2(lo, hi);
  }
  if (OUT == 0 || OUT == 3) scales[o] = (uint8_t)sbits;
}

// v[t] = src[i0 + t * blockDim.x] for t < U (zero past n): U 16-byte loads issued before any is used.
template <int U>
__device__ __forceinline__ void load_strided(const uint4* __restrict__ src, int i0, int n, uint4 (&v)[U]) {
#pragma unroll
  for (int t = 0; t < U; ++t) {
    const int i = i0 + t * blockDim.x;
    v[t] = i < n ? src[i] : make_uint4(0, 0, 0, 0);
  }
}

// The CTA's sum (or max) of a: a butterfly within each warp, the warps' values through shared
// memory, then a butterfly over them in every warp (each lane adds the same two values at each
// level, so every thread ends with the same bits; v39 - the warps' values summed one after another
// were a 16-load dependent chain at 512 threads).
__device__ __forceinline__ float block_reduce(float a, bool is_max, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, a, off);
    a = is_max ? fmaxf(a, o) : __fadd_rn(a, o);
  }
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = a;
  __syncthreads();
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;     // nw: 1 .. 32 warps
  a = lane < nw ? red[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, a, off);
    a = is_max ? fmaxf(a, o) : __fadd_rn(a, o);
  }
  __syncthreads();                                              // red is reused
  return a;
}

template <typename T>
__device__ float row_amax(const T* row, int K) {                   // whole CTA; K % 16 == 0
  __shared__ float red[32];
  float a = 0.f, f[8];
  for (int i0 = threadIdx.x; i0 < K / 8; i0 += 4 * blockDim.x) {   // 4 loads in flight per thread
    uint4 v[4];
    load_strided(reinterpret_cast<const uint4*>(row), i0, K / 8, v);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      unpack8<T>(v[u], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) a = fmaxf(a, fabsf(f[j]));
    }
  }
  return block_reduce(a, true, red);
}

// A row's tensor scale: 2688 / max|row| (gs_mode 2; thread 0 of the row's first CTA writes it to
// gs_out), else given.
__device__ __forceinline__ float row_scale(float amax, int gs_mode, const float* __restrict__ gs_in,
                                           float* __restrict__ gs_out, int m) {
  if (gs_mode != 2) return gs_in[gs_mode == 1 ? m : 0];
  const float gs = __fdiv_rn(2688.f, fmaxf(amax, 1e-30f));
  if (threadIdx.x == 0 && blockIdx.y == 0) gs_out[m] = gs;
  return gs;
}

template <typename T, int OUT>
__global__ void arc_act_kernel(const T* __restrict__ x, const int* __restrict__ starts, const float* __restrict__ gs_in,
                               int gs_mode, float* __restrict__ gs_out, void* __restrict__ xq,
                               uint8_t* __restrict__ scales, int K, int S) {
  arc::pdl_enter();
  const int m = blockIdx.x, nblk = (K + S) / 16, kb = K / 16, sb = S / 16;
  const T* row = x + (size_t)m * K;
  const float gs = row_scale(gs_mode == 2 ? row_amax<T>(row, K) : 0.f, gs_mode, gs_in, gs_out, m);
  for (int b = blockIdx.y * blockDim.x + threadIdx.x; b < nblk; b += gridDim.y * blockDim.x) {
    const bool tail = b >= kb;
    const T* src = row + starts[tail ? b - sb : b];
    float v[16];
    unpack8<T>(*reinterpret_cast<const uint4*>(src), v);
    unpack8<T>(*reinterpret_cast<const uint4*>(src + 8), v + 8);
    emit_block<OUT>(v, tail, gs, (size_t)m * nblk + b, xq, scales);
  }
}


// RMSNorm fused in front (the input of q/k/v and gate/up, decode and prefill). gridDim.y CTAs per
// row (several for a few decode rows: the quantization of a row's blocks is spread over SMs); each
// normalizes the whole row (the same arithmetic, so the same values), writes its 1/gridDim.y of y
// and quantizes its share of the blocks:
//   y = T(w * T(x * rsqrt(mean(x^2) + eps)))   (the transformers Llama / Qwen2 RMSNorm order:
//   fp32 statistics, rounded to T, times the T weight, rounded again), written out (M, K);
//   then y is quantized exactly as arc_act_kernel does with x (gs_mode 2: 2688 / max|y[m]|).
// The sum of squares is a CTA tree, so y can differ from torch's (another order) by one ulp of
// T where rsqrt lands near a rounding boundary; the quantized operand is exact for the y written.
template <typename T, int OUT>
__global__ void arc_rmsnorm_act_kernel(const T* __restrict__ x, const T* __restrict__ w, float eps,
                                       const int* __restrict__ starts, const float* __restrict__ gs_in, int gs_mode,
                                       float* __restrict__ gs_out, T* __restrict__ y, void* __restrict__ xq,
                                       uint8_t* __restrict__ scales, int K, int S) {
  arc::pdl_enter();
  extern __shared__ __align__(16) float ys[];                   // (K,) the row, then its normalized values
  __shared__ float red[32];
  const int m = blockIdx.x, nblk = (K + S) / 16, kb = K / 16, sb = S / 16;
  const T* row = x + (size_t)m * K;
  constexpr int U = 4;                                           // 16-byte loads in flight a thread
  // issued with x's first loads, not after the reductions (decode: one round trip to memory, not three):
  // w's first step and the start of this thread's first block
  const int b_per = (nblk + gridDim.y - 1) / gridDim.y;           // this CTA's blocks
  const int b0 = blockIdx.y * b_per + threadIdx.x, b_hi = min(nblk, (int)(blockIdx.y + 1) * b_per);
  const int st0 = b0 < b_hi ? starts[b0 >= kb ? b0 - sb : b0] : 0;
  uint4 w0[U];
  load_strided(reinterpret_cast<const uint4*>(w), threadIdx.x, K / 8, w0);
  float ss = 0.f, f[8];
  for (int i0 = threadIdx.x; i0 < K / 8; i0 += U * blockDim.x) {
    uint4 v[U];
    load_strided(reinterpret_cast<const uint4*>(row), i0, K / 8, v);
#pragma unroll
    for (int t = 0; t < U; ++t) {
      const int i = i0 + t * blockDim.x;
      if (i >= K / 8) break;
      unpack8<T>(v[t], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = __fadd_rn(ss, __fmul_rn(f[j], f[j]));
      float4* yv = reinterpret_cast<float4*>(ys + 8 * i);         // 16-byte stores: no bank conflicts
      yv[0] = make_float4(f[0], f[1], f[2], f[3]);
      yv[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
  }
  ss = block_reduce(ss, false, red);
  const float rstd = rsqrtf(__fadd_rn(__fmul_rn(ss, 1.f / K), eps));
  const int y_per = (K / 8 + gridDim.y - 1) / gridDim.y;         // 8-value groups of y this CTA writes
  const int y_lo = blockIdx.y * y_per, y_hi = y_lo + y_per;
  float amax = 0.f;
  for (int i0 = threadIdx.x; i0 < K / 8; i0 += U * blockDim.x) {
    uint4 wv[U];
    if (i0 == (int)threadIdx.x) {
#pragma unroll
      for (int t = 0; t < U; ++t) wv[t] = w0[t];
    } else {
      load_strided(reinterpret_cast<const uint4*>(w), i0, K / 8, wv);
    }
#pragma unroll
    for (int t = 0; t < U; ++t) {
      const int i = i0 + t * blockDim.x;
      if (i >= K / 8) break;
      unpack8<T>(wv[t], f);
      uint4 o;
      T* h = reinterpret_cast<T*>(&o);
      float4* yv = reinterpret_cast<float4*>(ys + 8 * i);
      const float4 r0 = yv[0], r1 = yv[1];
      float xv[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w}, yf[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float n = act_to_f<T>(act_from_f<T>(__fmul_rn(xv[j], rstd)));
        h[j] = act_from_f<T>(__fmul_rn(f[j], n));
        yf[j] = act_to_f<T>(h[j]);
        amax = fmaxf(amax, fabsf(yf[j]));
      }
      yv[0] = make_float4(yf[0], yf[1], yf[2], yf[3]);
      yv[1] = make_float4(yf[4], yf[5], yf[6], yf[7]);
      if (i >= y_lo && i < y_hi) reinterpret_cast<uint4*>(y + (size_t)m * K)[i] = o;
    }
  }
  amax = block_reduce(amax, true, red);                         // also: every ys written
  const float gs = row_scale(amax, gs_mode, gs_in, gs_out, m);
  for (int b = b0; b < b_hi; b += blockDim.x) {
    const bool tail = b >= kb;
    const int st = b == b0 ? st0 : starts[tail ? b - sb : b];
    const float4* src = reinterpret_cast<const float4*>(ys + st);                          // 64-byte aligned
    float v[16];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 t = src[q];
      v[4 * q] = t.x; v[4 * q + 1] = t.y; v[4 * q + 2] = t.z; v[4 * q + 3] = t.w;
    }
    emit_block<OUT>(v, tail, gs, (size_t)m * nblk + b, xq, scales);
  }
}

// SiLU(gate) * up fused in front (prefill: the input of down_proj). One CTA per row:
//   g = T(graw * 1 / (xgs[m] * wgu[0])), u = T(uraw * 1 / (xgs[m] * wgu[1])) when xgs is given (the
//   unscaled GEMM outputs and the factors arc_scale_rows would apply to them, formed here as it
//   forms them; xgs_per_row: one per row, else one value), else g, u as given; rows ld elements
//   apart (gate and up may be the two halves of one stacked product's rows); h = T(T(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in fp32 - torch's order
//   and roundings (F.silu on T, then the T product). h stays in shared memory as T (not written)
//   and is quantized as arc_act_kernel does (gs_mode 2: 2688 / max|h[m]|).
// 16-byte loads in flight per operand: 2 (47 registers, 5 CTAs an SM) is 5 % faster than 4 (63, 4 CTAs)
// at M = 2048 on an H200, bit-equal (scripts/ab_silu_act.py, results/ab-silu-act-h200.json)
#ifndef ARC_SILU_U
#define ARC_SILU_U 2
#endif
#ifdef ARC_SILU_MINB                                             // A/B knob (scripts/ab_silu_act.py): CTAs an SM
#define ARC_SILU_BOUNDS __launch_bounds__(256, ARC_SILU_MINB)
#else
#define ARC_SILU_BOUNDS
#endif
template <typename T, int OUT>
__global__ void ARC_SILU_BOUNDS arc_silu_mul_act_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                        const float* __restrict__ xgs, const float* __restrict__ wgu,
                                        int xgs_per_row, size_t ld, const int* __restrict__ starts,
                                        const float* __restrict__ gs_in, int gs_mode, float* __restrict__ gs_out,
                                        void* __restrict__ xq, uint8_t* __restrict__ scales, int K, int S) {
  arc::pdl_enter();
  extern __shared__ __align__(16) unsigned char hbuf[];          // (K,) T: the row of h
  T* hs = reinterpret_cast<T*>(hbuf);
  __shared__ float red[32];
  const int m = blockIdx.x, nblk = (K + S) / 16, kb = K / 16, sb = S / 16;
  const bool scaled = xgs != nullptr;
  const float xg = scaled ? xgs[xgs_per_row ? m : 0] : 1.f;
  const float sg = scaled ? __fdiv_rn(1.f, __fmul_rn(xg, wgu[0])) : 1.f;
  const float su = scaled ? __fdiv_rn(1.f, __fmul_rn(xg, wgu[1])) : 1.f;
  const uint4* grow = reinterpret_cast<const uint4*>(g + (size_t)m * ld);
  const uint4* urow = reinterpret_cast<const uint4*>(u + (size_t)m * ld);
  constexpr int U = ARC_SILU_U;
  float amax = 0.f, gf[8], uf[8];
  for (int i0 = threadIdx.x; i0 < K / 8; i0 += U * blockDim.x) {
    uint4 gv[U], uv[U];
    load_strided(grow, i0, K / 8, gv);
    load_strided(urow, i0, K / 8, uv);
#pragma unroll
    for (int t = 0; t < U; ++t) {
      const int i = i0 + t * blockDim.x;
      if (i >= K / 8) break;
      unpack8<T>(gv[t], gf);
      unpack8<T>(uv[t], uf);
      uint4 o;
      T* h = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float gj = scaled ? act_to_f<T>(act_from_f<T>(__fmul_rn(gf[j], sg))) : gf[j];
        const float uj = scaled ? act_to_f<T>(act_from_f<T>(__fmul_rn(uf[j], su))) : uf[j];
        const float a = act_to_f<T>(act_from_f<T>(__fdiv_rn(gj, __fadd_rn(1.f, expf(-gj)))));
        h[j] = act_from_f<T>(__fmul_rn(a, uj));
        amax = fmaxf(amax, fabsf(act_to_f<T>(h[j])));
      }
      reinterpret_cast<uint4*>(hs)[i] = o;
    }
  }
  amax = block_reduce(amax, true, red);                         // also: every hs written
  const float gs = row_scale(amax, gs_mode, gs_in, gs_out, m);
  for (int b = threadIdx.x; b < nblk; b += blockDim.x) {
    const bool tail = b >= kb;
    const uint4* src = reinterpret_cast<const uint4*>(hs + starts[tail ? b - sb : b]);   // 32-byte aligned
    float v[16];
    unpack8<T>(src[0], v);
    unpack8<T>(src[1], v + 8);
    emit_block<OUT>(v, tail, gs, (size_t)m * nblk + b, xq, scales);
  }
}

// SiLU(gate) * up alone (decode: the input of down_proj, which the activation kernel then quantizes
// with the other decode layers' settings): h = T(T(silu(g)) * u), the prefill kernel's per-value code
// and torch's F.silu(g) * u bit for bit; gate and up rows ld elements apart (the two halves of the
// stacked gate / up GEMV's output, which torch's elementwise kernels read through their slow strided
// path), h contiguous. 8 values a thread, 16-byte loads and stores.
template <typename T>
__global__ void arc_silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h,
                                    size_t ld, unsigned k8, unsigned total8) {
  arc::pdl_enter();
  const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total8) return;
  const unsigned r = idx / k8, c8 = idx - r * k8;
  const uint4 gv = reinterpret_cast<const uint4*>(g + (size_t)r * ld)[c8];
  const uint4 uv = reinterpret_cast<const uint4*>(u + (size_t)r * ld)[c8];
  float gf[8], uf[8];
  unpack8<T>(gv, gf);
  unpack8<T>(uv, uf);
  uint4 o;
  T* ho = reinterpret_cast<T*>(&o);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float a = act_to_f<T>(act_from_f<T>(__fdiv_rn(gf[j], __fadd_rn(1.f, expf(-gf[j])))));
    ho[j] = act_from_f<T>(__fmul_rn(a, uf[j]));
  }
  reinterpret_cast<uint4*>(h)[idx] = o;
}

template <typename T>
void launch_act(const torch::Tensor& x, const torch::Tensor& starts, const float* gs_in, int gs_mode, float* gs_out,
                torch::Tensor& xq, uint8_t* scales, int s, int out, int ctas) {
  const int m = x.size(0), k = x.size(1);
  if (m == 0) return;                                             // an empty grid is a launch error
  dim3 grid(m, ctas), block(128);                                 // rows on x: no 65535 limit
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int* st = starts.data_ptr<int>();
  void* q = xq.data_ptr();
  auto kernel = out == 0 ? arc_act_kernel<T, 0> : out == 1 ? arc_act_kernel<T, 1>
               : out == 2 ? arc_act_kernel<T, 2> : arc_act_kernel<T, 3>;
  arc::launch(kernel, m, grid, block, 0, stream, xp, st, gs_in, gs_mode, gs_out, q, scales, k, s);
}

}  // namespace

// gs: (0,) -> computed per row into gs_out; (1,) or (M,) given. out: 0 int8, 1 fp16, 2 bf16, 3 packed.
// The activation kernels' shared checks of x, starts, gs and the outputs; -> the kernel's gs mode
// (0 one value, 1 per row, 2 computed per row into gs_out) and raw pointers.
struct ActIO {
  int gs_mode;
  const float* gp;
  float* go;
  uint8_t* sp;
};

static ActIO check_act_io(const torch::Tensor& x, const torch::Tensor& starts, const torch::Tensor& gs,
                          const torch::Tensor& gs_out, const torch::Tensor& xq, const torch::Tensor& scales, int64_t s,
                          int64_t out, bool strided = false) {   // strided: rows may be apart (16-byte multiples)
  TORCH_CHECK(x.is_cuda() && starts.is_cuda() && gs.is_cuda() && xq.is_cuda() && scales.is_cuda() && gs_out.is_cuda(),
              "CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x: bfloat16 or float16");
  TORCH_CHECK(x.dim() == 2 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
              (strided ? x.stride(1) == 1 && x.stride(0) >= x.size(1) && x.stride(0) % 8 == 0 : x.is_contiguous()),
              strided ? "x: 2-D, unit column stride, rows 16-byte aligned" : "x: contiguous 2-D, 16-byte aligned");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % 16 == 0 && s % 16 == 0 && s >= 0 && s <= k, "K and s multiples of 16, 0 <= s <= K");
  TORCH_CHECK(starts.scalar_type() == at::kInt && starts.numel() == k / 16, "starts: int32 (K/16,)");
  TORCH_CHECK(gs.scalar_type() == at::kFloat && (gs.numel() == 0 || gs.numel() == 1 || gs.numel() == m),
              "gs: float32 with 0, 1 or M values");
  TORCH_CHECK(gs.numel() > 0 || (gs_out.scalar_type() == at::kFloat && gs_out.numel() == m), "gs_out: float32 (M,)");
  TORCH_CHECK(out >= 0 && out <= 3, "out in 0..3");
  const int64_t nblk = (k + s) / 16, bytes = out == 0 ? 16 : out < 3 ? 32 : 8;
  TORCH_CHECK(xq.is_contiguous() && xq.numel() * xq.element_size() == m * nblk * bytes &&
              reinterpret_cast<uintptr_t>(xq.data_ptr()) % 16 == 0, "xq: contiguous, 16-byte aligned, M x (K+s) values");
  TORCH_CHECK((out == 1) <= (xq.scalar_type() == at::kHalf) && (out == 2) <= (xq.scalar_type() == at::kBFloat16),
              "xq dtype must match out");
  TORCH_CHECK(!(out == 0 || out == 3) || (scales.scalar_type() == at::kByte && scales.numel() == m * nblk &&
              scales.is_contiguous()), "scales: uint8 (M, (K+s)/16)");
  const int gs_mode = gs.numel() == 0 ? 2 : gs.numel() > 1 ? 1 : 0;
  return {gs_mode, gs.numel() ? gs.data_ptr<float>() : nullptr, gs_mode == 2 ? gs_out.data_ptr<float>() : nullptr,
          (out == 0 || out == 3) ? scales.data_ptr<uint8_t>() : nullptr};
}

void arc_act_quant(torch::Tensor x, torch::Tensor starts, torch::Tensor gs, torch::Tensor gs_out, torch::Tensor xq,
                   torch::Tensor scales, int64_t s, int64_t out, int64_t ctas) {
  const at::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(ctas >= 1, "ctas >= 1");
  const ActIO io = check_act_io(x, starts, gs, gs_out, xq, scales, s, out);
  if (x.scalar_type() == at::kBFloat16)
    launch_act<__nv_bfloat16>(x, starts, io.gp, io.gs_mode, io.go, xq, io.sp, (int)s, (int)out, (int)ctas);
  else
    launch_act<__half>(x, starts, io.gp, io.gs_mode, io.go, xq, io.sp, (int)s, (int)out, (int)ctas);
}

// RMSNorm + quantization (decode): x (M, K), w (K,) of x's dtype -> y (M, K) and the outputs of
// arc_act_quant (out 0 int8, 1 fp16, 2 bf16, 3 packed).
void arc_rmsnorm_act(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor starts, torch::Tensor gs,
                     torch::Tensor gs_out, torch::Tensor y, torch::Tensor xq, torch::Tensor scales, int64_t s,
                     int64_t out, int64_t ctas) {
  const at::cuda::CUDAGuard guard(x.device());
  const ActIO io = check_act_io(x, starts, gs, gs_out, xq, scales, s, out);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k <= 12288, "K <= 12288 (the row in shared memory)");
  TORCH_CHECK(w.is_cuda() && y.is_cuda() && w.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type() &&
              w.numel() == k && y.numel() == m * k && w.is_contiguous() && y.is_contiguous() &&
              reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0,
              "w (K,) and y (M, K): CUDA, x's dtype, contiguous, 16-byte aligned");
  TORCH_CHECK(ctas >= 0 && ctas <= 64, "ctas in 0 (auto) .. 64");
  if (m == 0) return;
  // decode (few rows): up to 512 threads a row for latency; prefill (many rows): 128, with the
  // kernel's 4 loads in flight a thread - ~8 rows an SM instead of 2 (registers)
  const int64_t wide = std::min<int64_t>(512, std::max<int64_t>(64, (k / 8 + 31) / 32 * 32));
  const int threads = (int)(m >= 512 ? std::min<int64_t>(128, wide) : wide);
  // CTAs a row: several while the rows leave SMs idle (decode), so each quantizes fewer blocks
  const int64_t nblk = (k + s) / 16;
  const unsigned per_row = (unsigned)(ctas ? ctas : m <= 16 ? std::max<int64_t>(1, std::min<int64_t>(8, nblk / 32)) : 1);
  const dim3 grid((unsigned)m, per_row);
  const size_t smem = (size_t)k * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  void* q = xq.data_ptr();
#define ARC_NORM_LAUNCH(T, O) arc::launch(arc_rmsnorm_act_kernel<T, O>, m, grid, dim3(threads), smem, stream, \
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(w.data_ptr()), (float)eps, \
      starts.data_ptr<int>(), io.gp, io.gs_mode, io.go, reinterpret_cast<T*>(y.data_ptr()), q, io.sp, (int)k, (int)s)
  if (x.scalar_type() == at::kBFloat16) {
    if (out == 0) ARC_NORM_LAUNCH(__nv_bfloat16, 0); else if (out == 1) ARC_NORM_LAUNCH(__nv_bfloat16, 1);
    else if (out == 2) ARC_NORM_LAUNCH(__nv_bfloat16, 2); else ARC_NORM_LAUNCH(__nv_bfloat16, 3);
  } else {
    if (out == 0) ARC_NORM_LAUNCH(__half, 0); else if (out == 1) ARC_NORM_LAUNCH(__half, 1);
    else if (out == 2) ARC_NORM_LAUNCH(__half, 2); else ARC_NORM_LAUNCH(__half, 3);
  }
#undef ARC_NORM_LAUNCH
}

// SiLU(gate) * up + quantization: gate, up (M, K) of one dtype with one row stride, xgs (0 values:
// no scaling; 1 or M float32) and wgu (2 float32: gate's and up's weight tensor scales) -> the
// outputs of arc_act_quant (out 0 int8, 1 fp16, 2 bf16, 3 packed).
void arc_silu_mul_act(torch::Tensor g, torch::Tensor u, torch::Tensor xgs, torch::Tensor wgu,
                      torch::Tensor starts, torch::Tensor gs, torch::Tensor gs_out, torch::Tensor xq,
                      torch::Tensor scales, int64_t s, int64_t out) {
  const at::cuda::CUDAGuard guard(g.device());
  const ActIO io = check_act_io(g, starts, gs, gs_out, xq, scales, s, out, true);
  const int64_t m = g.size(0), k = g.size(1);
  TORCH_CHECK(k <= 24576, "K <= 24576 (the row of h in shared memory)");
  TORCH_CHECK(u.is_cuda() && u.scalar_type() == g.scalar_type() && u.sizes() == g.sizes() && u.stride(1) == 1 &&
              u.stride(0) == g.stride(0) && reinterpret_cast<uintptr_t>(u.data_ptr()) % 16 == 0,
              "up: CUDA (M, K) of gate's dtype and row stride, aligned");
  const int64_t ni = xgs.numel();
  TORCH_CHECK(xgs.is_cuda() && wgu.is_cuda() && xgs.scalar_type() == at::kFloat && wgu.scalar_type() == at::kFloat &&
              xgs.is_contiguous() && wgu.is_contiguous() && (ni == 0 || ni == 1 || ni == m) && (ni == 0 || wgu.numel() == 2),
              "xgs: float32 with 0, 1 or M values; wgu: 2 float32 values (gate's, up's) when xgs is given");
  if (m == 0) return;
  const float* xp = ni ? xgs.data_ptr<float>() : nullptr;
  const float* wp = ni ? wgu.data_ptr<float>() : nullptr;
  const int per_row = ni > 1 ? 1 : 0;
  const size_t ld = (size_t)g.stride(0);
  // 256 threads, ARC_SILU_U loads of gate and of up in flight each: ~5 CTAs an SM (registers), so one
  // CTA's loads overlap another's quantization (512 threads with one load each: 2 CTAs, ~1.3 TB/s on H200)
  const int threads = (int)std::min<int64_t>(256, std::max<int64_t>(64, (k / 8 + 31) / 32 * 32));
  const size_t smem = (size_t)k * 2;
  auto stream = at::cuda::getCurrentCUDAStream();
  void* q = xq.data_ptr();
#define ARC_SILU_LAUNCH(T, O) arc::launch(arc_silu_mul_act_kernel<T, O>, m, dim3((unsigned)m), dim3(threads), smem, \
      stream, reinterpret_cast<const T*>(g.data_ptr()), reinterpret_cast<const T*>(u.data_ptr()), xp, wp, per_row, ld, \
      starts.data_ptr<int>(), io.gp, io.gs_mode, io.go, q, io.sp, (int)k, (int)s)
  if (g.scalar_type() == at::kBFloat16) {
    if (out == 0) ARC_SILU_LAUNCH(__nv_bfloat16, 0); else if (out == 1) ARC_SILU_LAUNCH(__nv_bfloat16, 1);
    else if (out == 2) ARC_SILU_LAUNCH(__nv_bfloat16, 2); else ARC_SILU_LAUNCH(__nv_bfloat16, 3);
  } else {
    if (out == 0) ARC_SILU_LAUNCH(__half, 0); else if (out == 1) ARC_SILU_LAUNCH(__half, 1);
    else if (out == 2) ARC_SILU_LAUNCH(__half, 2); else ARC_SILU_LAUNCH(__half, 3);
  }
#undef ARC_SILU_LAUNCH
}

// h (M, K) contiguous = SiLU(g) * u; g, u (M, K) of one dtype and one row stride (16-byte rows).
void arc_silu_mul(torch::Tensor g, torch::Tensor u, torch::Tensor h) {
  const at::cuda::CUDAGuard guard(g.device());
  TORCH_CHECK(g.is_cuda() && u.is_cuda() && h.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK((g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kHalf) && u.scalar_type() == g.scalar_type() &&
              h.scalar_type() == g.scalar_type(), "g, u, h: one dtype, bfloat16 or float16");
  TORCH_CHECK(g.dim() == 2 && u.sizes() == g.sizes() && h.sizes() == g.sizes() && h.is_contiguous(), "(M, K) each, h contiguous");
  const int64_t m = g.size(0), k = g.size(1), ld = g.stride(0);
  TORCH_CHECK(g.stride(1) == 1 && u.stride(1) == 1 && u.stride(0) == ld && ld >= k && ld % 8 == 0 && k % 8 == 0 &&
              reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(u.data_ptr()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 == 0, "rows 16-byte aligned, one row stride, K % 8 == 0");
  const long long total8 = m * (k / 8);
  TORCH_CHECK(total8 < (1LL << 32), "at most 2^32 - 1 groups of 8 values a call");
  if (total8 == 0) return;
  const unsigned blocks = (unsigned)((total8 + 255) / 256);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (g.scalar_type() == at::kBFloat16)
    arc::launch(arc_silu_mul_kernel<__nv_bfloat16>, m, dim3(blocks), dim3(256), 0, stream,
        reinterpret_cast<const __nv_bfloat16*>(g.data_ptr()),
        reinterpret_cast<const __nv_bfloat16*>(u.data_ptr()), reinterpret_cast<__nv_bfloat16*>(h.data_ptr()), (size_t)ld,
        (unsigned)(k / 8), (unsigned)total8);
  else
    arc::launch(arc_silu_mul_kernel<__half>, m, dim3(blocks), dim3(256), 0, stream,
        reinterpret_cast<const __half*>(g.data_ptr()),
        reinterpret_cast<const __half*>(u.data_ptr()), reinterpret_cast<__half*>(h.data_ptr()), (size_t)ld,
        (unsigned)(k / 8), (unsigned)total8);
}
