"""Muon with Adam (vqgpt/optim.py): the orthogonalisation, the update by hand, Adam's half, state, the split."""
from __future__ import annotations

import math

import pytest
import torch

from models.vqgan import VQGAN, VQGAN_PRESETS
from vqgpt.optim import MuonWithAdam, orthogonalize


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
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    start = weight.detach().clone()
    lr, scale, momentum = 0.01, 3.0, 0.9
    optimizer = MuonWithAdam([weight], [], lr=lr, betas=(0.9, 0.95), momentum=momentum, muon_lr_scale=scale)
    grads = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    step_size = lr * scale * 0.2 * math.sqrt(12)   # a (4, 12) matrix
    expected = start.clone()
    buffer = torch.zeros_like(start)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        buffer = momentum * buffer + grad
        expected -= step_size * orthogonalize((grad + momentum * buffer).reshape(4, 12)).view(4, 3, 2, 2)
        torch.testing.assert_close(weight.detach(), expected)
    first = -step_size * orthogonalize((1 + momentum) * grads[0].reshape(4, 12))
    # an orthogonal (4, 12) matrix has RMS 1/sqrt(12): the update's RMS is about 0.2 x lr x scale
    assert 0.6 < first.pow(2).mean().sqrt().item() / (0.2 * lr * scale) < 1.3


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

