"""Pair files: both formats, streaming, and a clear message for every kind of bad record."""

from __future__ import annotations

import json

import pytest

from embedforge import data
from embedforge.data import DataError, Pair, read_pairs
from embedforge.sample_data import SPLITS, sample_path

GOOD = [{"query": "q1", "document": "d1", "rel": 1, "weight": 2.5}, {"query": "q2", "document": "d2", "rel": 0.25}]


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def test_jsonl_and_json_array_give_the_same_pairs(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in GOOD) + "\n\n")
    array = write(tmp_path, "a.json", json.dumps(GOOD, indent=2))
    expected = [Pair("q1", "d1", 1.0, 2.5), Pair("q2", "d2", 0.25, 1.0)]
    assert read_pairs(jsonl) == expected
    assert read_pairs(array) == expected


def test_format_is_detected_from_content_not_extension(tmp_path):
    assert len(read_pairs(write(tmp_path, "pairs.txt", json.dumps(GOOD)))) == 2
    assert len(read_pairs(write(tmp_path, "pairs.json", "\n".join(json.dumps(r) for r in GOOD)))) == 2


def test_utf8_bom_and_non_ascii_text_are_read(tmp_path):
    path = write(tmp_path, "bom.jsonl", "\ufeff" + json.dumps({"query": "crème brûlée", "document": "d", "rel": 1}))
    assert read_pairs(path)[0].query == "crème brûlée"


def test_json_array_is_streamed_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_BYTES", 7)
    records = [{"query": f"q{i} é", "document": "d" * (i + 1), "rel": i / 100} for i in range(100)]
    path = write(tmp_path, "big.json", json.dumps(records, indent=1, ensure_ascii=False))
    pairs = read_pairs(path)
    assert [p.query for p in pairs] == [r["query"] for r in records]
    assert pairs[99].document == "d" * 100


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"document": "d", "rel": 0.5}, "field 'query' is missing"),
        ({"query": "q", "document": "d"}, "field 'rel' is missing"),
        ({"query": 3, "document": "d", "rel": 0.5}, "field 'query' must be a string, got number"),
        ({"query": "q", "document": "  ", "rel": 0.5}, "field 'document' is empty"),
        ({"query": "q", "document": "d", "rel": 1.7}, "field 'rel' must be in [0, 1], got 1.7"),
        ({"query": "q", "document": "d", "rel": -0.1}, "field 'rel' must be in [0, 1]"),
        ({"query": "q", "document": "d", "rel": "0.5"}, "field 'rel' must be a number, got string"),
        ({"query": "q", "document": "d", "rel": True}, "field 'rel' must be a number, got boolean"),
        ({"query": "q", "document": "d", "rel": 0.5, "weight": -1}, "field 'weight' must be >= 0"),
        ({"query": "q", "document": "d", "rel": 0.5, "weight": [1]}, "field 'weight' must be a number, got array"),
    ],
)
def test_each_bad_field_is_named_with_file_and_line(tmp_path, record, expected):
    path = write(tmp_path, "bad.jsonl", json.dumps(GOOD[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert f"{path}:line 2: " in str(error.value)
    assert expected in str(error.value)


def test_nan_and_infinity_are_rejected(tmp_path):
    path = write(tmp_path, "nan.jsonl", '{"query": "q", "document": "d", "rel": NaN}\n'
                                        '{"query": "q", "document": "d", "rel": 0.5, "weight": Infinity}\n')
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert "line 1: invalid JSON: NaN is not valid JSON" in str(error.value)
    assert "line 2: invalid JSON: Infinity is not valid JSON" in str(error.value)


def test_a_record_that_is_not_an_object(tmp_path):
    with pytest.raises(DataError, match=r"index 1 \(line 1\): record must be a JSON object, got array"):
        read_pairs(write(tmp_path, "a.json", json.dumps([GOOD[0], [1, 2]])))


def test_up_to_ten_problems_are_listed_with_a_count_of_the_rest(tmp_path):
    lines = [json.dumps({"query": "q", "document": "d", "rel": 2}) for _ in range(13)]
    with pytest.raises(DataError) as error:
        read_pairs(write(tmp_path, "many.jsonl", "\n".join(lines)))
    message = str(error.value)
    assert "13 invalid record(s)" in message
    assert "line 10:" in message and "line 11:" not in message
    assert "... and 3 more" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]", "[ ]\n"])
def test_empty_files_are_rejected(tmp_path, content):
    with pytest.raises(DataError, match="no records"):
        read_pairs(write(tmp_path, "empty.jsonl", content))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"query": "q", "document": "d", "rel": 0.5}\n{"query": "q",', "line 2: invalid JSON"),
        ('[{"query": "q", "document": "d", "rel": 0.5}', "the array is not closed"),
        ('[{"query": "q", "document": "d", "rel": 0.5}} ]', "expected ',' or ']' after index 0"),
        ('[{"query": "q", "document": "d", "rel": 0.5}]\n[]', "extra data after the array"),
        ('[{"query": "q",\n "document": "d" "rel": 0.5}]', "index 0 (line 1): invalid JSON"),
        ('{"query": "q",\n "document": "d", "rel": 0.5}', "a JSON file must hold an array of objects"),
    ],
)
def test_invalid_json_is_located(tmp_path, content, expected):
    with pytest.raises(DataError) as error:
        read_pairs(write(tmp_path, "broken.json", content))
    assert expected in str(error.value)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json"])
def test_non_utf8_bytes_are_located(tmp_path, name):
    record = b'{"query": "caf\xe9", "document": "d", "rel": 0.5}'
    content = b"[\n" + record + b"\n]" if name.endswith(".json") else b"\n" + record + b"\n"
    with pytest.raises(DataError, match=r"line 2: not UTF-8 text"):
        read_pairs(write(tmp_path, name, content))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_bundled_sample_data_is_valid_and_split_by_query():
    splits = {split: read_pairs(sample_path(split)) for split in SPLITS}
    assert len(splits["train"]) >= 200 and len(splits["valid"]) >= 40 and len(splits["test"]) >= 40
    queries = {split: {p.query for p in pairs} for split, pairs in splits.items()}
    assert not queries["train"] & queries["valid"] and not queries["train"] & queries["test"]
    assert all(len({p.rel for p in pairs}) > 3 for pairs in splits.values()), "relevance is graded"


def test_numbers_beyond_float32_are_data_errors_with_line_and_field(tmp_path):
    path = write(tmp_path, "big.jsonl", json.dumps(GOOD[0]) + "\n"
                 '{"query": "q", "document": "d", "rel": 0.5, "weight": 1e39}\n'
                 '{"query": "q", "document": "d", "rel": 0.5, "weight": ' + "9" * 400 + "}\n")
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert "line 2: field 'weight' must be a finite number within float32 range" in str(error.value)
    assert "line 3: field 'weight' is too large for a number (400 digits)" in str(error.value)
