// Kernel launches with programmatic dependent launch (PDL, sm_90+), shared by the decode kernels.
//
// A decode step is ~15 kernels a layer, most of them a few microseconds long, so each kernel's
// launch and its CTAs' start are a large share of the step. With PDL
// (cudaLaunchAttributeProgrammaticStreamSerialization) a kernel's CTAs may be placed while the
// kernel before it in the stream still runs, and wait in arc::pdl_wait() - which returns once
// every earlier kernel has finished and its writes are visible. Every kernel launched through
// arc::launch begins with arc::pdl_enter(): the trigger that lets the next kernel be placed as soon
// as all of this one's CTAs are, then the wait, before any read or write of global memory. (Not
// even weights are read before the wait: a caller may have written them just before - a read there
// raced with a freshly computed permutation on the GPU, v39.) Without the attribute (pdl_flag()
// off, or a GPU before sm_90) both instructions are no-ops and the launch is the plain one; the
// arithmetic, and so every bit of the outputs, is the same.
#ifndef ARC_LAUNCH_CUH
#define ARC_LAUNCH_CUH
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <utility>

namespace arc {

inline bool& pdl_flag() {                                         // set from Python (kernels/pdl.py)
  static bool on = false;
  return on;
}

inline int64_t& pdl_max_rows() {                                  // calls of more token rows: no PDL
  static int64_t rows = 0;
  return rows;
}

__device__ __forceinline__ void pdl_wait() {                     // earlier kernels done, writes visible
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {                  // the next kernel may be placed
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_enter() {                    // first statement of a PDL kernel
  pdl_trigger();
  pdl_wait();
}

// kernel<<<grid, block, smem, stream>>>(args...) for a call of `rows` token rows, with the PDL
// attribute when pdl_flag() is on and rows <= pdl_max_rows().
template <typename... P, typename... A>
void launch(void (*kernel)(P...), int64_t rows, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_flag() && rows <= pdl_max_rows() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

}  // namespace arc

#endif  // ARC_LAUNCH_CUH
