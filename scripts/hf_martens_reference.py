"""Run Martens' own HF code (GNU Octave) on the problem of a ksd-run configuration, from the same start.

The configuration is composed from ``conf/`` as ``ksd-run`` composes it (the overrides after ``--``), and
:func:`ksd.runner.prepare` builds its data and model, so his run starts from exactly the weights
``ksd-run`` starts from for that seed (our sparse initialisation packed into his ``paramsp`` order), on the
same training cases in the same order, cut into the same contiguous chunks (``optimizer.num_chunks``),
with the same weight cost (``optimizer.weight_decay``). His code then runs unchanged in what it computes
(``scripts/martens_code.py`` lists the edits), in his own single precision by default
(``--precision double`` for his "use doubles" choice), until its iterations' seconds reach
``run.max_seconds`` (or ``--seconds``), on one thread unless ``--threads`` says otherwise.

It writes a CSV of his iterations beside ours: ``method`` (the figure label of ``optimizer``, so ``make
figures`` draws it as that method's reference), ``source`` (the legend's text), ``iteration``,
``epoch`` (= the iteration: each computes its gradient on all training cases, as ksd-run counts a
full-batch HF step), ``wall_time`` (the sum of his per-iteration
``times``: gradient, CG, CG backtracking, ρ, line search, update; his test-set evaluation is outside, as
ksd-run's evaluation is outside ``wall_time``), ``train_error`` and ``test_error`` (his ``'L2'`` error:
squared reconstruction error summed over pixels, averaged over all training, resp. test, cases; ksd-run's
``train_error`` is the same quantity on ``run.eval_train_size`` cases), ``train_objective`` (−ll: the mean
cross-entropy plus τ/2‖θ‖²), ``rho``, ``damping`` (λ after the iteration's update), ``cg_iterations``,
``line_search_reductions`` (``inf``: step rejected) and ``rate``. Lines starting with ``#`` say how it was
made.

    python scripts/hf_martens_reference.py --martens PATH --out results/hf_martens_ksd_curves_cpu_long.csv \\
        -- +experiment=ksd_curves scale=cpu_long optimizer=hf seed=0 optimizer.num_chunks=4
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from martens_code import prepare_code, run_octave, write_case

from ksd.config import validate
from ksd.figures import label
from ksd.results import atomic_write
from ksd.runner import REGISTRIES, prepare

CONF = Path(__file__).resolve().parents[1] / "conf"
SOURCE = "Martens' Octave code"  # the legend's text in make figures
COLUMNS = ["method", "source", "iteration", "epoch", "wall_time", "train_error", "test_error",
           "train_objective", "rho", "damping", "cg_iterations", "line_search_reductions", "rate"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--martens", type=Path, required=True, help="his nnet_train_2.m, conjgrad_1.m")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--precision", choices=["single", "double"], default="single")
    parser.add_argument("--seconds", type=float, help="his training-time budget (default: run.max_seconds)")
    parser.add_argument("--max-iterations", type=int, default=100_000, help="his maxepoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="ksd-run overrides, after --")
    args = parser.parse_args()
    if shutil.which("octave-cli") is None:
        raise SystemExit("hf_martens_reference: octave-cli is not installed (apt-get install octave)")
    for name in ("nnet_train_2.m", "conjgrad_1.m"):
        if not (args.martens / name).is_file():
            raise SystemExit(f"hf_martens_reference: {args.martens} has no {name}")

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    settings = validate(cfg, REGISTRIES)
    if settings.optimizer.name != "hf":
        raise SystemExit("hf_martens_reference: the configuration's optimizer must be hf")
    if settings.model.name != "autoencoder" or settings.model.activation != "sigmoid":
        raise SystemExit("hf_martens_reference: his driver trains autoencoders of logistic units only")
    torch.set_num_threads(args.threads)
    problem, _, lines = prepare(settings)
    budget = args.seconds if args.seconds is not None else settings.run.max_seconds
    train, test = problem.splits.train.inputs, problem.splits.test.inputs
    layers = [m.out_features for m in problem.model.modules() if isinstance(m, torch.nn.Linear)]
    widths = layers[: len(layers) // 2]  # the encoder's; the code layer (linear) is the last
    with tempfile.TemporaryDirectory(prefix="hf_martens_") as tmp:
        folder = Path(tmp)
        prepare_code(args.martens, folder, args.precision)
        write_case(folder / "case.mat", problem.model, widths, train, test,
                   chunks=settings.optimizer.num_chunks, iterations=args.max_iterations,
                   budget=budget if budget is not None else float("inf"),
                   weightcost=settings.optimizer.weight_decay, test_chunks=max(1, len(test) // 5000))
        began = time.perf_counter()
        record = run_octave(folder, args.threads)
        elapsed = time.perf_counter() - began

    method, total, previous_cg = label("hf"), 0.0, 0
    rows = []
    for it in record:
        total += it.seconds
        rows.append([method, SOURCE, it.epoch, it.epoch, total, it.train_error, it.test_error, -it.ll, it.rho,
                     it.new_lambda, it.cg_total - previous_cg, it.reductions, it.rate])
        previous_cg = it.cg_total
    header = [
        "# Martens' HF demo code (nnet_train_2.m, conjgrad_1.m) in GNU Octave, "
        f"{args.precision} precision, {args.threads} thread(s), {len(rows)} iterations in {elapsed:.0f} s "
        f"(test evaluations included), {datetime.now(timezone.utc):%Y-%m-%d}",
        f"# his code: {args.martens.resolve()}; edits: scripts/martens_code.py",
        "# problem: ksd-run " + shlex.join(args.overrides),
        *[f"# {line}" for line in lines],
        f"# budget: {budget} s of his per-iteration times",
    ]

    def write(handle) -> None:
        handle.write("\n".join(header) + "\n")
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)

    atomic_write(args.out, write)
    print(f"hf_martens_reference: {len(rows)} iterations, {total:.0f} s of training; wrote {args.out}")


if __name__ == "__main__":
    main()
