"""Curvature-vector products and per-example squared gradients on a batch, with :mod:`torch.func`.

All functions take a :class:`~ksd.problem.Problem`, a :class:`~ksd.problem.Batch` and an optional
flat parameter vector ``theta`` (default: the problem's current parameters), and work on batches
larger than ``problem.max_chunk`` by summing over chunks. Notation for a batch of ``B`` examples
with network outputs (pre-activations) ``z_i = z(x_i; θ)`` and per-example losses ``ℓ_i = ℓ(z_i, t_i)``,
the mean loss being ``f_B(θ) = (1/B) Σ_i ℓ_i``:

* ``J_i = ∂z_i/∂θ`` — the Jacobian of example ``i``'s outputs;
* ``H_ℓ,i = ∂²ℓ_i/∂z_i²`` — the closed-form output Hessian of the loss
  (:meth:`ksd.losses.Loss.output_hessian_vector_product`; PSD for the matching losses used here);
* Gauss-Newton matrix (Martens 2010 §4.2; Schraudolph 2002)  ``G = (1/B) Σ_i J_iᵀ H_ℓ,i J_i``;
* Hessian  ``H = ∇²f_B(θ) = G + (1/B) Σ_i Σ_k (∂ℓ_i/∂z_ik) ∇²z_ik``.

Both matrices are normalised like the mean loss (Martens' demo code adds the damping λ to this
per-case-normalised matrix). Weight decay and damping are added by the optimizers, not here.

How the products are computed (measured on the MNIST autoencoder, batch 1000, CPU;
``scripts/bench_curvature.py`` prints the current numbers):

* ``G v``: one reverse-mode pass over a forward-mode pass that *share one forward*:
  ``torch.func.vjp`` of the function ``θ ↦ jvp(z, θ, v)`` with the tangent ``J v`` returned as an
  auxiliary output. The forward computes ``z`` and ``J v`` together (the tangent adds two
  matrix products per layer), ``H_ℓ J v`` is closed-form, and the pullback of ``z`` alone gives
  ``Jᵀ (H_ℓ J v)`` (two matrix products per layer) — about 5 matrix-product passes against the
  gradient's 3. Alternatives measured and rejected: separate ``jvp`` and ``vjp`` (two forwards,
  ≈2.1× a gradient), the double-vjp trick (≈2.3×), ``torch.func.linearize`` (traces the graph,
  ≈5×).
* Many ``G v`` on one batch at one point (CG in HF, the Krylov recursion in KSD): :func:`ggn_operator`
  stores the forward and its pullback once and gets ``J v`` as the pullback of the pullback, ≈1.3× a
  gradient per product after a set-up of ≈1.2× (``linearize`` reused: ≈1.3× per product, but ≈2.6×
  to set up).
* ``H v``: double backprop, ``∇_θ (∇f_B(θ)ᵀ v)`` (≈2.7× a gradient for one vector); forward-over-reverse
  ``jvp(grad(f_B), θ, v)`` measured ≈3.4×. For several vectors the gradient's graph is shared and the
  second backward is batched (``is_grads_batched``), ≈2.2–2.5× per vector, like ``vmap`` over
  forward-over-reverse.
* Many ``H v`` on one batch at one point (KSD with ``curvature: hessian``): :func:`hessian_operator`
  keeps the gradient's graph and differentiates it once per product.
* Several Gauss-Newton products (``V`` of shape ``(k, n)``): :func:`torch.func.vmap` over the vectors
  of the single-vector product, so the primal forward is computed once and the tangents of all
  vectors go through the network as one larger batch.

``torch.compile`` (``run.compile_curvature``, :attr:`ksd.problem.Problem.compile_curvature`): the
one-off products are then compiled — the shared-forward ``G v`` as above, and ``H v`` as
forward-over-reverse ``jvp(grad(f_B), θ, v)``, which compiles better than double backprop. The stored
operators cannot be compiled (their graph is built outside the compiled region; TorchDynamo refuses
the ``autograd.grad`` through it), so with the option on :func:`ggn_operator` and
:func:`hessian_operator` return the compiled one-off products instead. Measured on the 2-core CPU
(``scripts/bench_curvature.py``): compiling speeds the one-off ``G v`` up by about 7 % and makes
``H v`` about 12 % cheaper than eager double backprop, but a compiled one-off ``G v`` (≈1.6 gradients)
still costs more than a stored operator's (≈1.25), so the option is off by default; with an empty
compile cache the first call compiled for 15.6 s (``G v``) and 4.5 s (``H v``).

Vectors are processed in groups so that (vectors × examples) pushed through at once stays within
``problem.max_chunk``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from ksd.problem import Batch, Problem

#: Most floats held by one chunk of per-example gradients in the ``vmap`` fallback of
#: :func:`per_example_squared_gradients` (2²⁶ floats = 256 MiB in float32).
PER_EXAMPLE_GRADIENT_BUDGET = 2**26


def ggn_vector_product(
    problem: Problem, batch: Batch, vectors: Tensor, theta: Tensor | None = None
) -> Tensor:
    """Gauss-Newton-vector products ``G v = (1/B) Σ_i J_iᵀ H_ℓ,i J_i v`` on ``batch`` at ``theta``.

    Args:
        vectors: one vector of shape ``(n,)`` or ``k`` vectors as the rows of a ``(k, n)`` matrix.

    Returns:
        ``G v`` with the shape of ``vectors`` (rows ``G v_j`` for a matrix). Adds ``len(batch)·k`` to
        ``problem.counts.curvature``. For many products on the same batch and point, :func:`ggn_operator`
        is cheaper.
    """
    point = _point(problem, theta)
    operators = ((c, _ggn_shared_forward(problem, c, point)) for c in batch.chunks(problem.max_chunk))
    return _sum_over_chunks(problem, batch, vectors, operators)


def ggn_operator(problem: Problem, batch: Batch, theta: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``G`` on ``batch`` at ``theta`` as a reusable operator ``V ↦ G V``; shapes as ``ggn_vector_product``.

    Built once: the forward pass ``z(θ)`` with its pullback ``u ↦ Jᵀu`` (:func:`torch.func.vjp`), and the
    pullback *of that pullback*: ``u ↦ Jᵀu`` is linear, so its own vjp is ``v ↦ J v`` (the "double-vjp"
    trick), which reuses the stored forward. Each product is then ``J v`` (two matrix products per layer)
    and ``Jᵀ(H_ℓ J v)`` (two more), about 1.3× a gradient against 1.7× for a one-off product; building
    costs about one gradient (a forward and a backward with graph) and is counted as ``len(batch)``
    curvature examples, each product as ``len(batch)·k``. Worth it from two products on.

    The operator holds the activations of the whole batch (all chunks) until it is released, and a copy
    of ``theta``: it stays ``G`` at the point it was built at when the parameters move on.
    """
    return _stored_operator(problem, batch, theta, _ggn_stored_forward, ggn_vector_product)


def hessian_vector_product(
    problem: Problem, batch: Batch, vectors: Tensor, theta: Tensor | None = None
) -> Tensor:
    """Hessian-vector products ``H v = ∇²f_B(θ) v`` of the mean loss on ``batch`` at ``theta``.

    Double backprop, ``H v = ∇_θ (∇f_B(θ)ᵀ v)``: the gradient's graph is built once per chunk and
    differentiated for each group of vectors (``is_grads_batched``). Same shapes and work count as
    :func:`ggn_vector_product`. ``H`` may be indefinite.
    """
    point = _point(problem, theta)
    build = _hessian_compiled if problem.compile_curvature else _hessian_on_chunk
    operators = ((c, build(problem, c, point)) for c in batch.chunks(problem.max_chunk))
    return _sum_over_chunks(problem, batch, vectors, operators)


def hessian_operator(
    problem: Problem, batch: Batch, theta: Tensor | None = None
) -> Callable[[Tensor], Tensor]:
    """``H`` on ``batch`` at ``theta`` as a reusable operator ``V ↦ H V``, shapes as in
    :func:`hessian_vector_product`.

    The gradient's graph (``create_graph=True``) of every chunk is built once and kept, so each product is
    one backward through it (about two gradients' work less the forward). Holds that graph — about twice
    the activations of a forward — and a copy of ``theta`` until released. Building counts
    ``len(batch)`` curvature examples, each product ``len(batch)·k``.
    """
    return _stored_operator(problem, batch, theta, _hessian_on_chunk, hessian_vector_product)


def per_example_squared_gradients(problem: Problem, batch: Batch, theta: Tensor | None = None) -> Tensor:
    """``Σ_i (∇ℓ_i)²`` (elementwise square) over the examples of ``batch``, shape ``(n,)``.

    Convention: gradients of the *per-example* losses ``ℓ_i`` (not of the mean ``f_B``), summed, NOT
    divided by ``B``: divide by ``len(batch)`` for Martens' ``F_diag = (1/N) Σ_i (∇ℓ_i)²``. Adds
    ``len(batch)`` to ``problem.counts.curvature`` (HF and KSD use it for their preconditioners).

    Two routes, same values:

    * every parameter of the model belongs to an ``nn.Linear`` layer that is applied once per
      forward to a ``(B, d_in)`` input: the per-layer formula. Example ``i``'s gradient of layer
      ``W`` is the outer product ``δ_i h_iᵀ`` of the gradient ``δ_i = ∂ℓ_i/∂a_i`` of its
      pre-activation ``a_i = W h_i + b`` and its input ``h_i``, so ``Σ_i (δ_i h_iᵀ)² = (δ²)ᵀ (h²)`` and
      ``Σ_i (∂ℓ_i/∂b)² = Σ_i δ_i²`` (Martens' demo code computes it the same way). Cost: about one
      gradient; ``δ`` comes from one backward of ``Σ_i ℓ_i`` to the pre-activations.
    * anything else (convolutions, shared layers, inputs with extra dimensions): per-example
      gradients ``vmap(grad(ℓ_i))`` in chunks of at most :data:`PER_EXAMPLE_GRADIENT_BUDGET` floats.
    """
    point = _point(problem, theta)
    problem.counts.curvature += len(batch)
    total = torch.zeros_like(point)
    layers = _linear_layers(problem.model)
    for chunk in batch.chunks(problem.max_chunk):
        if layers is None or _add_linear_squared_gradients(problem, chunk, point, layers, total) is None:
            _add_vmap_squared_gradients(problem, chunk, point, total)
    return total


def loss_gradient_and_squared_gradients(
    problem: Problem, batch: Batch, theta: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss, mean gradient and ``Σ_i (∇ℓ_i)²`` on ``batch``: what ``problem.loss_and_grad`` and
    :func:`per_example_squared_gradients` return, from one forward/backward where the per-layer formula
    applies (the weight gradient ``δᵀh`` and its square ``(δ²)ᵀ(h²)`` share ``δ`` and ``h``).

    HF needs both on its gradient batch; done separately they cost two passes over it. Where the formula
    does not apply (it depends on the model, not on the chunk), the two functions are called. Counts
    ``len(batch)`` gradient and ``len(batch)`` curvature examples, as the two calls it replaces.
    """
    point = _point(problem, theta)
    layers = _linear_layers(problem.model)
    if layers is not None:
        loss, gradient, squares = point.new_zeros(()), torch.zeros_like(point), torch.zeros_like(point)
        for chunk in batch.chunks(problem.max_chunk):
            chunk_loss = _add_linear_squared_gradients(problem, chunk, point, layers, squares, gradient)
            if chunk_loss is None:
                break
            loss += chunk_loss
        else:
            problem.counts.gradient += len(batch)
            problem.counts.curvature += len(batch)
            return loss / len(batch), gradient.div_(len(batch)), squares
    loss, gradient = problem.loss_and_grad(batch, point)
    return loss, gradient, per_example_squared_gradients(problem, batch, point)


# ---------------------------------------------------------------------------------------------- helpers
def _point(problem: Problem, theta: Tensor | None) -> Tensor:
    return (problem.theta if theta is None else theta).detach()


#: Maps one vector ``(n,)`` or a group of vectors ``(g, n)`` to its curvature products summed over the
#: examples of one chunk.
ChunkOperator = Callable[[Tensor], Tensor]


def _sum_over_chunks(
    problem: Problem, batch: Batch, vectors: Tensor, operators: Iterable[tuple[Batch, ChunkOperator]]
) -> Tensor:
    """``(1/B) Σ_chunks operator(V)``, in groups of vectors so that vectors × examples ≤ ``max_chunk``."""
    n = problem.n_params
    if vectors.dim() not in (1, 2) or vectors.shape[-1] != n:
        raise ValueError(f"vectors must have shape ({n},) or (k, {n}), got {tuple(vectors.shape)}")
    k = 1 if vectors.dim() == 1 else vectors.shape[0]
    problem.counts.curvature += len(batch) * k
    result = torch.zeros_like(vectors)
    for chunk, operator in operators:
        if vectors.dim() == 1:
            result += operator(vectors)
            continue
        group = max(1, problem.max_chunk // len(chunk))
        for start in range(0, k, group):
            result[start : start + group] += operator(vectors[start : start + group])
    return result.div_(len(batch))


def _stored_operator(
    problem: Problem,
    batch: Batch,
    theta: Tensor | None,
    build_chunk: Callable[[Problem, Batch, Tensor], ChunkOperator],
    one_off: Callable[[Problem, Batch, Tensor, Tensor], Tensor],
) -> Callable[[Tensor], Tensor]:
    """``V ↦ (1/B) Σ_chunks build_chunk(chunk)(V)`` with every chunk's operator built once, at a copy of
    ``theta``; with ``compile_curvature`` the compiled ``one_off`` product at that copy instead."""
    point = _point(problem, theta).clone()
    if problem.compile_curvature:
        return lambda vectors: one_off(problem, batch, vectors, point)
    problem.counts.curvature += len(batch)
    operators = [(c, build_chunk(problem, c, point)) for c in batch.chunks(problem.max_chunk)]
    return lambda vectors: _sum_over_chunks(problem, batch, vectors, operators)


def _batched(product: Callable[[Tensor], Tensor]) -> ChunkOperator:
    return lambda vectors: product(vectors) if vectors.dim() == 1 else vmap(product)(vectors)


def _compile(problem: Problem, product: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``product`` compiled with ``torch.compile`` when ``problem.compile_curvature``, else unchanged.

    TorchDynamo caches by code object and guards on the closure, so the closures built for every
    chunk and call reuse one compilation per chunk shape.
    """
    return torch.compile(product, dynamic=False) if problem.compile_curvature else product


def _ggn_shared_forward(problem: Problem, chunk: Batch, point: Tensor) -> ChunkOperator:
    """``Σ_{i∈chunk} J_iᵀ H_ℓ,i J_i v``: forward-mode ``J v`` and reverse-mode ``Jᵀ`` sharing one forward."""

    def product(vector: Tensor) -> Tensor:
        def outputs_and_tangent(p: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(lambda q: problem.outputs(chunk.inputs, q), (p,), (vector,))

        outputs, pullback, tangent = vjp(outputs_and_tangent, point, has_aux=True)
        return pullback(problem.loss_fn.output_hessian_vector_product(outputs, chunk.targets, tangent))[0]

    return _compile(problem, _batched(product))


def _ggn_stored_forward(problem: Problem, chunk: Batch, point: Tensor) -> ChunkOperator:
    """``Σ_{i∈chunk} J_iᵀ H_ℓ,i J_i v`` from a stored forward: ``J v`` as the pullback of the pullback."""
    outputs, pullback = vjp(lambda p: problem.outputs(chunk.inputs, p), point)
    _, tangent_of = vjp(pullback, torch.zeros_like(outputs))

    def product(vector: Tensor) -> Tensor:
        (tangent,) = tangent_of((vector,))
        return pullback(problem.loss_fn.output_hessian_vector_product(outputs, chunk.targets, tangent))[0]

    return _batched(product)


def _hessian_on_chunk(problem: Problem, chunk: Batch, point: Tensor) -> ChunkOperator:
    """``Σ_{i∈chunk} ∇²ℓ_i v`` by differentiating the gradient's graph (built here) along ``v``."""
    leaf = point.detach().requires_grad_()
    with torch.enable_grad():
        loss_sum = problem.loss_fn.per_example(problem.outputs(chunk.inputs, leaf), chunk.targets).sum()
        (gradient,) = torch.autograd.grad(loss_sum, leaf, create_graph=True)

    def products(v: Tensor) -> Tensor:
        return torch.autograd.grad(gradient, leaf, v, retain_graph=True, is_grads_batched=v.dim() == 2)[0]

    return products


def _hessian_compiled(problem: Problem, chunk: Batch, point: Tensor) -> ChunkOperator:
    """``Σ_{i∈chunk} ∇²ℓ_i v`` as compiled forward-over-reverse ``jvp(∇ℓ, θ, v)`` (no stored graph)."""

    def loss_sum(p: Tensor) -> Tensor:
        return problem.loss_fn.per_example(problem.outputs(chunk.inputs, p), chunk.targets).sum()

    def product(vector: Tensor) -> Tensor:
        return jvp(grad(loss_sum), (point,), (vector,))[1]

    return _compile(problem, _batched(product))


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear] | None:
    """The model's ``nn.Linear`` layers by name when they hold all its parameters, else None."""
    layers: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if type(module) is not nn.Linear:
            return None
        layers[name] = module
    return layers


def _add_linear_squared_gradients(
    problem: Problem,
    chunk: Batch,
    point: Tensor,
    layers: dict[str, nn.Linear],
    total: Tensor,
    gradient: Tensor | None = None,
) -> Tensor | None:
    """Add ``Σ_i (∇ℓ_i)²`` of ``chunk`` to ``total`` by the per-layer formula, and with ``gradient`` the
    summed gradient ``Σ_i ∇ℓ_i`` (``δᵀh`` and ``Σ_i δ_i`` per layer, the products autograd would do).

    Returns the chunk's summed loss, or None (nothing added) where the formula does not apply.
    """
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    valid = True

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            nonlocal valid
            valid &= name not in seen and inputs[0].dim() == 2
            seen[name] = (inputs[0].detach(), output)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers.items()]
    try:
        with torch.enable_grad():
            outputs = problem.outputs(chunk.inputs, point.detach().requires_grad_())
            loss_sum = problem.loss_fn.per_example(outputs, chunk.targets).sum()
    finally:
        for handle in handles:
            handle.remove()
    if not valid or len(seen) != len(layers):
        return None
    names = list(seen)
    deltas = torch.autograd.grad(loss_sum, [seen[name][1] for name in names], allow_unused=True)
    targets = [(problem.unflatten(total), True)]
    if gradient is not None:
        targets.append((problem.unflatten(gradient), False))
    for name, delta in zip(names, deltas):
        if delta is None:  # the layer does not affect the loss
            continue
        inputs = seen[name][0]
        prefix = f"{name}." if name else ""
        for views, squared in targets:
            d, h = (delta.square(), inputs.square()) if squared else (delta, inputs)
            views[prefix + "weight"].addmm_(d.T, h)
            if layers[name].bias is not None:
                views[prefix + "bias"].add_(d.sum(0))
    return loss_sum.detach()


def _add_vmap_squared_gradients(problem: Problem, chunk: Batch, point: Tensor, total: Tensor) -> None:
    """Add ``Σ_i (∇ℓ_i)²`` of ``chunk`` to ``total`` from materialised per-example gradients."""

    def example_loss(p: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        outputs = problem.outputs(inputs.unsqueeze(0), p)
        return problem.loss_fn.per_example(outputs, targets.unsqueeze(0)).sum()

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0))
    for part in chunk.chunks(max(1, PER_EXAMPLE_GRADIENT_BUDGET // point.numel())):
        total += per_example_grad(point, part.inputs, part.targets).square().sum(0)
