"""`make bench`: every benchmark of the project in one process, printed and saved.

Each ``scripts/bench_<topic>.py`` module exposes ``run(device) -> list[dict]`` with rows
``{"name", "ratio", "target" (optional), "detail"}``; ratios are measured in this process on the
same data. Results go to ``results/bench/bench.json`` and ``results/bench/bench.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import print_rows, resolve_device

from ksd.results import atomic_write, write_json

TOPICS = [
    "engine", "optimizers", "curvature", "ksd", "kbfgs", "arcs", "authors", "hf_martens", "ksd_reference",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--only", nargs="*", choices=TOPICS, help="run only these benchmarks")
    parser.add_argument("--out", default="results/bench", help="folder for bench.json and bench.md")

    def ksd_reference(path: str) -> str:  # bench_ksd_reference.py reads KSD_REFERENCE (skips without it)
        os.environ["KSD_REFERENCE"] = path
        return path

    parser.add_argument(
        "--ksd-reference",
        type=ksd_reference,
        help="converted checkout of pbrakel/ksd-theano: our KSD iteration / its (bench_ksd_reference.py)",
    )
    parser.add_argument(
        "--authors",
        help="checkout of renyiryry/kbfgs_neurips2020_public: our epoch time / theirs (bench_authors.py)",
    )
    args = parser.parse_args()
    if args.authors:
        os.environ["KBFGS_AUTHORS"] = args.authors
    device = resolve_device(args.device)
    rows: list[dict] = []
    # How loaded the machine was: ratios come from interleaved timings and hold under load, seconds do not.
    load = {"before": _load()}
    elapsed: dict[str, float] = {}
    start = time.perf_counter()
    for topic in args.only or TOPICS:
        print(f"[{topic}]", flush=True)
        began = time.perf_counter()
        topic_rows = importlib.import_module(f"bench_{topic}").run(device)
        elapsed[topic] = round(time.perf_counter() - began, 1)
        print_rows(topic_rows)
        print(f"[{topic}: {elapsed[topic]:.0f} s]", flush=True)
        rows += [{"topic": topic, **row} for row in topic_rows]
    elapsed["total"] = round(time.perf_counter() - start, 1)
    load["after"] = _load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    meta["date"] = time.strftime("%Y-%m-%d %H:%M")
    meta["seconds"] = elapsed
    meta["load"] = load
    write_json(out / "bench.json", {"meta": meta, "rows": rows})
    lines = ["| topic | measurement | ratio | target | detail |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if isinstance(r.get("ratio"), float) else str(r.get("ratio"))
        lines.append(
            f"| {r['topic']} | {r['name']} | {ratio} | {r.get('target') or ''} | {r.get('detail', '')} |"
        )
    device_meta = {k: v for k, v in meta.items() if k not in ("date", "seconds", "load")}
    header = (
        f"Device: {device_meta}\n\n"
        f"Measured {meta['date']} in {elapsed['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in elapsed.items() if k != 'total')}). "
        f"Load average (1, 5, 15 min) on {os.cpu_count()} CPUs: {load['before']} before, "
        f"{load['after']} after; "
        "a load above the CPU count means other processes shared the cores, which stretches the seconds "
        "but not the ratios of interleaved timings.\n\n"
    )
    atomic_write(out / "bench.md", lambda f: f.write(header + "\n".join(lines) + "\n"))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({elapsed['total']:.0f} s)")


def _load() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    main()
