"""How far a teacher's feature maps are from flip-equivariant: the cached-feature target of a flipped view.

A cache stores the teacher's maps of the original image; for a flipped view the trainer resamples (mirrors) them.
That is exact for boxes, but a feature map of a flipped image is not the mirrored map of the image: channels are not
flip-symmetric (a left-edge filter is not a right-edge one) and the encoder adds position embeddings. This prints,
per encoder level and for the backbone's stride-32 map, the relative error and the mean per-sample cosine between
``f(flip(x))`` (what an online teacher gives for the view) and ``flip(f(x))`` (what the cache gives).

    .venv/bin/python benchmarks/bench_flip_equivariance.py --teacher runs/demo/teacher/best --data runs/demo/data
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from PIL import Image


def main() -> None:
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a trained teacher (save_pretrained directory)")
    ap.add_argument("--data", required=True, help="a prepared dataset directory")
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, processor = load_model(args.teacher)
    model.eval()
    data = PreparedData.load(args.data)
    records = json.loads((data.root / f"{args.split}.json").read_text())["images"][: args.images]
    images = [Image.open(data.image_root_of(args.split) / r["file_name"]).convert("RGB") for r in records]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    seen = {}
    hook = model.model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o))
    maps = {}
    with torch.no_grad():
        for name, x in (("plain", pixels), ("flipped", pixels.flip(-1))):
            out = model(pixel_values=x)
            backbone = seen["backbone"][-1]
            backbone = backbone[0] if isinstance(backbone, (tuple, list)) else backbone
            maps[name] = list(out.encoder_last_hidden_state) + [backbone]
    hook.remove()
    print(f"teacher {args.teacher}, {len(images)} {args.split} images, input {tuple(pixels.shape[-2:])}")
    print("map              shape            rel. error   cosine (mean over samples)")
    names = [f"encoder level {i}" for i in range(len(maps['plain']) - 1)] + ["backbone last"]
    for name, a, b in zip(names, maps["plain"], maps["flipped"]):
        target = a.flip(-1)  # what a cache resampled for the flipped view holds
        rel = float((b - target).norm() / b.norm())
        cos = float(F.cosine_similarity(b.flatten(1), target.flatten(1)).mean())
        print(f"{name:16s} {str(tuple(a.shape[1:])):16s} {rel:10.3f}   {cos:.3f}")


if __name__ == "__main__":
    main()
