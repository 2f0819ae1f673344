"""Loss terms as pure functions: tensors in, tensor out."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss; `logits_fake` must come from a detached reconstruction."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's score of reconstructions."""
    return -logits_fake.float().mean()


def adaptive_weight(grad_rec: torch.Tensor, grad_gan: torch.Tensor, max_weight: float = 1e4,
                    eps: float = 1e-4) -> torch.Tensor:
    """lambda = ||dL_rec/dw|| / (||dL_G/dw|| + eps) for the decoder's last layer w.

    Norms in fp32: in half precision the squared sums overflow or vanish and lambda turns NaN.
    """
    rec_norm = torch.linalg.vector_norm(grad_rec.float())
    gan_norm = torch.linalg.vector_norm(grad_gan.float())
    return (rec_norm / (gan_norm + eps)).clamp(0.0, max_weight).detach()


def adopt_weight(step: int, start_step: int) -> float:
    """0 before the discriminator starts, 1 after."""
    return 1.0 if step >= start_step else 0.0
