"""Muon with Adam (vqgpt/optim.py): the orthogonalisation against the SVD, the update by hand, Adam's half, state,
the split."""
from __future__ import annotations

import math

import pytest
import torch

from models.vqgan import VQGAN, VQGAN_PRESETS
from vqgpt.optim import MuonWithAdam, orthogonalize

# Keller Jordan's published quintic Newton-Schulz coefficients, written here rather than imported: each step maps
# every singular value x of the Frobenius-normalised matrix to a x + b x^3 + c x^5 and keeps the singular vectors
PUBLISHED_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def quintic_five_times(x):
    a, b, c = PUBLISHED_NEWTON_SCHULZ
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    return x


def svd(matrix: torch.Tensor):
    """torch.linalg.svd in float64: (U, S, V^T), thin."""
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def against_the_svd(result: torch.Tensor, matrix: torch.Tensor) -> dict:
    """How close `result` is to the orthogonalisation U V^T of `matrix`'s SVD U S V^T."""
    u, s, vh = svd(matrix)
    result = result.double()
    in_basis = u.t() @ result @ vh.t()   # diagonal when the singular vectors are kept
    kept = torch.diagonal(in_basis)
    polar = u @ vh
    return dict(
        off_diagonal=(in_basis - torch.diag(kept)).abs().max().item(),
        # what became of the singular values of `matrix` above 1.1e-3 of its Frobenius norm (5 steps multiply a
        # smaller one by at most 3.4445^5 = 487: it cannot reach 0.5)
        kept=kept[s / s.norm() > 1.1e-3],
        all_kept=kept,
        cosine=((result * polar).sum() / (result.norm() * polar.norm())).item(),
        rms_ratio=(result.norm() / polar.norm()).item(),
        # the exact image of 5 quintic steps: U f(S / |S|_F) V^T, f the published polynomial 5 times
        exact_error=(result - u @ torch.diag(quintic_five_times(s / s.norm())) @ vh).abs().max().item(),
    )


def close_to_the_svd(m: dict) -> bool:
    """What 5 quintic Newton-Schulz steps allow. Measured on 50 fp32 matrices, tall, wide, square (to 256 x 256) and
    conv-shaped: exact error <= 8e-7 (asserted < 1e-5), off-diagonal <= 1.4e-6 (< 1e-4), kept singular values
    0.68..1.20, cosine 0.978..0.9996, RMS ratio 0.87..1.10. The bounds on the last three follow from the polynomial:
    5 steps map [1.1e-3, 1] into [0.47, 1.2024] (vqgpt/optim.py: "about [0.5, 1.2]") and [1.5e-3, 1] into
    [0.68, 1.2024], where singular values anywhere still give a cosine of at least 0.964 with U V^T."""
    return (m["exact_error"] < 1e-5 and m["off_diagonal"] < 1e-4 and (m["all_kept"] >= 0).all().item()
            and m["kept"].min().item() > 0.5 and m["kept"].max().item() < 1.21
            and m["cosine"] > 0.96 and 0.5 < m["rms_ratio"] < 1.21)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (32, 32), (16, 8, 3, 3)], ids=["wide", "tall", "square", "conv"])
def test_orthogonalize_is_about_the_svd_polar_factor(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape).reshape(shape[0], -1)   # a conv filter (out, in, k, k) is the matrix (out, in*k*k)
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    measured = against_the_svd(result, matrix)
    assert close_to_the_svd(measured), measured
    # the bounds have teeth: the matrix only scaled, not orthogonalised, keeps singular values 0.006..0.40 and an RMS
    # ratio 0.18..0.25 (its cosine, 0.85..0.97, alone would not tell); a transposed result (square) is off-diagonal
    # by 0.57 with a cosine of -0.08; 4 steps are 0.13..0.19 from the exact image of 5 (6 steps, or the cubic
    # coefficients (1.5, -0.5, 0): 0.18 and 0.09)
    assert not close_to_the_svd(against_the_svd(matrix / matrix.norm(), matrix))
    if matrix.shape[0] == matrix.shape[1]:
        assert not close_to_the_svd(against_the_svd(result.t(), matrix))
    a, b, c = PUBLISHED_NEWTON_SCHULZ
    four_steps = matrix / matrix.norm()
    for _ in range(4):
        gram = four_steps @ four_steps.t()
        four_steps = a * four_steps + (b * gram + c * gram @ gram) @ four_steps
    assert against_the_svd(four_steps, matrix)["exact_error"] > 1e-2


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_singular_values(shape):
    torch.manual_seed(0)
    # singular values from 0.1 to 10: the update must move every direction at about the same rate
    u, _ = torch.linalg.qr(torch.randn(shape[0], 16))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 16))
    values = torch.logspace(-1, 1, 16)
    matrix = u @ torch.diag(values) @ v.t()
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    in_basis = u.t() @ result @ v   # diagonal when the singular vectors are kept
    off_diagonal = in_basis - torch.diag(torch.diagonal(in_basis))
    assert off_diagonal.abs().max() < 1e-3
    kept = torch.diagonal(in_basis)
    assert kept.min() > 0.55 and kept.max() < 1.25   # a 100x spread, now within about 2x


def test_muon_step_by_hand_momentum_nesterov_and_scale():
    """Momentum and Nesterov by hand; each update against the SVD of the hand-made Nesterov matrix."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(4, 3, 2, 2))   # small weights: their fp32 rounding hides no update
    lr, scale, momentum = 0.01, 3.0, 0.9
    optimizer = MuonWithAdam([weight], [], lr=lr, betas=(0.9, 0.95), momentum=momentum, muon_lr_scale=scale)
    step_size = lr * scale * 0.2 * math.sqrt(12)   # a (4, 12) matrix: sqrt(max(rows, cols))
    buffer = torch.zeros(4, 3, 2, 2)
    for _ in range(3):
        grad = torch.randn(4, 3, 2, 2)
        before = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()
        update = (weight.detach() - before).reshape(4, 12)
        buffer = momentum * buffer + grad
        nesterov = (grad + momentum * buffer).reshape(4, 12)
        u, s, vh = svd(nesterov)
        exact = -step_size * (u @ torch.diag(quintic_five_times(s / s.norm())) @ vh)
        # measured: within 3.4e-8 of the exact image (fp32 rounding), in updates of up to 1.5e-2
        torch.testing.assert_close(update.double(), exact, rtol=0, atol=1e-6)
        measured = against_the_svd(update / -step_size, nesterov)
        assert close_to_the_svd(measured), measured
        # the RMS of an orthogonal (4, 12) matrix is 1/sqrt(12): the update's RMS is about 0.2 x lr x scale, off by the
        # singular values' spread (measured 0.90..0.96)
        assert 0.5 < update.pow(2).mean().sqrt().item() / (0.2 * lr * scale) < 1.21


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (36, 6)], ids=["wide-conv", "tall"])
def test_muon_step_scale_is_exact_on_a_matrix_of_equal_singular_values(shape):
    """Q with orthonormal rows (or columns): Newton-Schulz keeps it and maps its equal singular values, 1/sqrt(6)
    once normalised, to f(1/sqrt(6)) with f the published quintic 5 times, a scalar: the step is known exactly."""
    torch.manual_seed(0)
    rows, cols = shape[0], math.prod(shape[1:])
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64))
    q = (q if rows > cols else q.t()).reshape(shape)
    weight = torch.nn.Parameter(torch.zeros(shape))
    lr, scale, momentum = 0.01, 3.0, 0.9
    optimizer = MuonWithAdam([weight], [], lr=lr, betas=(0.9, 0.95), momentum=momentum, muon_lr_scale=scale)
    weight.grad = q.float()
    optimizer.step()   # Nesterov: (1 + momentum) Q, the same direction
    # -lr x scale x 0.2 x sqrt(max(rows, cols)) x f(1/sqrt(6)) Q, f(1/sqrt(6)) = 1.1046; measured within 1.2e-8 in
    # entries up to 0.02 (sqrt(rows) or sqrt(cols) in place of sqrt(max) would be 2.4x off)
    expected = -lr * scale * 0.2 * math.sqrt(36) * quintic_five_times(1 / math.sqrt(6)) * q
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-9)


def test_adam_half_matches_torch_adam():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = MuonWithAdam([], ours, lr=1e-2, betas=(0.9, 0.95))
    torch_adam = torch.optim.Adam(reference, lr=1e-2, betas=(0.9, 0.95))
    for step in range(5):
        for a, b in zip(ours, reference):
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        optimizer.step()
        torch_adam.step()
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    assert [s["step"].item() for s in optimizer.state.values()] == [5.0, 5.0]


def test_state_dict_continues_exactly():
    torch.manual_seed(0)
    make = lambda: ([torch.nn.Parameter(torch.ones(6, 4))], [torch.nn.Parameter(torch.ones(4))])   # noqa: E731
    grads = [(torch.randn(6, 4), torch.randn(4)) for _ in range(4)]

    def run(hidden, others, optimizer, steps):
        for grad_hidden, grad_other in steps:
            hidden[0].grad, others[0].grad = grad_hidden.clone(), grad_other.clone()
            optimizer.step()

    hidden, others = make()
    uninterrupted = MuonWithAdam(hidden, others, lr=1e-2, betas=(0.9, 0.95))
    run(hidden, others, uninterrupted, grads)

    first_hidden, first_others = make()
    first = MuonWithAdam(first_hidden, first_others, lr=1e-2, betas=(0.9, 0.95))
    run(first_hidden, first_others, first, grads[:2])
    resumed_hidden = [torch.nn.Parameter(first_hidden[0].detach().clone())]
    resumed_others = [torch.nn.Parameter(first_others[0].detach().clone())]
    resumed = MuonWithAdam(resumed_hidden, resumed_others, lr=1e-2, betas=(0.9, 0.95))
    resumed.load_state_dict(first.state_dict())
    run(resumed_hidden, resumed_others, resumed, grads[2:])
    assert torch.equal(resumed_hidden[0], hidden[0]) and torch.equal(resumed_others[0], others[0])


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2 or more dims"):
        MuonWithAdam([torch.nn.Parameter(torch.ones(3))], [], lr=1e-3, betas=(0.9, 0.95))


@pytest.mark.parametrize("preset", ["b64", "taming-b64"])
def test_hidden_weights_leave_out_the_pixel_layers_and_the_codebook(preset):
    vqgan = VQGAN(VQGAN_PRESETS[preset])
    hidden = {id(p) for p in vqgan.hidden_weights()}
    left_out = sorted(n for n, p in vqgan.named_parameters() if p.ndim >= 2 and id(p) not in hidden)
    pooled = [f"encoder.pooled_in.{i}.weight" for i in range(len(vqgan.config.ch_mult)) if vqgan.config.pooled_input]
    assert left_out == sorted(["decoder.conv_out.weight", "encoder.conv_in.weight", "quantizer.codebook", *pooled])
    assert all(p.ndim >= 2 for p in vqgan.hidden_weights())
    assert {"encoder.conv_out.weight", "decoder.conv_in.weight", "quant_conv.weight"} <= {
        n for n, p in vqgan.named_parameters() if id(p) in hidden}

