"""The fastai competitor, run the way fastai's docs teach it: ``ImageDataLoaders`` with
presizing (``item_tfms=Resize`` larger, ``batch_tfms=aug_transforms(size=...)``),
``vision_learner`` and ``fine_tune(epochs)`` at its default ``base_lr`` (2e-3, one frozen
epoch); ``--lr-find`` takes the ``lr_find()`` valley as ``base_lr`` first, as the docs also show.
The model is the same offline Lite0 (``pretrained=False`` only because the weights cannot be
downloaded here: they are loaded strictly, every key checked, with the normalisation fastai
would take from their config, mean = std = 0.5). fastai is an optional benchmark dependency
(pip install -e '.[bench]').

Prints one JSON line per epoch, like bench/plain_loop.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import timm
from competitor import competitor_parser  # bench/ is on the path: these run as scripts
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.all import ImageDataLoaders, Normalize, Resize, aug_transforms, get_image_files, vision_learner

from layerwise.models import lite0_state_dict  # only to load the same offline weights

PRESIZE = 460 / 224  # the fastai book's item resize against its training size


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
    p.add_argument("--lr-find", action="store_true", help="fine_tune at lr_find()'s valley, not the default base_lr")
    args = p.parse_args()
    set_seed(args.seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        args.data, train="train", valid="val", bs=args.batch_size, num_workers=1,
        item_tfms=Resize(int(args.img_size * PRESIZE)),  # presizing, as the fastai book does (460 for 224)
        batch_tfms=[*aug_transforms(size=args.img_size, min_scale=0.75), Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    report = Report(started)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, metrics=accuracy, cbs=report)
    body = learn.model[0].model
    full = timm.create_model("tf_efficientnet_lite0")
    weights = {k: v for k, v in lite0_state_dict(full).items() if not k.startswith("classifier")}
    body.load_state_dict(weights, strict=True)  # every key of the body, checked
    with learn.no_logging(), learn.no_bar():
        if args.strategy == "head":  # bench/speed.py's head-only row: the frozen body, one cycle
            learn.fit_one_cycle(args.epochs)
        elif args.strategy == "partial":  # its partial row: fastai's own freeze_to
            learn.freeze_to(-2)
            learn.fit_one_cycle(args.epochs)
        elif args.lr_find:
            with learn.removed_cbs(report):  # the range test's mock epoch is not an epoch of the run
                lr = learn.lr_find(show_plot=False).valley
            learn.fine_tune(args.epochs - 1, base_lr=lr)
        else:
            learn.fine_tune(args.epochs - 1)  # fastai's defaults: base_lr 2e-3, freeze_epochs 1
        test = Path(args.data) / "test"
        if test.is_dir():  # a held-out split: the final model, scored once, labelled as train/ is
            files = get_image_files(test)
            with learn.removed_cbs(report):
                probs, labels = learn.get_preds(dl=dls.test_dl(files, with_labels=True))
            ok = (probs.argmax(-1) == labels).tolist()
            print(json.dumps({"test_acc": sum(ok) / len(ok),  # per image, to pair with other tools' runs
                              "correct": {f"{f.parent.name}/{f.name}": int(c) for f, c in zip(files, ok)}}), flush=True)


if __name__ == "__main__":
    main()
