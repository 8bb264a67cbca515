"""The PB-relax softmax kernel (cogview._C) against its eager PyTorch reference."""

import math
import warnings

import pytest
import torch

from cogview.modules import pb_relax
from cogview.modules.pb_relax import has_kernel, pb_relax_softmax, pb_relax_softmax_reference

ALPHA = 32.0
LENGTHS = (1, 7, 64, 1089, 4097)
VARIANTS = ("unmasked", "causal", "key_mask", "causal+key_mask")
# Output tolerance per dtype: relative (to the largest reference value) and absolute.
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
}

needs_kernel = pytest.mark.skipif(not has_kernel("cpu"),
                                  reason="cogview._C is not built: make install")


def test_extension_is_built():
    # `make test` builds cogview._C first; without it the tests below are skipped, so fail here.
    assert has_kernel("cpu"), f"cogview._C did not import ({pb_relax._IMPORT_ERROR}): make install"


def make_case(lk: int, square: bool, variant: str, dtype: torch.dtype, device: str = "cpu"):
    """Scores [2, 2, Lq, Lk] as PB-relax sees them (already divided by alpha), plus the masking.

    square: Lq = Lk (training; the last 128 queries only for the longest rows); otherwise a
    few queries that are the last positions of the keys (decoding with a KV cache).
    """
    num_queries = (lk if lk <= 1089 else 128) if square else min(lk, 40)
    if not square and num_queries == lk:
        num_queries = max(1, lk // 2)
    batch = (2, 2) if lk <= 64 else (2, 1)
    scores = (torch.randn(*batch, num_queries, lk, dtype=torch.float64) / 8).to(dtype).to(device)
    causal = "causal" in variant
    key_mask = None
    if "key_mask" in variant:
        key_mask = torch.rand(batch[0], 1, lk) > 0.3  # (B, 1, Lk) over heads
        key_mask[..., 0] = True  # keep every row alive: fully masked rows have their own test
        key_mask = key_mask.to(device)
    return scores, causal, key_mask


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """|actual - expected| <= rtol * max|expected| + atol, elementwise."""
    bound = rtol * expected.abs().max().item() + atol
    error = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all()
    assert error <= bound, f"max error {error:.3g} > {bound:.3g}"


def check_against_reference(scores, causal, key_mask):
    """Kernel forward and backward on `scores` vs the fp64 reference of the same values."""
    torch.manual_seed(1)
    grad_probs = torch.randn(scores.shape, dtype=torch.float64).to(scores.dtype).to(scores.device)

    x = scores.clone().requires_grad_(True)
    probs = pb_relax_softmax(x, ALPHA, causal, key_mask)
    probs.backward(grad_probs)

    x_ref = scores.detach().cpu().double().requires_grad_(True)
    mask_ref = None if key_mask is None else key_mask.cpu()
    probs_ref = pb_relax_softmax_reference(x_ref, ALPHA, causal, mask_ref)
    probs_ref.backward(grad_probs.cpu().double())

    assert probs.dtype == scores.dtype and probs.shape == scores.shape
    tol = TOLERANCE[scores.dtype]
    assert_close_scaled(probs.cpu(), probs_ref.detach(), **tol)
    assert_close_scaled(x.grad.cpu(), x_ref.grad, **tol)


@pytest.fixture
def cpu_capability():
    """Restores the CPU kernel build a test switches to."""
    original = pb_relax._C.cpu_capability()
    yield
    pb_relax._C.set_cpu_capability(original)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("square", [True, False], ids=["train", "decode"])
@pytest.mark.parametrize("lk", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_reference(dtype, lk, square, variant):
    check_against_reference(*make_case(lk, square, variant, dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_cpu_build_matches_reference(dtype, cpu_capability):
    for name in pb_relax._C.cpu_capabilities():  # default, and avx2 / avx512 where the CPU has them
        pb_relax._C.set_cpu_capability(name)
        assert pb_relax._C.cpu_capability() == name
        for lk in (7, 64, 1089):
            check_against_reference(*make_case(lk, False, "causal+key_mask", dtype))
            check_against_reference(*make_case(lk, True, "causal", dtype))


@needs_kernel
@pytest.mark.parametrize("causal,masked,lq,lk", [
    (True, False, 5, 5), (True, True, 4, 9), (False, True, 3, 6), (False, False, 2, 33),
    (True, True, 6, 3),
])
def test_gradcheck_through_kernel(causal, masked, lq, lk):
    scores = (torch.randn(2, 3, lq, lk, dtype=torch.float64) / 8).requires_grad_(True)
    key_mask = torch.rand(2, 1, lk) > 0.4 if masked else None
    # fp64 goes through the kernel: it is part of the CPU dispatch.
    assert isinstance(pb_relax_softmax(scores, ALPHA, causal, key_mask).grad_fn,
                      pb_relax.PBRelaxSoftmaxFunction._backward_cls)
    for softmax in (pb_relax_softmax, pb_relax_softmax_reference):
        assert torch.autograd.gradcheck(lambda s: softmax(s, ALPHA, causal, key_mask), (scores,),
                                        fast_mode=True)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_rows_without_visible_keys_are_zero_not_nan(dtype):
    lq, lk = 6, 4  # causal with Lq > Lk: the first two queries see no key
    scores = torch.randn(2, 2, lq, lk).to(dtype).requires_grad_(True)
    key_mask = torch.ones(2, 1, lk, dtype=torch.bool)
    key_mask[1] = False  # batch entry 1 keeps no key at all
    probs = pb_relax_softmax(scores, ALPHA, True, key_mask)
    probs.backward(torch.randn(probs.shape).to(dtype))

    dead = torch.zeros(2, 2, lq, dtype=torch.bool)
    dead[:, :, :2] = True
    dead[1] = True
    assert torch.isfinite(probs).all() and torch.isfinite(scores.grad).all()
    assert (probs[dead] == 0).all() and (scores.grad[dead] == 0).all()
    torch.testing.assert_close(probs[~dead].float().sum(-1), torch.ones(int((~dead).sum())),
                               atol=1e-2, rtol=0)
    reference = pb_relax_softmax_reference(scores.detach(), ALPHA, True, key_mask)
    assert (reference[dead] == 0).all()


@needs_kernel
def test_key_mask_shapes_broadcast_like_the_expanded_mask():
    scores = torch.randn(2, 3, 5, 7) / 8
    keep = torch.rand(2, 7) > 0.3
    keep[:, 0] = True
    expected = pb_relax_softmax_reference(scores, ALPHA, True, keep[:, None, :].expand(2, 3, 7))
    for mask in (keep[:, None, :], keep[:, None, None, :], keep[:, None, :].expand(2, 3, 7)):
        torch.testing.assert_close(pb_relax_softmax(scores, ALPHA, True, mask), expected)
    shared = pb_relax_softmax(scores, ALPHA, True, keep[0])  # [Lk]: the same mask everywhere
    torch.testing.assert_close(shared, pb_relax_softmax_reference(scores, ALPHA, True, keep[0]))
    with pytest.raises(ValueError, match=r"key_mask\[:, None, :\]"):
        pb_relax_softmax(scores, ALPHA, True, keep)  # [B, Lk] lines B up with the heads
    with pytest.raises(TypeError, match="bool"):
        pb_relax_softmax(scores, ALPHA, True, keep.float())


@needs_kernel
def test_non_contiguous_scores():
    base = torch.randn(2, 3, 9, 9, dtype=torch.float64) / 8
    scores = base.transpose(-1, -2)  # not contiguous in the last dim
    torch.testing.assert_close(pb_relax_softmax(scores, ALPHA, True),
                               pb_relax_softmax_reference(scores.contiguous(), ALPHA, True))


@needs_kernel
def test_fallback_without_extension_matches_and_warns_once(monkeypatch):
    scores = (torch.randn(2, 4, 33, 33) / 8).requires_grad_(True)
    key_mask = torch.rand(2, 1, 33) > 0.3
    grad_probs = torch.randn(2, 4, 33, 33)
    fused = pb_relax_softmax(scores, ALPHA, True, key_mask)
    (fused_grad,) = torch.autograd.grad(fused, scores, grad_probs)

    monkeypatch.setattr(pb_relax, "_C", None)  # as if cogview._C failed to import
    monkeypatch.setattr(pb_relax, "_fallback_warned", set())
    assert not has_kernel("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = pb_relax_softmax(scores, ALPHA, True, key_mask)
        again = pb_relax_softmax(scores, ALPHA, True, key_mask)
    (fallback_grad,) = torch.autograd.grad(fallback, scores, grad_probs)

    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "make install" in messages[0]
    torch.testing.assert_close(fallback, fused, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(again, fused, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(fallback_grad, fused_grad, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_has_kernel_reports_devices():
    assert has_kernel("cpu")
    assert has_kernel("cuda") == pb_relax._C.with_cuda()
    assert not has_kernel("meta")


@needs_kernel
def test_pb_relax_keeps_fp16_attention_finite_where_plain_softmax_overflows():
    d, length = 64, 64
    # Large activations, as late in training. Multiples of 8 keep every product below exact in
    # fp16 except where it overflows: q.k is a multiple of 64, so the PB-relax scores q.k / 256
    # are multiples of 1/4 below 512, which fp16 holds exactly. The comparison with fp64 then
    # measures the overflow behaviour alone, not the rounding of the inputs.
    query = (torch.randint(-10, 11, (2, 4, length, d)) * 8).half()
    key = (torch.randint(-10, 11, (2, 4, length, d)) * 8).half()
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    raw = query @ key.transpose(-2, -1)  # fp16 matmul: some |q.k| pass 65504
    naive = torch.softmax((raw / math.sqrt(d)).masked_fill(~causal, float("-inf")), dim=-1)
    assert not torch.isfinite(raw).all()
    assert not torch.isfinite(naive).all()

    scores = (query / (ALPHA * math.sqrt(d))) @ key.transpose(-2, -1)  # fp16, |scores| < 512
    probs = pb_relax_softmax(scores, ALPHA, causal=True)
    assert probs.dtype == torch.float16 and torch.isfinite(probs).all()

    logits = query.double() @ key.double().transpose(-2, -1) / math.sqrt(d)
    expected = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(probs.double(), expected, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (pytest -m cuda on a machine with a GPU)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("square", [True, False], ids=["train", "decode"])
@pytest.mark.parametrize("lk", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_matches_reference(dtype, lk, square, variant):
    assert has_kernel("cuda"), "cogview._C was built without CUDA: rebuild with nvcc (make install)"
    scores, causal, key_mask = make_case(lk, square, variant, dtype, device="cuda")
    check_against_reference(scores, causal, key_mask)


@pytest.mark.cuda
@needs_gpu
def test_cuda_gradcheck_and_dead_rows():
    assert has_kernel("cuda"), "cogview._C was built without CUDA: rebuild with nvcc (make install)"
    scores = (torch.randn(2, 3, 6, 4, dtype=torch.float64, device="cuda") / 8).requires_grad_(True)
    key_mask = torch.ones(2, 1, 4, dtype=torch.bool, device="cuda")
    key_mask[1] = False
    assert torch.autograd.gradcheck(lambda s: pb_relax_softmax(s, ALPHA, True, key_mask), (scores,))
    probs = pb_relax_softmax(scores, ALPHA, True, key_mask)
    assert torch.isfinite(probs).all() and (probs[1] == 0).all() and (probs[0, :, :2] == 0).all()
