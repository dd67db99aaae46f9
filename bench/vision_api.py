"""Vision API route throughput against local fakes with a server-side quota: images/s as a ratio of the quota's
bound, 429s received, images lost. With the client bucket on (the product) and off (a plain pool of workers
that relies on retries), in the same process.

    .venv/bin/python bench/vision_api.py [--images-google 900] [--images-aws 300] [--folder PHOTOS]

Google fake: 50 ms latency, 1,800 requests/min and 1,800 images/min (30 images/s whatever the batching).
AWS-like fake: 50 ms latency, 10 requests/s, one image per request. Targets: >= 0.95 of the bound, zero lost,
zero 429s with the bucket on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import COLOURS, make_image  # noqa: E402
from fakes.aws_fake import RekognitionFake  # noqa: E402
from fakes.behaviour import FakeBehaviour  # noqa: E402
from fakes.google_fake import GoogleGrpcFake  # noqa: E402

from visionroute.vision.base import ProviderSettings, Quota, create_provider  # noqa: E402
from visionroute.vision.ratelimit import Limiter, RateLimiter  # noqa: E402
from visionroute.vision.runner import annotate_images  # noqa: E402


def photos(folder: Path, count: int) -> list[str]:
    colours = list(COLOURS.values())
    return [str(make_image(folder / f"{i:05d}.jpg", colours[i % 3], seed=i)) for i in range(count)]


def measure(
    name: str,
    fake_cls,
    behaviour: FakeBehaviour,
    provider_name: str,
    quota: Quota,
    bound: float,
    paths: list[str],
    bucket: bool,
) -> dict:
    with fake_cls(behaviour) as fake:
        provider = create_provider(provider_name, ProviderSettings(endpoint=fake.endpoint, timeout_s=10))
        rows: list[dict] = []
        limiter = Limiter(RateLimiter(quota, provider.max_batch)) if bucket else Limiter(None)
        # Without the bucket, a pool sized as the bucketed run would size it by Little's law plus headroom.
        stats = annotate_images(
            paths, provider, "tag", limiter=limiter, emit=rows.append, concurrency=None if bucket else 8
        )
    answered = sum(1 for row in rows if not row["error"])
    return {
        "run": f"{name}, bucket {'on' if bucket else 'off'}",
        "images": len(paths),
        "images_per_s": round(stats.metrics()["images_per_s"], 2),
        "bound": bound,
        "ratio": round(stats.metrics()["images_per_s"] / bound, 3),
        "429s": behaviour.throttled,
        "lost": len(paths) - answered,
        "requests": stats.requests,
        "concurrency": stats.concurrency,
        "p50_ms": round(stats.metrics()["latency_p50_s"] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-google", type=int, default=900)
    parser.add_argument("--images-aws", type=int, default=300)
    parser.add_argument("--folder", help="use these photos instead of synthetic ones (recursively)")
    args = parser.parse_args()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "AKIABENCH",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            found = sorted(str(p) for p in Path(args.folder).rglob("*.jpg"))
            google_paths, aws_paths = found[: args.images_google], found[: args.images_aws]
        else:
            everything = photos(Path(tmp), max(args.images_google, args.images_aws))
            google_paths, aws_paths = everything[: args.images_google], everything[: args.images_aws]
        google_quota = Quota(requests_per_s=30, units_per_s=30)
        aws_quota = Quota(requests_per_s=10)
        results = []
        for bucket in (True, False):
            results.append(
                measure(
                    "google fake, 1,800 req/min + 1,800 img/min, 50 ms",
                    GoogleGrpcFake,
                    FakeBehaviour(latency_s=0.05, requests_per_s=30, units_per_s=30, max_batch=16),
                    "google",
                    google_quota,
                    30.0,
                    google_paths,
                    bucket,
                )
            )
            results.append(
                measure(
                    "aws-like fake, 10 req/s, 50 ms",
                    RekognitionFake,
                    FakeBehaviour(latency_s=0.05, requests_per_s=10, max_batch=1),
                    "aws",
                    aws_quota,
                    10.0,
                    aws_paths,
                    bucket,
                )
            )
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| run | images | images/s | bound | ratio | 429s | lost | requests | workers | p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {r['images']} | {r['images_per_s']} | {r['bound']} | {r['ratio']} | {r['429s']} | "
            f"{r['lost']} | {r['requests']} | {r['concurrency']} | {r['p50_ms']} |"
        )


if __name__ == "__main__":
    main()
