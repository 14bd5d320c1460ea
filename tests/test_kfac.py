"""K-FAC against explicit factor averages and the dense Kronecker-product solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf
from test_kbfgs import make_problem, mlp_problem
from torch import nn

from ksd.optim.kfac import KFAC, sample_targets
from ksd.problem import Batch


def explicit_factors(
    problem, batch: Batch, generator_state: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per linear layer, A = (1/N) Σ ā āᵀ and G = (1/N) Σ δ̃ δ̃ᵀ with δ̃ = ∂ℓ(z, t̃)/∂z_l, t̃ sampled, by hand."""
    h, inputs, pre = batch.inputs, [], []
    for module in problem.model:
        if isinstance(module, nn.Linear):
            inputs.append(h.detach())
            h = module(h)
            h.retain_grad()
            pre.append(h)
        else:
            h = module(h)
    fake = sample_targets(problem.loss_fn, h.detach(), torch.Generator().set_state(generator_state))
    problem.loss_fn.per_example(h, fake).sum().backward()
    n = len(batch)
    factors = []
    for a, z in zip(inputs, pre):
        homogeneous = torch.cat([a, torch.ones(n, 1, dtype=a.dtype)], 1)
        factors.append((homogeneous.T @ homogeneous / n, z.grad.T @ z.grad / n))
    return factors


def test_factors_and_update_equal_dense_formulas():
    problem = mlp_problem()
    # full batch: the same examples every step; Martens & Grosse's ramp ρ_i = min(1 − 1/(i+1), 0.9)
    opt = KFAC(problem, KFAC.Config(batch_size=300, lr=0.7, factor_init="first_batch"))
    batch = problem.full_batch
    for _ in range(2):
        opt.step()
    state = opt.generator.get_state()
    a_before = [a.clone() for a in opt.state["A"]]
    g_before = [g.clone() for g in opt.state["G"]]
    theta = problem.theta.clone()
    explicit = explicit_factors(problem, batch, state)
    opt.step()  # step 2: ρ = min(1 − 1/3, 0.9), inverses refreshed (2 ≤ T_inv)
    rho = 2 / 3
    step = problem.unflatten(problem.theta - theta)
    momentum = problem.unflatten(opt.state["momentum"])
    root = 3.0**0.5
    for index, layer in enumerate(opt.layers):
        a_new, g_new = explicit[index]
        torch.testing.assert_close(opt.state["A"][index], rho * a_before[index] + (1 - rho) * a_new)
        torch.testing.assert_close(opt.state["G"][index], rho * g_before[index] + (1 - rho) * g_new)
        # vec(P) = −((A + √λ I) ⊗ (G + √λ I))⁻¹ vec(M), column-major vec, M = [∇W, ∇b] (momentum)
        a = opt.state["A"][index] + root * torch.eye(layer.n_in, dtype=torch.float64)
        g = opt.state["G"][index] + root * torch.eye(layer.n_out, dtype=torch.float64)
        w, b = layer.matrix_views(momentum)
        m = torch.cat([w, b[:, None]], 1)
        dense = torch.linalg.solve(torch.kron(a, g), m.T.reshape(-1))
        dw, db = layer.matrix_views(step)
        torch.testing.assert_close(torch.cat([dw, db[:, None]], 1).T.reshape(-1), -0.7 * dense)


def test_data_pass_starts_from_the_factors_averaged_over_the_training_set():
    """The authors' initialisation: A, G = means of the per-batch factors (file order), then ρ = 0.9."""
    problem = mlp_problem()
    opt = KFAC(problem, KFAC.Config(batch_size=100))
    start = opt.generator.get_state()
    generator = torch.Generator().set_state(start)
    passes = []
    for chunk in problem.full_batch.chunks(100):  # 3 batches of 100, each one draw of sampled targets
        passes.append(explicit_factors(problem, chunk, generator.get_state()))
        generator.set_state(_after_one_draw(generator, len(chunk)))
    batch = problem.next_batch(100)
    problem.next_batch = lambda size: batch
    step = explicit_factors(problem, batch, generator.get_state())
    opt.step()
    for index in range(len(opt.layers)):
        for k, name in enumerate("AG"):
            mean = sum(p[index][k] for p in passes) / len(passes)
            torch.testing.assert_close(opt.state[name][index], 0.9 * mean + 0.1 * step[index][k])


def _after_one_draw(generator: torch.Generator, n: int) -> torch.Tensor:
    """The generator's state after sampling the targets of ``n`` examples of the toy problem (3 outputs)."""
    torch.rand((n, 3), generator=generator, dtype=torch.float64)
    return generator.get_state()


def test_inverses_are_refreshed_only_on_schedule():
    problem = mlp_problem()
    opt = KFAC(problem, KFAC.Config(batch_size=50, inverse_every=3))
    kept = []
    for _ in range(8):
        opt.step()
        kept.append(opt.state["A_inv"][0].clone())
    # refreshed at i ≤ 3 and i = 6: the inverse of steps 4, 5 equals that of step 3, step 7 that of 6
    assert torch.equal(kept[3], kept[4]) and torch.equal(kept[4], kept[5]) and torch.equal(kept[6], kept[7])
    assert not torch.equal(kept[5], kept[6]) and not torch.equal(kept[2], kept[3])


@pytest.mark.parametrize("loss", ["sigmoid_cross_entropy", "softmax_cross_entropy", "squared_error"])
def test_sampled_targets_follow_the_predictive_distribution(loss):
    """The Fisher's targets: the sample mean of ∇_z ℓ(z, t̃) vanishes (E[∇ log p] = 0)."""
    from ksd.losses import build_loss

    fn = build_loss(loss)
    z = torch.randn(1, 4, dtype=torch.float64).expand(20000, 4).clone().requires_grad_()
    fake = sample_targets(fn, z.detach(), torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(fn.per_example(z, fake).sum(), z)
    assert grad.mean(0).abs().max() < 0.03


def test_kfac_on_conv_uses_spatial_damping_split():
    torch.manual_seed(0)
    x, y = torch.randn(40, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()
    opt = KFAC(make_problem(model, x, y), KFAC.Config(batch_size=40))
    opt.step()
    conv = opt.layers.layers[0]
    a = opt.state["A"][0] + 3**0.5 * 4 * torch.eye(conv.n_in, dtype=torch.float64)  # √λ·√|T|, |T| = 16
    torch.testing.assert_close(opt.state["A_inv"][0], torch.linalg.inv(a))


def test_config_file_lists_every_field():
    yaml = OmegaConf.load(CONF / "optimizer" / "kfac.yaml")
    assert set(yaml) == {f.name for f in dataclasses.fields(KFAC.Config)}
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(KFAC.Config), yaml))
    assert (config.lr, config.damping, config.factor_decay, config.inverse_every) == (1.0, 3.0, 0.9, 20)

