// The prefill GEMM's helpers (kernels/prefill.py).
// 1. Weight dequantization: packed NVFP4 codes and E4M3 block scales -> the augmented weight in
// bf16 / fp16, code * block scale (exact: at most 6 significant bits, within [2^-10, 2688]),
// the tail columns K..K+s-1 repeating K-s..K-1.
//
//   codes (R, K/2) uint8, element 2i in the low nibble; scales (R, K/16) E4M3 bits
//   out   (R, K+s) bf16 / fp16
// One thread per augmented 16-block: one 8-byte code load, one scale byte, two 16-byte stores.
// Decode (as decode8 in arc_gemv.cu, emulated by cuda_gemv.mma_decode_reference): the E2M1 code
// s e1 e0 m placed as an fp16's bit 15 and bits 11..9 is the code's value x 2^-14 (e = 0: a
// subnormal); nibbles j and j + 4 of a word sit at the same offsets of its two halves, so two shifts
// and one LOP3 place both. Widened to fp32 (exact) and multiplied by block scale x 2^14 (exact: at
// most 6 significant bits), then packed to bf16 / fp16 (exact). ~4 instructions a value, against ~10
// for the branchy per-value decode before (v10), and 32-bit index arithmetic instead of a 64-bit
// division: 8.3 -> 6.3 ms of a 2048-token Llama-3.1-8B prefill's dequantization on an H200
// (scripts/ab_dequant.py, results/ab-dequant-h200.json: mode 1 there). The bound is the write:
// a plain fill of the same bf16 output runs at ~3.1 TB/s there, ~13 % faster than this kernel.
// Why CUDA: the Triton kernel (prefill._dequant_kernel) loads one byte per element and ran at
// ~1 TB/s in the Llama-3.1-8B prefill profile (18 of 120 ms).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <type_traits>

namespace {

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {   // both exact in T
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ float scale_value(uint8_t bits) {      // E4M3 bits -> value (exact)
  return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)bits, __NV_E4M3)));
}

// 8 codes of one word (code i in nibble i) times sc14 = block scale x 2^14 -> 4 packed pairs.
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
__global__ void arc_dequant_kernel(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                                   T* __restrict__ out, unsigned total, int K, int S) {
  const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned nb = (K + S) / 16, kb = K / 16;
  if (idx >= total) return;
  const unsigned r = idx / nb, b = idx - r * nb, src = b < kb ? b : b - S / 16;   // tail blocks: main block src
  const uint2 c = *reinterpret_cast<const uint2*>(codes + (size_t)r * (K / 2) + 8 * src);
  const float sc14 = scale_value(scales[(size_t)r * kb + src]) * 16384.f;
  uint4* o = reinterpret_cast<uint4*>(out + (size_t)r * (K + S) + 16 * b);
  o[0] = decode_word<T>(c.x, sc14);
  o[1] = decode_word<T>(c.y, sc14);
}

// 2. The epilogue after cuBLAS: y (M, N) 16-bit in place, y = T(T(y * inv) + bias[n]) with
// inv = 1 / (xgs[m] * wgs[n]) in fp32 - the same roundings as torch's
// y.mul_(1.0 / (xgs[:, None] * wgs[None, :])).add_(bias) (fp32 product, IEEE division, RNE to T after
// the multiply and after the add). xgs: 1 or M values (the activation tensor scales), wgs: 1 or N
// (the weight's; N for a stacked q/k/v group, one per output column), so the caller launches no
// kernels to form the factors. One division per thread where its 8 columns share wgs (always for
// one layer; within a stacked group except at a member's edge). 8 elements per thread with 16-byte
// loads and stores (torch's broadcasting mixed-dtype kernel moved ~0.45 TB/s in the Llama-3.1-8B
// prefill profile: 12 of 110 ms).
template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
  else return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

template <typename T>
__global__ void arc_scale_rows_kernel(T* __restrict__ y, const float* __restrict__ xgs, int xgs_per_row,
                                      const float* __restrict__ wgs, int wgs_per_col,
                                      const T* __restrict__ bias, unsigned total8, unsigned n8) {
  const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;    // 32-bit: no 64-bit division a thread
  if (idx >= total8) return;
  const unsigned r = idx / n8, c8 = idx - r * n8;
  const float xg = xgs[xgs_per_row ? r : 0];
  float w[8], sc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = wgs[wgs_per_col ? 8 * c8 + j : 0];
  sc[0] = __fdiv_rn(1.f, __fmul_rn(xg, w[0]));
#pragma unroll
  for (int j = 1; j < 8; ++j) sc[j] = w[j] == w[j - 1] ? sc[j - 1] : __fdiv_rn(1.f, __fmul_rn(xg, w[j]));
  uint4 v = reinterpret_cast<uint4*>(y)[idx];
  T* h = reinterpret_cast<T*>(&v);
  uint4 bv = make_uint4(0, 0, 0, 0);
  if (bias != nullptr) bv = reinterpret_cast<const uint4*>(bias)[c8];
  const T* bh = reinterpret_cast<const T*>(&bv);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    T t = from_f<T>(__fmul_rn(to_f(h[j]), sc[j]));
    if (bias != nullptr) t = from_f<T>(__fadd_rn(to_f(t), to_f(bh[j])));
    h[j] = t;
  }
  reinterpret_cast<uint4*>(y)[idx] = v;
}

}  // namespace

void arc_scale_rows(torch::Tensor y, torch::Tensor xgs, torch::Tensor wgs, c10::optional<torch::Tensor> bias) {
  const at::cuda::CUDAGuard guard(y.device());
  const int64_t m = y.size(0), n = y.size(1);
  TORCH_CHECK(y.is_cuda() && xgs.is_cuda() && wgs.is_cuda() && y.is_contiguous() && xgs.is_contiguous() &&
              wgs.is_contiguous(), "contiguous CUDA tensors expected");
  TORCH_CHECK(xgs.scalar_type() == at::kFloat && (xgs.numel() == 1 || xgs.numel() == m), "xgs: float32, 1 or M values");
  TORCH_CHECK(wgs.scalar_type() == at::kFloat && (wgs.numel() == 1 || wgs.numel() == n), "wgs: float32, 1 or N values");
  TORCH_CHECK(n % 8 == 0 && reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0, "N % 8 == 0 and a 16-byte aligned y");
  const void* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == y.scalar_type() &&
                reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0, "bias: contiguous (N,) of y's dtype, aligned");
    b = bias->data_ptr();
  }
  const long long total8 = m * (n / 8);
  TORCH_CHECK(total8 < (1LL << 32), "at most 2^32 - 1 groups of 8 values (M x N / 8) a call, got ", total8);
  if (total8 == 0) return;
  const unsigned blocks = (unsigned)((total8 + 255) / 256);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int per_row = xgs.numel() > 1 ? 1 : 0, per_col = wgs.numel() > 1 ? 1 : 0;
  if (y.scalar_type() == at::kBFloat16)
    arc_scale_rows_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(y.data_ptr()),
        xgs.data_ptr<float>(), per_row, wgs.data_ptr<float>(), per_col, reinterpret_cast<const __nv_bfloat16*>(b),
        (unsigned)total8, (unsigned)(n / 8));
  else if (y.scalar_type() == at::kHalf)
    arc_scale_rows_kernel<__half><<<blocks, 256, 0, stream>>>(reinterpret_cast<__half*>(y.data_ptr()),
        xgs.data_ptr<float>(), per_row, wgs.data_ptr<float>(), per_col, reinterpret_cast<const __half*>(b),
        (unsigned)total8, (unsigned)(n / 8));
  else
    TORCH_CHECK(false, "y: bfloat16 or float16");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shapes and dtypes are checked in arcquant/kernels/prefill.py; these checks guard memory.
void arc_dequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor out, int64_t s) {
  const at::cuda::CUDAGuard guard(codes.device());
  const int64_t r = codes.size(0), k = codes.size(1) * 2;
  TORCH_CHECK(codes.is_cuda() && scales.is_cuda() && out.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "codes / scales: uint8");
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && out.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(k % 16 == 0 && s % 16 == 0 && s >= 0 && s <= k && scales.size(0) == r && scales.size(1) == k / 16 &&
              out.size(0) == r && out.size(1) == k + s, "shape mismatch");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 8 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
              "codes must start on an 8-byte and out on a 16-byte boundary");
  const long long total = r * ((k + s) / 16);
  TORCH_CHECK(total < (1LL << 32), "at most 2^32 - 1 16-blocks (R x (K+s) / 16) a call, got ", total);
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = (unsigned)((total + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (out.scalar_type() == at::kBFloat16)
    arc_dequant_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), (unsigned)total, (int)k, (int)s);
  else if (out.scalar_type() == at::kHalf)
    arc_dequant_kernel<__half><<<blocks, threads, 0, stream>>>(codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
        reinterpret_cast<__half*>(out.data_ptr()), (unsigned)total, (int)k, (int)s);
  else
    TORCH_CHECK(false, "out: bfloat16 or float16");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
