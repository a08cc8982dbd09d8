"""The competitor: what a user writes by hand following the tutorial.

ImageFolder + torchvision transforms, freezing by ``requires_grad`` with the tutorial's
substring rules, Adam over the trainable parameters, a standard fp32 loop. Same model and
weights as layerwise (offline Lite0, TF configuration, mean = std = 0.5).

    .venv/bin/python bench/plain_loop.py DATA --strategy head|partial|full --epochs N --img-size S
Prints one JSON line per epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from competitor import competitor_parser  # bench/ is on the path: these run as scripts
from torchvision import datasets, transforms

from layerwise.augment import LIGHT_SCALE  # only to augment as layerwise's default does
from layerwise.models import lite0_state_dict  # only to load the same offline weights


def main() -> None:
    started = time.perf_counter()
    p = competitor_parser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--augment", choices=("light", "none"), default="light", help="layerwise's default, or none")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)
    size = args.img_size
    val_tf = transforms.Compose([transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), norm])
    # the same light augmentation layerwise trains with by default (augment.LIGHT_SCALE), so a
    # comparison measures the loops, not the augmentation
    train_tf = val_tf if args.augment == "none" else transforms.Compose([
        transforms.RandomResizedCrop(size, scale=LIGHT_SCALE), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), norm])
    train = datasets.ImageFolder(f"{args.data}/train", train_tf)
    val = datasets.ImageFolder(f"{args.data}/val", val_tf)
    train_dl = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    val_dl = torch.utils.data.DataLoader(val, args.batch_size, num_workers=args.workers)

    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(lite0_state_dict(model), strict=True)  # every tensor, checked
    model.reset_classifier(len(train.classes))
    # The tutorial's freezing: substring rules on parameter names.
    for name, param in model.named_parameters():
        if args.strategy == "head":
            param.requires_grad = "classifier" in name
        elif args.strategy == "partial":  # "the last two stages": blocks.5, blocks.6, conv_head and the head
            param.requires_grad = any(k in name for k in ("blocks.5", "blocks.6", "conv_head", "bn2", "classifier"))
        else:
            param.requires_grad = True
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    for epoch in range(args.epochs):
        model.train()
        tic, seen = time.perf_counter(), 0
        for x, y in train_dl:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        train_s = time.perf_counter() - tic
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_dl:
                correct += (model(x).argmax(-1) == y).sum().item()
        print(json.dumps({"epoch": epoch, "images_per_second": seen / train_s, "val_acc": correct / len(val),
                          "elapsed_seconds": time.perf_counter() - started}), flush=True)
    if Path(f"{args.data}/test").is_dir():  # a held-out split: the final model, scored once
        test = datasets.ImageFolder(f"{args.data}/test", val_tf)
        ok: list[int] = []
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test, args.batch_size, num_workers=args.workers):
                ok += (model(x).argmax(-1) == y).int().tolist()
        names = [f"{Path(f).parent.name}/{Path(f).name}" for f, _ in test.samples]  # per image, to pair runs
        print(json.dumps({"test_acc": sum(ok) / len(ok), "correct": dict(zip(names, ok))}), flush=True)


if __name__ == "__main__":
    main()
