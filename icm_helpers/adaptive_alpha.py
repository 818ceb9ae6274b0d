"""Adaptive weighting of the auxiliary loss (beyond the paper; its Sec. 5 names adaptive weights as future work).

The paper trains with a fixed weight, Eq. 5: L = R + lambda * {E(y, y_hat) + alpha * E(y, y_hat_aux)}, alpha = 0.5.
``IcmSpec.alpha_mode`` chooses how the auxiliary term is weighted at each training step t:

- ``"fixed"`` (default, the paper): alpha_t = alpha. The training step is exactly the paper's (nothing here runs).
- ``"gradient_similarity"``: Du et al., "Adapting auxiliary losses using gradient similarity" (arXiv 1812.02224,
  the paper's ref. [28]), Algorithm 1, weighted version. With theta the codec parameters SHARED by both terms,

      G_main = grad_theta [R + lambda E(y, y_hat) (+ lambda MSE)]        (the main loss, Eq. 4 / Eq. 6 without aux)
      G_aux  = grad_theta [lambda alpha E(y, y_hat_aux)]
      w_t    = max(0, cos(G_main, G_aux))         cos over ALL shared parameters flattened into one vector
      theta  <- theta - lr * Adam(G_main + w_t G_aux)

  Parameters only the main loss reaches (decoder, hyperprior, context and entropy-parameter networks for aux-enc)
  get G_main; parameters only the auxiliary term reaches (the auxiliary branch itself: Du et al.'s task-specific
  phi_aux) get their full auxiliary gradient, as in Algorithm 1. Which parameters are shared is read off the
  autograd graph each step (a parameter is shared when both gradients exist): for aux-enc that is the encoder g_a
  (tests/test_models.py::test_aux_gradient_flow_per_position); aux-dec adds the decoder's layers before its last
  one, aux-task the whole codec. w_t is detached: a number per step, logged as ``aux_weight`` (with ``aux_cos``).
  The "unweighted" variant of Algorithm 1 (w_t = 1 if cos >= 0 else 0) is implemented in
  ``similarity_weight(cos, "unweighted")`` but not exposed as an ``alpha_mode``.
  Cost: one full backward of the main loss plus one backward of the auxiliary term through the branch and the
  shared parameters (``torch.autograd.grad`` on each; the graph is kept after the first), then a cheap surrogate
  backward that writes the combined gradient (``surrogate_loss``), so the usual optimizer step runs unchanged. A
  fixed-alpha step backpropagates the sum once, so the extra work is one more backward through the encoder plus the
  cosine. Measured on 2-core CPU, 1 thread: 1.14-1.25x the fixed step on the smoke config (N=32, 64x64, batch 4),
  1.21x at N=64 and 1.31-1.38x at N=128 (128x128 crops, batch 4); ``decay`` costs nothing measurable.
- ``"decay"``: the cheap schedule. alpha_t = alpha * (1 - t / (T - 1)), linear from alpha at the first step to 0 at
  the last of the T = epochs x steps_per_epoch steps. The auxiliary loss shapes the encoder early (its role in the
  paper) and the end of training optimises exactly the evaluated objective (Eq. 4 / Eq. 6). No extra computation.

The auxiliary branch is trained with the nominal weight in every mode except ``"decay"`` (where the whole term is
scaled). ``validation_terms`` report the nominal Eq. 5/6 loss; ``main`` (what Sec. 4.2 compares) is unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: alpha_mode -> suffix of the run name / result method ("" keeps the paper's runs where they were)
ALPHA_MODES: dict[str, str] = {"fixed": "", "gradient_similarity": "_gradsim", "decay": "_decay"}
SIMILARITY_VARIANTS = ("weighted", "unweighted")


def check_alpha_mode(alpha_mode) -> str:
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(
            f"unknown alpha_mode {alpha_mode!r}; valid: {', '.join(repr(m) for m in ALPHA_MODES)} "
            "('fixed' = the paper's constant alpha, Eq. 5). Fix: set tasks.<task>.alpha_mode in the profile "
            "or pass alpha_mode= to Experiment.spec / run_grid with one of these"
        )
    return alpha_mode


def mode_suffix(alpha_mode: str) -> str:
    """``""`` for the paper's fixed alpha, else ``"_gradsim"`` / ``"_decay"`` (run names, result methods)."""
    return ALPHA_MODES[check_alpha_mode(alpha_mode)]


def decay_weight(step: int, total_steps: int) -> float:
    """Multiplier of alpha at 0-based ``step`` of ``total_steps``: 1 at the first step, linear to 0 at the last."""
    if total_steps < 1 or not 0 <= step:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if total_steps == 1:
        return 1.0
    return max(0.0, 1.0 - step / (total_steps - 1))


def similarity_weight(cos: torch.Tensor, variant: str = "weighted") -> torch.Tensor:
    """Du et al., Algorithm 1: ``"weighted"`` max(0, cos); ``"unweighted"`` 1 if cos >= 0 else 0 (detached)."""
    if variant not in SIMILARITY_VARIANTS:
        raise ValueError(f"unknown gradient-similarity variant {variant!r}; valid: {SIMILARITY_VARIANTS}")
    cos = cos.detach()
    return cos.clamp(min=0.0) if variant == "weighted" else (cos >= 0).to(cos.dtype)


def gradient_cosine(g_main: Sequence[torch.Tensor | None], g_aux: Sequence[torch.Tensor | None],
                    eps: float = 1e-12) -> tuple[torch.Tensor, list[int]]:
    """Cosine similarity of two per-parameter gradient lists over the parameters where BOTH exist (the shared
    parameters), flattened into one vector; returns (cos, indices of the shared parameters). 0 when a norm is 0
    or nothing is shared (the auxiliary gradient is then not used)."""
    if len(g_main) != len(g_aux):
        raise ValueError(f"gradient lists differ in length: {len(g_main)} vs {len(g_aux)}")
    shared = [i for i, (a, b) in enumerate(zip(g_main, g_aux)) if a is not None and b is not None]
    if not shared:
        device = next((g.device for g in (*g_main, *g_aux) if g is not None), None)
        return torch.zeros((), device=device), shared
    dot = torch.stack([torch.sum(g_main[i].detach().double() * g_aux[i].detach().double()) for i in shared]).sum()
    nm = torch.stack([torch.sum(g_main[i].detach().double() ** 2) for i in shared]).sum().sqrt()
    na = torch.stack([torch.sum(g_aux[i].detach().double() ** 2) for i in shared]).sum().sqrt()
    return (dot / torch.clamp(nm * na, min=eps)).float(), shared


@dataclass
class SimilarityStep:
    grads: list[torch.Tensor | None]  # combined gradient per parameter (None: reached by neither loss)
    cos: torch.Tensor
    weight: torch.Tensor
    shared: list[int]  # indices (into params) of the shared parameters


def gradient_similarity_grads(params: Sequence[torch.nn.Parameter], main_loss: torch.Tensor, aux_loss: torch.Tensor,
                              variant: str = "weighted") -> SimilarityStep:
    """Du et al.'s combined gradient: G_main + w G_aux on the shared parameters, G_main / G_aux on the parameters
    only one loss reaches; w = ``similarity_weight(cos(G_main, G_aux) on the shared parameters)``. ``aux_loss``
    must already carry its weight (lambda alpha E_aux); two ``autograd.grad`` calls, the graph is freed after."""
    params = list(params)
    g_aux = torch.autograd.grad(aux_loss, params, retain_graph=True, allow_unused=True)
    g_main = torch.autograd.grad(main_loss, params, allow_unused=True)
    cos, shared = gradient_cosine(g_main, g_aux)
    w = similarity_weight(cos, variant)
    combined: list[torch.Tensor | None] = []
    for gm, ga in zip(g_main, g_aux):
        if gm is not None and ga is not None:
            combined.append(gm + w.to(ga.dtype) * ga)
        else:
            combined.append(gm if gm is not None else ga)
    return SimilarityStep(combined, cos, w, shared)


def surrogate_loss(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A scalar whose ``backward()`` puts exactly ``grads`` into ``params`` (sum of <p, g>, g constant), so the
    usual optimizer step (clipping, optimizer, quantile update in ``training.codec_step``) runs unchanged."""
    terms = [torch.sum(p * g.detach()) for p, g in zip(params, grads) if g is not None]
    if not terms:
        raise ValueError("no parameter receives gradient from the ICM loss")
    return torch.stack(terms).sum()


def training_loss(spec, terms: dict[str, torch.Tensor], step: int, total_steps: int,
                  params: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate at ``step`` for ``spec.alpha_mode`` and the per-step logs (0-dim tensors).

    ``terms`` come from ``training.icm_terms`` (nominal alpha); ``params`` are the optimised parameters. "fixed"
    returns ``terms["loss"]`` and ``terms`` unchanged (the paper's step, bit for bit). "decay" and
    "gradient_similarity" log the effective loss as ``loss`` and the multiplier of alpha as ``aux_weight``
    (``aux_cos``: the cosine, gradient_similarity only). For gradient_similarity the returned loss is the
    surrogate of ``surrogate_loss`` (its value is meaningless; its gradient is Du et al.'s combined gradient)."""
    mode = check_alpha_mode(getattr(spec, "alpha_mode", "fixed"))
    if mode == "fixed" or "aux" not in terms:
        return terms["loss"], terms
    weighted_aux = spec.lambda_ * spec.alpha * terms["aux"]
    if mode == "decay":
        w = decay_weight(step, total_steps)
        loss = terms["main"] + w * weighted_aux
        return loss, {**terms, "loss": loss, "aux_weight": torch.tensor(w, device=loss.device)}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise NotImplementedError(
            "alpha_mode='gradient_similarity' is not supported in a distributed (torchrun/DDP) job yet: "
            "its gradients bypass DDP's all-reduce; train it on one process, or use 'fixed' / 'decay'"
        )
    params = list(params)
    res = gradient_similarity_grads(params, terms["main"], weighted_aux)
    effective = (terms["main"].detach() + res.weight * weighted_aux.detach())
    logs = {
        **{k: v.detach() for k, v in terms.items()},
        "loss": effective,
        "aux_weight": res.weight,
        "aux_cos": res.cos,
    }
    return surrogate_loss(params, res.grads), logs
