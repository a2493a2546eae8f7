// maws_kernels._C: torch bindings of the CUDA C++ twins.
//
// The only file that sees torch. Each function checks its inputs (device, dtype, shape, patch
// size; ValueError on a bad one), allocates the output, picks the tensor's device and its
// current stream, calls the plain launcher from maws_kernels.h and turns a launch error into a
// RuntimeError. Nothing here synchronises with the host.
//
// Layout contract: `images` may have any strides (NCHW, channels_last, a slice of a bigger
// batch): the kernels index it through its strides. Every other input (pred, grad, ids_keep,
// mask) is used contiguous -- `.contiguous()` here, a no-op when it already is, a copy otherwise.
// Outputs are contiguous.
//
// Narrow includes instead of <torch/extension.h> (the whole C++ frontend): a third of the
// compile time, and all this file needs is Tensor, empty, the CUDA guard/stream and pybind11.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "maws_kernels.h"

namespace {

int dtype_code(const at::Tensor& t, const char* fn, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return maws::kFloat32;
    case at::kHalf:
      return maws::kFloat16;
    case at::kBFloat16:
      return maws::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, fn, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

// `t` must be a CUDA tensor on the same device as `ref` (the op's main input).
void check_device(const at::Tensor& t, const at::Tensor& ref, const char* fn, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(), " but the other inputs are on ",
                    ref.device());
}

// images (B, C, H, W) on CUDA, a float dtype, patch p dividing H and W, a patch small enough.
void check_images(const at::Tensor& images, int64_t p, const char* fn) {
  TORCH_CHECK_VALUE(images.is_cuda(), fn, ": images must be a CUDA tensor, got device ", images.device());
  TORCH_CHECK_VALUE(images.dim() == 4, fn, ": images must be (B, C, H, W), got shape ", images.sizes());
  TORCH_CHECK_VALUE(p > 0, fn, ": patch size must be positive, got ", p);
  const int64_t C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, fn, ": image size ", H, "x", W, " is not divisible by patch size ", p);
  TORCH_CHECK_VALUE(p * p * C <= maws::kMaxPatchElems, fn, ": a patch of ", p, "x", p, "x", C, " = ", p * p * C,
                    " values exceeds the kernels' limit of ", maws::kMaxPatchElems);
}

void check_ids(const at::Tensor& ids_keep, const at::Tensor& ref, int64_t B, const char* fn) {
  check_device(ids_keep, ref, fn, "ids_keep");
  TORCH_CHECK_VALUE(ids_keep.scalar_type() == at::kLong, fn, ": ids_keep must be int64, got ", ids_keep.scalar_type());
  TORCH_CHECK_VALUE(ids_keep.dim() == 2 && ids_keep.size(0) == B, fn, ": ids_keep must be (B, K) with B = ", B,
                    ", got shape ", ids_keep.sizes());
}

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor masked_patchify_fwd(const at::Tensor& images, const at::Tensor& ids_keep, int64_t p) {
  constexpr const char* fn = "maws_kernels._C.masked_patchify_fwd";
  check_images(images, p, fn);
  const int dtype = dtype_code(images, fn, "images");
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  check_ids(ids_keep, images, B, fn);
  const at::Tensor ids = ids_keep.contiguous();
  const int64_t K = ids.size(1);

  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = at::empty({B, K, p * p * C}, images.options());
  check_launch(maws::launch_masked_patchify_fwd(images.data_ptr(), dtype, B, C, H, W, images.stride(0),
                                                images.stride(1), images.stride(2), images.stride(3),
                                                ids.data_ptr<int64_t>(), K, p, out.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream()),
               fn);
  return out;
}

at::Tensor masked_patchify_bwd(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t p, int64_t C, int64_t H,
                               int64_t W) {
  constexpr const char* fn = "maws_kernels._C.masked_patchify_bwd";
  TORCH_CHECK_VALUE(grad.is_cuda(), fn, ": grad must be a CUDA tensor, got device ", grad.device());
  const int dtype = dtype_code(grad, fn, "grad");
  TORCH_CHECK_VALUE(p > 0 && C > 0 && H > 0 && W > 0, fn, ": p, C, H, W must be positive, got ", p, ", ", C, ", ",
                    H, ", ", W);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, fn, ": image size ", H, "x", W, " is not divisible by patch size ", p);
  TORCH_CHECK_VALUE(p * p * C <= maws::kMaxPatchElems, fn, ": a patch of ", p * p * C,
                    " values exceeds the kernels' limit of ", maws::kMaxPatchElems);
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(2) == p * p * C, fn, ": grad must be (B, K, ", p * p * C,
                    "), got shape ", grad.sizes());
  const int64_t B = grad.size(0);
  check_ids(ids_keep, grad, B, fn);
  TORCH_CHECK_VALUE(ids_keep.size(1) == grad.size(1), fn, ": ids_keep has K = ", ids_keep.size(1),
                    " but grad has K = ", grad.size(1));
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids = ids_keep.contiguous();

  const c10::cuda::CUDAGuard guard(grad.device());
  // empty, not zeros: the kernel writes every pixel, zeros included.
  at::Tensor dimages = at::empty({B, C, H, W}, grad.options());
  check_launch(maws::launch_masked_patchify_bwd(g.data_ptr(), dtype, ids.data_ptr<int64_t>(), B, g.size(1), C, H, W,
                                                p, dimages.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               fn);
  return dimages;
}

// Shared checks of the loss: pred (B, L, P) against images (B, C, H, W) and mask (B, L) fp32.
void check_loss_inputs(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask, int64_t p,
                       const char* fn) {
  check_images(images, p, fn);
  check_device(pred, images, fn, "pred");
  check_device(mask, images, fn, "mask");
  const int64_t B = images.size(0), C = images.size(1);
  const int64_t L = (images.size(2) / p) * (images.size(3) / p);
  TORCH_CHECK_VALUE(pred.dim() == 3 && pred.size(0) == B && pred.size(1) == L && pred.size(2) == p * p * C, fn,
                    ": pred must be (B, L, p*p*C) = (", B, ", ", L, ", ", p * p * C, "), got shape ", pred.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kFloat, fn, ": mask must be float32, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L, fn, ": mask must be (B, L) = (", B,
                    ", ", L, "), got shape ", mask.sizes());
}

at::Tensor norm_pix_loss_fwd(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask, int64_t p,
                             bool norm_pix, double eps) {
  constexpr const char* fn = "maws_kernels._C.norm_pix_loss_fwd";
  check_loss_inputs(pred, images, mask, p, fn);
  const int pred_dtype = dtype_code(pred, fn, "pred");
  const int img_dtype = dtype_code(images, fn, "images");
  const at::Tensor x = pred.contiguous();
  const at::Tensor m = mask.contiguous();

  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor loss = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  check_launch(maws::launch_norm_pix_loss_fwd(x.data_ptr(), pred_dtype, images.data_ptr(), img_dtype,
                                              images.stride(0), images.stride(1), images.stride(2), images.stride(3),
                                              m.data_ptr<float>(), images.size(0), images.size(1), images.size(2),
                                              images.size(3), p, norm_pix, static_cast<float>(eps),
                                              loss.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               fn);
  return loss;
}

at::Tensor norm_pix_loss_bwd(const at::Tensor& gscale, const at::Tensor& pred, const at::Tensor& images,
                             const at::Tensor& mask, int64_t p, bool norm_pix, double eps) {
  constexpr const char* fn = "maws_kernels._C.norm_pix_loss_bwd";
  check_loss_inputs(pred, images, mask, p, fn);
  check_device(gscale, images, fn, "gscale");
  TORCH_CHECK_VALUE(gscale.scalar_type() == at::kFloat && (gscale.numel() == 1 || gscale.numel() == mask.numel()), fn,
                    ": gscale must be a float32 tensor of one element or one per patch (", mask.numel(), "), got ",
                    gscale.scalar_type(), " of shape ", gscale.sizes());
  const at::Tensor gs = gscale.contiguous();
  const int64_t g_stride = gscale.numel() == 1 ? 0 : 1;
  const int pred_dtype = dtype_code(pred, fn, "pred");
  const int img_dtype = dtype_code(images, fn, "images");
  const at::Tensor x = pred.contiguous();
  const at::Tensor m = mask.contiguous();

  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor dpred = at::empty_like(x, at::MemoryFormat::Contiguous);
  check_launch(maws::launch_norm_pix_loss_bwd(gs.data_ptr<float>(), x.data_ptr(), pred_dtype, images.data_ptr(),
                                              img_dtype, images.stride(0), images.stride(1), images.stride(2),
                                              images.stride(3), m.data_ptr<float>(), images.size(0), images.size(1),
                                              images.size(2), images.size(3), p, norm_pix, static_cast<float>(eps),
                                              g_stride, dpred.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               fn);
  return dpred;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maws_kernels CUDA C++ twins (masked_patchify, norm_pix_loss); inputs must be CUDA tensors";
  m.def("masked_patchify_fwd", &masked_patchify_fwd, "(B,C,H,W), (B,K) int64, p -> (B,K,p*p*C) gathered patches",
        py::arg("images"), py::arg("ids_keep"), py::arg("p"));
  m.def("masked_patchify_bwd", &masked_patchify_bwd, "(B,K,P) grad -> (B,C,H,W), zeros outside the kept patches",
        py::arg("grad"), py::arg("ids_keep"), py::arg("p"), py::arg("C"), py::arg("H"), py::arg("W"));
  m.def("norm_pix_loss_fwd", &norm_pix_loss_fwd, "per-patch masked MSE (B,L) fp32 against normalised image patches",
        py::arg("pred"), py::arg("images"), py::arg("mask"), py::arg("p"), py::arg("norm_pix"), py::arg("eps"));
  m.def("norm_pix_loss_bwd", &norm_pix_loss_bwd, "dpred = gscale[row] * mask * 2 * (pred - target) / P; gscale has 1 or B*L elements",
        py::arg("gscale"), py::arg("pred"), py::arg("images"), py::arg("mask"), py::arg("p"), py::arg("norm_pix"),
        py::arg("eps"));
}
