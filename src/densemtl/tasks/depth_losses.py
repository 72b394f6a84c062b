"""Depth losses: L1/MSE/berHu/SILog on metres or log depth, and the negative log-likelihoods of an uncertain depth.

A depth head with uncertainty (``model.uncertainty``) outputs two channels: metres and ``s``, the predicted
standard deviation of ln(depth) (docs/uncertainty.md). ``laplace_nll`` and ``gaussian_nll`` train both from the
log residual ``r = ln pred - ln gt`` (Kendall & Gal 2017, heteroscedastic aleatoric uncertainty). Any other loss
trains the depth as before and, when the head has the ``s`` channel, adds a Laplace NLL of ``s`` on the *detached*
residual, so that the std learns the depth's error without changing how the depth itself is trained.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from densemtl.tasks.base import masked_mean
from densemtl.tasks.depth_head import STD_MAX, STD_MIN

DEPTH_LOSSES = ("l1", "mse", "berhu", "silog", "laplace_nll", "gaussian_nll")
NLL_LOSSES = ("laplace_nll", "gaussian_nll")
DEPTH_SPACES = ("metres", "log", "blog")
EPS_DEPTH = 1e-3  # metres; depths are clamped to this before a log so that log never sees 0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def depth_transform(depth: Tensor, space: str, clip: float = 80.0) -> Tensor:
    """Map metres to the space a depth loss compares in.

    ``metres``: unchanged. ``log``: ln(d). ``blog``: ln(clip(d, max=clip)) / 5, the lecture's bounded log
    target (about [-1.4, 0.9] for d in [1 mm, 80 m]). Depths are clamped to >= 1 mm before any log.
    """
    if space == "metres":
        return depth
    if space == "log":
        return depth.clamp_min(EPS_DEPTH).log()
    if space == "blog":
        return depth.clamp(EPS_DEPTH, clip).log() / 5.0
    raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")


def laplace_nll(r: Tensor, s: Tensor, beta: float = 0.0, excess: bool = True) -> Tensor:
    """Element-wise Laplace NLL of log residuals ``r`` with std ``s`` (scale ``b = s / sqrt(2)``).

    ``|r| / b + ln(2b)``, times ``b.detach() ** beta`` (beta-NLL): with ``beta = 1`` the gradient on the mean is
    exactly L1's ``sign(r)``, so the depth trains as under L1 while ``b`` still converges to ``E|r|``.
    With ``excess`` the NLL of the best std for this residual (``b = |r|`` within the head's bounds) is
    subtracted: a constant for the gradients, it makes the loss >= 0, which the weightings that compare task
    losses (uncertainty, DWA, GradNorm) assume.
    """
    b = s / math.sqrt(2.0)
    nll = r.abs() / b + torch.log(2.0 * b)
    if excess:
        best = r.detach().abs().clamp(STD_MIN / math.sqrt(2.0), STD_MAX / math.sqrt(2.0))
        nll = nll - (r.detach().abs() / best + torch.log(2.0 * best))
    return nll * b.detach().pow(beta) if beta else nll


def gaussian_nll(r: Tensor, s: Tensor, beta: float = 0.0, excess: bool = True) -> Tensor:
    """Element-wise Gaussian NLL ``r^2 / (2 s^2) + ln s + ln(2 pi) / 2``, times ``(s^2).detach() ** beta``
    (beta-NLL, Seitzer et al. 2022: ``beta = 1`` gives the mean MSE's gradient ``r``); ``excess`` subtracts the
    NLL of the best std ``s = |r|`` (within bounds), as :func:`laplace_nll` does."""
    nll = r.square() / (2.0 * s.square()) + torch.log(s) + _HALF_LOG_2PI
    if excess:
        best = r.detach().abs().clamp(STD_MIN, STD_MAX)
        nll = nll - (r.detach().square() / (2.0 * best.square()) + torch.log(best) + _HALF_LOG_2PI)
    return nll * s.detach().square().pow(beta) if beta else nll


class DepthLoss(nn.Module):
    """Depth regression on pixels with a measurement (target > 0), one of :data:`DEPTH_LOSSES`.

    Residuals are taken in ``space`` (see ``depth_transform``), except for "silog" and the NLLs, which are
    defined on log depth and always work in natural-log space whatever ``space`` says.

    berHu (reverse Huber, Laina et al. 2016): ``|r|`` if ``|r| <= c`` else ``(r^2 + c^2) / (2c)`` with
    ``c = 0.2 * max |r|`` over the valid pixels of the batch, detached.

    silog (Eigen et al. 2014, weighted as in BTS, Lee et al. 2019):
    ``scale * sqrt(mean(g^2) - lam * mean(g)^2)``, ``g = ln pred - ln gt``, ``lam = 0.85``, ``scale = 10``.
    ``lam = 1`` makes it fully invariant to a global scale of the prediction; 0.85 keeps a little scale
    supervision, which metric depth needs. The x10 brings it to the magnitude of cross-entropy.

    laplace_nll / gaussian_nll: see :func:`laplace_nll` and :func:`gaussian_nll` (``nll_beta`` is their beta;
    the value is the excess over the best std, >= 0). They need the head's second (std) channel.
    """

    def __init__(
        self,
        kind: str,
        space: str = "log",
        clip: float = 80.0,
        silog_lambda: float = 0.85,
        silog_scale: float = 10.0,
        nll_beta: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in DEPTH_LOSSES:
            raise ValueError(f"unknown depth loss {kind!r}; choose one of {DEPTH_LOSSES}")
        if space not in DEPTH_SPACES:
            raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")
        self.kind, self.space, self.clip = kind, space, clip
        self.silog_lambda, self.silog_scale, self.nll_beta = silog_lambda, silog_scale, nll_beta

    def forward(self, pred: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        """Scalar loss from the head's output (B, 1 or 2, H, W) and target metres (B, 1, H, W).

        ``sample_mask`` (B,) drops samples. Channel 0 is metres; channel 1, when present, is the std of ln depth.
        """
        if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[2:] or pred.shape[1] not in (1, 2):
            raise ValueError(
                f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        if self.kind in NLL_LOSSES and pred.shape[1] != 2:
            raise ValueError(f"loss.depth={self.kind} needs the depth std channel: set model.uncertainty=true")
        pred, target = pred.float(), target.float()
        valid = (target > 0) & torch.isfinite(target)  # (B, 1, H, W)
        if sample_mask is not None:
            valid = valid & sample_mask.view(-1, 1, 1, 1)
        target = torch.where(valid, target, torch.ones_like(target))  # keeps log() finite on invalid pixels
        depth, std = pred[:, :1], pred[:, 1:]  # (B, 1, H, W) each; std is empty without uncertainty
        r_log = depth_transform(depth, "log") - depth_transform(target, "log")  # (B, 1, H, W)
        if self.kind in NLL_LOSSES:
            nll = laplace_nll if self.kind == "laplace_nll" else gaussian_nll
            return masked_mean(nll(r_log, std, self.nll_beta), valid)
        loss = self._point_loss(depth, target, valid)
        if std.shape[1]:  # the std learns the error of a depth it does not train
            loss = loss + masked_mean(laplace_nll(r_log.detach(), std, self.nll_beta), valid)
        return loss

    def _point_loss(self, depth: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        if self.kind == "silog":
            return self._silog(depth, target, valid)
        r = depth_transform(depth, self.space, self.clip) - depth_transform(target, self.space, self.clip)
        if self.kind == "l1":
            return masked_mean(r.abs(), valid)
        if self.kind == "mse":
            return masked_mean(r.square(), valid)
        return masked_mean(berhu(r, valid), valid)

    def _silog(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        g = depth_transform(pred, "log") - depth_transform(target, "log")  # (B, 1, H, W)
        mean_g, mean_g2 = masked_mean(g, valid), masked_mean(g.square(), valid)
        var = (mean_g2 - self.silog_lambda * mean_g.square()).clamp_min(1e-12)  # sqrt'(0) would be inf
        return self.silog_scale * var.sqrt() * valid.any()  # exactly 0 when no pixel is valid


def berhu(r: Tensor, valid: Tensor) -> Tensor:
    """Element-wise reverse Huber of residuals ``r`` with the threshold from the valid pixels (see DepthLoss)."""
    absr = r.abs()
    c = (0.2 * (absr * valid).amax()).detach().clamp_min(1e-12)  # clamp keeps the unused branch finite
    return torch.where(absr <= c, absr, (absr.square() + c.square()) / (2 * c))
