"""DDP on CPU with gloo, 2 processes: unfreezing mid-run stays synchronised across ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import make_image_folder
from layerwise.checkpoint import load_state, read_jsonl
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.distributed import DistInfo, ShardedShuffle, eval_shard, unshard_order

COMMON = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--workers", "0", "--quiet",
          "--strategy", "gradual", "--every", "1", "--epochs", "3", "--bn", "eval", "--augment", "none", "--seed", "1",
          # one layout for both: a single process times its numerics, DDP ranks take the fixed table
          "--precision", "fp32", "--channels-last"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(root / "data", classes=3, per_class=16)
    ddp = subprocess.run([sys.executable, "-m", "layerwise", "fit", str(data), *COMMON, "--batch-size", "4",
                          "--nproc", "2", "--out", str(root / "ddp")], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert main(["fit", str(data), *COMMON, "--batch-size", "8", "--out", str(root / "single")]) == 0
    return root, data, ddp.stdout


def test_gradual_under_ddp_keeps_ranks_identical_and_trains_unfrozen_groups(runs):
    root, data, out = runs
    assert "ranks in sync: all 2 processes hold identical weights" in out
    from layerwise.engine import prepare

    torch.manual_seed(0)
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, seed=1)
    initial = prepare(cfg).model.loaded.model.state_dict()
    final = load_state(root / "ddp" / "last" / "state.pt")["model"]
    # stage4 (blocks.3) unfroze at epoch 2 of 3: it must have moved; the stem never unfroze.
    moved = [k for k in final if k.startswith("blocks.3.") and k.endswith("weight")]
    assert moved and all(not torch.equal(final[k], initial[k]) for k in moved)
    assert torch.equal(final["conv_stem.weight"], initial["conv_stem.weight"])


def test_ddp_matches_single_process_with_the_same_global_batch(runs):
    root, _, _ = runs
    a = load_state(root / "ddp" / "last" / "state.pt")["model"]
    b = load_state(root / "single" / "last" / "state.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)  # float summation order differs


def test_metrics_written_once_and_val_acc_over_the_whole_set(runs):
    from layerwise.inference import evaluate_run

    root, data, _ = runs
    rows = read_jsonl(root / "ddp" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    best = max(rows, key=lambda r: r["val_acc"])
    assert evaluate_run(root / "ddp", str(data))["accuracy"] == pytest.approx(best["val_acc"])


@pytest.mark.parametrize("n,world,batch", [(10, 2, 2), (17, 3, 4), (8, 2, 4)])
def test_sharded_sampler_covers_global_batches(n, world, batch):
    g = torch.Generator()
    shards = []
    for r in range(world):
        g.manual_seed(5)
        shards.append(list(ShardedShuffle(n, g, DistInfo(r, world), batch)))
    g.manual_seed(5)
    perm = torch.randperm(n, generator=g).tolist()
    steps = n // (batch * world)
    for k in range(steps):  # step k's global batch is the next world*batch of the permutation
        merged = sum((s[k * batch:(k + 1) * batch] for s in shards), [])
        assert merged == perm[k * batch * world:(k + 1) * batch * world]


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (5, 5)])
def test_eval_shards_cover_each_sample_once(n, world):
    parts = [eval_shard(n, DistInfo(r, world)) for r in range(world)]
    gathered = torch.tensor(sum(parts, []))
    assert sorted(gathered.tolist()) == list(range(n))
    assert gathered[unshard_order(n, DistInfo(0, world))].tolist() == list(range(n))


def test_auto_probes_once_and_every_rank_follows_rank_0(runs, tmp_path):
    import json

    _, data, _ = runs
    args = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--workers", "0", "--quiet",
            "--epochs", "1", "--augment", "none", "--seed", "1"]
    run = tmp_path / "auto"
    ddp = subprocess.run([sys.executable, "-m", "layerwise", "fit", str(data), *args, "--strategy", "auto",
                          "--batch-size", "4", "--nproc", "2", "--out", str(run)], capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert "ranks in sync" in ddp.stdout
    assert ddp.stdout.count("auto: linear probe on frozen features") == 1  # once, rank 0's verdict for all
    probe = json.loads((run / "probe.json").read_text())
    assert json.loads((run / "plan.json").read_text())["strategy"] == probe["strategy"]
