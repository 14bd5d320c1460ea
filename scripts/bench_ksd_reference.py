"""Our KSD iteration time / pbrakel/ksd-theano's on the same problem (issue 21, docs/ksd_vs_reference.md).

The reference is not part of this project: give the folder of a converted checkout with ``--reference
PATH`` (``make bench ARGS="--ksd-reference PATH"``) or ``KSD_REFERENCE=PATH``; without one this benchmark
is skipped with one line. The reference runs in its own interpreter (``PATH/.venv/bin/python``, or
``KSD_REFERENCE_PYTHON``; ``PYTHONPATH=PATH/shim:PATH``) through ``scripts/ksd_reference.py time``,
which drives its ``krylov_descent`` unchanged on the problem of ``scripts/ksd_reference.py`` (by
default the 20-10-4-10-20 autoencoder of the trajectory test; ``--widths``, ``--examples``,
``--subset`` for others) and reports the seconds between the starts of consecutive basis
constructions: one whole iteration (BFGS, update, next gradient and preconditioner, basis). Ours runs
the same settings (``krylov_dim = K + 1``, no previous step, the BFGS cap 30, the same subsets by index)
in float64 with as many threads; its iteration time is ``step()``. Median over the iterations after the
first of each run; the two codes alternate (reference, ours, reference, ours) so that both see the
same load. The PyTensor compilation before the first iteration is not counted.

    python scripts/bench_ksd_reference.py --reference PATH [--widths 20,10,4,10,20] [--iterations 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_ksd_reference import reference_config, reference_problem
from ksd_reference import MAXITER, N_EXAMPLES, SPACE_SIZE, SUBSET, WIDTHS, problem

from ksd.optim.ksd import KrylovSubspaceDescent

SCRIPT = Path(__file__).resolve().parent / "ksd_reference.py"


def reference_times(path: Path, widths: str, examples: int, subset: int, iterations: int) -> list[float]:
    python = os.environ.get("KSD_REFERENCE_PYTHON") or str(path / ".venv" / "bin" / "python")
    env = {
        **os.environ,
        "PYTHONPATH": f"{path / 'shim'}:{path}",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    command = [
        python,
        str(SCRIPT),
        "time",
        "--reference",
        str(path),
        "--widths",
        widths,
        "--examples",
        str(examples),
        "--subset",
        str(subset),
        "--iterations",
        str(iterations),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench_ksd_reference: the reference failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def our_times(spec: dict, iterations: int) -> list[float]:
    torch_problem = reference_problem(spec)
    settings = {
        "ours": {"krylov_dim": SPACE_SIZE + 1, "previous_step": False, "bfgs_max_iterations": MAXITER}
    }
    size = len(spec["subsets"]["curvature"][0])
    config = reference_config(settings, True, curvature_size=size, bfgs_size=size)
    optimizer = KrylovSubspaceDescent(torch_problem, config)
    train = torch_problem.splits.train

    def draw_subsets():
        n = optimizer.state["iteration"]
        return tuple(
            torch_problem.batch(train, torch.tensor(spec["subsets"][k][n])) for k in ("curvature", "bfgs")
        )

    optimizer.draw_subsets = draw_subsets
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def run(
    device: torch.device,
    reference: str | None = None,
    widths: str = ",".join(map(str, WIDTHS)),
    examples: int = N_EXAMPLES,
    subset: int = SUBSET,
    iterations: int = 6,
) -> list[dict]:
    reference = reference or os.environ.get("KSD_REFERENCE")
    if not reference:
        print("skipped: no checkout of pbrakel/ksd-theano given (--reference PATH, KSD_REFERENCE)")
        return []
    if device.type != "cpu":
        print(f"note: the reference runs on the CPU (NumPy, PyTensor), so ours does too (not on {device})")
    path = Path(reference).expanduser().resolve()
    spec = problem([int(w) for w in widths.split(",")], examples, subset, iterations)
    ours, theirs = [], []
    for _ in range(2):  # alternate, so that both see the same load
        theirs += reference_times(path, widths, examples, subset, iterations)[1:]
        ours += our_times(spec, iterations)[1:]
    ratio = statistics.median(ours) / statistics.median(theirs)
    n_params = sum(a * b + b for a, b in zip(spec["widths"][:-1], spec["widths"][1:], strict=True))
    return [
        {
            "name": f"ksd iteration / pbrakel/ksd-theano iteration ({widths}, {n_params} parameters)",
            "ratio": ratio,
            "detail": (
                f"{statistics.median(ours) * 1e3:.1f} ms vs {statistics.median(theirs) * 1e3:.1f} ms, "
                "float64, "
                f"K={SPACE_SIZE} (+1), subsets {subset}, gradient on {examples}, "
                f"{torch.get_num_threads()} threads"
            ),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", help="folder of a converted checkout of pbrakel/ksd-theano")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--examples", type=int, default=N_EXAMPLES, help="training examples (gradient set)")
    parser.add_argument("--subset", type=int, default=SUBSET, help="curvature and BFGS subset size")
    parser.add_argument("--iterations", type=int, default=6, help="per run (the first is not timed)")
    args = parser.parse_args()
    from bench_common import print_rows

    print_rows(
        run(torch.device("cpu"), args.reference, args.widths, args.examples, args.subset, args.iterations)
    )


if __name__ == "__main__":
    main()
