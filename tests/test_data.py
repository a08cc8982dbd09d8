from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, make_image_folder
from layerwise.data import class_counts, digits, eval_items, load_splits, spread, stratified_split
from layerwise.errors import DataError, LayerwiseError, MissingPathError


def test_train_val_folders(tmp_path):
    root = make_image_folder(tmp_path, classes=3, per_class=4)
    s = load_splits(str(root))
    assert s.classes == ["class_0", "class_1", "class_2"]
    assert len(s.train) == 12 and len(s.val) == 6


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
    assert len(eval_items(str(root), ["class_0", "class_1"])[1]) == 4  # val/
    assert len(eval_items(str(root / "train"), ["class_0", "class_1"])[1]) == 8  # as it is


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-mini").is_dir(), reason="shared cifar10-mini absent")
def test_cifar10_mini_layout():
    s = load_splits(str(SHARED_DATA / "cifar10-mini"))
    assert len(s.classes) == 10 and len(s.train) == 1000 and len(s.val) == 500


# --- bad images: load correctly or skip with a reason --------------------------------------

import io  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from layerwise.data import IMAGE_ERRORS, check_images, open_image  # noqa: E402


def _jpeg_bytes(size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 120, 200) if mode == "RGB" else 0).save(buf, "JPEG")
    return buf.getvalue()


def make_bad_files(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "truncated.jpg").write_bytes(_jpeg_bytes((64, 64))[:300])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    return {"truncated.jpg", "zero.jpg", "text.jpg"}


def make_odd_good_files(d):
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(d / "alpha.png")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(d / "deep16.png")
    Image.new("L", (16, 16), 128).save(d / "gray.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.new("P", (16, 16), 3).save(d / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    Image.new("RGB", (30, 10), (0, 200, 0)).save(d / "rotated.jpg", exif=exif)
    (d / "ñandú con espacios.png").write_bytes((d / "gray.png").read_bytes())
    (d / "link.png").symlink_to(d / "gray.png")


def test_odd_but_valid_images_load_as_rgb(tmp_path):
    make_odd_good_files(tmp_path)
    for p in tmp_path.iterdir():
        im = open_image(str(p))
        assert im.mode == "RGB", p.name
    assert open_image(str(tmp_path / "rotated.jpg")).size == (10, 30)  # EXIF orientation applied
    assert open_image(str(tmp_path / "alpha.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_image(str(tmp_path / "deep16.png")).getpixel((0, 0))[0] == round(40000 / 257)


def test_broken_files_are_skipped_with_reasons(tmp_path):
    bad = make_bad_files(tmp_path)
    items = [(str(p), 0) for p in tmp_path.iterdir()]
    good, skipped = check_images(items)
    assert good == [] and {s["path"].rsplit("/", 1)[1] for s in skipped} == bad
    assert all(s["reason"] for s in skipped)


def test_a_file_is_decoded_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """auto's race and --model auto check the same data once per set-up: each file is decoded
    the first time only, broken ones stay skipped, and a file rewritten since is decoded again."""
    import layerwise.data as data_module

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items = [(str(tmp_path / "ok.png"), 0), (str(tmp_path / "bad.png"), 1)]
    opened = []
    real = data_module.open_image
    monkeypatch.setattr(data_module, "open_image", lambda src: opened.append(src) or real(src))
    first, second = check_images(items), check_images(items)
    assert first == second and first[0] == items[:1] and len(first[1]) == 1
    assert len(opened) == 2  # each file once, across both checks
    (tmp_path / "bad.png").unlink()
    Image.new("RGB", (9, 9)).save(tmp_path / "bad.png")  # fixed: new size and mtime
    assert check_images(items)[0] == items and len(opened) == 3
    (tmp_path / "ok.png").unlink()
    assert "FileNotFoundError" in check_images(items)[1][0]["reason"]  # gone since: not taken from the memo


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "warn.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _, skipped = check_images([(str(tmp_path / "big.png"), 0), (str(tmp_path / "warn.png"), 0)])
    assert len(skipped) == 2 and all("Decompression" in s["reason"] for s in skipped)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_loader_raises_only_documented_errors(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("fuzz") / "x.jpg"
    p.write_bytes(blob)
    try:
        assert open_image(str(p)).mode == "RGB"
    except IMAGE_ERRORS:
        pass


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255))
def test_fuzz_corrupted_jpegs(tmp_path_factory, cut, byte):
    data = bytearray(_jpeg_bytes((48, 40)))
    data[min(cut, len(data) - 1)] = byte
    p = tmp_path_factory.mktemp("fuzzj") / "x.jpg"
    p.write_bytes(bytes(data[: max(1, len(data) - cut // 3)]))
    try:
        open_image(str(p))
    except IMAGE_ERRORS:
        pass


def test_fit_skips_bad_files_and_lists_them(tmp_path):
    from conftest import make_image_folder
    from layerwise.cli import main

    root = make_image_folder(tmp_path / "d", classes=2, per_class=6)
    bad = make_bad_files(root / "train" / "class_0")
    make_odd_good_files(root / "train" / "class_1")
    run = tmp_path / "run"
    assert main(["fit", str(root), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--batch-size", "4", "--workers", "0", "--epochs", "1", "--strategy", "full", "--quiet",
                 "--out", str(run)]) == 0
    report = json.loads((run / "skipped.json").read_text())
    assert report["count"] == 3 and {f["path"].rsplit("/", 1)[1] for f in report["files"]} == bad


def test_unreadable_file_mid_epoch_does_not_crash(tmp_path):
    from layerwise.augment import eval_transform
    from layerwise.data import ImageDataset, collate_skipping

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    ds = ImageDataset([(str(tmp_path / "ok.png"), 0), (str(tmp_path / "bad.png"), 1)], eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y = collate_skipping([ds[0], ds[1]])
    assert x.shape == (1, 3, 8, 8) and y.tolist() == [0]


@pytest.mark.parametrize("payload", ["caf\xe9.png,caf\xe9\n".encode("latin-1"), bytes(range(256))])
def test_non_utf8_csv_is_a_user_error(tmp_path, payload):
    p = tmp_path / "labels.csv"
    p.write_bytes(payload)
    with pytest.raises(LayerwiseError, match="is not UTF-8 text"):
        load_splits(str(p))


def test_class_folder_with_a_non_utf8_name_is_refused_before_training(tmp_path):
    import os

    make_image_folder(tmp_path / "d", classes=2, per_class=4, split=False)
    os.rename(tmp_path / "d" / "class_1", os.path.join(bytes(tmp_path / "d"), b"caf\xe9"))
    with pytest.raises(LayerwiseError, match=r"class folder name\(s\) 'caf\\xe9'.*not printable UTF-8"):
        load_splits(str(tmp_path / "d"))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 300))
def test_spread_keeps_every_class_a_first_k_would_drop(sizes, k):
    """BatchNorm re-estimation (--bn adapt, WiSE-FT) reads k of a class-ordered training list."""
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    idx = spread(len(labels), k)
    assert len(idx) == min(k, len(labels)) and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < len(labels)
    # a class at least as long as the gap between picks is always picked
    gap = -(-len(labels) // k)
    assert {labels[i] for i in idx} >= {c for c, n in enumerate(sizes) if n >= gap}
