"""Near-duplicate detection, calibrated: plant true near-copies into real datasets and count what is found.

    python bench/near_duplicates.py --make-digits /tmp/digits      # 1,797 8x8 digits as PNG class folders
    python bench/near_duplicates.py /tmp/digits ../shared/datasets/pneumoniamnist/pneumoniamnist.npz \
        ../shared/datasets/neu_steel_defects@64 ../shared/datasets/neu_steel_defects \
        ../shared/datasets/hymenoptera_data [--planted 200] [--seed 0] [--embeddings]

Each dataset (class folders, a manifest or an .npz; `PATH@64` downscales every image to a 64 px short side) is
written to a temporary folder with, for `--planted` randomly chosen images, one near-copy each in the same class:
re-encoded as JPEG at quality 60, resized (x0.75 from 64 px up, x1.5 below), cropped by 4% on two sides and
resized back, or brightened by 20% (in turn). `validate` then runs on the folder as before every training run.

Reported per dataset and detector: recall (planted copies found in their source's duplicate group, per
transform) and false positives (original images paired with a different original, or with a copy of another
image, as a share of the originals). Identical files count as duplicates, not as false positives. Detectors
compared on the same thumbnails: correlation >= 0.9 (the rule before issue 10), the relative rule without
alignment, the relative rule with alignment (the one `validate` uses) and, with `--embeddings`, pooled
tf_efficientnet_lite0 features at 96 px under the same relative rule.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from visionroute.data.dataset import scan_dataset
from visionroute.data.validation import (
    NEAR_DUPLICATE_MAX_DISTANCE,
    near_duplicate_pairs,
    signatures,
    validate,
)

TRANSFORMS = ("jpeg", "resize", "crop", "brightness")


def write_digits(root: Path) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as PNG files in class folders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8)).save(folder / f"{index:04d}.png")
    return root


def plant(image: Image.Image, kind: str) -> tuple[Image.Image | bytes, str]:
    """A near-copy of `image`: an image to save as PNG, or JPEG bytes."""
    width, height = image.size
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=60)
        return buffer.getvalue(), ".jpg"
    if kind == "resize":
        factor = 0.75 if min(width, height) >= 64 else 1.5
        return image.resize((round(width * factor), round(height * factor)), Image.BICUBIC), ".png"
    if kind == "crop":
        box = (0.04 * width, 0.04 * height, width, height)
        return image.resize((width, height), Image.BICUBIC, box=box), ".png"
    return ImageEnhance.Brightness(image).enhance(1.2), ".png"


def build(path: str, folder: Path, planted: int, seed: int) -> tuple[dict, dict]:
    """Originals and planted copies as files under `folder`; returns {file: original index} for both."""
    source, _, size = path.partition("@")
    dataset = scan_dataset(Path(source))
    rng = np.random.default_rng(seed)
    chosen = set(
        rng.choice(len(dataset.samples), size=min(planted, len(dataset.samples)), replace=False).tolist()
    )
    originals, copies = {}, {}
    for index, sample in enumerate(dataset.samples):
        target = folder / dataset.classes[sample.label]
        target.mkdir(parents=True, exist_ok=True)
        image = dataset.load(sample)
        if sample.mode == "L":
            image = image.convert("L")
        if size:
            scale = int(size) / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BOX)
        if sample.ref.startswith("npz:") or size:
            name = target / f"o{index:05d}.png"
            image.save(name)
        else:
            name = target / f"o{index:05d}{Path(sample.ref).suffix.lower()}"
            shutil.copyfile(sample.ref, name)
        originals[str(name)] = index
        if index in chosen:
            kind = TRANSFORMS[len(copies) % len(TRANSFORMS)]
            copy, suffix = plant(image, kind)
            name = target / f"c{index:05d}_{kind}{suffix}"
            if isinstance(copy, bytes):
                name.write_bytes(copy)
            else:
                copy.save(name)
            copies[str(name)] = index
    return originals, copies


def embedding_pairs(paths: list[str], ratio: float) -> list[tuple[int, int, float]]:
    """The relative rule on pooled ImageNet features (tf_efficientnet_lite0 at 96 px), without alignment."""
    import torch

    from visionroute.training.engine import build_model, predict_logits
    from visionroute.training.preprocessing import Preprocessing
    from visionroute.training.weights import load_pretrained, resolve_pretrained

    model = build_model("tf_efficientnet_lite0", 2)
    load_pretrained(model, resolve_pretrained("tf_efficientnet_lite0", model), 2)
    prep = Preprocessing(96, 96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ["a", "b"], "tf_efficientnet_lite0")
    crops = []
    for path in paths:
        with Image.open(path) as image:
            crops.append(
                torch.from_numpy(np.asarray(image.convert("RGB").resize((96, 96))).copy()).permute(2, 0, 1)
            )
    features = predict_logits(model, torch.stack(crops), prep, torch.device("cpu"), features=True).numpy()
    features -= features.mean(0)
    features /= np.linalg.norm(features, axis=1, keepdims=True) + 1e-12
    distance = 1 - features @ features.T
    np.fill_diagonal(distance, np.inf)
    k = min(10, len(paths) - 1)
    nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
    scale = np.median(np.take_along_axis(distance, nearest, axis=1), axis=1)
    limit = ratio * np.minimum(scale[:, None], scale[None, :])
    rows, columns = np.nonzero(np.triu(distance <= limit, 1))
    return [(int(i), int(j), float(distance[i, j])) for i, j in zip(rows, columns, strict=True)]


def score(pairs, representatives: list[str], originals: dict, copies: dict, same: dict) -> dict:
    """Recall on planted copies (same group as their source) and the share of originals falsely paired."""
    parent = list(range(len(representatives)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    false = set()
    for i, j, _ in pairs:
        parent[root(j)] = root(i)
        a, b = representatives[i], representatives[j]
        source_a = originals.get(a, copies.get(a))
        source_b = originals.get(b, copies.get(b))
        if source_a != source_b:  # two different originals, or a copy matched to the wrong original
            false.update(f for f in (a, b) if f in originals)
    index_of = {path: i for i, path in enumerate(representatives)}
    source_file = {index: path for path, index in originals.items()}
    found = {kind: [] for kind in TRANSFORMS}
    for path, index in copies.items():
        kind = Path(path).stem.split("_", 1)[1]
        a, b = same.get(path, path), same.get(source_file[index], source_file[index])
        found[kind].append(a == b or root(index_of[a]) == root(index_of[b]))
    hits = [hit for values in found.values() for hit in values]
    return {
        "recall": float(np.mean(hits)),
        "per_transform": {kind: round(float(np.mean(v)), 3) for kind, v in found.items() if v},
        "false_positive_share": len(false) / len(originals),
        "false_positive_images": len(false),
    }


def contact_sheet(pairs: list[dict], path: Path, side: int = 96) -> None:
    """The pairs `validate` reports among the original images, side by side, closest first: for judging by
    eye whether a "false positive" is a real near-duplicate the dataset already had."""
    from PIL import ImageDraw

    pairs = sorted(pairs, key=lambda pair: pair["distance"])
    columns = 4
    sheet = Image.new("L", (columns * (2 * side + 16), max(1, -(-len(pairs) // columns)) * (side + 14)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, pair in enumerate(pairs):
        x, y = (k % columns) * (2 * side + 16), (k // columns) * (side + 14)
        draw.text((x, y), f"{k}: {pair['distance']}", fill=0)
        for c, key in enumerate("ab"):
            with Image.open(pair[key]["path"]) as image:
                sheet.paste(image.convert("L").resize((side, side), Image.NEAREST), (x + c * side, y + 12))
    sheet.save(path)


def validated_pairs(dataset, report) -> tuple[list[str], dict[str, str], list[tuple[int, int, float]]]:
    """One representative file per content (identical files are one content: detectors compare one of each),
    each file's representative, and `validate`'s near-duplicate pairs as representative indices."""
    first_of: dict[str, str] = {}
    same = {
        sample.ref: first_of.setdefault(dataset.fingerprints[sample.ref].sha256, sample.ref)
        for sample in dataset.samples
    }
    representatives = list(dict.fromkeys(same.values()))
    index_of = {ref: i for i, ref in enumerate(representatives)}
    pairs = [
        (index_of[p["a"]["path"]], index_of[p["b"]["path"]], p["distance"]) for p in report.near_duplicates
    ]
    return representatives, same, pairs


def run(
    path: str, planted: int, seed: int, embeddings: bool, ratios: list[float], sheets: Path | None = None
) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        originals, copies = build(path, folder, planted, seed)
        started = time.perf_counter()
        dataset, report = validate(scan_dataset(folder), progress=False)
        seconds = time.perf_counter() - started
        facts = dataset.fingerprints
        if sheets:
            sheets.mkdir(parents=True, exist_ok=True)
            among_originals = [
                p
                for p in report.near_duplicates
                if p["a"]["path"] in originals and p["b"]["path"] in originals
            ]
            contact_sheet(
                among_originals, sheets / f"{Path(path.partition('@')[0]).stem}{path.partition('@')[2]}.png"
            )
        representatives, same, chosen = validated_pairs(dataset, report)
        thumbnails = np.array([facts[ref].thumbnail for ref in representatives])
        whole = signatures(thumbnails)
        before = []
        for start in range(0, len(whole), 1024):
            rows, columns = np.nonzero(
                whole[start : start + 1024] @ whole.T >= 1 - NEAR_DUPLICATE_MAX_DISTANCE
            )
            before += [(start + i, j, 0.0) for i, j in zip(rows, columns, strict=True) if start + i < j]
        detectors = {
            "correlation >= 0.9 (before)": before,
            "relative, no alignment": near_duplicate_pairs(thumbnails, align=False),
            "relative + alignment (validate)": chosen,
        }
        for ratio in ratios:
            detectors[f"relative + alignment, ratio {ratio}"] = near_duplicate_pairs(thumbnails, ratio=ratio)
        if embeddings:
            detectors["embeddings lite0 96 px, relative"] = embedding_pairs(representatives, 0.3)
        with Image.open(next(iter(originals))) as first:
            size = first.size
        rows = []
        for name, pairs in detectors.items():
            rows.append(
                {
                    "dataset": path,
                    "images": len(originals),
                    "size": f"{size[0]}x{size[1]}",
                    "planted": len(copies),
                    "detector": name,
                    **score(pairs, representatives, originals, copies, same),
                    "validate_seconds": round(seconds, 2),
                    "exact_groups": len(report.exact_duplicates),
                }
            )
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "datasets", nargs="*", help="class folders, a manifest or an .npz; PATH@64 downscales"
    )
    parser.add_argument("--planted", type=int, default=200, help="near-copies planted per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", action="store_true", help="also score pretrained embeddings (slow)")
    parser.add_argument("--ratios", type=float, nargs="*", default=[], help="also try these ratios")
    parser.add_argument(
        "--sheets", type=Path, help="write a contact sheet of the pairs found among originals"
    )
    parser.add_argument("--make-digits", type=Path, help="write the 8x8 digit set to this folder and stop")
    args = parser.parse_args()
    if args.make_digits:
        print(write_digits(args.make_digits))
        return
    print(
        "| dataset | images | size | planted | detector | recall | jpeg / resize / crop / brightness | FP images | FP share | validate s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.datasets:
        for row in run(path, args.planted, args.seed, args.embeddings, args.ratios, args.sheets):
            per = " / ".join(f"{row['per_transform'].get(k, float('nan')):.2f}" for k in TRANSFORMS)
            print(
                f"| {Path(row['dataset']).name} | {row['images']:,} | {row['size']} | {row['planted']} | "
                f"{row['detector']} | {row['recall']:.3f} | {per} | {row['false_positive_images']} | "
                f"{row['false_positive_share']:.2%} | {row['validate_seconds']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
