"""TFDS builder for math prompt sets (array_record, read back without TensorFlow)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vcppo_jax.data import math_prompts as mp

ROWS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(23)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_build_and_read_back_jsonl_and_parquet(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:13])
    b = str(tmp_path / "b.parquet")
    pq.write_table(
        pa.Table.from_pylist(
            [{"question": r["problem"], "solution": r["answer"]} for r in ROWS[13:]]
        ),
        b,
    )
    builder = mp.build_dataset([a, b], str(tmp_path / "tfds"))
    source = builder.as_data_source(split="train")
    assert len(source) == 23
    got = sorted(
        (mp.decode_row(source[i]) for i in range(len(source))), key=lambda r: int(r["answer"])
    )
    assert got == sorted(ROWS, key=lambda r: int(r["answer"]))
    files = list((tmp_path / "tfds").rglob("*array_record*"))
    assert files, "array_record files were written"
    # Building again reuses the prepared dataset.
    again = mp.build_dataset([a, b], str(tmp_path / "tfds"))
    assert len(again.as_data_source(split="train")) == 23


def test_malformed_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + "{not json\n")
    with pytest.raises(mp.DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(mp.read_rows(str(bad)))
    bad.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(mp.DataError, match=r"bad.jsonl:1: no answer field"):
        list(mp.read_rows(str(bad)))
    bad.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(mp.DataError, match=r"bad.jsonl:1: field 'problem' must be"):
        list(mp.read_rows(str(bad)))
    with pytest.raises(mp.DataError, match="no such file"):
        list(mp.read_rows(str(tmp_path / "missing.jsonl")))
    bad.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(mp.DataError, match=r"bad.jsonl: not UTF-8 text"):
        list(mp.read_rows(str(bad)))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(mp.DataError, match=r"dir.jsonl: is a directory"):
        list(mp.read_rows(str(tmp_path / "dir.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(mp.DataError, match=r"empty.jsonl: holds no rows"):
        mp.build_dataset([str(empty)], str(tmp_path / "tfds"))
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    with pytest.raises(mp.DataError, match="not a readable Parquet file"):
        list(mp.read_rows(str(corrupt)))


def test_prompt_iterator_is_deterministic_and_resumable():
    it = mp.PromptIterator(10, batch_size=4, seed=3)
    seen = [it.next_indices() for _ in range(5)]  # 20 indices: two full epochs.
    flat = np.concatenate(seen)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # A new order each epoch.
    it2 = mp.PromptIterator(10, batch_size=4, seed=3)
    it2.next_indices()
    it2.next_indices()
    resumed = mp.PromptIterator.from_state(10, 4, it2.state())
    assert [resumed.next_indices() for _ in range(3)] == seen[2:]
