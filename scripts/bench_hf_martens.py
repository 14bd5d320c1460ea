"""Hessian-free against Martens' own code: iteration time, ours / his (GNU Octave), in one run.

Martens' demo code (``nnet_train_2.m`` and ``conjgrad_1.m``, e.g. from the public copy
``pseudotensor/GeoAcc``) is not part of this project: give its folder with ``--martens PATH`` or
``HF_MARTENS=PATH`` (``HF_MARTENS=PATH make bench``). Without it, or without ``octave-cli`` on the PATH,
this benchmark prints one line and is skipped. His two files are copied into a temporary folder with the
edits of ``docs/hf_vs_martens.md`` (double precision, his own commented choice; no ``.mat`` saves and no
``drawnow``; one line writing each epoch's time, his ``times(epoch)``, to a file) and ``gather`` as the
identity; nothing is written next to them.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import print_rows

from ksd.config import ModelConfig
from ksd.data import load_dataset
from ksd.models import build_model
from ksd.optim.hf import HessianFree
from ksd.problem import Problem

WIDTHS = [400, 200, 100, 50, 25, 6]
CHUNKS = 4

#: (old, new) text edits to his nnet_train_2.m: double precision and no output files or figures.
EDITS = [
    ("mones = @(varargin)ones(varargin{:}, 'single');", "mones = @(varargin)ones(varargin{:}, 'double');"),
    ("mzeros = @(varargin)zeros(varargin{:}, 'single');",
     "mzeros = @(varargin)zeros(varargin{:}, 'double');"),
    ("    conv = @single;", "    conv = @double;"),
    ("    store = @single;\nend", "    store = @double;\nend"),
    ("indata = single(indata);", "indata = double(indata);"),
    ("outdata = single(outdata);", "outdata = double(outdata);"),
    ("intest = single(intest);", "intest = double(intest);"),
    ("outtest = single(outtest);", "outtest = double(outtest);"),
    ("    pause(0)\n    drawnow\n", ""),
    ("    save( [runName '_nnet_running.mat']", "    %save( [runName '_nnet_running.mat']"),
    ("        save( [runName '_nnet_epoch'", "        %save( [runName '_nnet_epoch'"),
    ("    times(epoch) = toc;\n",
     "    times(epoch) = toc;\n    global benchrec\n"
     "    fprintf(benchrec, '%d %.17g %.17g %d\\n', epoch, times(epoch), -ll, totalpasses);\n"),
]

DRIVER = """function bench_driver(matfile, recfile)
global benchrec
S = load(matfile);
benchrec = fopen(recfile, 'w');
types = repmat({'logistic'}, 1, numel(S.hidden) + 1);
types{S.ncode} = 'linear';
test = S.indata(:, 1:S.chunks);
nnet_train_2('bench', '', S.paramsp, [], [], [], S.iterations, S.indata, S.indata, S.chunks, ...
             test, test, 1, S.hidden, types, 'gn', 0, 'L2', 1, 2e-5, 0.95, 0);
fclose(benchrec);
end
"""


def skip(reason: str) -> list[dict]:
    print(f"bench_hf_martens: skipped, {reason}")
    return []


def prepare_code(source: Path, folder: Path) -> None:
    """His two files with :data:`EDITS` applied (CRLF line ends as in the public copies are accepted)."""
    text = (source / "nnet_train_2.m").read_text(errors="replace").replace("\r\n", "\n")
    for old, new in EDITS:
        if text.count(old) != 1:
            raise SystemExit(f"bench_hf_martens: {source}/nnet_train_2.m is not the demo version ({old!r})")
        text = text.replace(old, new)
    (folder / "nnet_train_2.m").write_text(text)
    shutil.copy(source / "conjgrad_1.m", folder / "conjgrad_1.m")
    (folder / "gather.m").write_text("function x = gather(x)\nend\n")
    (folder / "bench_driver.m").write_text(DRIVER)


def curves_problem(train_size: int) -> Problem:
    root = os.environ.get("KSD_DATA", "data")
    splits = load_dataset("curves", root, val_size=0, train_size=train_size, test_size=10)
    splits = splits.to_float(torch.float64)
    torch.manual_seed(0)
    built = build_model(ModelConfig(widths=WIDTHS, init="sparse"), splits.spec)
    return Problem(built.network.double(), built.loss, splits, autoencoder=True)


def martens_params(problem: Problem) -> torch.Tensor:
    """θ in his ``paramsp`` order: per layer vec(W) column-major (W is out × in), then b."""
    layers = [m for m in problem.model.modules() if isinstance(m, torch.nn.Linear)]
    return torch.cat([t for m in layers for t in (m.weight.detach().T.reshape(-1), m.bias.detach())])


def measure(source: Path, train_size: int, iterations: int) -> list[dict]:
    import scipy.io

    threads = torch.get_num_threads()
    problem = curves_problem(train_size)
    inputs = problem.splits.train.inputs.flatten(1)
    with tempfile.TemporaryDirectory(prefix="hf_martens_") as tmp:
        folder = Path(tmp)
        prepare_code(source, folder)
        scipy.io.savemat(folder / "case.mat", {
            "indata": inputs.T.numpy(), "paramsp": martens_params(problem).numpy()[:, None],
            "hidden": [float(w) for w in [*WIDTHS, *reversed(WIDTHS[:-1])]], "ncode": float(len(WIDTHS)),
            "iterations": float(iterations), "chunks": float(CHUNKS),
        })
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        command = ["octave-cli", "--no-window-system", "--eval", "bench_driver('case.mat', 'rec.txt')"]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        record = (folder / "rec.txt").read_text().split() if (folder / "rec.txt").exists() else []
        if len(record) < 4 * iterations:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise SystemExit(f"bench_hf_martens: octave-cli failed: {' / '.join(tail)}")
    rows = [record[i : i + 4] for i in range(0, 4 * iterations, 4)]
    his_times = [float(r[1]) for r in rows]
    his_f = [float(r[2]) for r in rows]
    his_cg = [int(r[3]) for r in rows]  # cumulative CG steps
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
