import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.io.errors import InputError
from sentiment_ray.training.data import excerpt_mask, trained_text
from sentiment_ray.training.excerpts import excerpt, make_excerpt_set

REVIEW = ("This film was a delight from start to end.<br /><br />The actors, the music and the story all work "
          "together, and I laughed more than I have in years. " * 4).strip()


def test_an_excerpt_is_a_window_of_8_to_60_consecutive_words():
    words = REVIEW.replace("<br />", " ").split()
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(200):
        cut = excerpt(REVIEW, rng).split()
        lengths.add(len(cut))
        assert 8 <= len(cut) <= 60
        starts = [i for i in range(len(words) - len(cut) + 1) if words[i:i + len(cut)] == cut]
        assert starts  # consecutive words of the review, in order
    assert min(lengths) < 20 and max(lengths) > 45  # the whole range is used
    assert excerpt("too short to cut", rng) == "too short to cut"


def test_excerpts_replace_the_given_share_of_training_texts_deterministically():
    texts = [f"{REVIEW} number {i}" for i in range(1000)]

    def replace_with_excerpts(texts, share, seed):  # as the finetune job cuts them (train_data.py)
        mask = excerpt_mask(len(texts), share, seed)
        return [trained_text(text, t, mask[t], seed) for t, text in enumerate(texts)], int(mask.sum())

    replaced, count = replace_with_excerpts(texts, 0.3, seed=7)
    changed = [i for i, (a, b) in enumerate(zip(texts, replaced)) if a != b]
    assert len(changed) == count and 250 < count < 350
    assert replace_with_excerpts(texts, 0.3, seed=7) == (replaced, count)  # same seed, same rows and windows
    assert replace_with_excerpts(texts, 0.0, seed=7) == (texts, 0)


def test_the_excerpt_set_keeps_every_review_its_label_and_a_derived_id(tmp_path):
    source = tmp_path / "dev.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [REVIEW, "short one", REVIEW + " more"],
                             "label": [1, 0, 1]}), source)
    assert make_excerpt_set(str(source), str(tmp_path / "x.parquet"), seed=3) == 3
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.column("id").to_pylist() == ["a#excerpt", "b#excerpt", "c#excerpt"]
    assert table.column("review_id").to_pylist() == ["a", "b", "c"]
    assert table.column("label").to_pylist() == [1, 0, 1]
    assert table.column("text")[1].as_py() == "short one"
    make_excerpt_set(str(source), str(tmp_path / "y.parquet"), seed=3)
    assert pq.read_table(tmp_path / "y.parquet").equals(table)  # deterministic for a seed
    pq.write_table(pa.table({"id": ["a"], "text": [None], "label": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: column 'text' row 0 has no text"):
        make_excerpt_set(str(tmp_path / "bad.parquet"), str(tmp_path / "z.parquet"))


def test_the_cli_writes_the_set_once_and_never_over_a_file(tmp_path, capsys):
    from sentiment_ray.cli import main

    source = tmp_path / "dev.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [REVIEW, REVIEW], "label": [1, 0]}), source)
    out = tmp_path / "dev_excerpts.parquet"
    assert main(["excerpts", "--input", str(source), "--output", str(out), "--seed", "5"]) == 0
    assert (pq.read_table(out).num_rows == 2
            and f"2 excerpts of 8-60 words (seed 5) written to {out}" in capsys.readouterr().out)
    before = out.read_bytes()
    assert main(["excerpts", "--input", str(source), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.parquet", "dev_excerpts.parquet"]
