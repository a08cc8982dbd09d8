from __future__ import annotations

from layerwise.config import RunConfig
from layerwise.loaders import epoch_workers


def test_cpu_training_from_images_decoded_in_ram_forks_no_loader_process():
    cpu = RunConfig(device="cpu")
    assert epoch_workers(cpu, True, 3) == 0
    assert epoch_workers(cpu, False, 3) == 3  # decoding files every epoch: workers overlap it with the steps


def test_an_explicit_worker_count_wins():
    assert epoch_workers(RunConfig(device="cpu", workers=2), True, 3) == 2
    assert epoch_workers(RunConfig(device="cpu", workers=0), False, 3) == 0
