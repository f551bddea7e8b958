// Decode-shaped ARC product on CUDA cores with integer dot products (sm_80+; E4M3 scale
// converts in hardware on sm_89+).
//
//   y (M, N) = 0.25 * sum_b [ isum(b) * ws(n, b) * xs(m, b) ] / (xgs(m) * wgs(n)) (+ bias) (+ residual)
// wgs: one tensor scale, or one per output row (several layers' weights stacked: q/k/v in one launch).
//
// Operands:
//   xi  (M, K+s) int8   2 * E2M1 value of the augmented activation (-12..12), from the
//                       activation kernel: [Q1 (K) | Q2 (s)]
//   xs  (M, (K+s)/16)   E4M3 block scales of xi (bits)
//   wc  (N, K/2) uint8  packed E2M1 weight codes, element 2i in the low nibble
//   ws  (N, K/16)       E4M3 block scales (bits)
// The weight tail (augmented columns K..K+s-1) is main columns K-s..K-1: a block there is
// decoded once and multiplied with both Q1 and Q2.
//
// Per 16-block, isum = sum_j 2w_j * 2x_j is exact in int32 (|isum| <= 16*12*12); one fp32
// FMA per block adds isum * (ws * xs) (the E4M3 product is exact in fp32). The nibble decode
// is 4 PRMTs per 8 codes: PRMT with a LUT of the 8 magnitudes (2 * {0,.5,1,1.5,2,3,4,6})
// reads the code's low 3 bits as the byte index, and its bit 3 (the E2M1 sign) is PRMT's
// sign-replicate flag, so it yields the magnitude where the sign is clear and 0 where it is
// set (every LUT byte is >= 0); the codes with the sign flipped give the negative part.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "arc_launch.cuh"

namespace {

// What every GEMV's epilogue takes besides y: bias (float32 (N,) or null), residual (y's dtype and
// shape, or null), y's kind (0 bfloat16, 1 float16, 2 float32).
struct Epilogue {
  const float* bias;
  const void* res;
  int out_kind;
};

// y[o] = T(v + bias[n]), then with a residual y[o] = T(float(y[o]) + float(res[o])): the rounding of
// the layer output and then torch's `residual + out` (one fp32 add, rounded), fused.
__device__ __forceinline__ void store_out(const Epilogue& ep, void* __restrict__ y, size_t o, int n, float v) {
  if (ep.bias != nullptr) v += ep.bias[n];
  if (ep.out_kind == 0) {
    __nv_bfloat16 h = __float2bfloat16(v);
    if (ep.res != nullptr) {
      const __nv_bfloat16 r = static_cast<const __nv_bfloat16*>(ep.res)[o];
      h = __float2bfloat16(__fadd_rn(__bfloat162float(h), __bfloat162float(r)));
    }
    static_cast<__nv_bfloat16*>(y)[o] = h;
  } else if (ep.out_kind == 1) {
    __half h = __float2half(v);
    if (ep.res != nullptr)
      h = __float2half(__fadd_rn(__half2float(h), __half2float(static_cast<const __half*>(ep.res)[o])));
    static_cast<__half*>(y)[o] = h;
  } else {
    static_cast<float*>(y)[o] = ep.res != nullptr ? __fadd_rn(v, static_cast<const float*>(ep.res)[o]) : v;
  }
}

constexpr uint32_t LUT_LO = 0x03020100u;   // 2 * |E2M1| of magnitude codes 0..3
constexpr uint32_t LUT_HI = 0x0C080604u;   // magnitude codes 4..7
constexpr uint32_t SIGNS = 0x88888888u;
constexpr uint32_t HIGH = 0x80808080u;

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ uint4 ld_stream(const void* p) {        // weights: read once, skip L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float e4m3(uint32_t bits) {
  __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)bits, __NV_E4M3);
  return __half2float(__half(h));
}

// 8 codes (one word, element 0 in the low nibble) -> int8x4 words for elements 0-3 and 4-7:
// SPLIT keeps positive and negative magnitudes apart (two dot products, no combine), else
// one signed word per 4 elements ((p | 0x80) - n) ^ 0x80 bytewise (no borrows: p, n <= 12).
template <bool SPLIT>
struct Codes8 {
  uint32_t a0, a1, b0, b1;        // SPLIT: pos lo, pos hi, neg lo, neg hi; else signed lo, hi
  Codes8() = default;
  __device__ __forceinline__ explicit Codes8(uint32_t w) {
    const uint32_t f = w ^ SIGNS;
    const uint32_t p0 = prmt(LUT_LO, LUT_HI, w), p1 = prmt(LUT_LO, LUT_HI, w >> 16);
    const uint32_t n0 = prmt(LUT_LO, LUT_HI, f), n1 = prmt(LUT_LO, LUT_HI, f >> 16);
    if (SPLIT) {
      a0 = p0; a1 = p1; b0 = n0; b1 = n1;
    } else {
      a0 = ((p0 | HIGH) - n0) ^ HIGH;
      a1 = ((p1 | HIGH) - n1) ^ HIGH;
      b0 = b1 = 0;
    }
  }
  __device__ __forceinline__ int dot(uint32_t x0, uint32_t x1) const {   // 8 int8 activations
    if (SPLIT) {
      int p = __dp4a((int)a1, (int)x1, __dp4a((int)a0, (int)x0, 0));
      int n = __dp4a((int)b1, (int)x1, __dp4a((int)b0, (int)x0, 0));
      return p - n;
    }
    return __dp4a((int)a1, (int)x1, __dp4a((int)a0, (int)x0, 0));
  }
};

// Two E4M3 scales (bits 0-7: .x, bits 8-15: .y) in one conversion.
__device__ __forceinline__ float2 e4m3x2(uint32_t bits) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)bits, __NV_E4M3);
  return __half22float2(__half2(h));
}

// A 16-block's signed integer sum: codes c0 (elements 0-7), c1 (8-15) against 16 int8 activations.
// SPLIT: the positive and the negative magnitudes each in one DP4A chain (one subtraction).
template <bool SPLIT>
__device__ __forceinline__ int dot(const Codes8<SPLIT>& c0, const Codes8<SPLIT>& c1, uint4 x) {
  if constexpr (!SPLIT) return c0.dot(x.x, x.y) + c1.dot(x.z, x.w);
  int p = __dp4a((int)c0.a0, (int)x.x, 0), n = __dp4a((int)c0.b0, (int)x.x, 0);
  p = __dp4a((int)c0.a1, (int)x.y, p);
  n = __dp4a((int)c0.b1, (int)x.y, n);
  p = __dp4a((int)c1.a0, (int)x.z, p);
  n = __dp4a((int)c1.b0, (int)x.z, n);
  p = __dp4a((int)c1.a1, (int)x.w, p);
  n = __dp4a((int)c1.b1, (int)x.w, n);
  return p - n;
}

// One 32-code step of NR rows (two 16-blocks, the chunk j of each row) into acc: w / sb the
// rows' 16 code bytes and 2 E4M3 scale bytes, already loaded.
template <int M, int NR>
__device__ __forceinline__ void gemv_step(const uint4* w, const uint32_t* sb, int j, float (*acc)[M],
                                          const int8_t* __restrict__ xi, const uint8_t* __restrict__ xs,
                                          int mrows, int K, int ka, int tb0) {
  constexpr bool SPLIT = M <= 2;
  float2 sw2[NR];                                                 // both blocks' weight scales
#pragma unroll
  for (int r = 0; r < NR; ++r) sw2[r] = e4m3x2(sb[r]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {                                   // the two 16-blocks of the step
    const int b = 2 * j + h;
    Codes8<SPLIT> c0[NR], c1[NR];
    float sw[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      c0[r] = Codes8<SPLIT>(h ? w[r].z : w[r].x);
      c1[r] = Codes8<SPLIT>(h ? w[r].w : w[r].y);
      sw[r] = h ? sw2[r].y : sw2[r].x;
    }
    const bool tail = b >= tb0;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int mm = min(m, mrows - 1);
      const int8_t* xrow = xi + (size_t)mm * ka;
      const uint8_t* xsrow = xs + (size_t)mm * (ka / 16);
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(xrow + 16 * b));
      const float sx = e4m3(xsrow[b]);
      uint4 x2 = make_uint4(0, 0, 0, 0);
      float sx2 = 0.f;
      if (tail) {                                                 // Q2: augmented block K/16 + b - tb0
        x2 = __ldg(reinterpret_cast<const uint4*>(xrow + K + 16 * (b - tb0)));
        sx2 = e4m3(xsrow[K / 16 + b - tb0]);
      }
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const int i1 = dot(c0[r], c1[r], x);
        acc[r][m] = fmaf((float)i1, sw[r] * sx, acc[r][m]);
        if (tail) {
          const int i2 = dot(c0[r], c1[r], x2);
          acc[r][m] = fmaf((float)i2, sw[r] * sx2, acc[r][m]);
        }
      }
    }
  }
}

// gemv_step for a chunk with no tail block (the warp's chunks all below (K - S) / 32), its operands
// through pointers the caller advances: xp[m] the row's 32 int8 activations of the chunk, xsp[m] their
// two E4M3 scales (one conversion; one 16-bit load for row 0). The same operations on the same values in the
// same order as gemv_step, so the same bits; no tail test and no index arithmetic in the step.
template <int M, int NR>
__device__ __forceinline__ void gemv_step_main(const uint4* w, const uint32_t* sb, float (*acc)[M],
                                               const int8_t* const* xp, const uint8_t* const* xsp) {
  constexpr bool SPLIT = M <= 2;
  float2 sw2[NR], sx2[M];
  uint4 x[M][2];
#pragma unroll
  for (int r = 0; r < NR; ++r) sw2[r] = e4m3x2(sb[r]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint32_t sxb = m == 0 ? *reinterpret_cast<const uint16_t*>(xsp[0])          // row 0: 2-byte aligned
                                : xsp[m][0] | ((uint32_t)xsp[m][1] << 8);                   // row m starts at m * (K+S)/16
    sx2[m] = e4m3x2(sxb);
    x[m][0] = __ldg(reinterpret_cast<const uint4*>(xp[m]));
    x[m][1] = __ldg(reinterpret_cast<const uint4*>(xp[m]) + 1);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    Codes8<SPLIT> c0[NR], c1[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      c0[r] = Codes8<SPLIT>(h ? w[r].z : w[r].x);
      c1[r] = Codes8<SPLIT>(h ? w[r].w : w[r].y);
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const int i1 = dot(c0[r], c1[r], x[m][h]);
        acc[r][m] = fmaf((float)i1, (h ? sw2[r].y : sw2[r].x) * (h ? sx2[m].y : sx2[m].x), acc[r][m]);
      }
  }
}

// Grid: one block per NR output rows; blockDim (32, KW): KW warps split the depth and meet in
// shared memory. Rows >= N are clamped (loaded, never stored); activation rows >= mrows too.
// U: steps whose weight loads a lane issues before using the first (U * NR 16-byte loads in
// flight; U = 1 loads and uses one step at a time). The lane's steps are summed in the same
// order for every U, so the result does not depend on it.
template <int M, int NR, int U>
__global__ void arc_gemv_kernel(const int8_t* __restrict__ xi, const uint8_t* __restrict__ xs,
                                const float* __restrict__ xgs, int xgs_per_row,
                                const uint8_t* __restrict__ wc, const uint8_t* __restrict__ ws,
                                const float* __restrict__ wgs, int wgs_per_row, const Epilogue ep,
                                void* __restrict__ y, int mrows, int N, int K, int S) {
  arc::pdl_enter();
  const int lane = threadIdx.x, warp = threadIdx.y, kw = blockDim.y;
  const int n0 = blockIdx.x * NR;
  const int ka = K + S, chunks = K / 32, tb0 = (K - S) / 16;     // 32 codes = 2 blocks per lane step
  const int stride = 32 * kw;
  const uint8_t* wrow[NR];
  const uint8_t* srow[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const size_t n = min(n0 + r, N - 1);
    wrow[r] = wc + n * (K / 2);
    srow[r] = ws + n * (K / 16);
  }
  float acc[NR][M];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  int j0 = warp * 32 + lane;
  if (U == 1) {                                                   // chunks below the tail, whole warps
    const int8_t* xp[M];
    const uint8_t* xsp[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int mm = min(m, mrows - 1);
      xp[m] = xi + (size_t)mm * ka + 32 * j0;
      xsp[m] = xs + (size_t)mm * (ka / 16) + 2 * j0;
    }
    const uint8_t* wp[NR];
    const uint8_t* sp[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      wp[r] = wrow[r] + 16 * j0;
      sp[r] = srow[r] + 2 * j0;
    }
    const int jt = tb0 >> 1;                                      // chunk jt may hold a tail block
#pragma unroll 2
    for (; j0 - lane + 31 < jt; j0 += stride) {                   // warp-uniform: its last chunk < jt
      uint4 w[NR];
      uint32_t sb[NR];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        w[r] = ld_stream(wp[r]);
        sb[r] = *reinterpret_cast<const uint16_t*>(sp[r]);
        wp[r] += 16 * stride;
        sp[r] += 2 * stride;
      }
      gemv_step_main<M, NR>(w, sb, acc, xp, xsp);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        xp[m] += 32 * stride;
        xsp[m] += 2 * stride;
      }
    }
  }
  for (; j0 < chunks; j0 += U * stride) {                         // the rest (every chunk for U > 1)
    uint4 w[U][NR];
    uint32_t sb[U][NR];
#pragma unroll
    for (int u = 0; u < U; ++u) {                                 // every load first
      const int j = j0 + u * stride;
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        w[u][r] = j < chunks ? ld_stream(wrow[r] + 16 * j) : make_uint4(0, 0, 0, 0);
        sb[u][r] = j < chunks ? *reinterpret_cast<const uint16_t*>(srow[r] + 2 * j) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * stride;
      if (j < chunks) gemv_step<M, NR>(w[u], sb[u], j, acc, xi, xs, mrows, K, ka, tb0);
    }
  }

  extern __shared__ float red[];                                 // (KW, NR * M)
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp * NR * M + r * M + m] = v;
    }
  __syncthreads();
  const int t = warp * 32 + lane;
  if (t < NR * M) {
    const int r = t / M, m = t % M, n = n0 + r;
    if (n < N && m < mrows) {
      float v = 0.f;
      for (int q = 0; q < kw; ++q) v += red[q * NR * M + t];
      v = v * 0.25f / ((xgs_per_row ? xgs[m] : xgs[0]) * wgs[wgs_per_row ? n : 0]);
      store_out(ep, y, (size_t)m * N + n, n, v);
    }
  }
}

template <int M, int NR, int U>
void launch(const torch::Tensor& xi, const torch::Tensor& xs, const torch::Tensor& xgs, const torch::Tensor& wc,
            const torch::Tensor& ws, const torch::Tensor& wgs, const Epilogue& ep, torch::Tensor& y,
            int kw, int s) {
  const int n = wc.size(0), k = wc.size(1) * 2, mrows = xi.size(0);
  dim3 grid((n + NR - 1) / NR), block(32, kw);
  const size_t smem = sizeof(float) * kw * NR * M;
  arc::launch(arc_gemv_kernel<M, NR, U>, mrows, grid, block, smem, at::cuda::getCurrentCUDAStream(),
              xi.data_ptr<int8_t>(), xs.data_ptr<uint8_t>(), xgs.data_ptr<float>(), xgs.numel() > 1 ? 1 : 0,
              wc.data_ptr<uint8_t>(), ws.data_ptr<uint8_t>(), wgs.data_ptr<float>(), wgs.numel() > 1 ? 1 : 0, ep,
              y.data_ptr(), mrows, n, k, s);
}

template <int M, int U>
void launch_nr(int nr, const torch::Tensor& xi, const torch::Tensor& xs, const torch::Tensor& xgs,
               const torch::Tensor& wc, const torch::Tensor& ws, const torch::Tensor& wgs, const Epilogue& ep,
               torch::Tensor& y, int kw, int s) {
  if (nr == 1) launch<M, 1, U>(xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else if (nr == 2) launch<M, 2, U>(xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else launch<M, 4, U>(xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
}

template <int M>
void launch_u(int u, int nr, const torch::Tensor& xi, const torch::Tensor& xs, const torch::Tensor& xgs,
              const torch::Tensor& wc, const torch::Tensor& ws, const torch::Tensor& wgs, const Epilogue& ep,
              torch::Tensor& y, int kw, int s) {
  if (u == 1) launch_nr<M, 1>(nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else if (u == 2) launch_nr<M, 2>(nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else launch_nr<M, 4>(nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
}


// ---------------------------------------------------------------------------------------------
// Tensor-core variant for 3 <= M <= 64: the weight is the MMA's A operand (16 rows x 16 depth),
// decoded in registers to fp16 code * block scale * 2^-14 (exact, see decode8); the activation
// arrives as fp16 code * block scale (exact) and is the B operand (8 tokens per tile); mma.sync
// m16n8k16 accumulates in fp32 over the whole depth, so no per-block epilogue. The depth order
// inside an MMA is free (the dot product does not care), so lane (g, t) of a warp reads 16
// contiguous codes of 2 blocks per row - coalesced 8-byte loads - and the activation half of the
// same 32 depth positions.
//   y = 2^14 * acc / (xgs(m) * wgs(n)) (+ bias) (+ residual); wgs one value or one per row, as above
// Decode (decode8): the E2M1 code s e1 e0 m placed as an fp16's sign bit and its exponent's low two
// bits + mantissa's top bit reads as the code's value times 2^-14 (e = 0: m * 2^-15, subnormal;
// else (1 + m/2) * 2^(e-15)), and times the block scale it stays exact in fp16 (at most 5
// significant bits, multiples of 2^-24 up to 2688 * 2^-14; fp16 arithmetic and the MMA keep
// subnormals); the epilogue multiplies by 2^14. Nibble j and j+4 of a word are the low and high
// halves' nibble j, so one shift and mask place both signs and one shift and mask both magnitudes:
// a half2 holds codes (j, j+4) for 2 ALU instructions (a mask and a merging LOP3) and 2 IMAD (the
// shifts, see ShiftMul) per 2 codes, against ~7 ALU per 4 for the PRMT table decode before (v25:
// the kernels were bound by the ALU pipe; results/kernels-hopper.md, v26). The
// activation operand is written in the matching order by the activation kernels (out="mma": each
// 8 columns as 0, 4, 1, 5, 2, 6, 3, 7; cuda_gemv.to_mma_order), so the MMA's B fragment is
// read as before.

// decode8's left shifts as multiplications by values ptxas cannot prove constant (z = 0 for
// every valid call: S >= 0), so they run as IMAD on the FMA pipe; as shifts ptxas put all of them
// on the ALU pipe (SHF), the kernels' bound.
struct ShiftMul {
  uint32_t sg[3], mg[3];                                         // 2^(12-4j), 2^(9-4j), j < 3
  __device__ __forceinline__ explicit ShiftMul(int S) {
    const uint32_t z = (uint32_t)S >> 31;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      sg[j] = (1u << (12 - 4 * j)) | z;
      mg[j] = (1u << (9 - 4 * j)) | z;
    }
  }
};

__device__ __forceinline__ void decode8(uint32_t w, __half2 scale, const ShiftMul& sm, uint32_t (&h)[4]) {
  constexpr uint32_t SGN = 0x80008000u, MAG = 0x0E000E00u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {                                  // h[j] = {code j | code j + 4}
#ifdef ARC_DECODE_SHF                                            // plain shifts (scripts/ab_mma_decode.py --shf)
    const uint32_t sg = (w << (12 - 4 * j)) & SGN;
    const uint32_t mg = (j == 3 ? w >> 3 : w << (9 - 4 * j)) & MAG;
#else
    const uint32_t sg = (j == 3 ? w : w * sm.sg[j]) & SGN;       // sign: bit 4j + 3 -> 15
    const uint32_t mg = (j == 3 ? w >> 3 : w * sm.mg[j]) & MAG;  // magnitude: bits 4j.. -> 9..11
#endif
    uint32_t v = sg | mg;
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&v), scale);
    h[j] = *reinterpret_cast<uint32_t*>(&r);
  }
}

__device__ __forceinline__ void mma16816(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 codes of one row and block (two words, element 0 in the low nibble) times the block's E4M3
// scale -> out[i] = {codes 8(i/2) + 2(i%2), +4 | codes 8(i/2) + 2(i%2) + 1, +5}: 4 x 2 words of the
// MMA A operand, depth in the order of to_mma_order.
__device__ __forceinline__ void decode16(uint32_t w0, uint32_t w1, uint32_t sc, const ShiftMul& sm,
                                         uint32_t (*out)[2]) {
  const __half2 s2 = __half2half2(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)sc, __NV_E4M3)));
  uint32_t h[2][4];
  decode8(w0, s2, sm, h[0]);
  decode8(w1, s2, sm, h[1]);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i][0] = h[i >> 1][2 * (i & 1)];
    out[i][1] = h[i >> 1][2 * (i & 1) + 1];
  }
}

// A lane's two activation blocks b, b+1 of token row m (fp16, 32 values) from global memory;
// zeros where ok(q) is false.
__device__ __forceinline__ void load_x_step(const __half* __restrict__ xd, size_t row, int b, bool ok0, bool ok1,
                                            uint4 (&xv)[4]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const bool ok = q ? ok1 : ok0;
    const uint4* p = reinterpret_cast<const uint4*>(xd + row + 16 * (b + q));
    xv[2 * q] = ok ? __ldg(p) : make_uint4(0, 0, 0, 0);
    xv[2 * q + 1] = ok ? __ldg(p + 1) : make_uint4(0, 0, 0, 0);
  }
}

// The 8 MMAs of a 128-deep step for one token tile: A the decoded rows g, g+8 (a[row half]),
// B the lane's 32 activations xv (in to_mma_order: xv[i/2] holds the pairs of MMA i and i^1).
__device__ __forceinline__ void mma_step(float* acc, const uint32_t (&a)[2][8][2], const uint4 (&xv)[4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint4 v = xv[i >> 1];
    const uint32_t b0 = (i & 1) ? v.z : v.x, b1 = (i & 1) ? v.w : v.y;
    mma16816(acc, a[0][i][0], a[1][i][0], a[0][i][1], a[1][i][1], b0, b1);
  }
}

// The tensor-core GEMVs' epilogue: the kw warps' partial tiles meet in shared memory `red`
// (kw, MT * 4 * 32 floats); warp 0 sums them in warp order and stores y = acc / (xgs * wgs) (+ bias).
template <int MT>
__device__ __forceinline__ void mma_epilogue(const float (*acc)[4], float* red, int kw, int n0,
                                             const float* __restrict__ xgs, int xgs_per_row,
                                             const float* __restrict__ wgs, int wgs_per_row,
                                             const Epilogue ep, void* __restrict__ y,
                                             int mrows, int N) {
  const int lane = threadIdx.x, warp = threadIdx.y, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(warp * MT * 4 + mt * 4 + e) * 32 + lane] = acc[mt][e];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = 0.f;
      for (int q = 0; q < kw; ++q) v += red[(q * MT * 4 + mt * 4 + e) * 32 + lane];
      const int n = n0 + g + (e >= 2 ? 8 : 0), m = mt * 8 + 2 * t + (e & 1);
      if (n < N && m < mrows) {
        v = (v * 16384.f) / ((xgs_per_row ? xgs[m] : xgs[0]) * wgs[wgs_per_row ? n : 0]);   // decode8's 2^-14
        store_out(ep, y, (size_t)m * N + n, n, v);
      }
    }
}

struct WeightStep {            // one lane's share of a 128-deep step: 2 blocks x rows g, g+8
  uint2 w[2][2];               // [row][block]: 16 codes
  uint32_t sc[2][2];           // E4M3 bits
};

__device__ __forceinline__ WeightStep load_step(const uint8_t* wr0, const uint8_t* wr1, const uint8_t* sr0,
                                                const uint8_t* sr1, int step, int t, int nb, int kb, int sb) {
  WeightStep ws;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int b = step * 8 + 2 * t + q;                          // augmented block
    const bool ok = b < nb;
    const int pb = b < kb ? b : b - sb;                          // tail blocks read the main part
    ws.w[0][q] = ok ? *reinterpret_cast<const uint2*>(wr0 + 8 * pb) : make_uint2(0, 0);
    ws.w[1][q] = ok ? *reinterpret_cast<const uint2*>(wr1 + 8 * pb) : make_uint2(0, 0);
    ws.sc[0][q] = ok ? sr0[pb] : 0u;
    ws.sc[1][q] = ok ? sr1[pb] : 0u;
  }
  return ws;
}

template <int MT>
__device__ __forceinline__ void mma_body(const __half* __restrict__ xd, const float* __restrict__ xgs, int xgs_per_row,
                                         const uint8_t* __restrict__ wc, const uint8_t* __restrict__ ws,
                                         const float* __restrict__ wgs, int wgs_per_row, const Epilogue ep,
                                         void* __restrict__ y, int mrows, int N, int K, int S) {
  arc::pdl_enter();
  const int lane = threadIdx.x, warp = threadIdx.y, kw = blockDim.y;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int ka = K + S, nb = ka / 16, kb = K / 16, sb = S / 16, steps = (nb + 7) / 8;
  const size_t r0 = min(n0 + g, N - 1), r1 = min(n0 + g + 8, N - 1);
  const uint8_t *wr0 = wc + r0 * (K / 2), *wr1 = wc + r1 * (K / 2);
  const uint8_t *sr0 = ws + r0 * kb, *sr1 = ws + r1 * kb;
  float acc[MT][4];
  const ShiftMul sm(S);
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  int step = warp;
  WeightStep cur = load_step(wr0, wr1, sr0, sr1, step, t, nb, kb, sb);
  for (; step < steps; step += kw) {
    WeightStep nxt;
    if (step + kw < steps) nxt = load_step(wr0, wr1, sr0, sr1, step + kw, t, nb, kb, sb);
    uint32_t a[2][8][2];                                         // [row half][4-code group][lo/hi]
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int q = 0; q < 2; ++q) decode16(cur.w[r][q].x, cur.w[r][q].y, cur.sc[r][q], sm, a[r] + 4 * q);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = mt * 8 + g, b = step * 8 + 2 * t;
      uint4 xv[4];
      load_x_step(xd, (size_t)m * ka, b, b < nb && m < mrows, b + 1 < nb && m < mrows, xv);
      mma_step(acc[mt], a, xv);
    }
    cur = nxt;
  }

  extern __shared__ float red[];                                 // (KW, MT * 4 * 32)
  mma_epilogue<MT>(acc, red, kw, n0, xgs, xgs_per_row, wgs, wgs_per_row, ep, y, mrows, N);
}

#define MMA_PARAMS                                                                                  \
  const __half* __restrict__ xd, const float* __restrict__ xgs, int xgs_per_row, const uint8_t* __restrict__ wc, \
      const uint8_t* __restrict__ ws, const float* __restrict__ wgs, int wgs_per_row, const Epilogue ep,            \
      void* __restrict__ y, int mrows, int N, int K, int S
#define MMA_ARGS xd, xgs, xgs_per_row, wc, ws, wgs, wgs_per_row, ep, y, mrows, N, K, S

// Two entry points: the compiler's own register choice (77 / 106 / 150 / 144 registers for MT
// 1 / 2 / 4 / 8 on sm_90 with nvcc 13.0: 6, 4, 3, 3 blocks of 4 warps per SM), and one bounded
// to 64 / 80 / 128 / 128 (8, 6, 4, 4 blocks of 4 warps; MT = 1 spills 4 bytes; at most 8 warps
// per block) - more warps in flight for the latency-bound weight stream.
constexpr int mma_min_blocks(int mt) { return mt == 1 ? 4 : mt == 2 ? 3 : 2; }

template <int MT>
__global__ void arc_gemm_mma_kernel(MMA_PARAMS) { mma_body<MT>(MMA_ARGS); }

template <int MT>
__global__ void __launch_bounds__(256, mma_min_blocks(MT)) arc_gemm_mma_bounded(MMA_PARAMS) {
  mma_body<MT>(MMA_ARGS);
}

template <int MT>
void launch_mma(const torch::Tensor& xd, const torch::Tensor& xgs, const torch::Tensor& wc, const torch::Tensor& ws,
                const torch::Tensor& wgs, const Epilogue& ep, torch::Tensor& y, int kw, int s, bool occ) {
  const int n = wc.size(0), k = wc.size(1) * 2, mrows = xd.size(0);
  dim3 grid((n + 15) / 16), block(32, kw);
  const size_t smem = sizeof(float) * kw * MT * 4 * 32;
  auto kernel = occ ? arc_gemm_mma_bounded<MT> : arc_gemm_mma_kernel<MT>;
  arc::launch(kernel, mrows, grid, block, smem, at::cuda::getCurrentCUDAStream(),
              reinterpret_cast<const __half*>(xd.data_ptr<at::Half>()), xgs.data_ptr<float>(), xgs.numel() > 1 ? 1 : 0,
              wc.data_ptr<uint8_t>(), ws.data_ptr<uint8_t>(), wgs.data_ptr<float>(), wgs.numel() > 1 ? 1 : 0, ep,
              y.data_ptr(), mrows, n, k, s);
}


// ---------------------------------------------------------------------------------------------
// The tensor-core GEMV with its operands streamed through shared memory by cp.async (M <= 16):
// the same MMA tiles, decode and per-warp step order as mma_body (so the same bits for the same
// kw), but the loads are decoupled from their use. A stage is kw steps of 128 depth (one per
// warp) of the block's 16 weight rows: 16-byte copies of contiguous row segments, ST stages in
// flight. The main part's stages come first (K % (kw * 128) == 0: whole stages, no bounds), then
// the tail's (augmented blocks K/16.., copied from the main blocks they repeat, zero past s).
// The block's E4M3 scales (16 rows x K/16 bytes, plus a zeroed pad the tail's last stage reads)
// are copied once with the first stage; the activation tile (code * block scale) of a stage is
// copied with it (XS) or read from global memory (L2).
// Shared layout: codes [ST][16][CP] (CP = kw*64 + 64: rows g, g+1 of a quarter warp land on
// different banks), scales [16][K/16 + kw*8], activations [ST][8*MT][AP] (AP = kw*256 + 64, its
// 16-byte chunks XOR-swizzled by their block pair: c ^ ((c >> 2) & 3)).

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(d), "l"(src), "r"(valid ? 8 : 0));
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <int KW>
struct PipeGeom {
  static constexpr int SB = KW * 8;                              // 16-blocks a stage
  static constexpr int CP = KW * 64 + 64;                        // code row pitch (bytes)
  static constexpr int AP = KW * 256 + 64;                       // activation row pitch (bytes)
};

// The activation tile of a stage: MT*8 token rows x kw*128 depth (fp16) from augmented block ab;
// blocks from `lim` on (the tail's end) and rows >= mrows are zero-filled; chunks swizzled.
template <int MT, int KW>
__device__ __forceinline__ void copy_acts(uint8_t* as, const __half* __restrict__ xd, int ab, int lim, int mrows,
                                          int ka) {
  const int tid = threadIdx.y * 32 + threadIdx.x;
#pragma unroll
  for (int i = 0; i < 4 * MT; ++i) {                             // MT*8 rows x 16*KW chunks / (32*KW)
    const int idx = tid + i * 32 * KW, m = idx / (16 * KW), c = idx % (16 * KW);
    const bool ok = m < mrows && c / 2 < lim;
    cp_async16(as + m * PipeGeom<KW>::AP + 16 * (c ^ ((c >> 2) & 3)),
               xd + (ok ? (size_t)m * ka + 16 * ab + 8 * c : 0), ok);
  }
}

template <int MT, int KW, int ST, bool XS>
__global__ void __launch_bounds__(32 * KW) arc_gemm_mma_pipe_kernel(MMA_PARAMS) {
  using G = PipeGeom<KW>;
  constexpr int SB = G::SB;
  arc::pdl_enter();
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x, warp = threadIdx.y, tid = warp * 32 + lane;
  const int g = lane >> 2, t = lane & 3, n0 = blockIdx.x * 16;
  const int ka = K + S, kb = K / 16, sb = S / 16, SP = kb + SB;
  const int nmain = kb / SB, nst = nmain + (sb + SB - 1) / SB;
  uint8_t* cs = smem;                                            // [ST][16][CP]
  uint8_t* ss = cs + ST * 16 * G::CP;                            // [16][SP]
  uint8_t* as = ss + 16 * SP;                                    // [ST][8*MT][AP] (XS)

  for (int idx = tid; idx < kb; idx += 32 * KW) {                // 16 rows x kb/16 chunks = kb copies
    const int r = idx / (kb / 16), c = idx % (kb / 16);
    cp_async16(ss + r * SP + 16 * c, ws + (size_t)min(n0 + r, N - 1) * kb + 16 * c, true);
  }
  if (tid < SB)                                                  // the pad: 16 rows x SB bytes
    *reinterpret_cast<uint4*>(ss + (tid / (SB / 16)) * SP + kb + 16 * (tid % (SB / 16))) = make_uint4(0, 0, 0, 0);
  const uint8_t* row[2];                                         // this thread's two 16-byte slots
  int slot[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {                                  // 16 rows x SB/2 slots / (32*KW) threads
    const int idx = tid + i * 32 * KW, r = idx / (SB / 2);
    row[i] = wc + (size_t)min(n0 + r, N - 1) * (K / 2);
    slot[i] = idx % (SB / 2);
  }
  auto issue = [&](int nx) {                                     // stage nx's copies
    uint8_t* cb = cs + (nx % ST) * 16 * G::CP;
    const int jb = (nx - nmain) * SB;                            // tail: first block of the stage
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint8_t* dst = cb + (tid + i * 32 * KW) / (SB / 2) * G::CP + 16 * slot[i];
      const int j = jb + 2 * slot[i];
      if (nx < nmain) {
        cp_async16(dst, row[i] + 8 * (nx * SB + 2 * slot[i]), true);
      } else if ((sb & 1) == 0) {
        cp_async16(dst, row[i] + (j < sb ? 8 * (kb - sb + j) : 0), j < sb);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          cp_async8(dst + 8 * h, row[i] + (j + h < sb ? 8 * (kb - sb + j + h) : 0), j + h < sb);
      }
    }
    if (XS) copy_acts<MT, KW>(as + (nx % ST) * 8 * MT * G::AP, xd, nx < nmain ? nx * SB : kb + jb,
                              nx < nmain ? SB : sb - jb, mrows, ka);
  };
#pragma unroll
  for (int p = 0; p < ST - 1; ++p) {                             // prologue: stages 0 .. ST-2
    if (p < nst) issue(p);
    cp_commit();
  }
  float acc[MT][4];
  const ShiftMul sm(S);
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int lb = warp * 8 + 2 * t;                               // the lane's first block in a stage

  for (int st = 0; st < nst; ++st) {
    cp_wait<ST - 2>();                                           // this thread's copies of stage st
    __syncthreads();                                             // everyone's; buffer st-1 is free
    if (st + ST - 1 < nst) issue(st + ST - 1);
    cp_commit();
    const int buf = st % ST, jb = (st - nmain) * SB;
    const bool tail = st >= nmain;
    const int sbase = tail ? kb - sb + jb : st * SB;             // main block of the stage's first
    const uint8_t* crow = cs + (buf * 16 + g) * G::CP + lb * 8;
    const uint4 wv[2] = {*reinterpret_cast<const uint4*>(crow), *reinterpret_cast<const uint4*>(crow + 8 * G::CP)};
    const uint8_t* srow = ss + g * SP + sbase + lb;
    uint32_t a[2][8][2];                                         // [row half][4-code group][lo/hi]
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int q = 0; q < 2; ++q)                                // scale 0 past the tail (codes are 0 too)
        decode16(q ? wv[r].z : wv[r].x, q ? wv[r].w : wv[r].y, srow[r * 8 * SP + q], sm, a[r] + 4 * q);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = mt * 8 + g;
      uint4 xv[4];
      if (XS) {
        const uint8_t* arow = as + (buf * 8 * MT + m) * G::AP + 64 * (warp * 4 + t);
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = *reinterpret_cast<const uint4*>(arow + 16 * (i ^ t));
      } else {
        const int ab = tail ? kb + jb : st * SB;                 // augmented block of the stage's first
        const int lim = tail ? sb - jb : SB;
        load_x_step(xd, (size_t)m * ka, ab + lb, m < mrows && lb < lim, m < mrows && lb + 1 < lim, xv);
      }
      mma_step(acc[mt], a, xv);
    }
  }
  cp_wait<0>();
  __syncthreads();                                               // the code buffers become the reduction
  mma_epilogue<MT>(acc, reinterpret_cast<float*>(smem), KW, n0, xgs, xgs_per_row, wgs, wgs_per_row, ep, y,
                   mrows, N);
}

template <int MT, int KW, int ST, bool XS>
void launch_pipe(const torch::Tensor& xd, const torch::Tensor& xgs, const torch::Tensor& wc, const torch::Tensor& ws,
                 const torch::Tensor& wgs, const Epilogue& ep, torch::Tensor& y,  int s) {
  using G = PipeGeom<KW>;
  const int n = wc.size(0), k = wc.size(1) * 2, mrows = xd.size(0);
  const size_t smem = std::max<size_t>(ST * 16 * G::CP + 16 * (k / 16 + G::SB) + (XS ? ST * 8 * MT * G::AP : 0),
                                       sizeof(float) * KW * MT * 4 * 32);
  auto kernel = arc_gemm_mma_pipe_kernel<MT, KW, ST, XS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  arc::launch(kernel, mrows, dim3((n + 15) / 16), dim3(32, KW), smem, at::cuda::getCurrentCUDAStream(),
              reinterpret_cast<const __half*>(xd.data_ptr<at::Half>()), xgs.data_ptr<float>(), xgs.numel() > 1 ? 1 : 0,
              wc.data_ptr<uint8_t>(), ws.data_ptr<uint8_t>(), wgs.data_ptr<float>(), wgs.numel() > 1 ? 1 : 0, ep,
              y.data_ptr(), mrows, n, k, s);
}

template <int MT, int KW, int ST>
void launch_pipe_xs(bool xs, const torch::Tensor& xd, const torch::Tensor& xgs, const torch::Tensor& wc,
                    const torch::Tensor& ws, const torch::Tensor& wgs, const Epilogue& ep, torch::Tensor& y,
                     int s) {
  if (xs) launch_pipe<MT, KW, ST, true>(xd, xgs, wc, ws, wgs, ep, y, s);
  else launch_pipe<MT, KW, ST, false>(xd, xgs, wc, ws, wgs, ep, y, s);
}

template <int MT, int KW>
void launch_pipe_st(int st, bool xs, const torch::Tensor& xd, const torch::Tensor& xgs, const torch::Tensor& wc,
                    const torch::Tensor& ws, const torch::Tensor& wgs, const Epilogue& ep, torch::Tensor& y,
                     int s) {
  if (st == 2) launch_pipe_xs<MT, KW, 2>(xs, xd, xgs, wc, ws, wgs, ep, y, s);
  else if (st == 3) launch_pipe_xs<MT, KW, 3>(xs, xd, xgs, wc, ws, wgs, ep, y, s);
  else launch_pipe_xs<MT, KW, 4>(xs, xd, xgs, wc, ws, wgs, ep, y, s);
}

Epilogue epilogue_args(const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                        const torch::Tensor& y, int64_t n) {
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_cuda(), "bias: float32 (N,)");
    b = bias->data_ptr<float>();
  }
  const void* r = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == y.scalar_type() && residual->sizes() == y.sizes() &&
                residual->is_contiguous() && residual->device() == y.device(),
                "residual: contiguous, y's dtype and shape");
    r = residual->data_ptr();
  }
  const int out_kind = y.scalar_type() == at::kBFloat16 ? 0 : y.scalar_type() == at::kHalf ? 1 : 2;
  TORCH_CHECK(out_kind < 2 || y.scalar_type() == at::kFloat, "y: bfloat16, float16 or float32");
  return {b, r, out_kind};
}

// The checks both tensor-core GEMVs share: devices, dtypes, contiguity, shapes, tensor-scale counts.
void check_mma_io(const torch::Tensor& xd, const torch::Tensor& xgs, const torch::Tensor& wc, const torch::Tensor& ws,
                  const torch::Tensor& wgs, const torch::Tensor& y, int64_t s) {
  const int64_t m = xd.size(0), n = wc.size(0), k = wc.size(1) * 2;
  TORCH_CHECK(xd.is_cuda() && wc.is_cuda() && ws.is_cuda() && y.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(xd.scalar_type() == at::kHalf && wc.scalar_type() == at::kByte && ws.scalar_type() == at::kByte &&
              xgs.scalar_type() == at::kFloat && wgs.scalar_type() == at::kFloat,
              "dtypes: xd float16, wc/ws uint8, xgs/wgs float32");
  TORCH_CHECK(s % 16 == 0 && s >= 0 && s <= k, "s: a multiple of 16 in 0..K");
  TORCH_CHECK(xd.is_contiguous() && wc.is_contiguous() && ws.is_contiguous() && y.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(xd.size(1) == k + s && ws.size(0) == n && ws.size(1) == k / 16 && y.size(0) == m && y.size(1) == n,
              "shape mismatch");
  TORCH_CHECK(xgs.numel() == 1 || xgs.numel() == m, "xgs must hold 1 or M values");
  TORCH_CHECK(wgs.is_contiguous() && (wgs.numel() == 1 || wgs.numel() == n), "wgs must hold 1 or N values");
}

}  // namespace

// Shapes and dtypes are checked in arcquant/kernels/cuda_gemv.py (clear messages); these
// checks only guard memory safety.
void arc_gemv_dp4a(torch::Tensor xi, torch::Tensor xs, torch::Tensor xgs, torch::Tensor wc, torch::Tensor ws,
                   torch::Tensor wgs, c10::optional<torch::Tensor> bias,
                   c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, int64_t nr,
                   int64_t kw, int64_t u) {
  const at::cuda::CUDAGuard guard(xi.device());
  const int64_t m = xi.size(0), n = wc.size(0), k = wc.size(1) * 2;
  TORCH_CHECK(xi.is_cuda() && xs.is_cuda() && wc.is_cuda() && ws.is_cuda() && y.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(xi.scalar_type() == at::kChar && xs.scalar_type() == at::kByte && wc.scalar_type() == at::kByte &&
              ws.scalar_type() == at::kByte && xgs.scalar_type() == at::kFloat && wgs.scalar_type() == at::kFloat,
              "dtypes: xi int8, xs/wc/ws uint8, xgs/wgs float32");
  TORCH_CHECK(m >= 1 && m <= 8 && k % 32 == 0 && s % 16 == 0 && s >= 0 && s <= k, "need 1 <= M <= 8, K % 32 == 0");
  TORCH_CHECK(xi.is_contiguous() && xs.is_contiguous() && wc.is_contiguous() && ws.is_contiguous() &&
              y.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(xi.size(1) == k + s && xs.size(0) == m && xs.size(1) == (k + s) / 16 && ws.size(0) == n &&
              ws.size(1) == k / 16 && y.size(0) == m && y.size(1) == n, "shape mismatch");
  TORCH_CHECK(xgs.numel() == 1 || xgs.numel() == m, "xgs must hold 1 or M values");
  TORCH_CHECK(wgs.is_contiguous() && (wgs.numel() == 1 || wgs.numel() == n), "wgs must hold 1 or N values");
  TORCH_CHECK(kw >= 1 && kw <= 32 && (nr == 1 || nr == 2 || nr == 4), "kw in 1..32, nr in {1, 2, 4}");
  TORCH_CHECK(u == 1 || ((u == 2 || u == 4) && m <= 2), "u in {1, 2, 4} (2 and 4 for M <= 2)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(xs.data_ptr()) % 2 == 0 && reinterpret_cast<uintptr_t>(ws.data_ptr()) % 2 == 0,
              "xs and ws must start on a 2-byte boundary");
  const Epilogue ep = epilogue_args(bias, residual, y, n);
  if (m == 1) launch_u<1>((int)u, nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else if (m == 2) launch_u<2>((int)u, nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else if (m <= 4) launch_nr<4, 1>(nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
  else launch_nr<8, 1>(nr, xi, xs, xgs, wc, ws, wgs, ep, y, kw, s);
}

void arc_gemm_mma(torch::Tensor xd, torch::Tensor xgs, torch::Tensor wc, torch::Tensor ws, torch::Tensor wgs,
                  c10::optional<torch::Tensor> bias,
                   c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, int64_t kw, int64_t occ) {
  const at::cuda::CUDAGuard guard(xd.device());
  const int64_t m = xd.size(0), n = wc.size(0), k = wc.size(1) * 2;
  check_mma_io(xd, xgs, wc, ws, wgs, y, s);
  TORCH_CHECK(m >= 1 && m <= 64 && k % 16 == 0, "need 1 <= M <= 64");
  TORCH_CHECK(kw >= 1 && kw <= 8 && kw * ((m + 7) / 8) <= 32, "kw in 1..8 and kw * ceil(M / 8) <= 32 (shared memory)");
  const Epilogue ep = epilogue_args(bias, residual, y, n);
  if (m <= 8) launch_mma<1>(xd, xgs, wc, ws, wgs, ep, y, kw, s, occ != 0);
  else if (m <= 16) launch_mma<2>(xd, xgs, wc, ws, wgs, ep, y, kw, s, occ != 0);
  else if (m <= 32) launch_mma<4>(xd, xgs, wc, ws, wgs, ep, y, kw, s, occ != 0);
  else launch_mma<8>(xd, xgs, wc, ws, wgs, ep, y, kw, s, occ != 0);
}

void arc_gemm_mma_pipe(torch::Tensor xd, torch::Tensor xgs, torch::Tensor wc, torch::Tensor ws, torch::Tensor wgs,
                       c10::optional<torch::Tensor> bias,
                   c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, int64_t kw, int64_t st,
                       int64_t xs) {
  const at::cuda::CUDAGuard guard(xd.device());
  const int64_t m = xd.size(0), n = wc.size(0), k = wc.size(1) * 2;
  check_mma_io(xd, xgs, wc, ws, wgs, y, s);
  TORCH_CHECK((kw == 4 || kw == 8) && st >= 2 && st <= 4, "kw in {4, 8}, st in 2..4");
  TORCH_CHECK(m >= 1 && m <= 16 && k % (128 * kw) == 0, "need 1 <= M <= 16, K % (128 * kw) == 0");
  const auto aligned = [](const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  TORCH_CHECK(aligned(xd) && aligned(wc) && aligned(ws), "xd, wc and ws must start on 16-byte boundaries");
  const Epilogue ep = epilogue_args(bias, residual, y, n);
#ifdef ARC_PIPE_ALL                      // every (kw, st, xs): the benchmarks' sweeps (ARCQUANT_EXT_SWEEP=1)
  if (m <= 8) {
    if (kw == 4) launch_pipe_st<1, 4>((int)st, xs != 0, xd, xgs, wc, ws, wgs, ep, y, s);
    else launch_pipe_st<1, 8>((int)st, xs != 0, xd, xgs, wc, ws, wgs, ep, y, s);
  } else {
    if (kw == 4) launch_pipe_st<2, 4>((int)st, xs != 0, xd, xgs, wc, ws, wgs, ep, y, s);
    else launch_pipe_st<2, 8>((int)st, xs != 0, xd, xgs, wc, ws, wgs, ep, y, s);
  }
#else                                     // the settings gpu.mma_config takes (cuda_gemv.PIPE_SETTINGS)
  const int key = (m <= 8 ? 1000 : 2000) + (int)kw * 100 + (int)st * 10 + (xs != 0);
  switch (key) {                          // PIPE_SETTINGS: tiles * 1000 + kw * 100 + st * 10 + xs
    case 1420: launch_pipe<1, 4, 2, false>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    case 1431: launch_pipe<1, 4, 3, true>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    case 1820: launch_pipe<1, 8, 2, false>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    case 1831: launch_pipe<1, 8, 3, true>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    case 2431: launch_pipe<2, 4, 3, true>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    case 2441: launch_pipe<2, 4, 4, true>(xd, xgs, wc, ws, wgs, ep, y, s); break;
    default:
      TORCH_CHECK(false, "pipelined setting ", key, " (tiles kw st xs) not built: ARCQUANT_EXT_SWEEP=1 builds all");
  }
#endif
}

// Programmatic dependent launch for the decode kernels launched after this call (arc_launch.cuh):
// on or off (sm_90+ only: kernels/pdl.py decides), for calls of at most max_rows token rows.
void arc_set_pdl(int64_t on, int64_t max_rows) {
  TORCH_CHECK(max_rows >= 0, "max_rows >= 0, got ", max_rows);
  arc::pdl_flag() = on != 0;
  arc::pdl_max_rows() = max_rows;
}
