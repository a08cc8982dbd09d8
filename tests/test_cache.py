from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import TINY, make_image_folder
from layerwise.augment import eval_transform
from layerwise.cache import DecodedImages, stored_side
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=10)


def _metrics(data, out, *args):
    assert main(["fit", str(data), *TINY, "--out", str(out), *args]) == 0
    return read_jsonl(out / "metrics.jsonl")


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (k, x["epoch"])


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_feature_cache_equals_recomputing(data, tmp_path, capsys, head):
    args = ["--strategy", "head", "--augment", "none", "--epochs", "3", "--head", head]
    cached = _metrics(data, tmp_path / "c", *args)
    assert "feature cache: frozen part run once" in capsys.readouterr().out
    plain = _metrics(data, tmp_path / "p", *args, "--feature-cache", "off")
    _same(cached, plain)


def test_feature_cache_dropped_when_the_boundary_moves(data, tmp_path, capsys):
    args = ["--strategy", "lp-ft", "--probe-epochs", "2", "--augment", "none", "--epochs", "4"]
    cached = _metrics(data, tmp_path / "c", *args)
    out = capsys.readouterr().out
    assert out.count("feature cache: frozen part run once") == 1
    plain = _metrics(data, tmp_path / "p", *args, "--feature-cache", "off")
    _same(cached, plain)
    assert cached[2]["trainable_params"] > cached[1]["trainable_params"]


def test_feature_cache_views_with_random_augmentation(data, tmp_path, capsys):
    rows = _metrics(data, tmp_path / "v", "--strategy", "head", "--augment", "light", "--epochs", "2",
                    "--feature-cache-views", "2")
    out = capsys.readouterr().out
    assert "x 2 train" in out and out.count("feature cache: frozen part run once") == 1
    assert len(rows) == 2 and rows[0]["train_loss"] != rows[1]["train_loss"]  # epoch 1 trains on the other view
    _metrics(data, tmp_path / "n", "--strategy", "head", "--augment", "light", "--epochs", "1")
    assert "feature cache" not in capsys.readouterr().out  # random augmentation, no views: the body runs


def test_decoded_images_store_uint8_at_eval_resolution(tmp_path):
    Image.new("RGB", (80, 40), (200, 10, 10)).save(tmp_path / "a.png")
    store = DecodedImages([(str(tmp_path / "a.png"), 1)], 32, eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    img = store.images[0]
    assert img.dtype == torch.uint8 and img.shape == (3, stored_side(32), 2 * stored_side(32))
    x, y = store[0]
    assert x.shape == (3, 32, 32) and y == 1
    torch.testing.assert_close(x[0], torch.full((32, 32), 200 / 255 * 2 - 1), atol=0.02, rtol=0)


def test_a_second_store_over_the_same_files_decodes_nothing(tmp_path, monkeypatch):
    """auto's race builds each candidate's loaders in one process: the images are decoded once,
    and a changed file is decoded again."""
    import os

    from layerwise import cache

    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 10, 10)).save(tmp_path / f"{i}.png")
    items = [(str(tmp_path / f"{i}.png"), i) for i in range(3)]
    tf = eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    calls = []
    real = cache._decode
    monkeypatch.setattr(cache, "_decode", lambda *a: calls.append(1) or real(*a))
    first = DecodedImages(items, 32, tf)
    second = DecodedImages(items, 32, lambda x: x)
    assert len(calls) == 1 and second.images is first.images and second.transform is not first.transform
    DecodedImages(items, 48, tf)  # another stored size is another store
    assert len(calls) == 2
    Image.new("RGB", (40, 40), (0, 200, 0)).save(tmp_path / "1.png")
    os.utime(tmp_path / "1.png", ns=(1, 10**18))
    changed = DecodedImages(items, 32, tf)
    assert len(calls) == 3 and changed.images[1][1, 0, 0] == 200


@pytest.mark.parametrize("mode,kind", [("ram", "DecodedImages"), ("off", "ImageDataset"), ("auto", "DecodedImages"),
                                       ("disk", "DiskImages")])
def test_cache_mode_picks_the_dataset(data, tmp_path, mode, kind):
    from layerwise.config import RunConfig
    from layerwise.engine import build_trainer

    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, workers=0,
                    quiet=True, cache=mode, cache_dir=str(tmp_path / "cache"))
    t = build_trainer(cfg, tmp_path / "run")
    assert type(t.kit.loaders.train.dataset).__name__ == kind == type(t.kit.loaders.val.dataset).__name__
    x, y = next(iter(t.kit.loaders.val))
    assert x.shape[1:] == (3, 32, 32)


def test_disk_cache_is_reused_and_never_stale(data, tmp_path):
    import os

    from layerwise.cache import DecodedImages, DiskImages
    from layerwise.data import load_splits

    items = load_splits(str(data)).train
    tf = eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    disk = DiskImages(items, 32, tf, cache_dir=tmp_path)
    ram = DecodedImages(items, 32, tf)
    assert len(disk) == len(ram)
    for i in (0, len(ram) - 1):
        assert torch.equal(disk[i][0], ram[i][0]) and disk[i][1] == ram[i][1]
    files = sorted(tmp_path.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    DiskImages(items, 32, tf, cache_dir=tmp_path)  # same files: reused, nothing rewritten
    assert sorted(tmp_path.iterdir()) == files and [f.stat().st_mtime_ns for f in files] == stamps
    src = items[0][0]
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edited image: a new store
    DiskImages(items, 32, tf, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_fit_with_disk_cache(data, tmp_path):
    # numerics pinned: each --cache-dir keeps its own timed numerics choice, and under load one
    # fit's trial picked bf16 and the other's fp32 (0.3-0.4 % apart in train loss): a flake that
    # was the timing trial's, not the cache's
    common = ["--strategy", "full", "--augment", "none", "--epochs", "1", "--precision", "fp32", "--no-channels-last"]
    rows = _metrics(data, tmp_path / "r", *common, "--cache", "disk", "--cache-dir", str(tmp_path / "c"))
    stores = list((tmp_path / "c").glob("decoded-*.u8"))
    assert rows and stores
    # the same numbers as decoding in RAM, and a second run reads the store instead of rebuilding it
    _same(rows, _metrics(data, tmp_path / "ram", *common, "--cache", "ram"))
    mtimes = {p: p.stat().st_mtime_ns for p in stores}
    _same(rows, _metrics(data, tmp_path / "r2", *common, "--cache", "disk", "--cache-dir", str(tmp_path / "c")))
    assert {p: p.stat().st_mtime_ns for p in stores} == mtimes


@pytest.mark.parametrize("workers", [0, 1])
def test_decoding_keeps_every_image_in_order_across_batches_and_skips_unreadable_ones(tmp_path, workers):
    """Workers hand images over a batch at a time (cache.DECODE_BATCH): the store holds each
    readable file's pixels, in the items' order, with its own label, whatever the batching."""
    from layerwise import cache

    items, expected = [], []
    for i in range(cache.DECODE_BATCH + 7):  # more than one batch, the last one short
        path = tmp_path / f"{i:03d}.png"
        if i == 5:
            path.write_bytes(b"not an image")
        else:
            colour = (i * 3 % 256, i * 7 % 256, i * 11 % 256)
            Image.new("RGB", (8 + i % 3, 8), colour).save(path)
            expected.append((colour, i % 4))
        items.append((str(path), i % 4))
    if workers:  # the warning is the worker process's own
        images, labels = cache._decode(items, 8, workers, False)
    else:
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            images, labels = cache._decode(items, 8, workers, False)
    assert labels == [label for _, label in expected]
    assert [tuple(int(v) for v in img[:, 0, 0]) for img in images] == [colour for colour, _ in expected]
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 and img.shape[1] == stored_side(8) for img in images)
