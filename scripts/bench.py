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
    for topic in args.only or TOPICS:
        print(f"[{topic}]", flush=True)
        topic_rows = importlib.import_module(f"bench_{topic}").run(device)
        print_rows(topic_rows)
        rows += [{"topic": topic, **row} for row in topic_rows]
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
    write_json(out / "bench.json", {"meta": meta, "rows": rows})
    lines = ["| topic | measurement | ratio | target | detail |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if isinstance(r.get("ratio"), float) else str(r.get("ratio"))
        lines.append(
            f"| {r['topic']} | {r['name']} | {ratio} | {r.get('target') or ''} | {r.get('detail', '')} |"
        )
    atomic_write(out / "bench.md", lambda f: f.write(f"Device: {meta}\n\n" + "\n".join(lines) + "\n"))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


if __name__ == "__main__":
    main()
