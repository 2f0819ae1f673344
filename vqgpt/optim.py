"""The VQGAN's optimizers: Adam, or Muon on the hidden layers' weights with Adam on everything else.

Muon (Keller Jordan et al., 2024) replaces the momentum of each hidden weight matrix by the nearest
semi-orthogonal matrix, found by a few Newton-Schulz iterations, so the update moves every direction
of the matrix at the same rate instead of mostly the few directions with the largest gradients. A
convolution's filter (out, in, k, k) is the matrix (out, in*k*k). The layers that see or write pixels
and the codebook (a lookup table, not a linear map) stay on Adam, as Muon's authors keep the first
and last layers. torch.optim.Muon takes 2-D parameters only, hence this module.

On the b64 preset's real-image budget (bench/quality.py, 271 steps x 8) it learns the same network
markedly faster than Adam at the same learning rate and schedule (BENCHMARKS.md).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.adam import adam as adam_functional

from models.vqgan import VQGAN

# the quintic Newton-Schulz coefficients of Muon's authors: fast, not exact; 5 steps bring singular values above
# about 1e-3 of the Frobenius norm into about [0.5, 1.2], not to 1 (tests/test_muon.py)
_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """(rows, cols) -> about U V^T of its SVD U S V^T (singular values pushed near 1), in fp32."""
    a, b, c = _NEWTON_SCHULZ
    x = matrix.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:   # iterate on the small Gram matrix
        x = x.t()
    x = x / (x.norm() + 1e-7)   # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if transposed else x


class MuonWithAdam(torch.optim.Optimizer):
    """Muon on `hidden` (each a weight of 2 or more dims), Adam (no weight decay) on `others`.

    One learning rate drives both (set per group by the trainer's schedule): a Muon update is scaled to
    RMS about 0.2 x lr x `muon_lr_scale` (0.2 x lr is Moonlight's match to Adam's typical update), so the
    Adam presets' learning rates carry over.
    """

    def __init__(self, hidden: Iterable[torch.nn.Parameter], others: Iterable[torch.nn.Parameter], lr: float,
                 betas: tuple[float, float], momentum: float = 0.95, muon_lr_scale: float = 1.0, eps: float = 1e-8):
        hidden, others = list(hidden), list(others)
        if any(p.ndim < 2 for p in hidden):
            raise ValueError("Muon orthogonalises matrices: give it weights of 2 or more dims only")
        groups = [dict(params=hidden, muon=True), dict(params=others, muon=False)]
        super().__init__([g for g in groups if g["params"]],
                         dict(lr=lr, betas=tuple(betas), momentum=momentum, muon_lr_scale=muon_lr_scale, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            (self._muon_step if group["muon"] else self._adam_step)(params, group)

    def _muon_step(self, params: list[torch.Tensor], group: dict) -> None:
        momentum = group["momentum"]
        for param in params:   # one matrix at a time: batching same shapes made it 1.4x slower on a CPU
            buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
            buffer.mul_(momentum).add_(param.grad)
            nesterov = param.grad.add(buffer, alpha=momentum)
            rows, cols = param.shape[0], param[0].numel()
            update = orthogonalize(nesterov.reshape(rows, cols)).view_as(param).to(param.dtype)
            # an orthogonal (rows, cols) matrix has RMS 1/sqrt(max(rows, cols)): this makes it 0.2 x scale
            param.add_(update, alpha=-group["lr"] * group["muon_lr_scale"] * 0.2 * math.sqrt(max(rows, cols)))

    def _adam_step(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own Adam (its functional form: foreach kernels on CUDA), with its state layout."""
        for param in params:
            if not self.state[param]:   # the count on the CPU, as torch.optim.Adam keeps it: no device sync
                self.state[param].update(step=torch.zeros((), dtype=torch.float32),
                                         exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam_functional(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                        beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0, eps=group["eps"],
                        maximize=False)


@torch.no_grad()
def reset_moments(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, rows: torch.Tensor) -> None:
    """Zero the optimizer's per-element state (Adam's moments) of `rows` of `param`: re-seeded codebook rows
    must not move by the gradients of the vectors they replaced."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[rows] = 0


def adam(params, lr: float, betas: tuple[float, ...], device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=device.type == "cuda")   # fused kernels on CUDA


def vqgan_optimizer(vqgan: VQGAN, name: str, lr: float, betas: tuple[float, ...], device: torch.device,
                    muon_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """`name` adam: Adam on every parameter; muon: MuonWithAdam on `vqgan.hidden_weights()` and the rest."""
    if name == "adam":
        return adam(vqgan.parameters(), lr, betas, device)
    hidden = {id(p) for p in vqgan.hidden_weights()}
    return MuonWithAdam([p for p in vqgan.parameters() if id(p) in hidden],
                        [p for p in vqgan.parameters() if id(p) not in hidden], lr, betas,
                        muon_lr_scale=muon_lr_scale)
