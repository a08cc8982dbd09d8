"""The fastai competitor: ``vision_learner(...).fine_tune(...)`` on the same data, model and
offline Lite0 weights. fastai is an optional benchmark dependency (pip install fastai).

Prints one JSON line per epoch, like bench/plain_loop.py.
"""

from __future__ import annotations

import json
import time

import timm
from competitor import competitor_parser  # bench/ is on the path: these run as scripts
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.all import ImageDataLoaders, Normalize, Resize, vision_learner

from layerwise.models import lite0_state_dict  # only to load the same offline weights


class Report(Callback):
    order = Recorder.order + 1  # after the recorder has the epoch's metrics

    def __init__(self, started: float) -> None:
        self.started, self.epoch_no = started, 0

    def before_epoch(self) -> None:
        self.tic, self.seen = time.perf_counter(), 0

    def after_batch(self) -> None:
        if self.training:
            self.seen += len(self.yb[0])

    def after_train(self) -> None:
        self.train_s = time.perf_counter() - self.tic

    def after_epoch(self) -> None:
        print(json.dumps({"epoch": self.epoch_no, "images_per_second": self.seen / self.train_s,
                          "val_acc": float(self.recorder.values[-1][2]),
                          "elapsed_seconds": time.perf_counter() - self.started}), flush=True)
        self.epoch_no += 1


def main() -> None:
    started = time.perf_counter()
    p = competitor_parser()
    args = p.parse_args()
    set_seed(args.seed, reproducible=True)
    # pretrained=False below (the weights are loaded by hand), so fastai would add no
    # normalisation: give it the one these TF-origin weights expect, as layerwise does.
    dls = ImageDataLoaders.from_folder(args.data, train="train", valid="val", item_tfms=Resize(args.img_size),
                                       batch_tfms=Normalize.from_stats([0.5] * 3, [0.5] * 3), bs=args.batch_size,
                                       num_workers=1)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, metrics=accuracy, cbs=Report(started))
    body = learn.model[0].model
    full = timm.create_model("tf_efficientnet_lite0")
    weights = {k: v for k, v in lite0_state_dict(full).items() if not k.startswith("classifier")}
    body.load_state_dict(weights, strict=False)
    with learn.no_logging(), learn.no_bar():
        if args.strategy == "head":
            learn.fit_one_cycle(args.epochs, 1e-3)
        elif args.strategy == "partial":
            learn.freeze_to(-2)
            learn.fit_one_cycle(args.epochs, 1e-3)
        else:
            learn.fine_tune(args.epochs - 1, base_lr=1e-3, freeze_epochs=1)


if __name__ == "__main__":
    main()
