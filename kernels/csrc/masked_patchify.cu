// masked_patchify: patchify + gather of the kept patches in one pass, and its adjoint.
//
//   fwd: out[b, k, (pi*p + qi)*C + c] = images[b, c, hi*p + pi, wi*p + qi],
//        l = ids_keep[b, k], hi = l / w, wi = l % w, w = W / p.
//   bwd: dimages[b] = kept patches of grad[b] put back in place, zeros elsewhere.
//
// Both are pure data movement (no arithmetic): the element type is copied bit for bit.
// Compiles standalone: nvcc -arch=sm_90 -std=c++17 -c masked_patchify.cu
#include "common.cuh"

namespace maws {
namespace {

using detail::from_float;

// One block per kept patch (row = b*K + k of the output).
// Reads go row-wise through the image (coalesced runs of p pixels), the (c, pi, qi) ->
// (pi, qi, c) transpose happens in shared memory, and the store of the P contiguous output
// elements is fully coalesced.
template <typename T>
__global__ void masked_patchify_fwd_kernel(const T* __restrict__ images,         // (B, C, H, W), strides s_*
                                           const int64_t* __restrict__ ids_keep,  // (B, K)
                                           T* __restrict__ out,                   // (B, K, P)
                                           int64_t K, int64_t L, int C, int p, int w, int64_t s_b,
                                           int64_t s_c, int64_t s_h, int64_t s_w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* patch = reinterpret_cast<T*>(smem_raw);  // (P,) in (pi, qi, c) order
  const int P = p * p * C;
  const int64_t row = blockIdx.x;  // int64: row * P overflows int32 for big batches
  const int64_t b = row / K;
  const int64_t l = ids_keep[row];
  T* dst = out + row * P;

  if (l < 0 || l >= L) {
    // A bad id must not read out of bounds; a NaN patch makes the bug visible downstream
    // (the loss turns NaN) without a device-side trap that would kill the CUDA context.
    const T nan = from_float<T>(__int_as_float(0x7fc00000));
    for (int j = threadIdx.x; j < P; j += blockDim.x) dst[j] = nan;
    return;  // uniform over the block: no thread is left waiting at a barrier
  }

  const int64_t hi = l / w;
  const int64_t wi = l % w;
  const T* src = images + b * s_b + hi * p * s_h + wi * p * s_w;
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int qi = i % p;  // fastest: neighbouring threads read neighbouring pixels of a row
    const int r = i / p;
    const int pi = r % p;
    const int c = r / p;
    patch[(pi * p + qi) * C + c] = src[c * s_c + pi * s_h + qi * s_w];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < P; j += blockDim.x) dst[j] = patch[j];
}

// One block per image patch (row = b*L + l), covering every pixel of dimages exactly once, so
// the output needs no memset beforehand. The block first finds which k (if any) kept patch l
// by scanning ids_keep[b, :] (K <= L int64s, cached in L1/L2 for all blocks of image b: cheaper
// than a separate inverse-index kernel and its workspace), then either copies grad[b, k]
// (coalesced read, transpose in shared memory, row-wise writes) or writes zeros.
template <typename T>
__global__ void masked_patchify_bwd_kernel(const T* __restrict__ grad,            // (B, K, P)
                                           const int64_t* __restrict__ ids_keep,  // (B, K)
                                           T* __restrict__ dimages,               // (B, C, H, W) contiguous
                                           int64_t K, int64_t L, int C, int64_t H, int64_t W, int p, int w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* patch = reinterpret_cast<T*>(smem_raw);  // (P,) in (pi, qi, c) order
  __shared__ int64_t k_src;
  const int P = p * p * C;
  const int64_t row = blockIdx.x;
  const int64_t b = row / L;
  const int64_t l = row % L;

  if (threadIdx.x == 0) k_src = -1;
  __syncthreads();
  const int64_t* ids = ids_keep + b * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (ids[k] == l) k_src = k;  // ids of a row are distinct: at most one writer
  }
  __syncthreads();

  const int64_t hi = l / w;
  const int64_t wi = l % w;
  T* dst = dimages + b * C * H * W + hi * p * W + wi * p;
  if (k_src < 0) {
    const T zero = from_float<T>(0.f);
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
      const int qi = i % p;
      const int r = i / p;
      const int pi = r % p;
      const int c = r / p;
      dst[c * H * W + pi * W + qi] = zero;
    }
    return;
  }

  const T* g = grad + (b * K + k_src) * P;
  for (int j = threadIdx.x; j < P; j += blockDim.x) patch[j] = g[j];
  __syncthreads();
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int qi = i % p;
    const int r = i / p;
    const int pi = r % p;
    const int c = r / p;
    dst[c * H * W + pi * W + qi] = patch[(pi * p + qi) * C + c];
  }
}

}  // namespace

cudaError_t launch_masked_patchify_fwd(const void* images, int dtype, int64_t B, int64_t C, int64_t H,
                                       int64_t W, int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w,
                                       const int64_t* ids_keep, int64_t K, int64_t p, void* out,
                                       cudaStream_t stream) {
  if (B < 0 || K < 0 || !detail::patch_args_ok(C, H, W, p)) return cudaErrorInvalidValue;
  if (B == 0 || K == 0) return cudaSuccess;
  const int64_t rows = B * K;
  if (!detail::grid_fits(rows)) return cudaErrorInvalidValue;
  const int64_t P = p * p * C;
  const int64_t L = (H / p) * (W / p);
  return detail::dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = detail::threads_for_patch(P);
    const size_t smem = static_cast<size_t>(P) * sizeof(T);
    masked_patchify_fwd_kernel<T><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        static_cast<const T*>(images), ids_keep, static_cast<T*>(out), K, L, static_cast<int>(C),
        static_cast<int>(p), static_cast<int>(W / p), s_b, s_c, s_h, s_w);
    return cudaGetLastError();
  });
}

cudaError_t launch_masked_patchify_bwd(const void* grad, int dtype, const int64_t* ids_keep, int64_t B,
                                       int64_t K, int64_t C, int64_t H, int64_t W, int64_t p, void* dimages,
                                       cudaStream_t stream) {
  if (B < 0 || K < 0 || !detail::patch_args_ok(C, H, W, p)) return cudaErrorInvalidValue;
  const int64_t L = (H / p) * (W / p);
  if (B == 0) return cudaSuccess;
  const int64_t rows = B * L;  // K == 0 still launches: every pixel must be written (zeros)
  if (!detail::grid_fits(rows)) return cudaErrorInvalidValue;
  const int64_t P = p * p * C;
  return detail::dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = detail::threads_for_patch(P);
    const size_t smem = static_cast<size_t>(P) * sizeof(T);
    masked_patchify_bwd_kernel<T><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        static_cast<const T*>(grad), ids_keep, static_cast<T*>(dimages), K, L, static_cast<int>(C), H, W,
        static_cast<int>(p), static_cast<int>(W / p));
    return cudaGetLastError();
  });
}

}  // namespace maws
