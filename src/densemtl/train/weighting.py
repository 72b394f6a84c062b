"""Task weighting: how per-task loss terms become one update. Selected by ``loss.weighting``.

One small interface, :class:`TaskWeighting`:

- ``forward(losses)`` returns the scalar total (what is logged, and what the default backward uses);
- ``backward(losses, shared, scaler)`` runs the backward pass; loss-based methods back-propagate the total,
  gradient-based ones (``needs_task_gradients = True``) back-propagate each task separately, combine the
  per-task gradients of the SHARED parameters (encoder, plus the shared decoder) and write the result into
  ``.grad``; task-specific parameters get the gradient of their own task as usual;
- ``on_epoch_end(avg_losses)`` is called by the engine after every epoch (DWA needs per-epoch losses);
- ``current_weights()`` gives the weight per task for logging.

AMP: every task loss goes through ``scaler.scale`` before its backward, so all gradients carry the same scale
``S``; PCGrad and CAGrad are positively homogeneous (scaling the inputs by ``S`` scales the output by ``S``), so
``scaler.unscale_`` later recovers the true update; GradNorm divides its norms by ``S``. Under DDP, learned
(uncertainty, GradNorm) and gradient-based methods are refused by ``distributed.check_loss_supported``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from densemtl.tasks import TASKS

UNCERTAINTY_INIT = 0.0  # initial log-variance s = log sigma^2 (weight 0.5 * exp(-s) = 0.5)
DWA_TEMPERATURE = 2.0  # Liu et al. 2019
GRADNORM_ALPHA = 1.5  # Chen et al. 2018 (their NYUv2 setting)
CAGRAD_C = 0.4  # Liu et al. 2021 (their NYUv2/Cityscapes setting)


def _check_names(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"loss.weights names unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")


class TaskWeighting(nn.Module):
    """Combines per-task loss terms into an update (see the module docstring).

    Subclasses receive ``(tasks, weights)``; adaptive ones may hold parameters (the optimiser includes
    ``MultiTaskLoss.parameters()``) and may treat ``weights`` as initial values.
    """

    needs_task_gradients: bool = False  # True: backward needs per-task gradients of the shared parameters

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        """Scalar total from ``{task: scalar loss}``."""
        raise NotImplementedError

    def current_weights(self) -> dict[str, float]:
        """The weight each task currently gets, for logging."""
        raise NotImplementedError

    def backward(
        self,
        losses: dict[str, Tensor],
        shared: list[nn.Parameter],
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Accumulate gradients for one step; default: back-propagate ``losses["total"]`` (scaled for AMP)."""
        total = losses["total"]
        (scaler.scale(total) if scaler is not None else total).backward()

    def on_epoch_end(self, avg_losses: dict[str, float]) -> None:
        """Called once per epoch with the epoch's mean loss per task; a no-op unless the method needs it."""


class FixedWeighting(TaskWeighting):
    """``sum_t w_t * L_t`` with constant weights (``a * L_seg + b * L_depth``); missing tasks get 1.0."""

    def __init__(self, tasks: tuple[str, ...], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        weights = dict(weights or {})
        _check_names(weights)
        self.weights = {t: float(weights.get(t, 1.0)) for t in tasks}

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[t] * losses[t] for t in self.weights)  # type: ignore[return-value]

    def current_weights(self) -> dict[str, float]:
        return dict(self.weights)


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018): ``sum_t 0.5 exp(-s_t) L_t + 0.5 s_t``.

    ``s_t = log sigma_t^2`` is learned with the network. For fixed ``L_t`` the minimum is at ``s_t = log L_t``
    (``sigma_t^2 = L_t``), so a noisier task (larger irreducible loss) gets a smaller weight ``0.5 / sigma^2``.
    The same form is used for every task (the common simplification of the paper's 1/sigma^2 for softmax).
    ``weights`` are ignored. The total can be negative; that is expected.
    """

    def __init__(self, tasks: tuple[str, ...], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        _check_names(dict(weights or {}))
        self.tasks = tuple(tasks)
        self.log_vars = nn.Parameter(torch.full((len(tasks),), UNCERTAINTY_INIT))  # (T,)

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        s = self.log_vars
        return sum(0.5 * torch.exp(-s[i]) * losses[t] + 0.5 * s[i] for i, t in enumerate(self.tasks))  # type: ignore[return-value]

    def current_weights(self) -> dict[str, float]:
        w = 0.5 * torch.exp(-self.log_vars.detach())
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}


class DWAWeighting(TaskWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    ``w_t = T * softmax_t(r_t / temp)`` with ``r_t = L_t(e-1) / L_t(e-2)`` the ratio of the last two epochs'
    mean losses: a task whose loss falls more slowly gets more weight. Weights are 1 for the first two epochs.
    The loss history lives in buffers, so it is checkpointed and a resumed run continues exactly.
    """

    def __init__(
        self,
        tasks: tuple[str, ...],
        weights: dict[str, float] | None = None,
        temperature: float = DWA_TEMPERATURE,
    ) -> None:
        super().__init__()
        _check_names(dict(weights or {}))
        self.tasks, self.temperature = tuple(tasks), temperature
        self.register_buffer("history", torch.zeros(2, len(tasks)))  # (2, T): epochs e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("weights", torch.ones(len(tasks)))  # (T,)

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[i] * losses[t] for i, t in enumerate(self.tasks))  # type: ignore[return-value]

    def on_epoch_end(self, avg_losses: dict[str, float]) -> None:
        if any(t not in avg_losses for t in self.tasks):  # an epoch without a finite step: keep the weights
            return
        new = torch.tensor([float(avg_losses[t]) for t in self.tasks], device=self.history.device)
        self.history.copy_(torch.stack([self.history[1], new]))
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)  # (T,)
            self.weights.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))

    def current_weights(self) -> dict[str, float]:
        return {t: float(self.weights[i].detach()) for i, t in enumerate(self.tasks)}


# ----------------------------------------------------------------------------------- gradient-based methods
def task_gradients(
    losses: Iterable[Tensor], shared: list[nn.Parameter], scaler: torch.amp.GradScaler | None
) -> Tensor:
    """Back-propagate each loss in turn; returns the shared parameters' gradients per loss, (T, P).

    Each backward also accumulates into the task-specific parameters (which only that task reaches). The
    shared parameters' ``.grad`` is reset after being read, so the caller writes the combined gradient.
    """
    losses = list(losses)
    rows = []
    for i, loss in enumerate(losses):
        (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=i < len(losses) - 1)
        rows.append(torch.cat([_flat_grad(p) for p in shared]))
        for p in shared:
            p.grad = None
    return torch.stack(rows)  # (T, P)


def _flat_grad(p: nn.Parameter) -> Tensor:
    return p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)


def write_gradient(shared: list[nn.Parameter], flat: Tensor) -> None:
    """Set the shared parameters' ``.grad`` from one flat (P,) vector."""
    offset = 0
    for p in shared:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020): project away conflicts, then sum. (T, P) -> (P,).

    For each task ``i`` and each other task ``j`` in random order, if ``g_i . g_j < 0`` then
    ``g_i -= (g_i . g_j) / |g_j|^2 * g_j`` (``g_j`` the ORIGINAL gradient). With two tasks the order does not
    matter and each projected gradient is orthogonal to the other task's gradient.
    """
    out = grads.clone()
    n = grads.shape[0]
    for i in range(n):
        others = [j for j in torch.randperm(n, generator=generator).tolist() if j != i]
        for j in others:
            dot = out[i] @ grads[j]
            if dot < 0:
                out[i] -= dot / grads[j].square().sum().clamp_min(1e-20) * grads[j]
    return out.sum(dim=0)


def cagrad(grads: Tensor, c: float = CAGRAD_C, iters: int = 100) -> Tensor:
    """CAGrad (Liu et al., NeurIPS 2021): conflict-averse direction, scaled to match a plain sum. (T, P) -> (P,).

    With ``g0`` the mean gradient and ``phi = c^2 |g0|^2``, find simplex weights ``w`` minimising
    ``g_w . g0 + sqrt(phi) |g_w|`` (``g_w = w^T G``), then ``d = g0 + sqrt(phi) g_w / |g_w|``. ``c = 0`` gives
    ``g0``. The result is multiplied by T so that ``c = 0`` equals the gradient of ``sum_t L_t``. The T-by-T
    problem is solved by exponentiated-gradient steps on the Gram matrix (cheap; T is 2 here).
    """
    n = grads.shape[0]
    gram = grads.double() @ grads.double().T  # (T, T)
    scale = gram.diagonal().mean().clamp_min(1e-30)
    gram = gram / scale  # scale-free problem: the same w whatever the AMP scale
    b = torch.full((n,), 1.0 / n, dtype=gram.dtype, device=gram.device)
    sqrt_phi = c * (b @ gram @ b).clamp_min(0).sqrt()
    w = b.clone()
    for _ in range(iters):
        gw_norm = (w @ gram @ w).clamp_min(1e-20).sqrt()
        grad = gram @ b + sqrt_phi * (gram @ w) / gw_norm  # d/dw of the objective
        w = w * torch.exp(-grad)
        w = w / w.sum()
    g0 = b.to(grads.dtype) @ grads  # (P,)
    gw = w.to(grads.dtype) @ grads  # (P,)
    gw_norm = gw.norm().clamp_min(1e-20)
    sqrt_phi_raw = float(sqrt_phi) * float(scale.sqrt())  # back to gradient units
    return n * (g0 + sqrt_phi_raw * gw / gw_norm)


class _GradientCombiner(TaskWeighting):
    """Per-task gradients of the shared parameters, combined by ``self.combine``; total = plain sum."""

    needs_task_gradients = True

    def __init__(self, tasks: tuple[str, ...], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        _check_names(dict(weights or {}))
        self.tasks = tuple(tasks)

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(losses[t] for t in self.tasks)  # type: ignore[return-value]

    def current_weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}

    def combine(self, grads: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(
        self,
        losses: dict[str, Tensor],
        shared: list[nn.Parameter],
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not shared or len(self.tasks) < 2:  # nothing shared (frozen encoder, split decoders) or one task
            return super().backward(losses, shared, scaler)
        for p in shared:
            p.grad = None
        grads = task_gradients([losses[t] for t in self.tasks], shared, scaler)  # (T, P), times the AMP scale
        write_gradient(shared, self.combine(grads))


class PCGradWeighting(_GradientCombiner):
    """PCGrad on the shared parameters (see :func:`pcgrad`); task-specific parameters get their own gradient."""

    def __init__(
        self, tasks: tuple[str, ...], weights: dict[str, float] | None = None, seed: int = 0
    ) -> None:
        super().__init__(tasks, weights)
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: Tensor) -> Tensor:
        return pcgrad(grads, self.generator)


class CAGradWeighting(_GradientCombiner):
    """CAGrad on the shared parameters (see :func:`cagrad`)."""

    def __init__(self, tasks: tuple[str, ...], weights: dict[str, float] | None = None, c: float = CAGRAD_C):
        super().__init__(tasks, weights)
        self.c = c

    def combine(self, grads: Tensor) -> Tensor:
        return cagrad(grads, self.c)


class GradNormWeighting(TaskWeighting):
    """GradNorm (Chen et al., ICML 2018): learn ``w_t`` so that task gradient norms train at similar rates.

    On the last shared weight ``W`` (the last shared parameter with >1 dimension), ``G_t = |grad_W w_t L_t|``;
    with ``r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))`` (relative inverse training rate) the weights follow
    ``d/dw sum_t |G_t - mean(G) r_t^alpha|`` (target held constant) through the training optimiser, and are
    renormalised to sum to T before every step. The network gets ``sum_t w_t grad L_t``. ``alpha = 0`` asks for
    equal gradient norms. ``weights`` are the initial weights. Initial losses are buffers (checkpointed).
    """

    needs_task_gradients = True

    def __init__(
        self, tasks: tuple[str, ...], weights: dict[str, float] | None = None, alpha: float = GRADNORM_ALPHA
    ) -> None:
        super().__init__()
        weights = dict(weights or {})
        _check_names(weights)
        self.tasks, self.alpha = tuple(tasks), alpha
        self.weights = nn.Parameter(torch.tensor([float(weights.get(t, 1.0)) for t in tasks]))  # (T,)
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))  # (T,) 0 = not yet seen

    def _normalised(self) -> Tensor:
        with torch.no_grad():  # the paper's renormalisation; done here so it precedes every step
            self.weights.clamp_(min=1e-4)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        return self.weights.detach()

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        w = self._normalised()
        return sum(w[i] * losses[t] for i, t in enumerate(self.tasks))  # type: ignore[return-value]

    def current_weights(self) -> dict[str, float]:
        return {t: float(self.weights[i].detach()) for i, t in enumerate(self.tasks)}

    def backward(
        self,
        losses: dict[str, Tensor],
        shared: list[nn.Parameter],
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not shared:
            return super().backward(losses, shared, scaler)
        w = self._normalised()
        current = torch.stack([losses[t].detach().float() for t in self.tasks])  # (T,)
        if bool((self.initial_losses == 0).all()):
            self.initial_losses.copy_(current)
        for p in shared:
            p.grad = None
        grads = task_gradients([w[i] * losses[t] for i, t in enumerate(self.tasks)], shared, scaler)  # (T, P)
        write_gradient(shared, grads.sum(dim=0))
        s = scaler.get_scale() if scaler is not None else 1.0
        start, size = _last_weight_slice(shared)
        norms = grads[:, start : start + size].norm(dim=1).float() / s  # (T,) G_t = |grad_W w_t L_t|
        rate = current / self.initial_losses.clamp_min(1e-12)
        target = norms.mean() * (rate / rate.mean()) ** self.alpha  # constant in the paper
        per_weight = norms / w.clamp_min(1e-12)  # dG_t / dw_t
        grad_w = torch.sign(norms - target) * per_weight
        if not bool(torch.isfinite(grad_w).all()):  # an AMP overflow: the engine skips this step anyway
            grad_w = torch.zeros_like(grad_w)
        self.weights.grad = (grad_w * s).to(self.weights.dtype)  # scaled like every other gradient


def _last_weight_slice(shared: list[nn.Parameter]) -> tuple[int, int]:
    """(offset, numel) of the last shared parameter with >1 dimension in the flat gradient vector."""
    offset, found = 0, None
    for p in shared:
        if p.ndim > 1:
            found = (offset, p.numel())
        offset += p.numel()
    return found if found is not None else (offset - shared[-1].numel(), shared[-1].numel())


WEIGHTINGS: dict[str, type[TaskWeighting]] = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWAWeighting,
    "gradnorm": GradNormWeighting,
    "pcgrad": PCGradWeighting,
    "cagrad": CAGradWeighting,
}


def build_weighting(
    name: str, tasks: tuple[str, ...], weights: dict[str, float], args: dict[str, float] | None = None
) -> TaskWeighting:
    """``WEIGHTINGS[name](tasks, weights, **args)``: ``args`` are the method's hyper-parameters
    (``loss.weighting_args``, e.g. ``{alpha: 0.5}`` for GradNorm), checked against its constructor."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss.weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    params = inspect.signature(cls.__init__).parameters
    defaults = {n: p.default for n, p in params.items() if n not in ("self", "tasks", "weights")}
    unknown = sorted(set(args or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"loss.weighting_args {unknown} are not hyper-parameters of loss.weighting={name}; "
            f"it takes {sorted(defaults) or 'none'}"
        )
    kwargs = {k: type(defaults[k])(v) for k, v in (args or {}).items()}  # e.g. PCGrad's integer seed
    return cls(tasks, weights, **kwargs)


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters every task's loss reaches: the encoder, plus the decoder when it is shared.

    Accepts a DistributedDataParallel wrapper. Empty when the encoder is frozen and decoders are split.
    """
    model = getattr(model, "module", model)
    params = list(model.encoder_parameters()) if hasattr(model, "encoder_parameters") else []
    decoders = getattr(model, "decoders", {})
    if "shared" in decoders:
        params += [p for p in decoders["shared"].parameters() if p.requires_grad]
    return params


# ------------------------------------------------------------------------------------ engine entry points
def backward_step(loss_fn: nn.Module, losses: dict[str, Tensor], model: nn.Module, scaler) -> None:
    """The training step's backward: the weighting's own when ``loss_fn`` has one, else ``total.backward()``."""
    weighting = getattr(loss_fn, "weighting", None)
    if isinstance(weighting, TaskWeighting):
        weighting.backward(losses, shared_parameters(model) if weighting.needs_task_gradients else [], scaler)
    else:
        scaler.scale(losses["total"]).backward()


def task_weights(loss_fn: nn.Module) -> dict[str, float]:
    """``{task: weight}`` now, for logging; empty when ``loss_fn`` has no weighting."""
    weighting = getattr(loss_fn, "weighting", None)
    return weighting.current_weights() if isinstance(weighting, TaskWeighting) else {}


def epoch_end(loss_fn: nn.Module, stats: dict[str, float]) -> None:
    """Hand the epoch's mean per-task losses (``stats["loss/<task>"]``) to the weighting's epoch hook."""
    weighting = getattr(loss_fn, "weighting", None)
    if isinstance(weighting, TaskWeighting):
        tasks = getattr(weighting, "tasks", None) or tuple(getattr(loss_fn, "losses", {}))
        weighting.on_epoch_end({t: stats[f"loss/{t}"] for t in tasks if f"loss/{t}" in stats})
