"""ksd-collect and make figures on synthetic run folders whose selection and averages are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ksd.collect import collect, final_rows, main, select, time_to_target
from ksd.figures import BEGIN, COLORS, END, color, reference_curves, render, seed_band, update_readme

EXPERIMENT = {
    "name": "toy",
    "paper": "Toy et al.",
    "figure": "Fig. 1",
    "train_metric": "train_loss",
    "test_metric": "test_loss",
    "select_on": "val_loss",
    "target": 5.0,
    "reported": {"sgd": {"test_loss": 0.9}, "Someone 2006": {"test_loss": 0.5}},
}


def config(optimizer: str, seed: int, **hyper) -> dict:
    return {
        "dataset": {"name": "mnist", "root": "/data", "train_size": 100},
        "model": {"name": "autoencoder", "widths": [16, 4]},
        "optimizer": {"name": optimizer, "batch_size": 10, **hyper},
        "run": {"max_seconds": 3, "eval_every": 1},
        "logger": {"name": "csv"},
        "seed": seed,
        "device": "cpu",
        "scale": "cpu",
        "experiment": EXPERIMENT,
    }


def write_run(root: Path, name: str, cfg: dict, status: str | None, rows: list[dict] | None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status is not None:
        summary = {"status": status, "reason": "bad value" if status == "failed" else "budget reached"}
        if status != "failed":
            summary["config"] = cfg
        (run / "summary.json").write_text(json.dumps(summary))
    if rows:
        pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    return run


def curve(final_val: float, final_test: float, train: tuple[float, ...] = (10.0, 6.0, 4.0)) -> list[dict]:
    """Three evaluations at 0, 1, 2 s; the final validation and test losses as given."""
    return [
        {
            "step": i,
            "epoch": 0.5 * i,
            "wall_time": float(i),
            "train_loss": loss,
            "val_loss": final_val + 2 - i,
            "test_loss": final_test + 2 - i,
        }
        for i, loss in enumerate(train)
    ]


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "toy-cpu"
    # sgd, lr 0.1: validation losses 1.0 and 2.0 (mean 1.5); lr 0.01: 1.2 and 1.4 (mean 1.3, selected)
    write_run(root, "sgd_lr0.1_s0", config("sgd", 0, lr=0.1), "completed", curve(1.0, 0.5))
    write_run(root, "sgd_lr0.1_s1", config("sgd", 1, lr=0.1), "completed", curve(2.0, 0.6))
    write_run(root, "sgd_lr0.01_s0", config("sgd", 0, lr=0.01), "completed", curve(1.2, 0.7, (10, 4.5, 3)))
    write_run(root, "sgd_lr0.01_s1", config("sgd", 1, lr=0.01), "completed", curve(1.4, 1.1, (10, 8, 6)))
    # adam: one seed diverged (NaN at the end), one failed before training, one never finished
    diverged = curve(1.0, 1.0)
    diverged[-1].update(train_loss=float("nan"), val_loss=float("nan"), test_loss=float("nan"))
    write_run(root, "adam_s0", config("adam", 0, lr=0.001), "completed", curve(3.0, 2.0))
    write_run(root, "adam_s1", config("adam", 1, lr=0.001), "diverged", diverged)
    write_run(root, "adam_s2", config("adam", 2, lr=0.001), "failed", None)
    write_run(root, "adam_s3", config("adam", 3, lr=0.001), None, None)
    return root


def test_table_has_a_row_per_evaluation_and_every_failure(sweep):
    table = collect([sweep.parent])
    assert table["run"].nunique() == 8
    assert len(table) == 6 * 3 + 2  # six runs with three evaluations, two without metrics
    status = final_rows(table).set_index("run")["status"]
    assert status[str(sweep / "adam_s2")] == "failed"
    assert status[str(sweep / "adam_s3")] == "incomplete"
    failed = table[table["run"] == str(sweep / "adam_s2")].iloc[0]
    assert failed["reason"] == "bad value" and math.isnan(failed["train_loss"])
    # config columns, from summary.json or (failed, incomplete) from .hydra/config.yaml
    assert failed["optimizer"] == "adam" and failed["optimizer.lr"] == 0.001 and failed["seed"] == 2
    assert set(table["experiment"]) == {"toy"} and set(table["scale"]) == {"cpu"}
    assert set(table["model.widths"]) == {"[16,4]"}
    # runs that differ only in their seed share a setting; the data folder is not part of it
    settings = table.groupby("optimizer")["setting"].nunique()
    assert settings["sgd"] == 2 and settings["adam"] == 1
    assert "dataset.root" not in table["setting"].iloc[0] and "seed" not in json.loads(
        table["setting"].iloc[0]
    )


def test_selection_picks_the_best_mean_validation_setting_and_averages_its_seeds(sweep):
    selection = select(collect([sweep.parent])).set_index("optimizer")
    sgd = selection.loc["sgd"]
    assert sgd["tuned"] == "lr=0.01" and sgd["select_on"] == "val_loss"
    assert sgd["selection_score"] == pytest.approx(1.3)
    assert sgd["test_loss_mean"] == pytest.approx(np.mean([0.7, 1.1]))
    assert sgd["test_loss_std"] == pytest.approx(np.std([0.7, 1.1], ddof=1))
    assert sgd["train_loss_mean"] == pytest.approx(4.5)
    # time to train_loss <= 5: seed 0 reaches 4.5 at 1 s, seed 1 never (it ends at 6)
    assert sgd["target_reached"] == 1 and sgd["time_to_target_mean"] == pytest.approx(1.0)
    adam = selection.loc["adam"]
    assert (adam["runs"], adam["completed"], adam["diverged"], adam["failed"]) == (4, 1, 1, 2)
    assert adam["selection_score"] == math.inf  # the diverged seed counts as the worst value
    assert adam["test_loss_mean"] == pytest.approx(2.0) and math.isnan(adam["test_loss_std"])


def test_selection_maximises_accuracy(tmp_path):
    for i, (lr, acc) in enumerate([(0.1, 0.8), (0.01, 0.9)]):
        cfg = config("sgd", 0, lr=lr)
        cfg["experiment"] = {**EXPERIMENT, "select_on": "val_accuracy"}
        rows = [{"step": 0, "wall_time": 0.0, "train_loss": 1.0, "val_accuracy": acc}]
        write_run(tmp_path, f"r{i}", cfg, "completed", rows)
    selection = select(collect([tmp_path]))
    assert selection["tuned"].tolist() == ["lr=0.01"]


def test_time_to_target_is_the_first_time_at_or_below_the_target():
    table = pd.DataFrame(
        {"run": ["a"] * 4 + ["b"] * 2, "wall_time": [0, 1, 2, 3, 0, 1], "train_loss": [9, 5, 6, 4, 9, 8]}
    )
    times = time_to_target(table, "train_loss", 5.0)
    assert times["a"] == 1 and math.isnan(times["b"])


def test_collect_cli_writes_parquet_csv_and_reports_failures(sweep, tmp_path, capsys):
    main([str(sweep.parent), "--out", str(tmp_path / "out" / "runs")])
    printed = capsys.readouterr().out
    assert "failed" in printed and "adam_s2: bad value" in printed and "incomplete" in printed
    parquet = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(parquet) == len(csv) == 20
    assert set(pd.read_csv(tmp_path / "out" / "runs_selected.csv")["optimizer"]) == {"adam", "sgd"}


def test_collect_add_keeps_the_other_experiments_of_the_table(sweep, tmp_path):
    out = tmp_path / "results" / "runs"
    main([str(sweep), "--out", str(out)])
    other = tmp_path / "multirun" / "toy-paper_epochs"
    cfg = {**config("sgd", 0, lr=0.1), "scale": "paper_epochs"}
    write_run(other, "sgd_s0", cfg, "completed", curve(1, 1))
    main([str(other), "--out", str(out), "--add"])
    table = pd.read_parquet(out.with_name("runs.parquet"))
    assert table.groupby("scale")["run"].nunique().to_dict() == {"cpu": 8, "paper_epochs": 1}
    main([str(other), "--out", str(out), "--add"])  # collecting a sweep again replaces its rows
    assert len(pd.read_parquet(out.with_name("runs.parquet"))) == len(table)


def test_collect_add_replaces_only_the_optimizers_collected(sweep, tmp_path):
    out = tmp_path / "results" / "runs"
    main([str(sweep), "--out", str(out)])
    before = pd.read_parquet(out.with_name("runs.parquet"))
    again = tmp_path / "later" / "toy-cpu"
    write_run(again, "sgd_long", config("sgd", 7, lr=0.1), "completed", curve(1, 3))
    main([str(again), "--out", str(out), "--add"])
    after = pd.read_parquet(out.with_name("runs.parquet"))
    sgd = after[after["optimizer"] == "sgd"]
    assert set(sgd["seed"]) == {7}  # the new sgd sweep replaced the old sgd runs
    kept = after[after["optimizer"] != "sgd"].reset_index(drop=True)
    expected = before[before["optimizer"] != "sgd"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[expected.columns], expected)  # adam's rows as they were


def test_collect_add_runs_keeps_the_other_runs_of_an_optimizer(sweep, tmp_path):
    out = tmp_path / "results" / "runs"
    main([str(sweep), "--out", str(out)])
    before = pd.read_parquet(out.with_name("runs.parquet"))
    more = tmp_path / "later" / "toy-cpu"
    write_run(more, "sgd_s7", config("sgd", 7, lr=0.1), "completed", curve(1, 3))
    main([str(more), "--out", str(out), "--add-runs"])
    after = pd.read_parquet(out.with_name("runs.parquet"))
    def sgd_seeds(table: pd.DataFrame) -> set[int]:
        return set(table[table["optimizer"] == "sgd"]["seed"])

    assert sgd_seeds(after) == sgd_seeds(before) | {7}
    main([str(more), "--out", str(out), "--add-runs"])  # the same run collected again replaces its rows
    assert len(pd.read_parquet(out.with_name("runs.parquet"))) == len(after)


def test_seed_band_interpolates_onto_the_common_time_range():
    a = pd.DataFrame({"wall_time": [0.0, 2.0, 4.0], "train_loss": [4.0, 2.0, 0.0]})
    b = pd.DataFrame({"wall_time": [0.0, 1.0], "train_loss": [6.0, 4.0]})
    grid, mean, low, high = seed_band([a, b], "wall_time", "train_loss")
    assert grid[0] == 0.0 and grid[-1] == 1.0  # up to the shorter run
    np.testing.assert_allclose(mean, ((4 - grid) + (6 - 2 * grid)) / 2)
    np.testing.assert_allclose(low, 4 - grid)
    np.testing.assert_allclose(high, 6 - 2 * grid)


def test_figures_and_readme_tables(sweep, tmp_path):
    table = collect([sweep.parent])
    written, section = render(table, tmp_path / "figures")
    assert sorted(p.name for p in written) == ["toy.pdf", "toy.png"]
    assert all(p.stat().st_size > 5_000 for p in written)
    assert "| SGD-m | lr=0.01 | 2/2 | 4.5 ± 2.1 | 0.9 ± 0.28 | 1.0 s (1/2) | test loss 0.9 |" in section
    assert "| Someone 2006 (paper) | — | — | — | 0.5 | — | reported |" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\nhand-written before\n\n{BEGIN}\nold\n{END}\n\nhand-written after\n")
    update_readme(readme, section)
    update_readme(readme, section)
    text = readme.read_text()
    assert text.startswith("# Results\n\nhand-written before") and text.endswith("hand-written after\n")
    assert text.count(BEGIN) == 1 and "old" not in text and "![toy](figures/toy.png)" in text


def test_paper_epochs_figures_carry_the_scale_and_the_reference_per_epoch(tmp_path):
    """At scale=paper_epochs the figure's name has the scale, and the reference's epochs sit beside ours."""
    root = tmp_path / "multirun" / "toy-paper_epochs"
    for seed, losses in ((0, (10.0, 6.0, 4.0)), (1, (10.0, 8.0, 6.0))):
        cfg = {**config("sgd", seed, lr=0.1), "scale": "paper_epochs"}
        rows = [{**row, "epoch": float(i)} for i, row in enumerate(curve(1.0, 0.5, losses))]
        write_run(root, f"sgd_s{seed}", cfg, "completed", rows)
    reference = tmp_path / "authors.csv"
    lines = ["# note", "method,epoch,train_loss,test_loss", "SGD-m,1,6.5,3.25", "SGD-m,2,4.5,2", "KFAC,1,9,9"]
    reference.write_text("\n".join(lines) + "\n")
    written, section = render(collect([root]), tmp_path / "figures", reference_curves(reference))
    assert sorted(p.name for p in written) == ["toy_paper_epochs.pdf", "toy_paper_epochs.png"]
    # epoch 1: ours 6 and 8 (mean 7), test 1.5 both; epoch 2: 4 and 6 (mean 5), test 0.5
    assert "| SGD-m | 1 | 6.5 / 7 (2) | 3.25 / 1.5 (2) |" in section
    assert "| SGD-m | 2 | 4.5 / 5 (2) | 2 / 0.5 (2) |" in section
    assert "KFAC" not in section.split("Per epoch")[1]  # no run of ours to put beside it


def test_paper_epochs_figures_draw_the_reference_curves_against_epochs(tmp_path, monkeypatch):
    """The authors' per-epoch curve is drawn, dotted, in the epoch panels only, up to our last epoch."""
    import matplotlib.figure

    root = tmp_path / "multirun" / "toy-paper_epochs"
    cfg = {**config("sgd", 0, lr=0.1), "scale": "paper_epochs"}
    rows = [{**row, "epoch": float(i)} for i, row in enumerate(curve(1.0, 0.5))]
    write_run(root, "sgd_s0", cfg, "completed", rows)
    reference = tmp_path / "authors.csv"
    lines = ["method,epoch,train_loss,test_loss", "SGD-m,1,6.5,3.25", "SGD-m,2,4.5,2", "SGD-m,3,4,1.5"]
    reference.write_text("\n".join(lines) + "\n")
    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    render(collect([root]), tmp_path / "figures", reference_curves(reference))
    time_panel, train_panel, test_panel = figures[0].axes
    notebook = "SGD-m, authors' notebook"
    assert notebook not in [line.get_label() for line in time_panel.get_lines()]
    for panel, metric in ((train_panel, [6.5, 4.5]), (test_panel, [3.25, 2.0])):
        (line,) = [line for line in panel.get_lines() if line.get_label() == notebook]
        assert line.get_linestyle() == ":"
        assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == metric  # epoch 3 is past ours


def test_other_codes_runs_are_drawn_dashed_against_time_in_their_figure(tmp_path, monkeypatch):
    """results/<source>_<figure>.csv (scripts/ksd_reference.py curves, hf_martens_*.csv) is drawn dashed in
    the colour of its method, in the panels whose columns it has, in that figure only."""
    import matplotlib.figure

    root = tmp_path / "multirun" / "toy-cpu_long"
    cfg = {**config("sgd", 0, lr=0.1), "scale": "cpu_long"}
    write_run(root, "sgd_s0", cfg, "completed", curve(1.0, 0.5))
    results = tmp_path / "results"
    results.mkdir()
    columns = "method,source,iteration,wall_time,train_loss,test_loss"
    rows = ["SGD-m,their code,0,0.0,10,9", "SGD-m,their code,2,3.5,5,4", "SGD-m,their code,1,1.5,7,6"]
    (results / "ksd_reference_toy_cpu_long.csv").write_text("\n".join(["# made by", columns, *rows]) + "\n")
    # no source column: the file name's prefix; the method by its optimizer name
    (results / "hf_martens_toy_cpu_long.csv").write_text("method,wall_time,train_loss\nsgd,0,8\nsgd,2,3\n")
    (results / "other_toy.csv").write_text("method,wall_time,train_loss\nSGD-m,0,1\nSGD-m,2,1\n")  # scale=cpu
    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    written, _ = render(collect([root]), tmp_path / "figures", curves_dir=results)
    assert [p.name for p in written] == ["toy_cpu_long.png", "toy_cpu_long.pdf"]
    time_panel, train_panel, test_panel = figures[0].axes
    lines = {line.get_label(): line for line in time_panel.get_lines()}
    theirs = lines["SGD-m, their code"]
    assert theirs.get_linestyle() == "--" and theirs.get_color() == COLORS["sgd"]
    assert list(theirs.get_xdata()) == [0.0, 1.5, 3.5] and list(theirs.get_ydata()) == [10, 7, 5]
    assert list(lines["SGD-m, hf_martens"].get_ydata()) == [8, 3]
    assert "SGD-m, other" not in lines
    assert "SGD-m, their code" in [t.get_text() for t in time_panel.get_legend().get_texts()]
    for panel in (train_panel, test_panel):  # no epoch column: not in the panels against epochs
        labels = {line.get_label() for line in panel.get_lines()}
        assert "SGD-m" in labels and not labels & {"SGD-m, their code", "SGD-m, hf_martens"}


def test_optimizer_colours_are_fixed_and_distinct():
    assert len(set(COLORS.values())) == len(COLORS)
    assert color("sgd") == COLORS["sgd"]
    assert color("my_method") == "#cedb9c"  # tab20b, picked by the name's CRC-32: the same in every run
    assert color("my_method").startswith("#")


def test_time_to_target_uses_the_target_of_each_scale(tmp_path):
    """One experiment at two scales, targets 5 (cpu) and 3 (paper_epochs): each run is timed to its own."""
    for scale, target in (("cpu", 5.0), ("paper_epochs", 3.0)):
        cfg = {**config("sgd", 0, lr=0.1), "scale": scale, "experiment": {**EXPERIMENT, "target": target}}
        # training losses 10, 4, 2 at 0, 1, 2 s: ≤ 5 at 1 s, ≤ 3 at 2 s
        write_run(tmp_path / f"toy-{scale}", "sgd", cfg, "completed", curve(1.0, 0.5, (10.0, 4.0, 2.0)))
    selection = select(collect([tmp_path / "toy-cpu", tmp_path / "toy-paper_epochs"])).set_index("scale")
    assert selection.loc["cpu", "time_to_target_mean"] == pytest.approx(1.0)
    assert selection.loc["paper_epochs", "time_to_target_mean"] == pytest.approx(2.0)
