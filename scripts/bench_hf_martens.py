"""Hessian-free against Martens' own code: iteration time, ours / his (GNU Octave), in one run.

Martens' demo code (``nnet_train_2.m`` and ``conjgrad_1.m``, e.g. from the public copy
``pseudotensor/GeoAcc``) is not part of this project: give its folder with ``--martens PATH`` or
``HF_MARTENS=PATH`` (``HF_MARTENS=PATH make bench``). Without it, or without ``octave-cli`` on the PATH,
this benchmark prints one line and is skipped. His two files are copied into a temporary folder with
the edits of ``scripts/martens_code.py`` (double precision, his own commented choice; no ``.mat`` saves,
no ``drawnow``; a record line per iteration) and ``gather`` as the identity; nothing is written next to
them.

Problem: the CURVES autoencoder of his demo (784-400-200-100-50-25-6 + mirror, logistic units, linear
code layer) on the first ``--train-size`` training images of ``dataset=curves`` (default 1,000, 4 chunks),
from the same weights (our sparse initialisation packed into his ``paramsp`` order), float64 on the CPU,
the same number of threads for both (torch's, and ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` for
Octave). Both run ``--iterations`` HF iterations (default 4); the first is not timed (warm-up); the time
per iteration is the mean of the others: his ``times(epoch)`` (gradient, CG, CG backtracking, ρ, line
search, update: the test-set evaluation after it is outside), our ``HessianFree.step()``. The two
trajectories must agree (objective after each iteration to 1e-6 relative, the CG iterations exactly), so
that both did the same work; the row says if they did not.

    python scripts/bench_hf_martens.py --martens PATH [--train-size 1000] [--iterations 4]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import print_rows
from martens_code import prepare_code, run_octave, write_case

from ksd.config import ModelConfig
from ksd.data import load_dataset
from ksd.models import build_model
from ksd.optim.hf import HessianFree
from ksd.problem import Problem

WIDTHS = [400, 200, 100, 50, 25, 6]
CHUNKS = 4


def skip(reason: str) -> list[dict]:
    print(f"bench_hf_martens: skipped, {reason}")
    return []


def curves_problem(train_size: int) -> Problem:
    root = os.environ.get("KSD_DATA", "data")
    splits = load_dataset("curves", root, val_size=0, train_size=train_size, test_size=10)
    splits = splits.to_float(torch.float64)
    torch.manual_seed(0)
    built = build_model(ModelConfig(widths=WIDTHS, init="sparse"), splits.spec)
    return Problem(built.network.double(), built.loss, splits, autoencoder=True)


def measure(source: Path, train_size: int, iterations: int) -> list[dict]:
    threads = torch.get_num_threads()
    problem = curves_problem(train_size)
    inputs = problem.splits.train.inputs
    with tempfile.TemporaryDirectory(prefix="hf_martens_") as tmp:
        folder = Path(tmp)
        prepare_code(source, folder, precision="double")
        write_case(folder / "case.mat", problem.model, WIDTHS, inputs, inputs[:CHUNKS], chunks=CHUNKS,
                   iterations=iterations)
        record = run_octave(folder, threads)
    if len(record) < iterations:
        raise SystemExit(f"bench_hf_martens: his code recorded {len(record)} of {iterations} iterations")
    his_times = [r.seconds for r in record]
    his_f = [-r.ll for r in record]
    his_cg = [r.cg_total for r in record]
    hf = HessianFree(problem, HessianFree.Config(num_chunks=CHUNKS))
    ours_times, ours_f, ours_cg, total = [], [], [], 0
    for _ in range(iterations):
        began = time.perf_counter()
        stats = hf.step()
        ours_times.append(time.perf_counter() - began)
        total += stats["cg_iterations"]
        ours_cg.append(total)
        theta = problem.theta
        ours_f.append(problem.loss(problem.full_batch).item() + 1e-5 * theta.dot(theta).item())
    ours, his = sum(ours_times[1:]) / (iterations - 1), sum(his_times[1:]) / (iterations - 1)
    same = ours_cg == his_cg and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours_f, his_f))
    detail = (
        f"{ours:.3f} s vs {his:.3f} s per iteration (mean of iterations 2..{iterations}; {total} CG steps in "
        f"{iterations}), CURVES autoencoder {'-'.join(map(str, WIDTHS))}, {train_size} images, "
        f"{CHUNKS} chunks, "
        f"float64, {threads} thread(s); trajectories {'agree' if same else 'DIFFER'} "
        f"(f after iteration {iterations}: {ours_f[-1]:.6f} vs {his_f[-1]:.6f}); load {_load()}"
    )
    return [{"name": "HF iteration time, ours / Martens' Octave code", "ratio": ours / his, "detail": detail}]


def run(device: torch.device, train_size: int = 1000, iterations: int = 4) -> list[dict]:
    """``make bench`` entry: the row, or nothing (with one line) when Octave or his code is missing."""
    if shutil.which("octave-cli") is None:
        return skip("octave-cli is not installed (apt-get install octave)")
    source = os.environ.get("HF_MARTENS")
    if not source:
        return skip("no copy of Martens' code (HF_MARTENS=PATH: a folder with nnet_train_2.m, conjgrad_1.m)")
    path = Path(source)
    if not (path / "nnet_train_2.m").is_file() or not (path / "conjgrad_1.m").is_file():
        return skip(f"{path} has no nnet_train_2.m and conjgrad_1.m")
    if device.type != "cpu":
        print("bench_hf_martens: his code runs on the CPU; ours is timed on the CPU too")
    return measure(path, train_size, iterations)


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--martens", help="folder with Martens' nnet_train_2.m and conjgrad_1.m")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    if args.martens:
        os.environ["HF_MARTENS"] = args.martens
    if args.iterations < 2 or args.train_size % CHUNKS:
        raise SystemExit("bench_hf_martens: --iterations must be >= 2 and --train-size a multiple of 4")
    print_rows(run(torch.device("cpu"), args.train_size, args.iterations))


if __name__ == "__main__":
    main()
