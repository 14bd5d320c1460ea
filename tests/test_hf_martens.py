"""Our Hessian-free against Martens' own code: the trajectory his ``nnet_train_2.m`` / ``conjgrad_1.m``
took in GNU Octave (``tests/data/hf_martens_reference.json``, how it was made: its ``description`` and
``docs/hf_vs_martens.md``), and his line search and CG stop test written out beside ours.

Tolerance. Both codes do the same arithmetic in float64 in different summation orders (OpenBLAS in
Octave, PyTorch here). Over the 10 recorded iterations ours deviates from his by at most 7·10⁻¹⁴
(relative, every continuous quantity), and ours deviates from itself by the same 6·10⁻¹⁴ when θ₀ is
perturbed by one ulp: that is the rounding floor. ``RTOL = 1e-9`` leaves four orders of magnitude for other
BLAS builds and CPUs; the smallest deliberate change tried (the other chunk order) moves ρ by 6·10⁻⁴ at
the first iteration (and q at the last CG iterate by more), five orders above it. Integer quantities (CG
iterations, chosen iterate, line-search reductions) must be equal. Later iterations are not recorded:
from iteration 13 on, rounding amplified by CG makes both codes, and ours against itself, drift apart
(10⁻⁹ at iteration 13, 10⁻² at 23).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import ksd.optim.hf as hf_module
from ksd.data import DataSpec, Split, Splits
from ksd.losses import build_loss
from ksd.models.autoencoder import autoencoder
from ksd.optim.hf import HessianFree
from ksd.optim.linalg import conjugate_gradient
from ksd.problem import Problem

REFERENCE = json.loads((Path(__file__).parent / "data" / "hf_martens_reference.json").read_text())
RTOL = 1e-9
INTEGER_KEYS = ("cg", "chosen", "reductions")
CONTINUOUS_KEYS = ("f0", "gnorm", "lambda", "startnorm", "qlast", "rho", "pnorm", "rate", "f1", "newlambda")


def reference_problem() -> Problem:
    """The recorded autoencoder in float64, from his initial ``paramsp`` (W column-major, then b)."""
    ref = REFERENCE
    x = torch.tensor(ref["train_uint8"], dtype=torch.float64) / 255
    sizes, types = ref["layer_sizes"], ref["layer_types"]
    code = types.index("linear")
    network = autoencoder((sizes[0],), sizes[1 : code + 2], "sigmoid").double()
    assert [m.out_features for m in network if isinstance(m, torch.nn.Linear)] == sizes[1:]
    spec = DataSpec("curves", (sizes[0],), None, "curves")
    splits = Splits(Split(x, x), Split(x[:0], x[:0]), Split(x[:0], x[:0]), spec)
    problem = Problem(network, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True)
    paramsp = torch.zeros(ref["paramsp_size"], dtype=torch.float64)
    index, value = ref["paramsp_nonzero"]
    paramsp[index] = torch.tensor(value, dtype=torch.float64)
    pieces, cursor = [], 0
    for n_in, n_out in itertools.pairwise(sizes):
        pieces.append(paramsp[cursor : cursor + n_in * n_out].view(n_in, n_out).T.reshape(-1))  # vec(W) → W
        cursor += n_in * n_out
        pieces.append(paramsp[cursor : cursor + n_out])
        cursor += n_out
    assert cursor == len(paramsp) == problem.n_params
    with torch.no_grad():
        problem.theta.copy_(torch.cat(pieces))
    return problem


def trajectory(monkeypatch, iterations: int = 10, **config) -> list[dict]:
    """Our HF with Martens' settings (the defaults) on the reference problem: his record's quantities."""
    problem = reference_problem()
    hf = HessianFree(problem, HessianFree.Config(num_chunks=REFERENCE["num_chunks"], **config))
    seen = {}

    def spy(matvec, b, x0=None, **kwargs):
        result = conjugate_gradient(matvec, b, x0, **kwargs)
        seen.update(gnorm=b.norm().item(), startnorm=0.0 if x0 is None else x0.norm().item(), cg=result)
        return result

    monkeypatch.setattr(hf_module, "conjugate_gradient", spy)
    rows = []
    for _ in range(iterations):
        stats = hf.step()
        cg = seen["cg"]
        chosen = cg.iterations.index(stats["cg_chosen_iteration"])
        theta = problem.theta
        f1 = problem.loss(problem.full_batch).item() + 0.5 * hf.config.weight_decay * theta.dot(theta).item()
        rows.append({
            "f0": stats["loss"].item(), "gnorm": seen["gnorm"], "lambda": stats["damping"],
            "startnorm": seen["startnorm"], "cg": stats["cg_iterations"], "qlast": cg.values[-1],
            "chosen": stats["cg_chosen_iteration"], "rho": stats["rho"],
            "pnorm": cg.iterates[chosen].norm().item(),
            "reductions": stats["line_search_tries"] - 1 if stats["step_size"] > 0 else math.inf,
            "rate": stats["step_size"], "f1": f1, "newlambda": hf.state["damping"],
        })
    return rows


def first_departure(ours: list[dict], his: list[dict]) -> tuple[int, str] | None:
    """(iteration, key) of the first quantity outside the tolerance, None when ours follows his."""
    for iteration, (a, b) in enumerate(zip(ours, his), start=1):
        for key in INTEGER_KEYS:
            if a[key] != b[key]:
                return iteration, key
        for key in CONTINUOUS_KEYS:
            if not math.isclose(a[key], b[key], rel_tol=RTOL, abs_tol=0.0):
                return iteration, key
    return None


@pytest.mark.parametrize("cg_stop_rule", ["paper", "martens"])
def test_follows_martens_code_step_by_step(monkeypatch, cg_stop_rule):
    his = REFERENCE["runs"]["contiguous"]
    ours = trajectory(monkeypatch, len(his), cg_stop_rule=cg_stop_rule)
    assert first_departure(ours, his) is None
    # the record exercises CG backtracking (an earlier iterate chosen) and λ falling at every step
    assert any(row["chosen"] < row["cg"] for row in his) and his[-1]["newlambda"] < his[0]["lambda"]


def test_shuffled_chunks_follow_his_demo_order(monkeypatch):
    """chunk_order=shuffled is his demo's randperm before nnet_train_2: the reference ran his code on the
    cases in our permutation's order."""
    his = REFERENCE["runs"]["shuffled"]
    ours = trajectory(monkeypatch, len(his), chunk_order="shuffled", cg_stop_rule="martens")
    assert first_departure(ours, his) is None


@pytest.mark.parametrize(
    ("variant", "departs_at"),
    [({"chunk_order": "shuffled"}, (1, "qlast")), ({"warm_start": 1.0}, (2, "startnorm"))],
)
def test_a_deliberate_variant_departs_from_his_trajectory(monkeypatch, variant, departs_at):
    his = REFERENCE["runs"]["contiguous"]
    assert first_departure(trajectory(monkeypatch, 3, **variant), his) == departs_at


def martens_line_search(f, f0: float, slope: float, limit: int = 60) -> tuple[float, float, int]:
    """The loop of nnet_train_2.m written out: ``j`` reductions while ``j < limit``, f evaluated after each,
    the step rejected (rate 0, j = ∞) when ``j`` reaches the limit. ``f(rate)`` is f(θ + rate·p), f(1) is
    known from CG backtracking. Returns (rate, j, objective evaluations after the first)."""
    rate, j, value, evaluations = 1.0, 0, f(1.0), 0
    while j < limit:
        if -value >= -f0 + 0.01 * rate * -slope:  # his test, in log-likelihoods (ll = −f, grad = −∇f)
            break
        rate, j = 0.8 * rate, j + 1
        value, evaluations = f(rate), evaluations + 1
    if j == limit:
        return 0.0, math.inf, evaluations
    return rate, j, evaluations


@pytest.mark.parametrize("tries", [5, 60])
def test_line_search_takes_his_rates_with_one_evaluation_less_on_rejection(monkeypatch, tries):
    """His loop tests the rates 0.8⁰ … 0.8⁵⁹ and then evaluates 0.8⁶⁰ untested before rejecting;
    ``line_search_tries = 60`` tests the same rates: same rate, same rejection, j + 1 trials."""
    from test_hf import saturated_logistic_problem

    problem = saturated_logistic_problem()
    theta0 = problem.theta.clone()
    hf = HessianFree(problem, HessianFree.Config(weight_decay=0.0, initial_damping=1e-8, num_chunks=1,
                                                 line_search_tries=tries))
    seen = {}

    def spy(matvec, b, x0=None, **kwargs):
        seen["cg"] = conjugate_gradient(matvec, b, x0, **kwargs)
        seen["grad"] = -b
        return seen["cg"]

    monkeypatch.setattr(hf_module, "conjugate_gradient", spy)
    stats = hf.step()
    step = seen["cg"].iterates[seen["cg"].iterations.index(stats["cg_chosen_iteration"])]
    batch = problem.full_batch
    f0 = hf._objective(batch, theta0)
    rate, j, evaluations = martens_line_search(
        lambda r: hf._objective(batch, theta0 + r * step), f0, seen["grad"].dot(step).item(), limit=tries
    )
    assert stats["step_size"] == rate
    if tries == 5:
        assert rate == 0.0 and stats["line_search_tries"] == tries  # rejected by both
        assert evaluations == tries  # his: 0.8¹ … 0.8⁵ evaluated; ours: 0.8¹ … 0.8⁴, one less
    else:
        assert 0 < rate < 0.8**20 and stats["line_search_tries"] == j + 1 and evaluations == j


def spd_system(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-3, 0, n, dtype=torch.float64)) @ q.T
    return a, torch.randn(n, generator=g, dtype=torch.float64)


def test_cg_stop_rules_agree_unless_the_tolerance_is_huge():
    a, b = spd_system()
    start = 30 * torch.linalg.solve(a, b)  # a bad warm start: q starts far above 0
    for tolerance in (5e-4, 1e-2):  # k·tolerance ≤ 1: opposite signs make the ratio ≥ 1 under either test
        runs = [conjugate_gradient(lambda v: a @ v, b, start, tolerance=tolerance, stop_sign=sign)
                for sign in ("current", "earlier")]
        assert runs[0].iterations == runs[1].iterations
        assert runs[0].values == runs[1].values
    # k·tolerance = 5 > 1: the paper's test (q_i < 0) fires as q crosses 0, his (q_{i−k} < 0) waits
    paper, martens = (conjugate_gradient(lambda v: a @ v, b, start, tolerance=0.5, stop_sign=sign)
                      for sign in ("current", "earlier"))
    i = paper.iterations[-1]
    assert paper.stop == "progress" and paper.values[i] < 0 <= paper.values[i - 10]
    assert martens.iterations[-1] > i


def test_martens_records_parse_his_infinities_and_attach_the_test_line(tmp_path):
    """scripts/martens_code.py reads the lines its edit makes his code print (Octave writes ±Inf, NaN)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from martens_code import parse_records

    path = tmp_path / "rec.txt"
    path.write_text(
        "train 1 1.5 -361.8 104.85 30 0.84 13 0 1\ntest 1 -362.0 104.87\n"
        "train 2 1.25 -361.8 104.85 45 -Inf 40 Inf 0\n"
    )
    first, second = parse_records(path)
    assert (first.epoch, first.cg_total, first.test_error, first.new_lambda) == (1, 13, 104.87, 30.0)
    assert second.rho == -math.inf and second.reductions == math.inf and math.isnan(second.test_error)
