"""The optimizers on your own model and data, ``torch.optim``-style.

.. code-block:: python

    from ksd.optim import KSD

    optimizer = KSD(model, "softmax_cross_entropy", krylov_dim=10)
    for _ in range(20):
        stats = optimizer.step(inputs, targets)   # one KSD iteration on these examples

Each class wraps the optimizer that ``ksd-run`` runs (:data:`ksd.optim.OPTIMIZERS`) and a
:class:`~ksd.problem.Problem` built on ``model``: the same code, with the same hyperparameters and
defaults (the fields of the method's ``Config``, documented in ``conf/optimizer/<name>.yaml``), so handed
the examples ``ksd-run`` would use, a run here follows the same trajectory (``tests/test_api.py`` checks
it for KSD on its whole training set).

The ``step`` contract: data handed to every step
------------------------------------------------
``step(inputs, targets)`` performs one iteration of the method on these examples and returns its
statistics. Every evaluation inside the step uses them, as ``ksd-run`` uses its training set: the
gradient, the line searches (L-BFGS, nonlinear CG), the curvature products and the random curvature
and BFGS subsets (KSD, each at most half of the examples), the curvature chunks (HF), the second pass at
the new point (K-BFGS), the trial point (ARCs-LSR1). Hand the whole data set to the full-batch methods
(KSD, HF, L-BFGS, NCG, as in their papers) and mini-batches to the stochastic ones; there is no
``batch_size``: the batch is what you hand over.

Why data and not a ``torch.optim`` closure: a closure returns one number at the current parameters, but
these methods evaluate other points (line searches, trial steps, the subspace BFGS) and need the
network's outputs and per-example losses — a Gauss-Newton product uses the closed-form output Hessian of
the loss, the diagonal preconditioners per-example gradients, K-FAC and K-BFGS each layer's inputs and
pre-activation gradients. So the optimizer holds the model and the loss and is handed the examples.

* ``loss_fn``: a name of :data:`ksd.losses.LOSSES` (``softmax_cross_entropy`` with class indices as
  targets; ``sigmoid_cross_entropy`` or ``squared_error`` with targets shaped like the outputs, e.g.
  ``inputs.flatten(1)`` for an autoencoder) or a :class:`~ksd.losses.Loss`. Each is summed over the
  output units of an example and averaged over examples.
* Returned statistics: ``loss`` (the objective, weight decay included, on these examples at the
  parameters before the step) and the method's own (the columns ``ksd-run`` writes to ``metrics.csv``);
  values may be tensors, so no host synchronisation is forced. A method whose safeguards cannot continue
  raises :class:`~ksd.optim.base.Diverged`.
* The model: its parameters become views of one flat vector when the optimizer is built, so build the
  optimizer after moving the model to its device and before anything else holds ``model.parameters()``.
  All of them are trained: tied (shared) and frozen (``requires_grad=False``) parameters are refused.
  K-BFGS, K-BFGS(L) and K-FAC precondition ``nn.Linear`` and ``nn.Conv2d`` layers and refuse a model with
  any other layer that has parameters, naming it; the other methods take any differentiable module.
* ``lr_decay_epochs`` (K-BFGS, K-FAC) counts passes over the examples handed to a step, i.e. steps.
* ``state_dict()`` / ``load_state_dict()``: the method's state, work counts and random generator; the
  parameters are the model's (``model.state_dict()``), as with ``torch.optim``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ksd.data.splits import DataSpec, Split, Splits
from ksd.losses import LOSSES, Loss, build_loss
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.registry import optimizer_class
from ksd.problem import Problem

#: Config fields the library API does not take: the method's name, and the batch (handed to ``step``).
NOT_HYPERPARAMETERS = ("name", "batch_size")


class ModelOptimizer:
    """One method of :data:`ksd.optim.OPTIMIZERS` on a model and a loss; ``step`` is handed the data.

    Args:
        model: the network; its outputs are the loss's inputs (logits, pre-activations).
        loss_fn: a loss name (``softmax_cross_entropy``, ``sigmoid_cross_entropy``, ``squared_error``)
            or a :class:`~ksd.losses.Loss`.
        seed: seeds the method's random draws (KSD's subsets, K-FAC's sampled targets).
        max_chunk: most examples pushed through the network at once (results are summed over chunks).
        **hyperparameters: fields of the method's ``Config`` (``conf/optimizer/<name>.yaml``), e.g.
            ``lr``, ``krylov_dim``, ``damping``; unknown names and out-of-range values are refused.
    """

    #: The key of the wrapped method in :data:`ksd.optim.OPTIMIZERS` (and ``optimizer=`` of ``ksd-run``).
    method: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        loss_fn: str | Loss,
        *,
        seed: int = 0,
        max_chunk: int = 10_000,
        **hyperparameters: Any,
    ) -> None:
        implementation = optimizer_class(self.method)
        self.config = self._config(implementation.Config, hyperparameters)
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise ValueError(f"{type(self).__name__}: the model has no parameters to optimize.")
        empty = Split(inputs=parameter.new_empty(0), labels=None)
        spec = DataSpec(name="data handed to step()", input_shape=(), num_classes=None, source="ksd.optim")
        splits = Splits(train=empty, val=empty, test=empty, spec=spec)
        self.problem = Problem(
            model, _loss(loss_fn), splits, autoencoder=False, seed=seed, max_chunk=max_chunk
        )
        self.optimizer: Optimizer = implementation(self.problem, self.config)

    def _config(self, schema: type[OptimizerConfig], hyperparameters: dict[str, Any]) -> OptimizerConfig:
        """The method's validated ``Config``: these hyperparameters, the defaults of ``ksd-run`` otherwise."""
        known = [f.name for f in dataclasses.fields(schema) if f.name not in NOT_HYPERPARAMETERS]
        unknown = sorted(set(hyperparameters) - set(known))
        if unknown:
            extra = " (the batch is the data handed to step())" if "batch_size" in unknown else ""
            raise TypeError(
                f"{type(self).__name__} has no hyperparameter {', '.join(map(repr, unknown))}{extra}; "
                f"its hyperparameters are: {', '.join(known)}."
            )
        return schema(name=self.method, batch_size=None, **hyperparameters)

    def step(self, inputs: Tensor, targets: Tensor) -> Stats:
        """One iteration of the method on these examples (moved to the model's device); its statistics."""
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(
                f"step() needs as many targets as inputs, at least one: got {len(inputs)} and {len(targets)}."
            )
        device = self.problem.theta.device
        self.problem.use_training_data(Split(inputs=inputs.to(device), labels=targets.to(device)))
        with torch.enable_grad():
            return self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The method's state (as in ``ksd-run``'s checkpoints), work counts and random generator."""
        problem = self.problem.state_dict(parameters=False)
        return {"optimizer": self.optimizer.state_dict(), "problem": problem}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (load the parameters with ``model.load_state_dict``)."""
        self.problem.load_state_dict(state_dict["problem"])
        self.optimizer.load_state_dict(state_dict["optimizer"])


def _loss(loss_fn: str | Loss) -> Loss:
    if isinstance(loss_fn, Loss):
        return loss_fn
    if isinstance(loss_fn, str) and loss_fn in LOSSES:
        return build_loss(loss_fn)
    raise ValueError(f"loss_fn must be a ksd.losses.Loss or one of {', '.join(LOSSES)}, got {loss_fn!r}.")


class KSD(ModelOptimizer):
    """Krylov Subspace Descent (Vinyals & Povey 2012): :mod:`ksd.optim.ksd`, ``conf/optimizer/ksd.yaml``."""

    method = "ksd"


class HessianFree(ModelOptimizer):
    """Hessian-free optimisation (Martens 2010): :mod:`ksd.optim.hf`, ``conf/optimizer/hf.yaml``."""

    method = "hf"


class KBFGS(ModelOptimizer):
    """K-BFGS (Goldfarb, Ren & Bahamou 2020): :mod:`ksd.optim.kbfgs`, ``conf/optimizer/kbfgs.yaml``."""

    method = "kbfgs"


class KBFGSL(ModelOptimizer):
    """K-BFGS(L), limited memory: :mod:`ksd.optim.kbfgs`, ``conf/optimizer/kbfgs_l.yaml``."""

    method = "kbfgs_l"


class KFAC(ModelOptimizer):
    """K-FAC (Martens & Grosse 2015): :mod:`ksd.optim.kfac`, ``conf/optimizer/kfac.yaml``."""

    method = "kfac"


class ARCsLSR1(ModelOptimizer):
    """ARCs with L-SR1 (Ranganath, Singhal & Marcia 2025): :mod:`ksd.optim.arcs_lsr1`, ``arcs_lsr1.yaml``."""

    method = "arcs_lsr1"


class TRON(ModelOptimizer):
    """Trust-region Newton-CG (Lin & Moré 1999; LIBLINEAR): :mod:`ksd.optim.tron`, ``tron.yaml``."""

    method = "tron"


class LBFGS(ModelOptimizer):
    """L-BFGS with a strong-Wolfe line search: :mod:`ksd.optim.lbfgs`, ``conf/optimizer/lbfgs.yaml``."""

    method = "lbfgs"


class NonlinearCG(ModelOptimizer):
    """Nonlinear conjugate gradient (PR+ / FR): :mod:`ksd.optim.ncg`, ``conf/optimizer/ncg.yaml``."""

    method = "ncg"


class SGD(ModelOptimizer):
    """``torch.optim.SGD`` through the same step as ``ksd-run``: ``conf/optimizer/sgd.yaml``."""

    method = "sgd"


class Adam(ModelOptimizer):
    """``torch.optim.Adam`` (or the K-BFGS code's variant): ``conf/optimizer/adam.yaml``."""

    method = "adam"


class RMSprop(ModelOptimizer):
    """``torch.optim.RMSprop`` (or the K-BFGS code's variant): ``conf/optimizer/rmsprop.yaml``."""

    method = "rmsprop"


class AdaGrad(ModelOptimizer):
    """``torch.optim.Adagrad`` through the same step as ``ksd-run``: ``conf/optimizer/adagrad.yaml``."""

    method = "adagrad"


#: The library classes by ``ksd-run`` optimizer name.
LIBRARY: dict[str, type[ModelOptimizer]] = {cls.method: cls for cls in ModelOptimizer.__subclasses__()}
