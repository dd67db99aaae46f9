"""The runner every provider shares: quota, retry rules, resending only failed images, the result cache and
the rows it writes, driven through real providers and SDKs against the local fakes (no Prefect here)."""

from __future__ import annotations

import hashlib
import io
import random
import time
from pathlib import Path

import pytest
from conftest import COLOURS, make_image
from fakes.aws_fake import RekognitionFake
from fakes.behaviour import FakeBehaviour
from fakes.google_fake import GoogleGrpcFake
from PIL import Image

from visionroute.vision.base import ErrorKind, ImageInput, ProviderSettings, Quota, create_provider
from visionroute.vision.cache import ResultCache
from visionroute.vision.ratelimit import Limiter, RateLimiter, limiter_for
from visionroute.vision.retry import RetryPolicy
from visionroute.vision.runner import annotate_images, concurrency_for, prepare
from visionroute.vision.service import map_to_class

FAST = RetryPolicy(base_s=0.01, cap_s=0.05, deadline_s=5.0)


@pytest.fixture
def images(tmp_path):
    return [
        str(make_image(tmp_path / "img" / f"{i:02d}.jpg", list(COLOURS.values())[i % 3], seed=i))
        for i in range(20)
    ]


@pytest.fixture
def forty(tmp_path):
    colours = list(COLOURS.values())
    return [
        str(make_image(tmp_path / "many" / f"{i:02d}.jpg", colours[i % 3], seed=500 + i)) for i in range(40)
    ]


def run(provider, paths, limiter=None, **kwargs):
    rows = []
    stats = annotate_images(
        paths,
        provider,
        kwargs.pop("feature", "tag"),
        limiter=limiter or Limiter(None),
        emit=rows.append,
        policy=kwargs.pop("policy", FAST),
        **kwargs,
    )
    return stats, {row["path"]: row for row in rows}


def aws(fake):
    return create_provider("aws", ProviderSettings(endpoint=fake.endpoint, timeout_s=2))


def google(fake):
    return create_provider("google", ProviderSettings(endpoint=fake.endpoint, timeout_s=2))


def test_every_image_gets_one_row_with_the_normalised_answer(cloud_credentials, images):
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        stats, rows = run(aws(fake), images)
    assert sorted(rows) == sorted(images)
    assert stats.answered == 20 and stats.billed_units == 20 and stats.requests == 20
    first = rows[images[0]]
    assert first["labels"][0]["name"] == "Red" and first["error"] is None and first["cached"] is False
    assert first["provider"] == "aws" and first["feature"] == "tag" and len(first["sha256"]) == 64


def test_throttling_is_retried_with_backoff_until_answered(cloud_credentials, images):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(2, "throttled")
        stats, rows = run(aws(fake), images[:1])
    assert rows[images[0]]["error"] is None and rows[images[0]]["attempts"] == 3
    assert stats.requests == 3 and stats.retries == 2 and stats.throttled_responses == 2


@pytest.mark.parametrize("kind", ["unavailable", "server_error", "timeout"])
def test_transient_failures_are_retried(cloud_credentials, images, kind):
    # The hang outlasts the read timeout threefold, and the timeout leaves the retried request a second to
    # answer: a 0.3 s timeout could also cut off the retry's honest answer on a loaded machine.
    behaviour = FakeBehaviour(max_batch=1, hang_s=3.0)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(1, kind)
        provider = create_provider("aws", ProviderSettings(endpoint=fake.endpoint, timeout_s=1.0))
        stats, rows = run(provider, images[:1])
    assert rows[images[0]]["error"] is None
    assert stats.retries == 1


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("bad_request", ErrorKind.BAD_REQUEST),
        ("unauthorized", ErrorKind.UNAUTHORIZED),
        ("forbidden", ErrorKind.FORBIDDEN),
        ("invalid_image", ErrorKind.INVALID_IMAGE),
    ],
)
def test_permanent_failures_are_recorded_never_retried(cloud_credentials, images, kind, expected):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(1, kind)
        stats, rows = run(aws(fake), images[:1])
    assert rows[images[0]]["error"]["kind"] == expected
    assert stats.requests == 1 and stats.retries == 0
    assert stats.errors_by_kind == {expected: 1}


def test_retries_stop_at_the_deadline_and_the_image_is_recorded(cloud_credentials, images):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(1000, "unavailable")
        # A 3 s deadline: on a loaded machine the first request alone once took 2.5 s, past a 0.5 s deadline,
        # and left no time for the retries this test is about.
        policy = RetryPolicy(base_s=0.05, cap_s=0.1, deadline_s=3.0)
        stats, rows = run(aws(fake), images[:1], policy=policy)
    error = rows[images[0]]["error"]
    assert error["kind"] == ErrorKind.UNAVAILABLE and "gave up after" in error["message"]
    assert 2 <= stats.requests < 1000


def test_google_batch_resends_only_the_images_that_failed(images):
    behaviour = FakeBehaviour(max_batch=16)
    flaky, broken = images[3], images[5]
    with open(flaky, "rb") as f:
        behaviour.fail_image(_sha(f.read()), "throttled", times=1)
    with open(broken, "rb") as f:
        behaviour.fail_image(_sha(f.read()), "invalid_image")
    with GoogleGrpcFake(behaviour) as fake:
        stats, rows = run(google(fake), images[:16])
    assert rows[flaky]["error"] is None and rows[flaky]["attempts"] == 2
    assert rows[broken]["error"]["kind"] == ErrorKind.INVALID_IMAGE
    assert stats.requests == 2 and stats.images_sent == 17  # the batch of 16, then the one throttled image
    assert stats.answered == 15 and stats.billed_units == 15


def test_a_rerun_is_served_from_the_cache_with_no_billable_call(cloud_credentials, images, tmp_path):
    cache = ResultCache(tmp_path / "cache.db")
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        provider = aws(fake)
        first, _ = run(provider, images, cache=cache)
        sent = fake.behaviour.requests
        second, rows = run(provider, images, cache=cache)
        assert fake.behaviour.requests == sent
    assert first.billed_units == 20 and first.cache_hits == 0
    assert second.cache_hits == 20 and second.billed_units == 0 and second.requests == 0
    assert all(row["cached"] and row["labels"] for row in rows.values())
    # Another feature of the same images is a different question: not served from the tag answers.
    assert cache.get_many("aws", "ocr", provider.api_version, [rows[images[0]]["sha256"]]) == {}


def test_unreadable_files_are_rows_with_the_reason_and_never_sent(cloud_credentials, images, tmp_path):
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    missing = str(tmp_path / "img" / "gone.jpg")
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        stats, rows = run(aws(fake), [*images[:2], str(bad), missing])
        assert fake.behaviour.requests == 2
    assert rows[str(bad)]["error"]["kind"] == ErrorKind.UNREADABLE
    assert (
        rows[missing]["error"]["kind"] == ErrorKind.UNREADABLE
        and "cannot read" in rows[missing]["error"]["message"]
    )
    assert stats.answered == 2 and stats.errors_by_kind == {ErrorKind.UNREADABLE: 2}


def test_formats_and_sizes_the_api_refuses_are_converted_before_sending(cloud_credentials, tmp_path):
    bmp = make_image(tmp_path / "a.bmp", COLOURS["blue"], seed=1, fmt="BMP")
    big = make_image(tmp_path / "big.png", COLOURS["green"], seed=2, size=(900, 700), fmt="PNG")
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        provider = aws(fake)
        converted = prepare(str(bmp), provider)
        assert isinstance(converted, ImageInput) and converted.format == "PNG"
        provider.max_image_bytes = 60_000  # the 5 MB limit, scaled down to this test's image
        shrunk = prepare(str(big), provider)
        assert isinstance(shrunk, ImageInput) and len(shrunk.data) <= 60_000 and shrunk.format == "JPEG"
        assert (
            shrunk.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
        )  # the file's own digest: cache key
        assert (shrunk.width, shrunk.height) == Image.open(io.BytesIO(shrunk.data)).size < (900, 700)
        _, rows = run(provider, [str(bmp), str(big)])
    assert rows[str(bmp)]["labels"][0]["name"] == "Blue"
    assert rows[str(big)]["labels"][0]["name"] == "Green"


def test_the_bucket_keeps_a_strict_server_quota_free_of_429s(cloud_credentials, forty):
    # The server allows 20 requests/s; the client's bucket holds the same quota, so nothing is throttled.
    behaviour = FakeBehaviour(max_batch=1, requests_per_s=20, latency_s=0.01)
    with RekognitionFake(behaviour) as fake:
        limiter = Limiter(RateLimiter(Quota(requests_per_s=20)))
        stats, rows = run(aws(fake), forty, limiter=limiter, concurrency=8)
    assert behaviour.throttled == 0 and stats.throttled_responses == 0
    assert stats.answered == 40


def test_without_the_bucket_the_same_load_is_throttled_and_still_nothing_is_lost(cloud_credentials, forty):
    behaviour = FakeBehaviour(max_batch=1, requests_per_s=20)
    with RekognitionFake(behaviour) as fake:
        stats, rows = run(aws(fake), forty, concurrency=8)
    assert behaviour.throttled > 0
    assert stats.answered == 40 and not stats.errors_by_kind


def test_a_retry_after_pauses_every_worker():
    limiter = RateLimiter(Quota(requests_per_s=1000))
    limiter.pause(0.2)
    started = time.monotonic()
    limiter.acquire()
    assert time.monotonic() - started >= 0.19


def test_bucket_counts_requests_and_units_separately():
    # Google: 30 requests/s and 30 images/s. A batch of 16 images takes 16 units and 1 request.
    limiter = RateLimiter(Quota(requests_per_s=30, units_per_s=30), max_units=16)
    assert limiter.acquire(1, 16) == 0  # the full bucket holds a whole batch
    waited = limiter.acquire(1, 16)
    assert waited > 0.4  # 16 more units need about 0.53 s at 30 units/s, though requests are plenty
    requests_only = RateLimiter(Quota(requests_per_s=30, units_per_s=30), max_units=16)
    assert sum(requests_only.acquire(1, 1) for _ in range(15)) == 0  # 15 one-image requests fit half a second


def test_backoff_has_full_jitter_a_cap_and_honours_retry_after():
    policy = RetryPolicy(base_s=0.5, cap_s=4.0, max_attempts=5, deadline_s=10)
    rng = random.Random(0)
    delays = [policy.delay(attempt, rng) for attempt in range(1, 8) for _ in range(50)]
    assert min(delays) >= 0 and max(delays) <= 4.0
    assert len({round(d, 3) for d in delays}) > 100  # jittered, not a fixed schedule
    assert policy.delay(1, rng, retry_after=3.0) >= 3.0
    assert policy.allows(4, 1.0, 1.0) and not policy.allows(5, 1.0, 1.0) and not policy.allows(2, 9.5, 1.0)


def test_concurrency_follows_littles_law():
    google_quota = Quota(requests_per_s=30, units_per_s=30)
    # 30 images/s in batches of 16 is 1.9 requests/s; at 0.5 s latency one or two in flight do it.
    assert concurrency_for(google_quota, 0.5, 16) == 3
    assert concurrency_for(Quota(requests_per_s=10), 2.0, 1) == 31
    assert concurrency_for(Quota(requests_per_s=1000), 10.0, 1) == 64
    assert concurrency_for(None, 0.5, 16) == 1


def test_an_unexpected_sdk_failure_is_recorded_and_the_job_goes_on(cloud_credentials, images):
    class Flaky:
        """The AWS provider, except that one image makes the SDK raise something the provider never maps."""

        def __init__(self, inner, bad):
            self.inner, self.bad = inner, bad

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def annotate(self, batch, feature):
            if batch[0].path == self.bad:
                raise KeyError("Labels")  # e.g. a response missing a field
            return self.inner.annotate(batch, feature)

    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        stats, rows = run(Flaky(aws(fake), images[2]), images[:6], concurrency=2)
    assert rows[images[2]]["error"] == {"kind": ErrorKind.CLIENT, "message": "KeyError: 'Labels'"}
    assert stats.answered == 5 and stats.retries == 0


def test_limiters_for_one_endpoint_are_shared_within_the_process():
    quota = Quota(requests_per_s=7)
    a, b = (
        limiter_for("aws-x", quota, 1, cross_process=False),
        limiter_for("aws-x", quota, 1, cross_process=False),
    )
    assert a.local is b.local
    assert limiter_for("aws-y", quota, 1, cross_process=False).local is not a.local
    assert limiter_for("local", Quota(), 16).local is None


def test_label_map_takes_the_best_scoring_mapped_label():
    label_map = {"cat": ["Cat", "Kitten"], "dog": ["dog"]}
    assert map_to_class([{"name": "Dog", "score": 0.6}, {"name": "cat", "score": 0.9}], label_map) == (
        "cat",
        0.9,
    )
    assert map_to_class([{"name": "Car", "score": 0.99}], label_map) == (None, 0.0)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_images_are_read_as_the_file_is(tmp_path):
    path = make_image(tmp_path / "x.png", COLOURS["red"], seed=3, fmt="PNG")

    class AnyFormat:
        max_image_bytes, formats = None, None

    item = prepare(str(path), AnyFormat)
    assert item.data == path.read_bytes() and item.format == "PNG"
    assert (item.width, item.height) == Image.open(path).size


def test_identical_files_are_sent_and_billed_once(cloud_credentials, images, tmp_path):
    copies = []
    for index in range(3):
        copy = tmp_path / "copies" / f"copy{index}.jpg"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(Path(images[0]).read_bytes())
        copies.append(str(copy))
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        stats, rows = run(aws(fake), [images[0], *images[1:4], *copies])
        assert fake.behaviour.requests == 4
    assert stats.billed_units == 4 and stats.answered == 7
    for copy in copies:
        assert rows[copy]["labels"] == rows[images[0]]["labels"] and rows[copy]["duplicate_of"] == images[0]


def test_a_refused_credential_stops_sending_the_rest(cloud_credentials, images):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(1, "unauthorized")
        stats, rows = run(aws(fake), images[:6], concurrency=2)
        assert behaviour.requests == 1  # one 401 is enough: the other five are not sent to fail too
    assert stats.errors_by_kind == {ErrorKind.UNAUTHORIZED: 6}
    assert sum("not sent" in row["error"]["message"] for row in rows.values()) == 5


def test_a_retry_after_past_the_deadline_fails_the_image_without_stalling_the_others(
    cloud_credentials, images
):
    behaviour = FakeBehaviour(max_batch=1)
    limiter = Limiter(RateLimiter(Quota(requests_per_s=100)))
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(1, "throttled", retry_after=30)
        policy = RetryPolicy(base_s=0.01, cap_s=0.05, deadline_s=1.0)
        stats, rows = run(aws(fake), images[:3], limiter=limiter, policy=policy, concurrency=1)
    assert stats.errors_by_kind == {ErrorKind.THROTTLED: 1} and stats.answered == 2
    assert limiter.local._paused_until < time.monotonic()  # nobody was told to wait 30 s


def test_a_failing_prefect_rate_limit_falls_back_to_this_process(caplog):
    class ServerGone:
        def acquire(self, requests, units):
            raise ConnectionError("prefect server unreachable")

    limiter = Limiter(RateLimiter(Quota(requests_per_s=1000)), ServerGone())
    limiter.acquire()
    limiter.acquire()
    assert limiter.shared is None and "limiting this process only" in caplog.text
