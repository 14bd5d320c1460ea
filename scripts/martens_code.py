"""Martens' HF demo code (``nnet_train_2.m``, ``conjgrad_1.m``) prepared to run in GNU Octave beside ours.

His code is not part of this project. :func:`prepare_code` copies his two files from a folder the user
gives (e.g. a checkout of the public copy ``pseudotensor/GeoAcc``, docs/hf_vs_martens.md) into a
temporary folder with these edits, none of which changes what his code computes:

- ``precision="double"``: the CPU branch's ``mones``/``mzeros``/``conv``/``store`` and the four casts of
  the data in double precision, his own commented "use doubles" choice (``"single"`` leaves them as he
  published them);
- no ``.mat`` saves, no ``pause(0)``/``drawnow`` (octave-cli has nothing to draw);
- one ``fprintf`` per HF iteration at his ``times(epoch) = toc`` (the iteration's time: gradient, CG, CG
  backtracking, ρ, line search, update), with ``%.17g``: the iteration, its seconds, ll and the L2 error
  on the training set after the step, the new λ, ρ, the cumulative CG steps (``totalpasses``), the
  line-search reductions and the rate; and one after his test-set evaluation: ll and L2 error on it;
- after that test line, a stop once the iterations' seconds reach a budget (his ``maxepoch`` is the
  other stop), so that a long comparison can be given a training-time budget as ksd-run's
  ``run.max_seconds``; his test-set evaluation is outside ``times``, as ours is outside ``wall_time``;
- ``gather`` defined as the identity (a GPU function some copies call).

:func:`run_octave` calls ``nnet_train_2`` through a small driver on a ``.mat`` case (:func:`write_case`)
and parses the records (:class:`Iteration`).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: (old, new) edits to his nnet_train_2.m for double precision.
DOUBLE_EDITS = [
    ("mones = @(varargin)ones(varargin{:}, 'single');", "mones = @(varargin)ones(varargin{:}, 'double');"),
    ("mzeros = @(varargin)zeros(varargin{:}, 'single');",
     "mzeros = @(varargin)zeros(varargin{:}, 'double');"),
    ("    conv = @single;", "    conv = @double;"),
    ("    store = @single;\nend", "    store = @double;\nend"),
    ("indata = single(indata);", "indata = double(indata);"),
    ("outdata = single(outdata);", "outdata = double(outdata);"),
    ("intest = single(intest);", "intest = double(intest);"),
    ("outtest = single(outtest);", "outtest = double(outtest);"),
]

#: (old, new) edits for octave-cli and the per-iteration records.
RECORD_EDITS = [
    ("    pause(0)\n    drawnow\n", ""),
    ("    save( [runName '_nnet_running.mat']", "    %save( [runName '_nnet_running.mat']"),
    ("        save( [runName '_nnet_epoch'", "        %save( [runName '_nnet_epoch'"),
    ("    times(epoch) = toc;\n",
     "    times(epoch) = toc;\n    global hfrec hfbudget\n"
     "    fprintf(hfrec, 'train %d %.17g %.17g %.17g %.17g %.17g %d %.17g %.17g\\n', epoch, times(epoch), "
     "ll, err, lambda, rho, totalpasses, j, rate);\n"),
    ("    errrecord(epoch,2) = err_test;\n",
     "    errrecord(epoch,2) = err_test;\n"
     "    fprintf(hfrec, 'test %d %.17g %.17g\\n', epoch, ll_test, err_test);\n"
     "    if sum(times(1:epoch)) >= hfbudget\n        break;\n    end\n"),
]

DRIVER = """function hf_driver(matfile, recfile)
global hfrec hfbudget
S = load(matfile);
hfbudget = S.budget;
hfrec = fopen(recfile, 'w');
types = repmat({'logistic'}, 1, numel(S.hidden) + 1);
types{S.ncode} = 'linear';
nnet_train_2('hf', '', S.paramsp, [], [], [], S.iterations, S.indata, S.indata, S.chunks, ...
             S.intest, S.intest, S.testchunks, S.hidden, types, 'gn', 0, 'L2', 1, S.weightcost, 0.95, 0);
fclose(hfrec);
end
"""


@dataclass
class Iteration:
    """One HF iteration of his code, as recorded (ll is the log-likelihood minus the weight cost, −f)."""

    epoch: int
    seconds: float
    ll: float
    train_error: float
    new_lambda: float
    rho: float
    cg_total: int
    reductions: float
    rate: float
    test_ll: float = math.nan
    test_error: float = math.nan


def prepare_code(source: Path, folder: Path, precision: str = "double") -> None:
    """His two files with the edits above in ``folder`` (CRLF line ends as in the public copies are
    accepted), plus ``gather.m`` and the driver ``hf_driver.m``."""
    text = (source / "nnet_train_2.m").read_text(errors="replace").replace("\r\n", "\n")
    edits = (DOUBLE_EDITS if precision == "double" else []) + RECORD_EDITS
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"martens_code: {source}/nnet_train_2.m is not the demo version ({old!r})")
        text = text.replace(old, new)
    (folder / "nnet_train_2.m").write_text(text)
    shutil.copy(source / "conjgrad_1.m", folder / "conjgrad_1.m")
    (folder / "gather.m").write_text("function x = gather(x)\nend\n")
    (folder / "hf_driver.m").write_text(DRIVER)


def martens_params(model: torch.nn.Module) -> torch.Tensor:
    """θ in his ``paramsp`` order: per layer vec(W) column-major (W is out × in), then b."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return torch.cat([t for m in layers for t in (m.weight.detach().T.reshape(-1), m.bias.detach())])


def write_case(
    path: Path, model: torch.nn.Module, widths: list[int], train: torch.Tensor, test: torch.Tensor, *,
    chunks: int, iterations: int, budget: float = math.inf, weightcost: float = 2e-5, test_chunks: int = 1,
) -> None:
    """The ``.mat`` file :data:`DRIVER` reads: data as columns (cases × pixels transposed), θ₀, the hidden
    layer sizes of the encoder and its mirror, the code layer's index, and the run's settings."""
    import scipy.io

    scipy.io.savemat(path, {
        "indata": train.flatten(1).T.double().numpy(), "intest": test.flatten(1).T.double().numpy(),
        "paramsp": martens_params(model).double().numpy()[:, None],
        "hidden": np.array([*widths, *reversed(widths[:-1])], dtype=float), "ncode": float(len(widths)),
        "iterations": float(iterations), "chunks": float(chunks), "testchunks": float(test_chunks),
        "budget": float(budget), "weightcost": float(weightcost),
    })


def run_octave(folder: Path, threads: int, timeout: float | None = None) -> list[Iteration]:
    """Run the driver on ``folder/case.mat``; the recorded iterations (as many as finished)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    command = ["octave-cli", "--no-window-system", "--eval", "hf_driver('case.mat', 'rec.txt')"]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    (folder / "octave.log").write_text(done.stdout + done.stderr)
    records = parse_records(folder / "rec.txt")
    if done.returncode != 0 or not records:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise SystemExit(f"martens_code: octave-cli failed: {' / '.join(tail)}")
    return records


def parse_records(path: Path) -> list[Iteration]:
    if not path.exists():
        return []
    iterations: list[Iteration] = []
    for line in path.read_text().splitlines():
        kind, *values = line.split()
        if kind == "train":
            epoch, seconds, ll, err, lam, rho, cg, reductions, rate = values
            iterations.append(Iteration(int(epoch), float(seconds), float(ll), float(err), float(lam),
                                        float(rho), int(cg), float(reductions), float(rate)))
        elif kind == "test" and iterations and iterations[-1].epoch == int(values[0]):
            iterations[-1].test_ll, iterations[-1].test_error = float(values[1]), float(values[2])
    return iterations
