"""Loss terms as functions of tensors (the reconstruction loss also takes the LPIPS network)."""
from __future__ import annotations

import torch
import torch.nn.functional as F



def scale_chroma(images: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, 3, H, W) with each pixel's chroma (the pixel minus its grey level, the mean of its channels) x factor."""
    if factor == 1:
        return images
    grey = images.mean(1, keepdim=True)
    return grey + factor * (images - grey)


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


def reconstruction_loss(images: torch.Tensor, recon: torch.Tensor, perceptual: torch.nn.Module | None,
                        l1_weight: float, perceptual_weight: float, l2_weight: float = 0.0,
                        chroma_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """l1_weight * |e| + l2_weight * e^2 + perceptual_weight * LPIPS, means over the batch, where e = x - y with
    its chroma part (e minus its mean over the colour channels) scaled so that chroma_weight multiplies its share
    of the squared error. The logged `l1` and `mse` are of the plain error e, comparable with the eval's."""
    plain = images - recon
    error = scale_chroma(plain, chroma_weight ** 0.5)
    loss = l1_weight * error.abs().mean()
    terms = {"l1": plain.detach().abs().mean()}
    if l2_weight > 0:
        loss = loss + l2_weight * error.square().mean()
        terms["mse"] = plain.detach().square().mean()
    if perceptual is not None and perceptual_weight > 0:
        lpips_value = perceptual(images, recon).mean()
        loss = loss + perceptual_weight * lpips_value
        terms["lpips"] = lpips_value.detach()
    return loss, terms
