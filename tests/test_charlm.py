"""The language-modelling task: text windows, the per-token loss and its Hessian, charlm runs that learn."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config

from ksd.data import DataError, load_dataset
from ksd.data.text import read_text
from ksd.losses import SequenceCrossEntropy
from ksd.runner import execute

CORPUS = "abcabcabd" * 40  # 360 characters: 4 distinct, one surprise every 9


def test_windows_are_the_text_and_its_next_characters(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    raw, vocabulary = read_text(tmp_path, path="corpus.txt", seq_len=8)
    assert vocabulary == ["a", "b", "c", "d"]
    decode = "".join
    n_windows = (len(CORPUS) - 1) // 8  # 44
    assert raw.train_x.shape == (40, 8) and raw.test_x.shape == (4, 8)  # the last 10 % for test
    assert decode(vocabulary[i] for i in raw.train_x[0]) == CORPUS[:8]
    assert decode(vocabulary[i] for i in raw.train_y[0]) == CORPUS[1:9]
    last = n_windows - 1
    assert decode(vocabulary[i] for i in raw.test_y[-1]) == CORPUS[last * 8 + 1 : last * 8 + 9]


def test_load_dataset_keeps_indices_and_sizes_the_spec(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    splits = load_dataset("text", tmp_path, val_size=5, path="corpus.txt", seq_len=8)
    assert splits.train.inputs.dtype == torch.int64 and splits.train.labels.shape == (35, 8)
    assert (splits.spec.input_shape, splits.spec.num_classes) == ((8,), 4)


def test_builtin_corpus_needs_no_file(tmp_path):
    splits = load_dataset("text", tmp_path, val_size=100, seq_len=64)
    assert splits.spec.num_classes > 50 and len(splits.train) > 5000 and "pydoc_data" in splits.spec.source


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not found"), (b"\xff\xfe\xfa", "could not be read as UTF-8"), (b"abc", "too short")],
)
def test_bad_corpus_gets_one_sentence(tmp_path, content, match):
    if content is not None:
        (tmp_path / "corpus.txt").write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_text(tmp_path, path="corpus.txt", seq_len=8)


def test_sequence_loss_hessian_is_the_autograd_hessian_of_the_per_example_loss():
    """H_ℓ u against the dense Hessian of ℓ(z) = (1/T) Σ_τ CE(z_τ, t_τ) for one example (T = 3, V = 4)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([[0, 3, 1]])
    u = torch.randn(1, 3, 4, dtype=torch.float64, generator=g)
    loss = SequenceCrossEntropy()
    dense = torch.autograd.functional.hessian(lambda x: loss.per_example(x, t).sum(), z).reshape(12, 12)
    expected = (dense @ u.reshape(12)).reshape(1, 3, 4)
    torch.testing.assert_close(loss.output_hessian_vector_product(z, t, u), expected)
    manual = sum(torch.logsumexp(z[0, k], 0) - z[0, k, t[0, k]] for k in range(3)) / 3
    torch.testing.assert_close(loss.per_example(z, t), manual.reshape(1))


# Adam in the fast set; ARCs-LSR1 (several times as long) in the slow set
@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [("adam", ["optimizer.lr=0.01"]), pytest.param("arcs_lsr1", [], marks=pytest.mark.slow)],
)
def test_charlm_learns_and_logs_perplexity(tmp_path, optimizer, extra):
    """On a corpus where 8 of 9 next characters are determined, perplexity falls from about 4 (uniform over
    4 characters) to below 2.5 in 60 steps."""
    (tmp_path / "corpus.txt").write_text(CORPUS * 3, encoding="utf-8")
    cfg = compose_config(
        "dataset=text",
        "model=charlm",
        f"optimizer={optimizer}",
        f"dataset.root={tmp_path}",
        "dataset.path=corpus.txt",
        "dataset.seq_len=16",
        "dataset.val_size=10",
        "model.widths=[16]",
        "model.embedding=8",
        "optimizer.batch_size=20",
        "run.max_steps=60",
        "run.max_seconds=null",
        "run.eval_every=30",
        "run.plot=false",
        *extra,
    )
    summary = execute(cfg, tmp_path / "run", progress=False)
    final = summary["final"]
    assert summary["status"] == "completed"
    assert final["test_perplexity"] == pytest.approx(math.exp(final["test_loss"]))
    assert final["train_perplexity"] < 2.5, final
