from __future__ import annotations

import torch

from layerwise.evaluation import EvalResult, evaluate_features
from layerwise.hardware import Amp


def test_confusion_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2])
    probs = torch.eye(3)[torch.tensor([0, 1, 1, 1, 0])]
    ev = EvalResult(0.0, 0.6, labels, probs)
    assert ev.confusion(3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert ev.per_class_acc(3) == [0.5, 1.0, 0.0]


def test_evaluate_features_matches_the_head():
    head = torch.nn.Linear(4, 3)
    feats, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ev = evaluate_features(head, feats, labels, Amp("fp32", torch.device("cpu")), torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        expected = head(feats).softmax(-1)
    torch.testing.assert_close(ev.probs, expected)
    assert ev.acc == (expected.argmax(-1) == labels).float().mean().item()
