// Weight dequantization variants for scripts/ab_dequant.py (an A/B on the card; not part of the
// package). Same contract as csrc/arc_dequant.cu's arc_dequant:
//   codes (R, K/2) uint8, element 2i in the low nibble; scales (R, K/16) E4M3 bits
//   out   (R, K+s) bf16 / fp16 = code * block scale; tail columns K..K+s-1 repeat K-s..K-1.
// mode 0: the v10 kernel (one thread per 16-block, 64-bit index division, branchy E2M1 decode).
// mode 1: mode 0's layout, 32-bit index, the fp16-placement decode below.
// mode 2: one 16-block a lane, persistent grid-stride loop, U blocks' loads issued before any store.
// mode 3: one half block (8 values, one 16-byte store) a lane - a warp stores 512 contiguous bytes -
//         persistent grid-stride loop, U half blocks' loads first.
// The fp16-placement decode (as in arc_gemv.cu's decode8): E2M1 code s e1 e0 m written into an
// fp16's bit 15 and bits 11..9 is the fp16 E2M1 x 2^-14 (e = 0: a subnormal). Nibbles j and j + 4 of
// a 32-bit word sit at the same offsets of its two halves, so one shift left, one shift right and one
// LOP3 place both. Widened to fp32 (exact) and multiplied by scale x 2^14 (exact: <= 6 significant
// bits), then packed to bf16 / fp16 (exact: the value is representable).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <type_traits>

namespace {

__device__ __forceinline__ float e2m1_value(uint32_t c) {
  const uint32_t m = c & 7u;
  const float v = m < 4 ? 0.5f * m : m < 6 ? float(m - 2) : m == 6 ? 4.f : 6.f;
  return (c & 8u) ? -v : v;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ float scale_value(uint8_t bits) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)bits, __NV_E4M3)));
}

// 8 codes of one 32-bit word (element i in nibble i) times sc14 = scale x 2^14 -> 4 packed pairs.
template <typename T>
__device__ __forceinline__ uint4 decode_word(uint32_t w, float sc14) {
  float f[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t t = w << (12 - 4 * j);                       // nibble j -> bits 15..12, j + 4 -> 31..28
    const uint32_t h = (t & 0x80008000u) | ((t >> 3) & 0x0E000E00u);
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&h));
    f[j] = v.x * sc14;
    f[j + 4] = v.y * sc14;
  }
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

template <typename T>
__global__ void dequant_v0(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                           T* __restrict__ out, long long total, int K, int S) {
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const int nb = (K + S) / 16, kb = K / 16;
  if (idx >= total) return;
  const long long r = idx / nb;
  const int b = (int)(idx - r * nb), src = b < kb ? b : b - S / 16;
  const uint2 c = *reinterpret_cast<const uint2*>(codes + r * (K / 2) + 8 * src);
  const float s = scale_value(scales[r * kb + src]);
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xFFu;
    w[j] = pack2<T>(e2m1_value(byte & 0xFu) * s, e2m1_value(byte >> 4) * s);
  }
  uint4* o = reinterpret_cast<uint4*>(out + r * (long long)(K + S) + 16 * b);
  o[0] = make_uint4(w[0], w[1], w[2], w[3]);
  o[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

template <typename T>
__global__ void dequant_v1(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                           T* __restrict__ out, unsigned total, int K, int S) {
  const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned nb = (K + S) / 16, kb = K / 16;
  if (idx >= total) return;
  const unsigned r = idx / nb, b = idx - r * nb, src = b < kb ? b : b - S / 16;
  const uint2 c = *reinterpret_cast<const uint2*>(codes + (size_t)r * (K / 2) + 8 * src);
  const float s14 = scale_value(scales[(size_t)r * kb + src]) * 16384.f;
  uint4* o = reinterpret_cast<uint4*>(out + (size_t)r * (K + S) + 16 * b);
  o[0] = decode_word<T>(c.x, s14);
  o[1] = decode_word<T>(c.y, s14);
}

// Position (r, unit) advanced by a fixed stride without division: stride = q units-per-row-rows + rem.
struct Walker {
  unsigned r, u;
  __device__ __forceinline__ void step(unsigned q, unsigned rem, unsigned per_row) {
    r += q;
    u += rem;
    if (u >= per_row) { u -= per_row; ++r; }
  }
};

template <typename T, int U>
__global__ void dequant_v2(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                           T* __restrict__ out, unsigned rows, int K, int S, unsigned q, unsigned rem) {
  const unsigned nb = (K + S) / 16, kb = K / 16;
  const unsigned start = blockIdx.x * blockDim.x + threadIdx.x;
  Walker p{start / nb, start % nb};
  while (p.r < rows) {
    uint2 c[U];
    float s14[U];
    Walker at[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      at[i] = p;
      if (p.r < rows) {
        const unsigned src = p.u < kb ? p.u : p.u - S / 16;
        c[i] = *reinterpret_cast<const uint2*>(codes + (size_t)p.r * (K / 2) + 8 * src);
        s14[i] = scale_value(scales[(size_t)p.r * kb + src]) * 16384.f;
      }
      p.step(q, rem, nb);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (at[i].r < rows) {
        uint4* o = reinterpret_cast<uint4*>(out + (size_t)at[i].r * (K + S) + 16 * at[i].u);
        o[0] = decode_word<T>(c[i].x, s14[i]);
        o[1] = decode_word<T>(c[i].y, s14[i]);
      }
    }
  }
}

template <typename T, int U>
__global__ void dequant_v3(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                           T* __restrict__ out, unsigned rows, int K, int S, unsigned q, unsigned rem) {
  const unsigned nh = (K + S) / 8, kb = K / 16;                 // half blocks a row
  const unsigned start = blockIdx.x * blockDim.x + threadIdx.x;
  Walker p{start / nh, start % nh};
  const uint32_t* c32 = reinterpret_cast<const uint32_t*>(codes);
  while (p.r < rows) {
    uint32_t c[U];
    float s14[U];
    Walker at[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      at[i] = p;
      if (p.r < rows) {
        const unsigned b = p.u >> 1, src = b < kb ? b : b - S / 16;
        c[i] = c32[(size_t)p.r * (K / 8) + 2 * src + (p.u & 1)];
        s14[i] = scale_value(scales[(size_t)p.r * kb + src]) * 16384.f;
      }
      p.step(q, rem, nh);
    }
#pragma unroll
    for (int i = 0; i < U; ++i)
      if (at[i].r < rows)
        *reinterpret_cast<uint4*>(out + (size_t)at[i].r * (K + S) + 8 * at[i].u) = decode_word<T>(c[i], s14[i]);
  }
}

template <typename T>
void launch(int mode, int unroll, int ctas_per_sm, const uint8_t* c, const uint8_t* s, T* o, int64_t r, int k, int sa,
            cudaStream_t stream) {
  const int threads = 256;
  if (mode <= 1) {
    const long long total = r * ((k + sa) / 16);
    const unsigned blocks = (unsigned)((total + threads - 1) / threads);
    if (mode == 0) dequant_v0<T><<<blocks, threads, 0, stream>>>(c, s, o, total, k, sa);
    else dequant_v1<T><<<blocks, threads, 0, stream>>>(c, s, o, (unsigned)total, k, sa);
    return;
  }
  const unsigned per_row = mode == 2 ? (k + sa) / 16 : (k + sa) / 8;
  const long long units = r * (long long)per_row;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long blocks = (units + threads - 1) / threads;
  if (ctas_per_sm > 0 && blocks > (long long)sms * ctas_per_sm) blocks = (long long)sms * ctas_per_sm;
  const unsigned stride = (unsigned)(blocks * threads), q = stride / per_row, rem = stride % per_row;
#define ARC_LAUNCH(KERNEL, UU) KERNEL<T, UU><<<(unsigned)blocks, threads, 0, stream>>>(c, s, o, (unsigned)r, k, sa, q, rem)
  if (mode == 2) {
    if (unroll == 1) ARC_LAUNCH(dequant_v2, 1); else if (unroll == 2) ARC_LAUNCH(dequant_v2, 2); else ARC_LAUNCH(dequant_v2, 4);
  } else {
    if (unroll == 1) ARC_LAUNCH(dequant_v3, 1); else if (unroll == 2) ARC_LAUNCH(dequant_v3, 2); else ARC_LAUNCH(dequant_v3, 4);
  }
#undef ARC_LAUNCH
}

}  // namespace

void dequant_variant(torch::Tensor codes, torch::Tensor scales, torch::Tensor out, int64_t s, int64_t mode,
                     int64_t unroll, int64_t ctas_per_sm) {
  const at::cuda::CUDAGuard guard(codes.device());
  const int64_t r = codes.size(0), k = codes.size(1) * 2;
  TORCH_CHECK(codes.is_cuda() && scales.is_cuda() && out.is_cuda() && codes.is_contiguous() && scales.is_contiguous() &&
              out.is_contiguous(), "contiguous CUDA tensors expected");
  TORCH_CHECK(k % 16 == 0 && s % 16 == 0 && s >= 0 && s <= k && scales.size(1) == k / 16 && out.size(1) == k + s &&
              r * (k + s) < (1LL << 31), "shape mismatch");
  TORCH_CHECK(mode >= 0 && mode <= 3 && (unroll == 1 || unroll == 2 || unroll == 4), "mode 0..3, unroll 1/2/4");
  if (r == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (out.scalar_type() == at::kBFloat16)
    launch<__nv_bfloat16>((int)mode, (int)unroll, (int)ctas_per_sm, codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                          reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), r, (int)k, (int)s, stream);
  else
    launch<__half>((int)mode, (int)unroll, (int)ctas_per_sm, codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                   reinterpret_cast<__half*>(out.data_ptr()), r, (int)k, (int)s, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
