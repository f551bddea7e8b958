// Weight dequantization variants for scripts/ab_dequant.py (an A/B on the card; not part of the
// package). Same contract as csrc/arc_dequant.cu's arc_dequant:
//   codes (R, K/2) uint8, element 2i in the low nibble; scales (R, K/16) E4M3 bits
//   out   (R, K+s) bf16 / fp16 = code * block scale; tail columns K..K+s-1 repeat K-s..K-1.
// mode 0: the v10 kernel (one thread per 16-block, 64-bit index division, branchy E2M1 decode).
// mode 1: the package's kernel (arc_dequant_kernel, included from csrc/arc_dequant.cu): mode 0's layout,
//         32-bit index, the fp16-placement decode (decode_word there).
// mode 2: one 16-block a lane, persistent grid-stride loop, U blocks' loads issued before any store.
// mode 3: one half block (8 values, one 16-byte store) a lane - a warp stores 512 contiguous bytes -
//         persistent grid-stride loop, U half blocks' loads first.
// Every mode uses the package's scale_value and pack2, modes 2 and 3 its decode_word too (built with csrc/ on the include path).
#include "arc_dequant.cu"

namespace {

__device__ __forceinline__ float e2m1_value(uint32_t c) {
  const uint32_t m = c & 7u;
  const float v = m < 4 ? 0.5f * m : m < 6 ? float(m - 2) : m == 6 ? 4.f : 6.f;
  return (c & 8u) ? -v : v;
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

// Position (r, unit) advanced by a fixed stride without division: stride = q units-per-row-rows + rem.
struct Walker {
  unsigned r, u;
  __device__ __forceinline__ void step(unsigned q, unsigned rem, unsigned per_row) {
    r += q;
    u += rem;
    if (u >= per_row) { u -= per_row; ++r; }
  }
};

// HALF false: one 16-block a lane (one 8-byte code load, two 16-byte stores); true: one half block
// a lane (one 4-byte code load, one 16-byte store). U units' loads are issued before any store.
template <typename T, int U, bool HALF>
__global__ void dequant_persistent(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                                   T* __restrict__ out, unsigned rows, int K, int S, unsigned q, unsigned rem) {
  const unsigned per_row = (K + S) / (HALF ? 8 : 16), kb = K / 16;
  const unsigned start = blockIdx.x * blockDim.x + threadIdx.x;
  Walker p{start / per_row, start % per_row};
  while (p.r < rows) {
    uint2 c[U];
    float s14[U];
    Walker at[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      at[i] = p;
      if (p.r < rows) {
        const unsigned b = HALF ? p.u >> 1 : p.u, src = b < kb ? b : b - S / 16;
        if (HALF) c[i].x = reinterpret_cast<const uint32_t*>(codes)[(size_t)p.r * (K / 8) + 2 * src + (p.u & 1)];
        else c[i] = *reinterpret_cast<const uint2*>(codes + (size_t)p.r * (K / 2) + 8 * src);
        s14[i] = scale_value(scales[(size_t)p.r * kb + src]) * 16384.f;
      }
      p.step(q, rem, per_row);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (at[i].r >= rows) continue;
      if (HALF) {
        *reinterpret_cast<uint4*>(out + (size_t)at[i].r * (K + S) + 8 * at[i].u) = decode_word<T>(c[i].x, s14[i]);
      } else {
        uint4* o = reinterpret_cast<uint4*>(out + (size_t)at[i].r * (K + S) + 16 * at[i].u);
        o[0] = decode_word<T>(c[i].x, s14[i]);
        o[1] = decode_word<T>(c[i].y, s14[i]);
      }
    }
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
    else arc_dequant_kernel<T><<<blocks, threads, 0, stream>>>(c, s, o, (unsigned)total, k, sa);
    return;
  }
  const unsigned per_row = mode == 2 ? (k + sa) / 16 : (k + sa) / 8;
  const long long units = r * (long long)per_row;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long blocks = (units + threads - 1) / threads;
  if (ctas_per_sm > 0 && blocks > (long long)sms * ctas_per_sm) blocks = (long long)sms * ctas_per_sm;
  const unsigned stride = (unsigned)(blocks * threads), q = stride / per_row, rem = stride % per_row;
#define ARC_LAUNCH(UU, HALF) dequant_persistent<T, UU, HALF><<<(unsigned)blocks, threads, 0, stream>>>( \
      c, s, o, (unsigned)r, k, sa, q, rem)
  if (mode == 2) {
    if (unroll == 1) ARC_LAUNCH(1, false); else if (unroll == 2) ARC_LAUNCH(2, false); else ARC_LAUNCH(4, false);
  } else {
    if (unroll == 1) ARC_LAUNCH(1, true); else if (unroll == 2) ARC_LAUNCH(2, true); else ARC_LAUNCH(4, true);
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
