"""Training losses on network outputs (pre-activations) and their closed-form output Hessians.

Every loss is ``ℓ(z, t)`` summed over the output dimensions of one example and averaged over the
examples of a batch, as in the papers: Martens (2010) and Goldfarb et al. (2020) sum the pixel-wise
cross-entropy over the 784 pixels of an image and average over images.

Each loss is a *matching loss* for its output non-linearity, so its Hessian with respect to the
pre-activation ``z`` is positive semi-definite and the Gauss-Newton matrix ``Jᵀ H_ℓ J`` is too:

==========================  ===========================================  ====================================
loss                        ℓ(z, t) for one example                      H_ℓ u
==========================  ===========================================  ====================================
sigmoid cross-entropy       Σ_j softplus(z_j) − t_j z_j                    σ(z) ⊙ (1 − σ(z)) ⊙ u
softmax cross-entropy       logsumexp(z) − z_t                             p ⊙ u − p (pᵀ u),  p = softmax(z)
sequence cross-entropy      (1/T) Σ_τ logsumexp(z_τ) − z_τ,t_τ              (p_τ ⊙ u_τ − p_τ (p_τᵀ u_τ)) / T
squared error               ½ ‖z − t‖²                                     u
==========================  ===========================================  ====================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor


class Loss(ABC):
    """A loss on pre-activation outputs ``z`` of shape (B, ...) and targets of the batch."""

    name: str
    #: True when targets are class labels and ``error`` is a 0/1 misclassification.
    classification: bool = False
    #: True when the loss is a mean log-loss per token, so ``exp(loss)`` is a perplexity.
    perplexity: bool = False

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean over examples of the per-example loss."""
        return self.per_example(outputs, targets).mean()

    @abstractmethod
    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Loss of each example, shape (B,)."""

    @abstractmethod
    def output_hessian_vector_product(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """``H_ℓ u`` per example, ``H_ℓ = ∂²ℓ/∂z²`` of the per-example loss; same shape as ``u``."""

    @abstractmethod
    def error(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The error the papers report, per example: squared reconstruction error or misclassification."""


class SigmoidCrossEntropy(Loss):
    """Bernoulli cross-entropy of logistic outputs, summed over output units (autoencoders)."""

    name = "sigmoid_cross_entropy"

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return loss.flatten(1).sum(1)

    def output_hessian_vector_product(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(outputs)
        return p * (1 - p) * u

    def error(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Squared reconstruction error ``Σ_j (σ(z_j) − t_j)²`` (Hinton & Salakhutdinov 2006)."""
        return (torch.sigmoid(outputs) - targets).pow(2).flatten(1).sum(1)


class SquaredError(Loss):
    """``½‖z − t‖²`` on linear outputs, summed over output units."""

    name = "squared_error"

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)

    def output_hessian_vector_product(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        return u

    def error(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Squared reconstruction error ``‖z − t‖²``."""
        return (outputs - targets).pow(2).flatten(1).sum(1)


class SoftmaxCrossEntropy(Loss):
    """Categorical cross-entropy of softmax outputs over class logits (classifiers)."""

    name = "softmax_cross_entropy"
    classification = True

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def output_hessian_vector_product(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def error(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Misclassification indicator (1 − accuracy when averaged)."""
        return (outputs.argmax(-1) != targets).to(outputs.dtype)


class SequenceCrossEntropy(Loss):
    """Next-token cross-entropy of (B, T, V) logits against (B, T) targets, *averaged* over the T positions
    of an example (language models): the loss is in nats per token and its exponential the perplexity."""

    name = "sequence_cross_entropy"
    classification = True
    perplexity = True

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(1)

    def output_hessian_vector_product(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
        return (p * u - p * (p * u).sum(-1, keepdim=True)) / outputs.shape[1]

    def error(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Fraction of positions whose most likely next token is wrong."""
        return (outputs.argmax(-1) != targets).to(outputs.dtype).mean(1)


LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (SigmoidCrossEntropy, SquaredError, SoftmaxCrossEntropy, SequenceCrossEntropy)
}


def build_loss(name: str) -> Loss:
    """The loss called ``name`` (one of :data:`LOSSES`)."""
    return LOSSES[name]()
