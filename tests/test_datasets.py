"""Reading data files (ckpt.datasets): CSV edge cases, .npz, .npy, Parquet, the in-place split
and the scaling; bad data is one DataError naming the line or row and the column."""
import sys

import numpy as np
import pytest

from ckpt import datasets
from ckpt.cli import main
from ckpt.datasets import DataError, Standardizer, read_table, split_in_place


def _csv(tmp_path, text, name="data.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------ CSV

@pytest.mark.parametrize("text", [
    "a,b,label\n1,2,0\n3,4,1\n",                  # trailing newline
    "a,b,label\n1,2,0\n3,4,1",                    # none
    "a,b,label\r\n1,2,0\r\n3,4,1\r\n",            # Windows line ends
    "a,b,label\n\n1,2,0\n\n3,4,1\n\n\n",          # blank lines
    '"a","b","label"\n1,2,0\n3,4,1\n',            # a quoted header
    '\ufeffa,b,label\n1,2,0\n3,4,1\n',            # a byte-order mark
    'a,b,label\n"1",2,0\n3,"4",1\n',              # quoted numbers
])
def test_csv_variants_read_the_same_table(tmp_path, text):
    table = read_table(_csv(tmp_path, text))
    np.testing.assert_array_equal(table.X, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(table.y, [0, 1])
    assert table.feature_names == ["a", "b"] and table.target_name == "label" and table.named


def test_a_byte_order_mark_before_a_quoted_header(tmp_path):
    table = read_table(_csv(tmp_path, '\ufeff"x y",z\n1,2\n'), dtype=np.float32)
    assert table.feature_names == ["x y"] and table.target_name == "z"
    assert table.X.dtype == np.float32


def test_without_a_header_columns_are_named_by_position(tmp_path):
    table = read_table(_csv(tmp_path, "1,2,0\n3,4,1\n"))
    assert not table.named and table.feature_names == ["0", "1"] and table.target_name == "2"
    np.testing.assert_array_equal(table.X, [[1, 2], [3, 4]])


def test_one_row(tmp_path):
    table = read_table(_csv(tmp_path, "a,b\n5,6\n"))
    np.testing.assert_array_equal(table.X, [[5]])
    np.testing.assert_array_equal(table.y, [6])


def test_target_and_features_by_name_and_index(tmp_path):
    path = _csv(tmp_path, "id,a,b,price\nx1,1,2,10\nx2,3,4,20\n")
    table = read_table(path, target="price", features=["b", "a"])
    np.testing.assert_array_equal(table.X, [[2, 1], [4, 3]])      # in the order asked
    np.testing.assert_array_equal(table.y, [10, 20])
    table = read_table(path, target=1, features=["2"])            # indices, 0-based
    assert table.target_name == "a" and table.feature_names == ["b"]
    table = read_table(path, target="-1", features=["a"])
    assert table.target_name == "price"


def test_text_labels_are_kept_as_text(tmp_path):
    table = read_table(_csv(tmp_path, "a,b,kind\n1,2,cat\n3,4, dog\n"))
    assert list(table.y) == ["cat", "dog"]


@pytest.mark.parametrize("text, kwargs, match", [
    ("", {}, "is empty"),
    ("\n\n", {}, "is empty"),
    ("a,b,label\n", {}, "holds no data rows"),
    ("a,b,c\n1,2,3\n4,5\n6,7,8\n", {}, r"line 3: 2 fields, but the table has 3 columns"),
    ("1,2,3\n4,5,6,7\n", {}, r"line 2: 4 fields, but the table has 3 columns"),
    ("a,b,c\n1,2,3\n", {"target": "price"},
     r"the target 'price' is not a column \(columns: a, b, c\)"),
    ("a,b,c\n1,2,3\n", {"target": 3}, "the target 3 is not a column"),
    ("a,b,c\n1,2,3\n", {"features": ["d"]}, "the feature 'd' is not a column"),
    ("a,b,c\n1,2,3\n", {"features": ["a", "c"]}, "'c' is both the target and a feature"),
    ("a,b,c\n1,2,3\n", {"features": ["a", "a"]}, "chosen twice"),
    ("a,b,a\n1,2,3\n", {}, "names column 'a' twice"),
    ("c\n1\n", {}, "needs at least one feature column besides the target 'c'"),
    ("name,b,c\nx,2,3\n", {}, r"line 2: feature column 'name' holds 'x', not a number"),
    ("a,b,c\n1,2,3\n1,,3\n", {}, r"line 3: feature column 'b' is empty"),
    ("a,b,c\n1,2,3\n\n4,nan,6\n", {}, r"row 1 \(line 4\), column 'b' holds nan"),
    ("a,b,c\n1,2,3\n4,5,inf\n", {}, r"row 1 \(line 3\), target 'c' holds inf"),
    ("a,b,c\n1,2,3\n4,5,x\n", {}, r"line 3: the target 'c' holds 'x', but its first value"),
])
def test_bad_csv_is_named(tmp_path, text, kwargs, match):
    with pytest.raises(DataError, match=match):
        read_table(_csv(tmp_path, text), **kwargs)


def test_a_ragged_row_far_down_reports_its_line(tmp_path):
    lines = ["a,b,c"] + [f"{i},{i},0" for i in range(50_000)]
    lines[40_001] = "1,2"
    with pytest.raises(DataError, match="line 40002: 2 fields"):
        read_table(_csv(tmp_path, "\n".join(lines)))


def test_an_unused_text_column_is_never_parsed(tmp_path):
    table = read_table(_csv(tmp_path, 'id,a,y\n"r,1",1,0\nr2,2,1\n'), features=["a"])
    np.testing.assert_array_equal(table.X, [[1], [2]])


def test_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("caf\xe9,b\n1,2\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_table(path)


# ------------------------------------------------------------------------------------ arrays

def test_npz_npy_table_and_npy_pair(tmp_path):
    X = np.arange(12.0).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", X=X, y=y)
    table = read_table(tmp_path / "d.npz", dtype=np.float32, features=["2", "0"])
    np.testing.assert_array_equal(table.X, X[:, [2, 0]])
    np.testing.assert_array_equal(table.y, y)
    np.save(tmp_path / "t.npy", np.column_stack([X, y]))
    table = read_table(tmp_path / "t.npy")
    np.testing.assert_array_equal(table.X, X)
    np.testing.assert_array_equal(table.y, y)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    table = read_table(tmp_path / "X.npy", labels=tmp_path / "y.npy")
    np.testing.assert_array_equal(table.X, X)
    np.testing.assert_array_equal(table.y, y)
    assert read_table(tmp_path / "d.npz", require_target=False).X.shape == (4, 3)


@pytest.mark.parametrize("arrays, kwargs, match", [
    ({"X": np.zeros((3, 2)), "y": np.zeros(2)}, {}, "3 rows of features but 2 targets"),
    ({"X": np.array([["a", "b"]]), "y": np.zeros(1)}, {}, "must hold real numbers"),
    ({"X": np.array([[1.0, np.inf]]), "y": np.zeros(1)}, {}, r"row 0, column '1' holds inf"),
    ({"X": np.zeros((2, 2)), "y": np.array([0, np.nan])}, {}, "row 1, the target holds nan"),
    ({"X": np.zeros((2, 2)), "y": np.zeros(2)}, {"target": "0"}, "keeps its targets in array y"),
])
def test_bad_npz_is_named(tmp_path, arrays, kwargs, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        read_table(tmp_path / "d.npz", **kwargs)


# ------------------------------------------------------------------------------------ Parquet

def test_parquet_by_name(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"a": [1.0, 2.0], "n": [3, 4], "kind": ["x", "y"]}),
                   tmp_path / "d.parquet")
    table = read_table(tmp_path / "d.parquet", dtype=np.float32)
    np.testing.assert_array_equal(table.X, [[1, 3], [2, 4]])
    assert list(table.y) == ["x", "y"] and table.feature_names == ["a", "n"] and table.named
    pq.write_table(pa.table({"s": ["u", "v"], "y": [0, 1]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="feature column 's' is of type string"):
        read_table(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"a": [1.0, None], "y": [0, 1]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match="row 1, column 'a' is missing a value"):
        read_table(tmp_path / "null.parquet")


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path / "d.parquet"), "--epochs", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ckpt-cpu[parquet]'" in err


# ------------------------------------------------------------------------------------ split, scaling

def test_split_in_place_moves_the_held_rows_to_the_end():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 3))
    rows = np.arange(1000)
    original = X.copy()
    held = np.sort(rng.choice(1000, 230, replace=False))
    m = split_in_place(X, held, rows)
    assert m == 770
    assert set(rows[m:]) == set(held)
    np.testing.assert_array_equal(X, original[rows])         # rows moved whole


def test_standardizer_blocks_equal_the_whole_array_formula():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40_000, 4)) * [1, 10, 0, 3] + [5, -2, 7, 0]
    scaler = Standardizer.fit(X)
    np.testing.assert_allclose(scaler.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaler.scale, np.where(X.std(axis=0) > 0, X.std(axis=0), 1),
                               rtol=1e-10)
    assert scaler.scale[2] == 1.0                           # a constant column is kept
    scaled = scaler.transform(X.astype(np.float32))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.mean(axis=0), [0, 0, 0, 0], atol=1e-5)


# ------------------------------------------------------------------------------------ the CLI

def test_train_reads_target_and_features_from_a_header(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lines = ["id,noise,signal,kind"]
    for i in range(80):
        kind = ("left", "right")[i % 2]
        lines.append(f"r{i},{rng.standard_normal():.4f},{(i % 2) * 10 + rng.random():.4f},{kind}")
    path = _csv(tmp_path, "\n".join(lines) + "\n")
    assert main(["train", "--data", str(path), "--target", "kind", "--features",
                 "signal,noise", "--epochs", "20", "--depth", "2", "--width", "8",
                 "--batch-size", "8", "--lr", "0.01", "--json"]) == 0   # text labels: classes
    out = capsys.readouterr().out
    assert "64 train / 16 test rows, 2 features, 2 classes" in out
    import json
    assert json.loads(out.strip().splitlines()[-1])["test_accuracy"] == 1.0


def test_column_options_need_a_data_file(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--target", "label", "--epochs", "1"])
    assert info.value.code == 2
    assert "--target applies to a --data file" in capsys.readouterr().err
