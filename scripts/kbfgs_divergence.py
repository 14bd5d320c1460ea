"""How often K-BFGS and K-BFGS(L) diverge at the authors' settings: ksd-run against the authors' code.

Each run is one configuration of the MNIST autoencoder of the K-BFGS demo (all 60,000 images, batch 1,000,
α = λ = 0.3, τ = 1e-5) trained for ``--epochs`` epochs from seed ``s``:

- **ours**: ``ksd-run +experiment=kbfgs_mnist scale=paper optimizer=M seed=s run.max_epochs=E ...``, plus
  the overrides of a *variant* (``--variants``; ``paper`` is none, see :data:`VARIANTS`); it diverged when
  its ``summary.json`` says ``status: diverged``;
- **theirs** (``--authors PATH``, a checkout of ``renyiryry/kbfgs_neurips2020_public``, only with the
  ``paper`` variant): their unmodified ``training_function.train_model(algorithm=..., lr=0.3,
  lambda_damping=0.3, batch_size=1000, if_max_epoch=1, max_epoch=E)`` with only its hard-coded
  ``args['seed_number'] = 9999`` replaced by ``s``, on the MNIST files of ``KSD_DATA``. Their loop stops at
  the first NaN (gradient, step, weights or epoch loss); the run diverged when it returns fewer than E
  epoch losses or a non-finite one. Imports their path never uses (``torchvision``, which does not import
  beside this CPU torch) are stubbed.

Every run is a subprocess with one thread (``OMP_NUM_THREADS=1``), ``--jobs`` at a time; each result is a
small JSON file under ``--out`` (``results/kbfgs_divergence``, committed: the measurement's data) and a
re-run skips the runs already there, so an interrupted measurement resumes, in a later checkout too. Our
runs' own folders go to ``--runs`` (``multirun/kbfgs_divergence``).
The table gives per method, code and variant: runs, diverged, the rate with its 95 % Wilson score interval,
the mean final training loss of the runs that completed, and Fisher's exact test (two-sided) of the
variant's rate against the authors' code (``paper``) or, without it, against ours at ``paper``.

    python scripts/kbfgs_divergence.py --seeds 0-15 --jobs 2 --authors /path/to/kbfgs_neurips2020_public
    python scripts/kbfgs_divergence.py --seeds 0-15 --variants minibatch float64 lr0.1 rewind
    python scripts/kbfgs_divergence.py --table-only     # the table of what is under --out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"kbfgs": "K-BFGS", "kbfgs_l": "K-BFGS(L)"}
#: variant → ksd-run overrides on top of the authors' settings
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    "minibatch": ["optimizer.a_update=minibatch"],  # the 2022 paper's A-side Hessian action
    "float64": ["dtype=float64"],
    "lr0.1": ["optimizer.lr=0.1"],
    "rewind": ["run.on_divergence=rewind"],
}
BASE = [
    "+experiment=kbfgs_mnist",
    "scale=paper",
    "run.max_seconds=null",
    "dataset.val_size=0",
    "run.eval_train_size=null",
    "run.eval_seconds=null",
    # every 10 steps: a divergence ends the run within 10 steps, and a rewind loses at most 10 (an
    # evaluation reads no random generator and leaves the trajectory as it is)
    "run.eval_every=10",
    "run.plot=false",
    "run.progress=false",
    "run.checkpoint_every=0",
]

#: The driver of the authors' code: their train_model, its seed line replaced, nothing else changed.
AUTHORS_DRIVER = r"""
import json, math, sys, types
code, algorithm, seed, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for name in ("torchvision", "torchvision.transforms", "torchvision.datasets"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.path.insert(0, code)
source = open(code + "/training_function.py").read()
line = "args['seed_number'] = 9999"
assert source.count(line) == 1, "training_function.py: the seed line was not found once"
module = types.ModuleType("training_function")
module.__file__ = code + "/training_function.py"
exec(compile(source.replace(line, f"args['seed_number'] = {seed}"), module.__file__, "exec"), module.__dict__)
result = module.train_model(dataset_name="MNIST", algorithm=algorithm, lr=0.3, lambda_damping=0.3,
                            batch_size=1000, if_gpu=False, if_max_epoch=1, max_epoch=epochs, verbose=False)
train, test = ([float(v) for v in result[key]] for key in ("train_losses", "test_losses"))
print("RESULT " + json.dumps({"train_losses": train, "test_losses": test}))
"""


def parse_seeds(text: str) -> list[int]:
    """``0-15`` or ``0,3,9999`` (or both, comma-separated)."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test of the 2×2 table (k1, n1 − k1; k2, n2 − k2).

    The sum of the hypergeometric probabilities of every table with the same margins that is no more
    likely than the observed one (the convention of R's ``fisher.test`` and SciPy's ``fisher_exact``).
    """
    total, column = n1 + n2, k1 + k2

    def probability(a: int) -> float:
        return math.comb(n1, a) * math.comb(n2, column - a) / math.comb(total, column)

    observed = probability(k1)
    low, high = max(0, column - n2), min(n1, column)
    return min(1.0, sum(p for a in range(low, high + 1) if (p := probability(a)) <= observed * (1 + 1e-7)))


def result_path(out: Path, code: str, method: str, variant: str, seed: int) -> Path:
    return out / f"{code}-{method}-{variant}-seed{seed}.json"


def run_ours(runs: Path, method: str, variant: str, seed: int, epochs: int) -> dict[str, Any]:
    run_dir = runs / f"{method}-{variant}-seed{seed}"
    command = [
        str(Path(sys.executable).parent / "ksd-run"),
        *BASE,
        f"optimizer={method}",
        f"seed={seed}",
        f"run.max_epochs={epochs}",
        *VARIANTS[variant],
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=_one_thread(), cwd=ROOT)
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise RuntimeError(f"ksd-run left no summary.json (exit {done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(summary_file.read_text())
    if summary["status"] not in ("completed", "diverged"):
        raise RuntimeError(f"ksd-run {summary['status']}: {summary.get('reason')}")
    return {
        "diverged": summary["status"] == "diverged",
        "status": summary["status"],
        "reason": summary.get("reason"),
        "steps": summary.get("steps"),
        "epochs": summary.get("epochs"),
        "train_loss": summary.get("final", {}).get("train_loss"),
        "test_loss": summary.get("final", {}).get("test_loss"),
        "rewinds": summary.get("rewinds"),
        "wall_time": summary.get("wall_time"),
        "command": " ".join(command[1:]),
    }


def run_authors(authors: Path, method: str, seed: int, epochs: int, python: str) -> dict[str, Any]:
    data = data_root() / "MNIST" / "raw"
    with tempfile.TemporaryDirectory() as work:  # their reader looks in ./data/MNIST_data
        (Path(work) / "data").mkdir()
        (Path(work) / "data" / "MNIST_data").symlink_to(data.resolve())
        done = subprocess.run(
            [python, "-c", AUTHORS_DRIVER, str(authors.resolve()), METHODS[method], str(seed), str(epochs)],
            capture_output=True,
            text=True,
            env=_one_thread(),
            cwd=work,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the authors' code failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    losses = result["train_losses"]
    completed = len(losses) == epochs + 1 and all(math.isfinite(v) for v in losses)
    return {
        "diverged": not completed,
        "epochs": len(losses) - 1,
        "train_loss": losses[-1] if completed else None,
        "test_loss": result["test_losses"][-1] if completed else None,
        "train_losses": losses,
    }


def _one_thread() -> dict[str, str]:
    return {**os.environ, "KSD_DATA": str(data_root()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def data_root() -> Path:
    """``KSD_DATA``, else the project's shared data beside the checkout (as the Makefile)."""
    return Path(os.environ.get("KSD_DATA", ROOT.parent / "shared" / "data")).resolve()


def measure(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in args.seeds:  # seed by seed, so that an interrupted measurement has every method and variant
        for method in args.methods:
            if args.authors is not None:
                todo.append(("authors", method, "paper", seed))
            todo += [("ours", method, variant, seed) for variant in args.variants]
    todo = [job for job in todo if not result_path(out, *job).exists()]
    print(f"{len(todo)} runs to make, {args.jobs} at a time", flush=True)

    def one(job: tuple[str, str, str, int]) -> None:
        code, method, variant, seed = job
        if code == "authors":
            result = run_authors(args.authors, method, seed, args.epochs, args.authors_python)
        else:
            result = run_ours(args.runs, method, variant, seed, args.epochs)
        result.update(code=code, method=method, variant=variant, seed=seed, run_epochs=args.epochs)
        path = result_path(out, *job)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        loss = result["train_loss"]
        shown = "diverged" if result["diverged"] else f"{loss:.1f}"
        print(f"{code:7s} {method:8s} {variant:9s} seed {seed:5d}: {shown}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(one, job) for job in todo]:
            future.result()


def table(out: Path, epochs: int) -> str:
    """The rate table of the runs under ``out``. Each rate is compared by Fisher's exact test on the seeds
    both groups ran: ours at ``paper`` with the authors' code, every other variant with ours at ``paper``."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for r in results:
        if r.get("run_epochs") == epochs:
            groups.setdefault((r["method"], r["code"], r["variant"]), {})[r["seed"]] = r
    lines = [
        "| method | code | variant | runs | diverged | rate (95 % interval) "
        f"| train loss after epoch {epochs} of those that completed, mean (min–max) | their training s "
        "| Fisher's exact p (vs, common seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"authors": 0, "ours": 1}
    variants = list(VARIANTS)
    for key in sorted(groups, key=lambda k: (k[0], order[k[1]], variants.index(k[2]))):
        method, code, variant = key
        runs = list(groups[key].values())
        n, k = len(runs), sum(r["diverged"] for r in runs)
        low, high = wilson_interval(k, n)
        losses = [r["train_loss"] for r in runs if not r["diverged"]]
        loss = f"{sum(losses) / len(losses):.1f} ({min(losses):.1f}–{max(losses):.1f})" if losses else "—"
        times = [r["wall_time"] for r in runs if not r["diverged"] and r.get("wall_time") is not None]
        seconds = f"{sum(times) / len(times):.0f}" if times else "—"
        reference = ("authors", "paper") if (code, variant) == ("ours", "paper") else ("ours", "paper")
        p_value = "—"
        if code == "ours" and (method, *reference) in groups:
            ref = groups[(method, *reference)]
            common = sorted(set(ref) & set(groups[key]))
            mine = sum(groups[key][s]["diverged"] for s in common)
            theirs = sum(ref[s]["diverged"] for s in common)
            who = "the authors" if reference[0] == "authors" else "ours at paper"
            p_value = f"{fisher_exact(mine, len(common), theirs, len(common)):.2g} ({who}, {len(common)})"
        lines.append(
            f"| {METHODS[method]} | {code} | {variant} | {n} | {k} | {k / n:.2f} ({low:.2f}–{high:.2f}) "
            f"| {loss} | {seconds} | {p_value} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-15"), help="0-15 or 0,1,9999")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["paper"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--authors", type=Path, help="a checkout of renyiryry/kbfgs_neurips2020_public")
    parser.add_argument(
        "--authors-python", default=sys.executable, help="the Python that runs their code (with scipy, pytz)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "kbfgs_divergence")
    parser.add_argument("--runs", type=Path, default=ROOT / "multirun" / "kbfgs_divergence")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs under --out")
    args = parser.parse_args(argv)
    if args.authors is not None and not (args.authors / "training_function.py").is_file():
        parser.error(f"{args.authors} has no training_function.py; give a kbfgs_neurips2020_public checkout.")
    if not args.table_only:
        measure(args)
    print(table(args.out, args.epochs))


if __name__ == "__main__":
    main()
