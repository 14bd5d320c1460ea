"""K-BFGS, K-BFGS(L) and K-FAC against the authors' code: epoch time, ours / theirs, in one process.

The authors' code (``renyiryry/kbfgs_neurips2020_public``) is not part of this project: give the folder
of a checkout with ``--authors PATH`` (``make bench ARGS="--authors PATH"``) or ``KBFGS_AUTHORS=PATH``;
without it this benchmark is skipped with a message. Their modules are imported from that folder and
driven step by step exactly as their ``training_function.train_model`` loop does (gradient, momentum,
``get_second_order_caches``, ``Kron_BFGS_update`` / ``kfac_update``, ``update_parameter``); modules they
import but never use on this path (``psutil``) are stubbed when missing.

Problem: the MNIST autoencoder of their demo (784-1000-500-250-30 + mirror, ReLU, batch 1000,
α and λ of their demo), the same initial weights for both, 10,000 training images (``KSD_DATA``, else
random images). Steps are timed after warm-up (K-BFGS(L): until both hold 100 pairs; K-FAC: past the
steps ``i ≤ 20`` that invert every step) in blocks that alternate between the two codes; the epoch time
is 60 steps (one pass of MNIST's 60,000 images) at the median step time, K-FAC's at the mean over an
inversion period of 20 steps. The one-off passes over the data before step 0 and the evaluations are
not included.

    python scripts/bench_authors.py --authors PATH [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import mnist_autoencoder_problem, paired_step_times, print_rows, resolve_device

from ksd.optim import optimizer_class

BATCH = 1000
TRAIN_SIZE = 10_000
STEPS_PER_EPOCH = 60_000 // BATCH
#: ours → (theirs, α, λ, warm-up steps, block of timed steps, statistic)
METHODS = {
    "kbfgs": ("K-BFGS", 0.3, 0.3, 3, 3, statistics.median),
    "kbfgs_l": ("K-BFGS(L)", 0.3, 0.3, 101, 3, statistics.median),
    "kfac": ("KFAC", 1.0, 3.0, 21, 20, statistics.fmean),
}


def import_authors(path: Path) -> types.SimpleNamespace:
    """Their modules, imported from ``path`` (stubs for imports they never use on this path)."""
    if not (path / "kbfgs_utils.py").is_file():
        raise SystemExit(
            f"bench_authors: {path} has no kbfgs_utils.py; give a checkout of kbfgs_neurips2020_public."
        )
    for name in ("psutil",):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    sys.path.insert(0, str(path))
    names = ("functions_utils", "kbfgs_utils", "kfac_utils", "models", "training_utils")
    return types.SimpleNamespace(**{n: importlib.import_module(n) for n in names})


class AuthorsRun:
    """Their training loop on our data and initial weights, one step per call."""

    def __init__(self, code, algorithm: str, network: nn.Module, images: torch.Tensor, lr: float, lam: float):
        fu, device = code.functions_utils, images.device
        linears = [m for m in network if isinstance(m, nn.Linear)]
        sizes = [linears[0].in_features] + [m.out_features for m in linears]
        activations = ["relu", "relu", "relu", "linear"] * 2
        model = code.models.Model_class.__new__(code.models.Model_class)
        nn.Module.__init__(model)
        model.name_loss, model.name_model, model.layersizes = (
            "logistic-regression-sum-loss",
            "fully-connected",
            sizes,
        )
        layer_params = code.models.get_layers_params("fully-connected", sizes, activations, {})
        model.layers_all = [nn.Linear(p["input_size"], p["output_size"]).to(device) for p in layer_params]
        with torch.no_grad():
            for theirs, ours in zip(model.layers_all, linears):
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
        model.layers_weight = [{"W": m.weight, "b": m.bias} for m in model.layers_all]
        model.layers_params_all = model.layers_params = layer_params
        model.numlayers = model.numlayers_all = len(layer_params)
        model.layers = nn.ModuleList(model.layers_all)
        params = {
            "algorithm": algorithm,
            "device": device,
            "name_loss": model.name_loss,
            "matrix_name": "Fisher" if algorithm == "KFAC" else "EF",
            "momentum_gradient_rho": 0.9,
            "layersizes": sizes,
            "layers_params": layer_params,
            "numlayers": len(layer_params),
            "num_train_data": len(images),
            "alpha": lr,
            "if_second_order_algorithm": True,
            "tau": 1e-5,
            "if_gpu": device.type == "cuda",
        }
        args = {
            "N1": BATCH,
            "N2": BATCH,
            "kfac_damping_lambda": lam,
            "kfac_inverse_update_freq": 20,
            "kfac_rho": 0.9,
            "Kron_BFGS_A_decay": 0.9,
            "Kron_LBFGS_Hg_initial": 1,
            "Kron_BFGS_A_LM_epsilon": lam**0.5,
            "Kron_BFGS_H_epsilon": lam**0.5,
            "Kron_BFGS_H_initial": 1,
            "Kron_BFGS_number_s_y": 100,
        }
        flat = images.flatten(1).cpu().numpy()
        data = {"model": model, "dataset": types.SimpleNamespace(train=_FileOrder(flat))}
        self.code, self.model, self.images = code, model, images.flatten(1)
        self.data, self.params = code.training_utils.train_initialization(data, params, args)
        self.data["model_grad_momentum"] = fu.get_zero_torch(self.params)
        self.generator = torch.Generator().manual_seed(0)
        self.i = -1

    def step(self) -> None:
        code, data, params, model = self.code, self.data, self.params, self.model
        fu = code.functions_utils
        self.i += 1
        params["i"] = self.i
        index = torch.randint(len(self.images), (BATCH,), generator=self.generator).to(self.images.device)
        x = self.images[index]
        z, a, h = model.forward(x)
        loss = fu.get_loss_from_z(model, z, x, "mean")
        model.zero_grad()
        loss.backward()
        grad = fu.get_plus_torch(
            fu.get_model_grad(model, params),
            fu.get_multiply_scalar_no_grad(params["tau"], model.layers_weight),
        )
        data["model_grad_torch"] = grad
        momentum = fu.get_multiply_scalar(0.9, data["model_grad_momentum"])
        data["model_grad_momentum"] = fu.get_plus_torch(momentum, fu.get_multiply_scalar(0.1, grad))
        data["model_grad_used_torch"] = data["model_grad_momentum"]
        data["X_mb"] = data["t_mb"] = x
        data = code.training_utils.get_second_order_caches(z, a, h, data, params)
        if params["algorithm"] == "KFAC":
            code.kfac_utils.kfac_update(data, params)
        else:
            code.kbfgs_utils.Kron_BFGS_update(data, params)
        code.training_utils.update_parameter(data["p_torch"], model, params)


class _FileOrder:
    """Their ``DataSet.next_batch`` for the passes before step 0: consecutive batches in file order."""

    def __init__(self, images):
        self.images, self.position = images, 0

    def next_batch(self, n: int):
        if self.position + n > len(self.images):
            self.position = 0
        batch = self.images[self.position : self.position + n]
        self.position += n
        return batch, batch


def run(device: torch.device, authors: str | None = None, repeats: int = 4) -> list[dict]:
    authors = authors or os.environ.get("KBFGS_AUTHORS")
    if not authors:
        print(
            "skipped: no checkout of renyiryry/kbfgs_neurips2020_public given (--authors PATH, KBFGS_AUTHORS)"
        )
        return []
    code = import_authors(Path(authors).expanduser())
    rows = []
    for name, (theirs_name, lr, lam, warmup, block, statistic) in METHODS.items():
        problem = mnist_autoencoder_problem(device, TRAIN_SIZE, activation="relu")
        theirs = AuthorsRun(code, theirs_name, problem.model, problem.splits.train.inputs, lr, lam)
        cls = optimizer_class(name)
        ours = cls(problem, cls.Config(batch_size=BATCH, lr=lr, damping=lam))
        for _ in range(warmup):
            theirs.step()
        ours_times, their_times = paired_step_times(ours.step, theirs.step, device, warmup, repeats, block)
        ours_epoch, their_epoch = (STEPS_PER_EPOCH * statistic(t) for t in (ours_times, their_times))
        rows.append(
            {
                "name": f"{name} epoch / authors' {theirs_name} epoch",
                "ratio": ours_epoch / their_epoch,
                "detail": f"{ours_epoch:.1f} s vs {their_epoch:.1f} s per 60 steps of batch {BATCH}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--authors", help="folder of a checkout of renyiryry/kbfgs_neurips2020_public")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=4, help="alternating blocks per method")
    args = parser.parse_args()
    print_rows(run(resolve_device(args.device), args.authors, args.repeats))


if __name__ == "__main__":
    main()
