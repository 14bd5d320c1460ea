"""Per-layer machinery of the Kronecker-factored optimizers (K-BFGS, K-BFGS(L), K-FAC).

Each ``nn.Linear`` and ``nn.Conv2d`` layer ``l`` has a weight matrix ``W_l`` (d_out × d_in; a conv
kernel viewed as C_out × C_in·k_h·k_w) and optionally a bias, treated in homogeneous coordinates: the
layer maps ``ā = [a; 1]`` to the pre-activation ``z = [W, b] ā``. The curvature block of the layer is
modelled as ``A_l ⊗ G_l`` with an input factor ``A_l`` ((d_in+1)²) and an output factor ``G_l``
(d_out²), and a preconditioned direction is the matrix ``H_G · M · H_A`` with ``M = [∇W, ∇b]``
(Goldfarb, Ren & Bahamou 2020, eq. (4)–(6); Martens & Grosse 2015, §3).

What a forward/backward pass records (:meth:`KroneckerLayers.forward_backward`), through forward
hooks on the layer modules and ``autograd.grad`` with respect to the recorded pre-activations:

* the layer inputs ``a`` (the homogeneous 1 is added implicitly, never concatenated);
* the pre-activations ``z``;
* the per-example pre-activation gradients ``δ_i = ∂ℓ_i/∂z_i`` — the gradient of the *summed*
  loss, i.e. ``N · z.grad`` of the mean loss (ALGORITHMS.md §1.5).

Convolutions follow Grosse & Martens (2016, KFC) and Ren, Bahamou & Goldfarb (2022, §4): a conv
layer is a linear layer applied at |T| spatial positions to the unfolded patches
(``torch.nn.functional.unfold``). Its input factor is the second moment of the homogeneous patches
summed over the positions and averaged over the examples,
``A = (1/N) Σ_i Σ_t ā_it ā_itᵀ = |T| · mean_{i,t} ā_it ā_itᵀ`` (KFC's Ω), and its output-side
statistics are averages over examples *and* positions (KFC's Γ; the (s, y) pairs of K-BFGS use
spatially averaged pre-activations and gradients). Because ``A`` carries the factor |T|, damping
``λ`` is split as ``√λ·√|T|`` on the A side and ``√λ/√|T|`` on the G side (2022 paper; the same
split as ASDL's ``KronBfgsGradientMaker``), see :meth:`KroneckerLayer.damping`. For linear layers
|T| = 1 and everything reduces to the 2020 formulas.

Directions are written back into the flat ``problem.theta`` through views of that vector
(:meth:`KroneckerLayer.matrix_views`), so no parameter is copied.

:class:`KroneckerOptimizer` holds what the three optimizers share: the exponential-moving-average
gradient momentum of the authors' code ``M ← ρ M + (1 − ρ)(g + τ θ)`` (no bias correction), L2
weight decay ``τ`` added to the gradient, and a step-decay learning-rate schedule on ``problem.epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ksd.errors import ConfigError, require
from ksd.optim.base import Optimizer, OptimizerConfig
from ksd.problem import Batch, Problem

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

#: Gram matrices at least this wide are computed as their upper block triangle (:func:`symmetric_gram_`).
SYMMETRIC_SPLIT_MIN = 256


def symmetric_gram_(out: Tensor, rows: list[Tensor], beta: float, alpha: float) -> Tensor:
    """``out ← β·out + α·Σ_r rᵀr`` in place for a symmetric ``out``, computing only the upper block triangle.

    torch has no symmetric rank-k product (BLAS ``syrk``). With the columns split in halves
    ``R = [R₁, R₂]``, ``RᵀR = [[R₁ᵀR₁, R₁ᵀR₂], [(R₁ᵀR₂)ᵀ, R₂ᵀR₂]]``: three products of a quarter of the
    work each instead of four, and the lower-left block is copied from the upper-right one (1000 × 1001
    rows on the 2-core CPU: 6.8 ms instead of 9.0). Narrower than :data:`SYMMETRIC_SPLIT_MIN`, one product.
    ``β = 0`` ignores what ``out`` held (``addmm`` semantics). Returns ``out``.
    """
    d = out.shape[0]
    if d < SYMMETRIC_SPLIT_MIN:
        blocks = [(slice(None), slice(None))]
    else:
        first, second = slice(0, d // 2), slice(d // 2, d)
        blocks = [(first, first), (first, second), (second, second)]
    for left, right in blocks:
        for k, r in enumerate(rows):
            out[left, right].addmm_(r[:, left].T, r[:, right], beta=beta if k == 0 else 1.0, alpha=alpha)
    if d >= SYMMETRIC_SPLIT_MIN:
        out[second, first] = out[first, second].T
    return out


def damped_inverse(matrix: Tensor, damping: float) -> Tensor:
    """``(matrix + damping · I)⁻¹`` of a symmetric positive semi-definite matrix, by Cholesky."""
    shifted = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.cholesky_inverse(torch.linalg.cholesky_ex(shifted).L)


@dataclass
class LayerRecord:
    """What one layer saw during one forward/backward pass, one entry per chunk of the batch."""

    inputs: list[Tensor] = field(default_factory=list)  # layer inputs a (detached)
    outputs: list[Tensor] = field(default_factory=list)  # pre-activations z (detached after the pass)
    output_grads: list[Tensor] = field(default_factory=list)  # per-example δ = ∂ℓ_i/∂z_i
    rows: list[Tensor] | None = None  # cached input rows (unfolded patches for conv layers)


@dataclass
class PassRecord:
    """Result of :meth:`KroneckerLayers.forward_backward` on one batch."""

    loss: Tensor  # mean loss over the batch (0-dim, no host sync)
    grad: Tensor | None  # mean gradient as a flat vector, when requested
    examples: int  # N
    layers: list[LayerRecord]


class KroneckerLayer:
    """One ``nn.Linear`` or ``nn.Conv2d`` (groups = 1) seen as ``z = [W, b] ā`` on input rows ``ā``."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d) -> None:
        self.name = name
        self.module = module
        self.weight_key = f"{name}.weight" if name else "weight"
        self.bias_key = (f"{name}.bias" if name else "bias") if module.bias is not None else None
        self.is_conv = isinstance(module, nn.Conv2d)
        self.n_out = module.weight.shape[0]
        self.d_in = module.weight[0].numel()  # C_in·k_h·k_w for a conv
        self.n_in = self.d_in + (self.bias_key is not None)  # size of the A factor
        self.spatial_size = 1  # |T|, read from the first recorded conv output

    # ------------------------------------------------------------------ flat-vector views
    def matrix_views(self, named: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The weight as a (d_out × d_in) view and the bias (or None), from ``problem.unflatten(v)``."""
        weight = named[self.weight_key].view(self.n_out, self.d_in)
        return weight, (named[self.bias_key] if self.bias_key is not None else None)

    def times_input_factor(self, named: dict[str, Tensor], right: Tensor) -> Tensor:
        """``[W, b] · R`` for the layer's part of a flat vector, without concatenating ``[W, b]``."""
        weight, bias = self.matrix_views(named)
        product = weight @ right[: self.d_in]
        if bias is not None:
            product.addr_(bias, right[self.d_in])
        return product

    def add_matrix_(self, named: dict[str, Tensor], matrix: Tensor, alpha: float) -> None:
        """``v_l ← v_l + alpha · matrix`` for the layer's part of a flat vector (in place, through views)."""
        weight, bias = self.matrix_views(named)
        weight.add_(matrix[:, : self.d_in], alpha=alpha)
        if bias is not None:
            bias.add_(matrix[:, self.d_in], alpha=alpha)

    # ------------------------------------------------------------------ damping
    def damping(self, lam: float) -> tuple[float, float]:
        """Levenberg-Marquardt damping ``(A side, G side) = (√λ·√|T|, √λ/√|T|)`` (2022 paper)."""
        root, spatial = math.sqrt(lam), math.sqrt(self.spatial_size)
        return root * spatial, root / spatial

    # ------------------------------------------------------------------ input statistics
    def input_rows(self, record: LayerRecord) -> list[Tensor]:
        """Inputs as rows of length d_in, one row per example and spatial position (cached)."""
        if record.rows is None:
            record.rows = [self._rows(x) for x in record.inputs]
        return record.rows

    def _rows(self, x: Tensor) -> Tensor:
        if not self.is_conv:
            return x.reshape(-1, self.d_in)
        m = self.module
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return patches.transpose(1, 2).reshape(-1, self.d_in)  # (N·|T|, C_in·k_h·k_w)

    def input_mean(self, record: LayerRecord) -> Tensor:
        """Mean homogeneous input ``mean_{i,t} ā_it`` (length n_in; last entry 1 with a bias).

        Unfolding is linear, so for a conv layer this is the spatial mean of the unfolded *mean input*:
        no (N·|T| × d_in) patch matrix is formed.
        """
        if self.is_conv:
            count = sum(x.shape[0] for x in record.inputs)
            mean_input = sum(x.sum(0, keepdim=True) for x in record.inputs) / count
            total = self._rows(mean_input).mean(0)
        else:
            rows = self.input_rows(record)
            total = sum(r.sum(0) for r in rows) / sum(r.shape[0] for r in rows)
        return torch.cat([total, total.new_ones(1)]) if self.bias_key is not None else total

    def input_second_moment(self, record: LayerRecord, examples: int) -> Tensor:
        """``A = (1/N) Σ_i Σ_t ā_it ā_itᵀ``, built blockwise from ``Σ aaᵀ``, ``Σ a`` and the row count."""
        moment = record.inputs[0].new_zeros(self.n_in, self.n_in)
        return self.update_input_second_moment_(moment, record, examples, 0.0)

    def update_input_second_moment_(
        self, average: Tensor, record: LayerRecord, examples: int, decay: float
    ) -> Tensor:
        """``Ā ← decay·Ā + (1 − decay)·A`` in place (K-BFGS's stored Ā, K-FAC's A); no temporary ``A``.

        The Gram block ``Σ aaᵀ`` by :func:`symmetric_gram_`; the homogeneous row and column from ``Σ a``,
        the corner from the row count.
        """
        rows = self.input_rows(record)
        weight = (1 - decay) / examples
        symmetric_gram_(average[: self.d_in, : self.d_in], rows, decay, weight)
        if self.bias_key is not None:
            column = sum(r.sum(0) for r in rows)
            for edge in (average[self.d_in, : self.d_in], average[: self.d_in, self.d_in]):
                edge.mul_(decay).add_(column, alpha=weight)
            average[self.d_in, self.d_in].mul_(decay).add_(weight * sum(r.shape[0] for r in rows))
        return average

    def input_second_moment_action(self, record: LayerRecord, examples: int, v: Tensor) -> Tensor:
        """``A v = (1/N) Σ_{i,t} ā_it (ā_itᵀ v)`` without forming ``A`` (the 2022 mini-batch action).

        For a conv layer ``ā_itᵀ v`` is a convolution of the input with ``v`` as a one-channel kernel and
        ``Σ_{i,t} ā_it q_it`` the weight gradient of that convolution: no patch matrix is formed.
        """
        out = v.new_zeros(self.n_in)
        weight, bias = v[: self.d_in], (v[self.d_in] if self.bias_key is not None else None)
        for x in record.inputs:
            if self.is_conv:
                m, kernel = self.module, weight.view(1, *self.module.weight.shape[1:])
                options = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}
                projection = F.conv2d(x, kernel, bias=None if bias is None else bias.view(1), **options)
                out[: self.d_in] += torch.nn.grad.conv2d_weight(x, kernel.shape, projection, **options).view(
                    -1
                )
            else:
                rows = x.reshape(-1, self.d_in)
                projection = rows @ weight if bias is None else torch.addmv(bias, rows, weight, beta=1)
                out[: self.d_in].addmv_(rows.T, projection)
            if bias is not None:
                out[self.d_in] += projection.sum()
        return out.div_(examples)

    # ------------------------------------------------------------------ output statistics
    def _channel_rows(self, t: Tensor) -> Tensor:
        """A pre-activation-shaped tensor as rows of length d_out (one per example and position)."""
        return t.movedim(1, -1).reshape(-1, self.n_out) if self.is_conv else t.reshape(-1, self.n_out)

    def _mean(self, chunks: list[Tensor]) -> Tensor:
        dims = [0, *range(2, chunks[0].dim())] if self.is_conv else list(range(chunks[0].dim() - 1))
        count = sum(c.numel() // self.n_out for c in chunks)
        return sum(c.sum(dims) for c in chunks) / count

    def output_mean(self, record: LayerRecord) -> Tensor:
        """Pre-activations averaged over examples and spatial positions (length d_out)."""
        return self._mean(record.outputs)

    def output_grad_mean(self, record: LayerRecord) -> Tensor:
        """Per-example pre-activation gradients δ averaged over examples and positions."""
        return self._mean(record.output_grads)

    def output_grad_second_moment(self, record: LayerRecord) -> Tensor:
        """``G = mean_{i,t} δ_it δ_itᵀ`` (KFC's Γ; the K-FAC output factor)."""
        moment = record.output_grads[0].new_zeros(self.n_out, self.n_out)
        return self.update_output_grad_second_moment_(moment, record, 0.0)

    def update_output_grad_second_moment_(self, average: Tensor, record: LayerRecord, decay: float) -> Tensor:
        """``Ḡ ← decay·Ḡ + (1 − decay)·G`` in place, with :func:`symmetric_gram_`."""
        rows = [self._channel_rows(g) for g in record.output_grads]
        return symmetric_gram_(average, rows, decay, (1 - decay) / sum(r.shape[0] for r in rows))


def find_layers(model: nn.Module, optimizer: str) -> list[KroneckerLayer]:
    """Every ``nn.Linear``/``nn.Conv2d`` of ``model`` in parameter order; ConfigError for other layers."""
    layers = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = type(module).__name__
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ConfigError(
                f"optimizer {optimizer} preconditions nn.Linear and nn.Conv2d layers only, but layer "
                f"{name!r} ({kind}) has parameters; use a model without it."
            )
        if isinstance(module, nn.Conv2d):
            require(
                module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str),
                f"optimizer {optimizer} needs conv layers with groups=1, zero padding given as numbers; "
                f"layer {name!r} ({kind}) is not.",
            )
        layers.append(KroneckerLayer(name, module))
    return layers


class KroneckerLayers:
    """The Kronecker-factorable layers of a problem's model and the passes that record them."""

    def __init__(self, problem: Problem, optimizer: str) -> None:
        self.problem = problem
        self.layers = find_layers(problem.model, optimizer)
        self._recording: list[LayerRecord] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KroneckerLayer]:
        return iter(self.layers)

    @contextmanager
    def _record(self) -> Iterator[list[LayerRecord]]:
        """Forward hooks on the layers, active only inside the ``with`` block."""
        records = [LayerRecord() for _ in self.layers]
        handles = [
            layer.module.register_forward_hook(_recorder(record))
            for layer, record in zip(self.layers, records)
        ]
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

    def forward_backward(
        self,
        batch: Batch,
        *,
        gradient: bool,
        sampled_targets: Callable[[Tensor], Tensor] | None = None,
    ) -> PassRecord:
        """Forward and backward at the current ``problem.theta`` on ``batch``, recording every layer.

        Args:
            gradient: also return the flat mean gradient (counted as gradient work). Without it only
                the pre-activation gradients are computed (autograd then skips the weight-gradient
                products) and the pass counts as curvature work: K-BFGS's second pass at the trial point.
            sampled_targets: K-FAC's Fisher: the recorded δ are then gradients of the loss with targets
                drawn from the model's predictive distribution (a second backward through the same
                graph), while the returned gradient still uses the true targets.
        """
        problem = self.problem
        if gradient:
            problem.counts.gradient += len(batch)
        if not gradient or sampled_targets is not None:
            problem.counts.curvature += len(batch)
        point = problem.theta.detach().requires_grad_()
        loss = point.new_zeros(())
        grad = None
        with self._record() as records:
            for chunk in batch.chunks(problem.max_chunk):
                start = len(records[0].outputs)
                out = problem.outputs(chunk.inputs, point)
                require(
                    all(len(r.outputs) == start + 1 for r in records),
                    "every preconditioned layer must be applied exactly once per forward pass.",
                )
                pre_activations = [r.outputs[start] for r in records]
                chunk_loss = problem.loss_fn.per_example(out, chunk.targets).sum()
                wrt = [point, *pre_activations] if gradient else pre_activations
                if sampled_targets is None:
                    grads = torch.autograd.grad(chunk_loss, wrt)
                else:
                    grads = torch.autograd.grad(chunk_loss, point, retain_graph=True) if gradient else ()
                    with torch.no_grad():
                        fake = sampled_targets(out)
                    grads += torch.autograd.grad(
                        problem.loss_fn.per_example(out, fake).sum(), pre_activations
                    )
                if gradient:
                    grad = grads[0] if grad is None else grad.add_(grads[0])
                deltas = grads[1:] if gradient else grads
                for r, z, d in zip(records, pre_activations, deltas):
                    r.outputs[start] = z.detach()
                    r.output_grads.append(d)
                loss += chunk_loss.detach()
        self._read_spatial_sizes(records)
        n = len(batch)
        return PassRecord(loss / n, None if grad is None else grad.div_(n), n, records)

    def input_pass(self, batch: Batch) -> PassRecord:
        """A forward pass without gradients, recording the layer inputs (counted as forward work)."""
        problem = self.problem
        problem.counts.forward += len(batch)
        with torch.no_grad(), self._record() as records:
            for chunk in batch.chunks(problem.max_chunk):
                problem.outputs(chunk.inputs)
        self._read_spatial_sizes(records)
        return PassRecord(problem.theta.new_zeros(()), None, len(batch), records)

    def _read_spatial_sizes(self, records: list[LayerRecord]) -> None:
        """|T| of each conv layer from its output; refuse layers applied more than once per forward."""
        for layer, record in zip(self.layers, records):
            require(
                len(record.outputs) == len(record.inputs) and len(record.outputs) >= 1,
                f"layer {layer.name!r} must be applied exactly once per forward pass.",
            )
            if layer.is_conv:
                layer.spatial_size = record.outputs[0][0, 0].numel()


def _recorder(record: LayerRecord) -> Callable:
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        record.inputs.append(args[0].detach())
        record.outputs.append(output)

    return hook


class KroneckerOptimizer(Optimizer):
    """Shared skeleton: layers, EMA momentum on the regularised gradient, step-decay learning rate."""

    @dataclass
    class Config(OptimizerConfig):
        batch_size: int | None = 1000
        weight_decay: float = 1e-5
        lr: float = 0.3
        damping: float = 0.3
        momentum: float = 0.9
        lr_decay_epochs: list[float] = field(default_factory=list)
        lr_decay_factor: float = 0.1

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "damping", "lr_decay_factor")
            require(0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1), got {self.momentum}.")
            require(
                list(self.lr_decay_epochs) == sorted(self.lr_decay_epochs)
                and all(e > 0 for e in self.lr_decay_epochs),
                f"optimizer.lr_decay_epochs must be increasing positive epochs, got {self.lr_decay_epochs}.",
            )

    def __init__(self, problem: Problem, config: OptimizerConfig | None = None) -> None:
        super().__init__(problem, config)
        self.layers = KroneckerLayers(problem, self.config.name)
        self.state.update(step=0, momentum=torch.zeros_like(problem.theta))

    def learning_rate(self) -> float:
        """``lr · factor^k · step_scale`` with k the number of ``lr_decay_epochs`` already reached."""
        c = self.config
        passed = sum(self.problem.epoch >= e for e in c.lr_decay_epochs)
        return c.lr * c.lr_decay_factor**passed * self.step_scale

    def momentum_gradient(self, grad: Tensor) -> Tensor:
        """``M ← ρ M + (1 − ρ) g`` (authors' ``model_grad_momentum``; no bias correction)."""
        rho = self.config.momentum
        return self.state["momentum"].mul_(rho).add_(grad, alpha=1 - rho)
