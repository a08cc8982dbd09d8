from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, make_image_folder
from layerwise.data import class_counts, digits, eval_items, load_splits, stratified_split
from layerwise.errors import DataError, MissingPathError


def test_train_val_folders(tmp_path):
    root = make_image_folder(tmp_path, classes=3, per_class=4)
    s = load_splits(str(root))
    assert s.classes == ["class_0", "class_1", "class_2"]
    assert len(s.train) == 12 and len(s.val) == 6 and s.test is None


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    root = make_image_folder(tmp_path, classes=3, per_class=10, split=False)
    a = load_splits(str(root), val_split=0.2, seed=1)
    b = load_splits(str(root), val_split=0.2, seed=1)
    c = load_splits(str(root), val_split=0.2, seed=2)
    assert a.val == b.val and a.val != c.val
    assert class_counts(a.val, a.classes) == {"class_0": 2, "class_1": 2, "class_2": 2}
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 30), min_size=2, max_size=6), st.floats(0.05, 0.5), st.integers(0, 99))
def test_split_properties(sizes, frac, seed):
    items = [(f"{c}/{i}", c) for c, n in enumerate(sizes) for i in range(n)]
    classes = [str(c) for c in range(len(sizes))]
    try:
        train, val = stratified_split(items, frac, seed, classes)
    except DataError as e:
        assert "no training or no validation image" in str(e)
        return
    assert sorted(train + val) == sorted(items)
    for c in range(len(sizes)):  # every class on both sides
        assert any(lbl == c for _, lbl in val) and any(lbl == c for _, lbl in train)


def test_csv_with_relative_paths(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=5, split=False)
    rows = ["path,label"] + [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = load_splits(str(tmp_path / "labels.csv"))
    assert s.classes == ["class_0", "class_1"] and len(s.train) + len(s.val) == 10


@pytest.mark.parametrize("content,msg", [
    ("path,label\nmissing.png,cat\n", "do not exist"),
    ("path,label\nimgs/class_0/0.png,\n", "no label"),
])
def test_csv_errors(tmp_path, content, msg):
    make_image_folder(tmp_path / "imgs", classes=2, per_class=2, split=False)
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(DataError, match=msg):
        load_splits(str(tmp_path / "l.csv"))


def test_layout_errors(tmp_path):
    with pytest.raises(MissingPathError):
        load_splits(str(tmp_path / "nope"))
    one = make_image_folder(tmp_path / "one", classes=1, per_class=4, split=False)
    with pytest.raises(DataError, match="single class"):
        load_splits(str(one))
    mism = make_image_folder(tmp_path / "mism", classes=3, per_class=4)
    (mism / "val" / "class_2").rename(mism / "val" / "class_9")
    with pytest.raises(DataError, match=r"missing \['class_2'\], extra \['class_9'\]"):
        load_splits(str(mism))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_splits(str(tmp_path / "empty"))
    few = make_image_folder(tmp_path / "few", classes=2, per_class=1, split=False)
    with pytest.raises(DataError, match="no training or no validation"):
        load_splits(str(few))


def test_embedded_digits_are_real_and_split():
    s = digits()
    assert len(s.train) + len(s.val) == 1797 and len(s.classes) == 10
    img, label = s.train[0]
    assert img.shape == (8, 8) and img.max() > 200 and 0 <= label < 10


def test_eval_items_prefers_test_then_val(tmp_path):
    root = make_image_folder(tmp_path, classes=2, per_class=4)
    assert len(eval_items(str(root), ["class_0", "class_1"])) == 4  # val/
    assert len(eval_items(str(root / "train"), ["class_0", "class_1"])) == 8  # as it is


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-mini").is_dir(), reason="shared cifar10-mini absent")
def test_cifar10_mini_layout():
    s = load_splits(str(SHARED_DATA / "cifar10-mini"))
    assert len(s.classes) == 10 and len(s.train) == 1000 and len(s.val) == 500
