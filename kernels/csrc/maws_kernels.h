// maws_kernels CUDA C++ twins: plain C++ launchers over templated kernels.
//
// This header is the only thing bindings.cpp and the .cu files share. It needs nothing but the
// CUDA runtime, so every .cu file compiles standalone (`nvcc -arch=sm_90 -std=c++17 -c x.cu`)
// without torch headers; torch lives in bindings.cpp alone.
//
// Conventions for every launcher:
//   * element pointers are `const void*` / `void*` plus a dtype code (MawsDtype) that picks the
//     template instantiation;
//   * sizes and strides are int64_t, strides in ELEMENTS (not bytes), as torch reports them;
//   * it launches on `stream`, returns the error of the launch (cudaGetLastError) or
//     cudaErrorInvalidValue for arguments it cannot handle, and never synchronises;
//   * an empty problem (a zero size) launches nothing and returns cudaSuccess.
// Patch layout (official MAE): patch l of an image with a w = W/p patch grid covers rows
// (l / w)*p .. +p and columns (l % w)*p .. +p; it is flattened in (row pi, col qi, channel c)
// order, channel last: element j = (pi*p + qi)*C + c, P = p*p*C elements per patch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace maws {

// Element types the kernels are instantiated for.
enum MawsDtype : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// The kernels stage one patch (P elements as fp32) in shared memory without raising the
// 48 KB dynamic shared-memory default: P = p*p*C may be at most this (p = 64 with C = 3).
constexpr int64_t kMaxPatchElems = 12288;

// out[b, k, j] = patch ids_keep[b, k] of images[b], j in (pi, qi, c) order.
//   images:   (B, C, H, W) any strides (s_b, s_c, s_h, s_w), dtype `dtype`
//   ids_keep: (B, K) int64, contiguous; an id outside [0, L) yields a NaN patch (no OOB read)
//   out:      (B, K, P) contiguous, dtype `dtype`
cudaError_t launch_masked_patchify_fwd(const void* images, int dtype, int64_t B, int64_t C, int64_t H,
                                       int64_t W, int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w,
                                       const int64_t* ids_keep, int64_t K, int64_t p, void* out,
                                       cudaStream_t stream);

// dimages = the adjoint of masked_patchify_fwd: kept patches receive grad[b, k], all other
// pixels 0. Every pixel is written exactly once (no memset needed, no atomics), which requires
// the ids of one row of ids_keep to be distinct.
//   grad:     (B, K, P) contiguous, dtype `dtype`
//   ids_keep: (B, K) int64, contiguous
//   dimages:  (B, C, H, W) contiguous, dtype `dtype`
cudaError_t launch_masked_patchify_bwd(const void* grad, int dtype, const int64_t* ids_keep, int64_t B,
                                       int64_t K, int64_t C, int64_t H, int64_t W, int64_t p, void* dimages,
                                       cudaStream_t stream);

// loss[b, l] = mask[b, l] * mean_j (pred[b, l, j] - t[b, l, j])^2, t = patch l of images[b],
// normalised per patch by (t - mean) / sqrt(var_unbiased + eps) when norm_pix. fp32 math.
// Rows with mask == 0 skip all reads and write 0.
//   pred:   (B, L, P) contiguous, dtype `pred_dtype`
//   images: (B, C, H, W) any strides, dtype `img_dtype`
//   mask:   (B, L) fp32 contiguous
//   loss:   (B, L) fp32 contiguous
cudaError_t launch_norm_pix_loss_fwd(const void* pred, int pred_dtype, const void* images, int img_dtype,
                                     int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w, const float* mask,
                                     int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, bool norm_pix,
                                     float eps, float* loss, cudaStream_t stream);

// dpred[b, l, j] = gscale[b, l] * mask[b, l] * 2 * (pred[b, l, j] - t[b, l, j]) / P, in one pass
// (t recomputed from the image). `gscale` is a device pointer to the upstream gradient of each
// loss[b, l]: B*L fp32 values (g_stride = 1), or one value for every row (g_stride = 0). It is read
// on the device, so the caller needs no host sync.
//   dpred: (B, L, P) contiguous, dtype `pred_dtype`; other arguments as in the forward.
cudaError_t launch_norm_pix_loss_bwd(const float* gscale, const void* pred, int pred_dtype, const void* images,
                                     int img_dtype, int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w,
                                     const float* mask, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                                     bool norm_pix, float eps, int64_t g_stride, void* dpred, cudaStream_t stream);

}  // namespace maws
