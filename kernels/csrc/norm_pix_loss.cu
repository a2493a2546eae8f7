// norm_pix_loss: the MAE reconstruction loss with the target patches read straight from the
// image (no patchified copy of the batch), forward per patch and backward in one pass.
//
//   t      = patch l of images[b] in (pi, qi, c) order, P = p*p*C values
//   t_hat  = (t - mean(t)) / sqrt(var_unbiased(t) + eps)   if norm_pix, else t
//   fwd:     loss[b, l]     = mask[b, l] * mean_j (pred[b, l, j] - t_hat[j])^2
//   bwd:     dpred[b, l, j] = gscale * mask[b, l] * 2 * (pred[b, l, j] - t_hat[j]) / P
//
// All math in fp32 with IEEE sqrt and division (no fast-math intrinsics), following the order of
// operations of the official formula. Reductions are deterministic (fixed order).
// Compiles standalone: nvcc -arch=sm_90 -std=c++17 -c norm_pix_loss.cu
#include "common.cuh"

namespace maws {
namespace {

using detail::block_sum;
using detail::from_float;
using detail::to_float;

// Stages target patch l of image b in shared memory (fp32) and returns, in every thread, the
// statistics that turn t into t_hat = (t - shift) / scale: (mean, std) with norm_pix, else (0, 1).
// Two passes over shared memory (mean, then squared deviations) rather than E[x^2] - E[x]^2,
// which cancels badly on patches with a large mean.
template <typename TI>
__device__ __forceinline__ float2 stage_target(float* __restrict__ target, float* __restrict__ red,
                                               const TI* __restrict__ images, int64_t b, int64_t l, int C, int p,
                                               int w, int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w,
                                               bool norm_pix, float eps) {
  const int P = p * p * C;
  const int64_t hi = l / w;
  const int64_t wi = l % w;
  detail::stage_patch_f32(target, images + b * s_b + hi * p * s_h + wi * p * s_w, C, p, s_c, s_h, s_w);
  __syncthreads();
  if (!norm_pix) return make_float2(0.f, 1.f);

  float s = 0.f;
  for (int j = threadIdx.x; j < P; j += blockDim.x) s += target[j];
  const float mean = block_sum(s, red) / static_cast<float>(P);
  float ss = 0.f;
  for (int j = threadIdx.x; j < P; j += blockDim.x) {
    const float d = target[j] - mean;
    ss += d * d;
  }
  // Unbiased, as torch.var's default in the official code; P == 1 gives 0/0 = NaN like torch.
  const float var = block_sum(ss, red) / static_cast<float>(P - 1);
  return make_float2(mean, sqrtf(var + eps));
}

// One block per patch (row = b*L + l). Rows with mask == 0 (the kept, visible patches, ~25% of
// all) return before reading anything.
template <typename TP, typename TI>
__global__ void norm_pix_loss_fwd_kernel(const TP* __restrict__ pred,     // (B, L, P)
                                         const TI* __restrict__ images,   // (B, C, H, W), strides s_*
                                         const float* __restrict__ mask,  // (B, L)
                                         float* __restrict__ loss,        // (B, L)
                                         int64_t L, int C, int p, int w, int64_t s_b, int64_t s_c, int64_t s_h,
                                         int64_t s_w, bool norm_pix, float eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* target = reinterpret_cast<float*>(smem_raw);  // (P,) fp32, (pi, qi, c) order
  __shared__ float red[32];
  const int P = p * p * C;
  const int64_t row = blockIdx.x;
  const float m = mask[row];
  if (m == 0.f) {
    if (threadIdx.x == 0) loss[row] = 0.f;
    return;  // uniform over the block
  }
  const float2 st = stage_target(target, red, images, row / L, row % L, C, p, w, s_b, s_c, s_h, s_w, norm_pix, eps);

  const TP* x = pred + row * P;
  float acc = 0.f;
  for (int j = threadIdx.x; j < P; j += blockDim.x) {
    const float d = to_float(x[j]) - (target[j] - st.x) / st.y;
    acc += d * d;
  }
  const float total = block_sum(acc, red);
  if (threadIdx.x == 0) loss[row] = (total / static_cast<float>(P)) * m;
}

// One block per patch; recomputes t_hat instead of saving it in the forward (P floats per
// patch of extra traffic both ways would cost more than re-reading the image patch).
template <typename TP, typename TI>
__global__ void norm_pix_loss_bwd_kernel(const float* __restrict__ gscale,  // (1,) or (B, L): d(out)/d(loss[b, l])
                                         const TP* __restrict__ pred,       // (B, L, P)
                                         const TI* __restrict__ images,     // (B, C, H, W), strides s_*
                                         const float* __restrict__ mask,    // (B, L)
                                         TP* __restrict__ dpred,            // (B, L, P)
                                         int64_t L, int C, int p, int w, int64_t s_b, int64_t s_c, int64_t s_h,
                                         int64_t s_w, bool norm_pix, float eps, int64_t g_stride) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* target = reinterpret_cast<float*>(smem_raw);  // (P,) fp32, (pi, qi, c) order
  __shared__ float red[32];
  const int P = p * p * C;
  const int64_t row = blockIdx.x;
  const float m = mask[row];
  TP* dx = dpred + row * P;
  if (m == 0.f) {
    const TP zero = from_float<TP>(0.f);
    for (int j = threadIdx.x; j < P; j += blockDim.x) dx[j] = zero;
    return;
  }
  const float2 st = stage_target(target, red, images, row / L, row % L, C, p, w, s_b, s_c, s_h, s_w, norm_pix, eps);

  // Same association as autograd: (gscale * mask) / P from mean's backward, then * (2 * diff)
  // from pow's backward.
  const float coef = (gscale[row * g_stride] * m) / static_cast<float>(P);
  const TP* x = pred + row * P;
  for (int j = threadIdx.x; j < P; j += blockDim.x) {
    const float d = to_float(x[j]) - (target[j] - st.x) / st.y;
    dx[j] = from_float<TP>(coef * (2.f * d));
  }
}

// Dispatches both element types (pred's and the image's) and launches `kernel_for<TP, TI>`.
template <typename Launch>
cudaError_t dispatch_pred_image(int pred_dtype, int img_dtype, Launch&& launch) {
  return detail::dispatch_float(pred_dtype, [&](auto ptag) {
    return detail::dispatch_float(img_dtype, [&](auto itag) { return launch(ptag, itag); });
  });
}

}  // namespace

cudaError_t launch_norm_pix_loss_fwd(const void* pred, int pred_dtype, const void* images, int img_dtype,
                                     int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w, const float* mask,
                                     int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, bool norm_pix,
                                     float eps, float* loss, cudaStream_t stream) {
  if (B < 0 || !detail::patch_args_ok(C, H, W, p)) return cudaErrorInvalidValue;
  const int64_t L = (H / p) * (W / p);
  if (B == 0) return cudaSuccess;
  const int64_t rows = B * L;
  if (!detail::grid_fits(rows)) return cudaErrorInvalidValue;
  const int64_t P = p * p * C;
  const int threads = detail::threads_for_patch(P);
  const size_t smem = static_cast<size_t>(P) * sizeof(float);
  return dispatch_pred_image(pred_dtype, img_dtype, [&](auto ptag, auto itag) {
    using TP = typename decltype(ptag)::type;
    using TI = typename decltype(itag)::type;
    norm_pix_loss_fwd_kernel<TP, TI><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        static_cast<const TP*>(pred), static_cast<const TI*>(images), mask, loss, L, static_cast<int>(C),
        static_cast<int>(p), static_cast<int>(W / p), s_b, s_c, s_h, s_w, norm_pix, eps);
    return cudaGetLastError();
  });
}

cudaError_t launch_norm_pix_loss_bwd(const float* gscale, const void* pred, int pred_dtype, const void* images,
                                     int img_dtype, int64_t s_b, int64_t s_c, int64_t s_h, int64_t s_w,
                                     const float* mask, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                                     bool norm_pix, float eps, int64_t g_stride, void* dpred, cudaStream_t stream) {
  if (B < 0 || !detail::patch_args_ok(C, H, W, p)) return cudaErrorInvalidValue;
  const int64_t L = (H / p) * (W / p);
  if (B == 0) return cudaSuccess;
  const int64_t rows = B * L;
  if (!detail::grid_fits(rows)) return cudaErrorInvalidValue;
  const int64_t P = p * p * C;
  const int threads = detail::threads_for_patch(P);
  const size_t smem = static_cast<size_t>(P) * sizeof(float);
  return dispatch_pred_image(pred_dtype, img_dtype, [&](auto ptag, auto itag) {
    using TP = typename decltype(ptag)::type;
    using TI = typename decltype(itag)::type;
    norm_pix_loss_bwd_kernel<TP, TI><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        gscale, static_cast<const TP*>(pred), static_cast<const TI*>(images), mask, static_cast<TP*>(dpred), L,
        static_cast<int>(C), static_cast<int>(p), static_cast<int>(W / p), s_b, s_c, s_h, s_w, norm_pix, eps, g_stride);
    return cudaGetLastError();
  });
}

}  // namespace maws
