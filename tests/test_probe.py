from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_image_folder
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.engine import build_trainer
from layerwise.groups import head_module
from layerwise.probe import ProbeResult, linear_probe, probe_accuracy, probe_loaders

TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "16",
        "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 32 images per class: above the head-only threshold, so auto probes.
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=32, size=16)


def test_probe_accuracy_separable_and_random():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centres = rng.normal(size=(3, 16)) * 5
    x = centres[y] + rng.normal(size=(120, 16))
    assert probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    noise = rng.normal(size=(120, 16))
    assert probe_accuracy(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.7


def test_skill_rescales_against_the_majority_class():
    assert ProbeResult(0.55, 0.1, 10, 0.0).skill == pytest.approx(0.5)
    assert ProbeResult(0.1, 0.1, 10, 0.0).skill == pytest.approx(0.0)
    assert ProbeResult(1.0, 0.5, 10, 0.0).skill == pytest.approx(1.0)


def test_linear_probe_leaves_model_and_rng_untouched(data, tmp_path):
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=16,
                    workers=0, quiet=True, strategy="auto")
    t = build_trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in t.kit.model.state_dict().items()}
    rng = torch.get_rng_state()
    def probe(**kw):
        from layerwise.loaders import with_eval_transform

        train = with_eval_transform(t.kit.loaders.train.dataset, 32, t.kit.loaded.mean, t.kit.loaded.std)
        loaders = probe_loaders(train, t.kit.loaders.val.dataset, batch_size=16, workers=0, seed=0, **kw)
        return linear_probe(t.kit.model, head_module(t.kit.model, t.kit.groups), *loaders, t.kit.device, t.kit.amp)

    res = probe()
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in t.kit.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.train_images == 96 and 0 <= res.acc <= 1 and res.chance == pytest.approx(1 / 3)
    # coloured squares are easy even for random features
    assert res.skill > 0.5
    capped = probe(max_images=30)
    assert capped.train_images == 30 and capped.acc * 30 == pytest.approx(round(capped.acc * 30))


def test_fit_auto_probes_records_and_resumes_without_probing(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--no-race", "--out", str(run)]) == 0
    probe = json.loads((run / "probe.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert plan["strategy"] == probe["strategy"] and plan["strategy"].startswith("auto:")
    assert cfg["probe_skill"] == probe["skill"] and cfg["bn"] == "eval"
    assert "linear probe" in capsys.readouterr().out
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [-1, 0, 1] and rows[0]["stage"] == "probe"
    assert probe["c"] in (0.01, 0.1, 1.0, 10.0) and (run / "probe_head.safetensors").is_file()
    assert 0 <= probe["knn_acc"] <= 1 and probe["hscore"] > 0  # more evidence from the same features
    assert probe["bn_shift"] is None and cfg["bn_shift"] is None  # random init: no pretraining statistics
    assert probe["earlier"] is None  # research evidence no choice reads (bench/evidence.py): a fit skips its fit
    assert plan["strategy"] == "auto:lp-ft"  # coloured squares: the features fit (skill 1.0)
    # the probe is LP-FT's linear-probing stage: fine-tuning starts at once
    assert cfg["probe_epochs"] == 0 and len(plan["epochs"][0]["trainable_groups"]) == len(plan["groups"])

    from layerwise import engine

    def boom(*a, **k):
        raise AssertionError("a resume must reuse the recorded evidence, not probe again")

    monkeypatch.setattr(engine, "run_probe", boom)  # where fit calls it: a patch that can fire
    assert main(["fit", "--resume", str(run), "--epochs", "3"]) == 0
    assert json.loads((run / "plan.json").read_text())["strategy"] == plan["strategy"]
    resumed = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [-1, 0, 1, 2] and resumed[:3] == rows  # the probe row kept as it was
    monkeypatch.undo()
    # a fresh run given the evidence by hand does not probe either, and plans the same way
    monkeypatch.setattr(engine, "run_probe", boom)
    given = tmp_path / "given"
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--probe-skill", str(cfg["probe_skill"]), "--no-race",
                 "--out", str(given)]) == 0
    assert json.loads((given / "plan.json").read_text())["strategy"] == plan["strategy"]


def test_auto_is_never_worse_than_its_probe_and_the_probe_row_is_the_saved_model(data, tmp_path, monkeypatch):
    from layerwise import trainer
    from layerwise.inference import evaluate_run

    run = tmp_path / "run"

    def stop_at_once(self, epoch, stop, *a, **k):
        raise trainer.Interrupted  # killed right after the probe: best.safetensors is the probe model

    monkeypatch.setattr(trainer.Trainer, "train_epoch", stop_at_once)
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--no-race", "--out", str(run)]) == 130
    probe_row = read_jsonl(run / "metrics.jsonl")[0]
    assert probe_row["epoch"] == -1
    # the val split of a train/val folder is what evaluate scores too
    assert evaluate_run(run, str(data))["accuracy"] == pytest.approx(probe_row["val_acc"])
    monkeypatch.undo()
    done = tmp_path / "done"
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--lr", "0.5", "--out", str(done)]) == 0  # a bad LR
    rows = read_jsonl(done / "metrics.jsonl")
    best = json.loads((done / "probe.json").read_text())
    assert rows[0]["val_acc"] >= best["val_acc"] - 0.05  # the probe row is the probe's model
    # the saved file, evaluated on its own, is the best row; with the probe row among them it is at
    # least the probe (a best.safetensors not seeded with the probe model would fail this at lr 0.5)
    assert evaluate_run(done, str(data))["accuracy"] == pytest.approx(max(r["val_acc"] for r in rows))


def test_no_probe_and_explicit_bn_are_respected(data, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--epochs", "1", "--no-probe", "--bn", "frozen", "--out", str(run)]) == 0
    assert not (run / "probe.json").exists()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["bn"] == "frozen" and cfg["probe_skill"] is None
    assert json.loads((run / "plan.json").read_text())["strategy"] == "auto:gradual"


@pytest.mark.parametrize("bn,expected", [(None, "frozen"), ("eval", "eval")])
def test_auto_on_far_data_trains_everything_on_batch_statistics(data, tmp_path, bn, expected):
    run = tmp_path / "run"
    args = ["fit", str(data), *TINY, "--epochs", "1", "--probe-skill", "0.8", "--bn-shift", "0.5", "--out", str(run)]
    assert main([*args, *(["--bn", bn] if bn else [])]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    plan = json.loads((run / "plan.json").read_text())
    assert plan["strategy"] == "auto:full" and cfg["bn"] == expected and plan["training"]["bn"] == expected
    assert cfg["bn_shift"] == 0.5 and not (run / "probe.json").exists()  # given: no probe


def test_auto_full_keeps_the_probe_row_but_trains_a_fresh_head(data, tmp_path, monkeypatch):
    from layerwise.shift import BnShiftMeter

    monkeypatch.setattr(BnShiftMeter, "value", lambda self: 0.5)  # random init has no statistics: pretend far data
    auto, full = tmp_path / "auto", tmp_path / "full"
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--no-race", "--out", str(auto)]) == 0
    assert main(["fit", str(data), *TINY, "--epochs", "2", "--strategy", "full", "--out", str(full)]) == 0
    probe = json.loads((auto / "probe.json").read_text())
    assert probe["strategy"] == "auto:full" and probe["bn_shift"] == 0.5 and probe["bn"] == "frozen"
    assert yaml.safe_load((auto / "config.yaml").read_text())["probe_epochs"] is None  # lp-ft's setting only
    rows, fixed = read_jsonl(auto / "metrics.jsonl"), read_jsonl(full / "metrics.jsonl")
    assert rows[0]["stage"] == "probe" and rows[0]["val_acc"] == pytest.approx(probe["val_acc"])
    # after the probe row, exactly the fixed strategy's run: same fresh head, same batches
    timing = {"epoch_seconds": 0, "elapsed_seconds": 0, "images_per_second": 0}
    assert [r | timing for r in rows[1:]] == [r | timing for r in fixed]


def test_probe_shows_progress_unless_quiet(data, tmp_path, capsys):
    args = ["fit", str(data), *TINY[:-1], "--strategy", "auto", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "probe: train features" in capsys.readouterr().err
    assert main([*args, "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert "probe:" not in capsys.readouterr().err


@pytest.mark.parametrize("classes", [2, 4])
def test_folded_probe_equals_the_standardised_logistic_regression(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from layerwise.probe import fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [0.5, 2.0, 10.0, 0.1, 1.0], size=(200, 5))  # features on very different scales
    y = rng.integers(0, classes, 200)
    x[np.arange(200), y] += 2.0
    head = fit_probe(x, y, classes)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=head.c, max_iter=1000)).fit(x, y)
    got, want = head.logits(x), ref.decision_function(x)
    if classes == 2:
        got = got[:, 1] - got[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert head.c in (0.01, 0.1, 1.0, 10.0)


def test_probe_head_loads_into_a_linear_layer_and_reproduces_its_logits():
    from layerwise.probe import fit_probe, load_probe_head

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 8)), rng.integers(0, 3, 120)
    head = fit_probe(x, y, 3)
    layer = torch.nn.Linear(8, 3)
    assert load_probe_head(layer, head)
    with torch.no_grad():
        out = layer(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out, head.logits(x), atol=1e-4)
    assert not load_probe_head(torch.nn.Sequential(torch.nn.Linear(8, 3)), head)  # an MLP head starts fresh


def test_h_score_and_knn_rank_separable_above_random_features():
    from layerwise.probe import h_score, knn_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    noise = rng.normal(size=(400, 32))
    signal = noise + 3 * np.eye(32)[y]  # the class shifts 1 of 32 features
    assert h_score(signal, y) > h_score(noise, y) + 0.5
    assert knn_accuracy(signal[:300], y[:300], signal[300:], y[300:]) > 0.8
    assert knn_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.5


SUITE = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "suite").glob("*")
               if (p / "train").is_dir())


@pytest.mark.skipif(not SUITE, reason="the shared transfer suite is absent")
@pytest.mark.parametrize("name", SUITE)
def test_auto_is_at_least_its_probe_on_every_suite_dataset(name, tmp_path):
    """On each real domain (small and fast: 32 px, one epoch), auto's best val accuracy is at
    least its probe model's, and the saved best weights score that accuracy."""
    from layerwise.inference import evaluate_run

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "suite" / name
    run = tmp_path / "run"
    assert main(["fit", str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "64", "--workers", "0",
                 "--quiet", "--out", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["stage"] == "probe"
    # the saved file, evaluated on its own, scores the best row, the probe row among them
    assert evaluate_run(run, str(data))["accuracy"] == pytest.approx(max(r["val_acc"] for r in rows), abs=1e-6)


def test_pooled_outputs_average_positions_and_leave_no_hook():
    from layerwise.probe import pooled_outputs

    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(4, 3, 6, 6)
    with pooled_outputs(conv) as got:
        conv(x)
        conv(x[:2])
    assert [g.shape for g in got] == [(4, 5), (2, 5)]
    assert torch.allclose(got[0], conv(x).mean((2, 3)), atol=1e-6)
    assert not conv._forward_hooks
    with pooled_outputs(None) as none:
        conv(x)
    assert none == []
    tokens = torch.nn.Linear(5, 6)  # a transformer block's (batch, tokens, width) output: the mean over tokens
    t = torch.randn(2, 7, 5)
    with pooled_outputs(tokens) as got:
        tokens(t)
    assert got[0].shape == (2, 6) and torch.allclose(got[0], tokens(t).mean(1), atol=1e-6)


def test_the_earlier_probe_sees_features_that_separate_what_the_last_cannot(data):
    """A body whose last stage throws the colour away: the earlier depth still separates
    the classes, the last does not, and the probe reports both."""
    class Forgetful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.early = torch.nn.Conv2d(3, 3, 1)
            self.late = torch.nn.Conv2d(3, 4, 1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.early(x)
            return self.fc((self.late(h) * 0).mean((2, 3)))

    from layerwise.augment import eval_transform
    from layerwise.data import ImageDataset, load_splits
    from layerwise.hardware import Amp
    from layerwise.loaders import ordered_loader
    from layerwise.probe import linear_probe

    model = Forgetful()
    splits = load_splits(str(data))
    tf = eval_transform(16, (0.5,) * 3, (0.25,) * 3)
    train, val = (ordered_loader(ImageDataset(items, tf), 16, 0) for items in (splits.train, splits.val))
    res = linear_probe(model, model.fc, train, val, torch.device("cpu"), Amp("fp32", torch.device("cpu")),
                       earlier=model.early)
    assert res.earlier_skill is not None and res.earlier_skill > 0.8 > 0.2 > res.skill


def test_the_earlier_depth_is_the_output_of_every_group_before_the_bodys_last(data):
    """What bench/evidence.py asks for: the probe at the stage before the last, from the same passes."""
    from layerwise.engine import prepare
    from layerwise.evidence import ProbeInputs, run_probe
    from layerwise.loaders import with_eval_transform

    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=16,
                    epochs=2, workers=0, quiet=True, strategy="auto")
    p = prepare(cfg)
    loaded = p.model.loaded
    inputs = ProbeInputs(with_eval_transform(p.loaders.train.dataset, 32, loaded.mean, loaded.std),
                         p.loaders.val.dataset, 16, 0, 0)
    res, earlier = run_probe(loaded.model, p.model.groups, inputs, p.device, p.amp, channels_last=False, quiet=True,
                             earlier_depth_too=True)
    assert earlier is not None and earlier[0] == [g.name for g in p.model.groups][-3]
    assert res.earlier_acc is not None and 0 <= res.earlier_acc <= 1
    assert res.earlier_skill == pytest.approx((res.earlier_acc - res.chance) / (1 - res.chance))
    assert run_probe(loaded.model, p.model.groups, inputs, p.device, p.amp, channels_last=False,
                     quiet=True)[0].earlier_acc is None


def test_the_probes_classical_fits_run_in_one_thread_and_restore_the_pools():
    """fit_probe, knn_accuracy and h_score run with every BLAS/OpenMP pool at one thread (10x
    faster for their small fits on a shared CPU), and the pools are as before afterwards."""
    from threadpoolctl import threadpool_info

    from layerwise import probe

    def threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info()]

    seen: list[list[int]] = []
    wrapped = probe.one_thread(lambda: seen.append(threads()))
    wrapped()  # loads scikit-learn's libraries, so that before and after list the same pools
    before = threads()
    wrapped()
    assert seen[0] and set(seen[0]) == {1}
    assert threads() == before
    for fn in (probe.fit_probe, probe.knn_accuracy, probe.h_score):
        assert getattr(fn, "__wrapped__", None) is not None, fn  # decorated with one_thread


def test_a_single_c_is_the_c_the_probe_fits_at():
    """The earlier-depth probe passes the last depth's C alone: it must be fitted at that C (it
    was fitted at sklearn's default 1.0 whatever C was passed)."""
    from layerwise.probe import fit_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), np.repeat(np.arange(3), 20)
    x[:, 0] += y  # one informative feature
    strong, weak = fit_probe(x, y, 3, cs=(0.01,)), fit_probe(x, y, 3, cs=(10.0,))
    assert (strong.c, weak.c) == (0.01, 10.0)
    assert np.abs(strong.weight).sum() < np.abs(weak.weight).sum()  # stronger regularisation, smaller weights
