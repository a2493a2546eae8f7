// Device helpers shared by the maws_kernels .cu files: element-type conversion, dtype dispatch,
// block size choice, patch staging and a deterministic block reduction.
//
// Everything converts through the explicit intrinsics (__half2float, __float2bfloat16_rn, ...)
// because torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and friends, which remove
// the implicit float <-> half / bfloat16 conversions; the files must compile both ways.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "maws_kernels.h"

namespace maws {
namespace detail {

// ---- element types -------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the element type named by `dtype`; unknown codes are an argument error.
template <typename F>
cudaError_t dispatch_float(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      return f(Tag<float>{});
    case kFloat16:
      return f(Tag<__half>{});
    case kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// ---- launch shape --------------------------------------------------------------------------

// One block per patch of P elements: about 4 elements per thread, a whole number of warps,
// 32..256 threads (P = 768 -> 192 threads, P = 588 -> 160). Small blocks keep many patches in
// flight per multiprocessor, which is what a latency-bound gather needs.
inline int threads_for_patch(int64_t P) {
  int64_t t = (P + 3) / 4;
  t = (t + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<int>(t);
}

// The grid is one-dimensional over rows (patches): it must fit gridDim.x.
inline bool grid_fits(int64_t rows) { return rows > 0 && rows <= 0x7fffffffLL; }

// Common argument checks of every launcher; true when the launch can go ahead.
inline bool patch_args_ok(int64_t C, int64_t H, int64_t W, int64_t p) {
  if (C <= 0 || H <= 0 || W <= 0 || p <= 0 || H % p != 0 || W % p != 0) return false;
  return p * p * C <= kMaxPatchElems;
}

// ---- patch staging -------------------------------------------------------------------------

// Copies one p x p x C image patch into shared memory as fp32 in (pi, qi, c) order.
// `src` points at the patch's top-left pixel of channel 0. The loop index runs (c, pi, qi) with
// qi fastest, so consecutive threads read consecutive pixels of one image row (p * elem bytes
// contiguous per row); the transpose to channel-last happens in shared memory. C is 1 or 3 in
// practice; a stride of 3 words in the shared-memory write has no bank conflicts.
template <typename T>
__device__ __forceinline__ void stage_patch_f32(float* __restrict__ dst, const T* __restrict__ src, int C, int p,
                                                int64_t s_c, int64_t s_h, int64_t s_w) {
  const int P = p * p * C;
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int qi = i % p;
    const int r = i / p;
    const int pi = r % p;
    const int c = r / p;
    dst[(pi * p + qi) * C + c] = to_float(src[c * s_c + pi * s_h + qi * s_w]);
  }
}

// ---- reductions ----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block, returned to EVERY thread. `red` is a __shared__ float[32].
// Deterministic: a fixed order of additions, and every warp reduces the per-warp partials in the
// same order, so all threads get the identical value without a second broadcast barrier.
// Must be reached by all threads of the block (it contains __syncthreads).
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // a previous call's readers of `red` are done
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace detail
}  // namespace maws
