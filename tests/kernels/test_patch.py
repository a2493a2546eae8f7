"""masked_patchify: Triton (interpreted on CPU) vs the torch reference, output and d(images)."""
import pytest
import torch

import maws_kernels as mk

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

# (B, C, H, W, p, K): B=1, patch 14 and 16, non-square grids, L not a power of two, ragged K
SHAPES = [(1, 3, 28, 28, 14, 1), (3, 3, 32, 48, 16, 4), (2, 1, 20, 12, 4, 7), (2, 3, 42, 14, 14, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(B, L, K):
    return torch.stack([torch.randperm(L)[:K] for _ in range(B)])  # unsorted, as MAE's ids_shuffle


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_patchify_matches_ref(seeded, shape, dtype):
    B, C, H, W, p, K = shape
    x = torch.randn(B, C, H, W).to(dtype).requires_grad_()
    ids = _ids(B, (H // p) * (W // p), K)
    out = mk.masked_patchify(x, ids, p, backend="triton")
    ref = mk.masked_patchify_ref(x, ids, p)
    assert out.dtype == dtype and out.shape == (B, K, p * p * C)
    assert torch.equal(out, ref)  # a pure copy: bit-exact in every dtype
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, gr)  # kept pixels get their gradient, every other pixel exactly 0


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_masked_patchify_strided_images(seeded, layout):
    x = torch.randn(2, 3, 32, 48)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, 3, 48, 32).transpose(2, 3)
    else:
        x = torch.randn(2, 5, 32, 50)[:, 1:4, :, 2:]
    ids = _ids(2, 6, 3)
    assert torch.equal(mk.masked_patchify(x, ids, 16, backend="triton"), mk.masked_patchify_ref(x, ids, 16))


def test_masked_patchify_equals_official_patchify_then_gather(seeded):
    """The fused op reads the same values the official code's patchify + gather keeps."""
    B, p, L = 2, 4, 16
    x = torch.randn(B, 3, 16, 16)
    noise = torch.rand(B, L)
    ids_keep = torch.argsort(noise, dim=1)[:, : L // 4]
    full = torch.einsum("nchpwq->nhwpqc", x.reshape(B, 3, 4, p, 4, p)).reshape(B, L, p * p * 3)
    expect = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, p * p * 3))
    assert torch.equal(mk.masked_patchify(x, ids_keep, p, backend="triton"), expect)


def test_out_of_range_ids_read_nothing(seeded):
    """Ids are not checked on the device (a host sync): a bad one gives a NaN patch in the forward
    (as the CUDA twin) and no gradient in the backward, never an out-of-bounds access."""
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    ids = torch.tensor([[2, 16, -1, 5]])
    out = mk.masked_patchify(x, ids, 4, backend="triton")
    full = mk.patchify(x, 4)
    assert torch.equal(out[0, 0], full[0, 2]) and torch.equal(out[0, 3], full[0, 5])
    assert torch.isnan(out[0, 1:3]).all()
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    good = torch.tensor([[2, 5]])
    (gr,) = torch.autograd.grad(mk.masked_patchify_ref(x, good, 4), x, g[:, [0, 3]])
    assert torch.equal(gx, gr)  # the two valid patches get their gradient, nothing else


def test_masked_patchify_compiles_without_graph_break(seeded):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    ids = _ids(2, 16, 4)
    f = torch.compile(lambda a, b: mk.masked_patchify(a, b, 4, backend="triton").square().sum(),
                      backend="aot_eager", fullgraph=True)
    y = f(x, ids)
    (g,) = torch.autograd.grad(y, x)
    r = mk.masked_patchify_ref(x, ids, 4).square().sum()
    (gr,) = torch.autograd.grad(r, x)
    torch.testing.assert_close(y, r)
    torch.testing.assert_close(g, gr)


def test_masked_patchify_rejects_bad_inputs():
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        mk.masked_patchify(x, torch.zeros(2, 1, dtype=torch.int64), 5, backend="triton")
    for p in (0, -4):
        with pytest.raises(ValueError, match="patch_size must be a positive int"):
            mk.masked_patchify(x, torch.zeros(2, 1, dtype=torch.int64), p, backend="triton")
    with pytest.raises(ValueError, match="floating point"):
        mk.masked_patchify(x.to(torch.uint8), torch.zeros(2, 1, dtype=torch.int64), 4, backend="triton")
    with pytest.raises(ValueError, match="int64"):
        mk.masked_patchify(x, torch.zeros(2, 1, dtype=torch.int32), 4, backend="triton")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        mk.masked_patchify(x, torch.zeros(3, 1, dtype=torch.int64), 4, backend="triton")
    with pytest.raises(ValueError, match="keeps 17 patches"):
        mk.masked_patchify(x, torch.zeros(2, 17, dtype=torch.int64), 4, backend="triton")
    with pytest.raises(mk.BackendUnavailableError, match="cuda"):
        mk.masked_patchify(x, torch.zeros(2, 1, dtype=torch.int64), 4, backend="cuda")


def _gpu_backend(backend):
    if backend == "cuda" and "cuda" not in mk.available_backends("masked_patchify", ("cuda",), "cuda"):
        pytest.skip("maws_kernels._C is not built (pip install --no-build-isolation -e ./kernels on a CUDA machine)")
    return backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("model", [(224, 16), (224, 14), (448, 14)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_patchify_gpu(backend, model, dtype):
    backend = _gpu_backend(backend)
    img, p = model
    L = (img // p) ** 2
    x = torch.randn(8, 3, img, img, device="cuda", dtype=dtype, requires_grad=True)
    ids = torch.argsort(torch.rand(8, L, device="cuda"), dim=1)[:, : L // 4]
    out = mk.masked_patchify(x, ids, p, backend=backend)
    ref = mk.masked_patchify_ref(x, ids, p)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
