"""Cost of the curvature products relative to one gradient, on the MNIST autoencoder with a batch of 1,000.

The network is the papers' 784-1000-500-250-30 autoencoder (sigmoid units, 2.8 M parameters) on real
MNIST when ``KSD_DATA`` points at the data folder, else on random images of the same shape. After one
warm-up call of everything, each repeat times a gradient and then the measured call right after it, and
the row reports the median over ``REPEATS`` repeats of their ratio: interleaving keeps both timings
under the same load on a shared machine.

* one Gauss-Newton-vector product ``G v`` / one gradient (``problem.loss_and_grad``) — target ≤ 1.8;
* one product of a ``ggn_operator`` built beforehand (HF's CG, many products at one point), and the
  cost of building it;
* one Hessian-vector product ``H v`` / one gradient, and one product of a ``hessian_operator`` built
  beforehand (KSD with ``curvature: hessian``);
* the one-off ``G v`` and ``H v`` with ``run.compile_curvature`` (``torch.compile``; the detail gives the
  seconds of the first, compiling call), against the same gradient;
* ``G V`` for ``K`` vectors at once (``vmap``), per vector / one gradient;
* the per-example squared gradients ``Σ_i (∇ℓ_i)²`` / one gradient.

    python scripts/bench_curvature.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_common import mnist_autoencoder_problem, print_rows, resolve_device, seconds

from ksd.curvature import (
    ggn_operator,
    ggn_vector_product,
    hessian_operator,
    hessian_vector_product,
    per_example_squared_gradients,
)

BATCH = 1000
REPEATS = 3  # was 7 until 2026-12-03: 3 gave the same ratios within 2 % (results/bench/README.md)
K = 8


def run(device: str | torch.device = "cpu") -> list[dict]:
    device = torch.device(device)
    problem = mnist_autoencoder_problem(device, BATCH)
    batch = problem.full_batch
    g = torch.Generator(device=device).manual_seed(0)
    vector = torch.randn(problem.n_params, device=device, generator=g)
    vectors = torch.randn(K, problem.n_params, device=device, generator=g)

    def gradient() -> object:
        return problem.loss_and_grad(batch)

    operator = ggn_operator(problem, batch)
    hessian = hessian_operator(problem, batch)
    compiled = mnist_autoencoder_problem(device, BATCH)  # same model and data, products compiled
    compiled.compile_curvature = True
    compiling = {
        "G v": seconds(lambda: ggn_vector_product(compiled, batch, vector), device),
        "H v": seconds(lambda: hessian_vector_product(compiled, batch, vector), device),
    }

    measurements = [  # name, call, number of products in one call, target ratio
        ("Gauss-Newton-vector product / gradient",
         lambda: ggn_vector_product(problem, batch, vector), 1, 1.8),
        ("Gauss-Newton-vector product of a built ggn_operator / gradient",
         lambda: operator(vector), 1, None),
        ("building ggn_operator / gradient",
         lambda: ggn_operator(problem, batch), 1, None),
        ("Hessian-vector product / gradient",
         lambda: hessian_vector_product(problem, batch, vector), 1, None),
        ("Hessian-vector product of a built hessian_operator / gradient",
         lambda: hessian(vector), 1, None),
        ("Gauss-Newton-vector product, torch.compile'd / gradient",
         lambda: ggn_vector_product(compiled, batch, vector), 1, None),
        ("Hessian-vector product, torch.compile'd (forward-over-reverse) / gradient",
         lambda: hessian_vector_product(compiled, batch, vector), 1, None),
        (f"Gauss-Newton products of {K} vectors at once, per vector / gradient",
         lambda: ggn_vector_product(problem, batch, vectors), K, None),
        (f"Hessian-vector products of {K} vectors at once, per vector / gradient",
         lambda: hessian_vector_product(problem, batch, vectors), K, None),
        ("per-example squared gradients / gradient",
         lambda: per_example_squared_gradients(problem, batch), 1, None),
    ]
    gradient()
    for _, fn, _, _ in measurements:
        fn()
    ratios: list[list[float]] = [[] for _ in measurements]
    gradient_times = []
    for _ in range(REPEATS):
        for (_, fn, count, _), found in zip(measurements, ratios):
            reference = seconds(gradient, device)
            found.append(seconds(fn, device) / count / reference)
            gradient_times.append(reference)
    setting = (
        f"MNIST AE, {problem.n_params / 1e6:.2f} M params, batch {BATCH} ({problem.splits.spec.source}), "
        f"{device.type}, {torch.get_num_threads()} threads, median of {REPEATS}; "
        f"gradient {statistics.median(gradient_times) * 1e3:.0f} ms"
    )
    details = {
        name: f"{setting}; first call compiles: {compiling[key]:.1f} s"
        for name, _, _, _ in measurements
        for key in compiling
        if "compile" in name and name.startswith({"G v": "Gauss", "H v": "Hessian"}[key])
    }
    return [
        {
            "name": name,
            "ratio": round(statistics.median(found), 3),
            "target": target,
            "detail": details.get(name, setting),
        }
        for (name, _, _, target), found in zip(measurements, ratios)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    print_rows(run(resolve_device(args.device)))


if __name__ == "__main__":
    main()
