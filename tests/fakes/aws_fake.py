"""A local Amazon Rekognition: the JSON 1.1 protocol boto3 speaks, answering DetectLabels, DetectText and
DetectFaces from `describe(data)`, failing as FakeBehaviour says with AWS's own error shapes.

moto's Rekognition answers with canned data and has no DetectFaces, hence this fake. It does not check
signatures; it records the headers that arrived (behaviour.headers_seen) so tests can.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from typing import Any

from fakes.behaviour import FakeBehaviour, describe
from fakes.http_fake import FakeHandler, FakeServer, HttpFake

CONTENT_TYPE = "application/x-amz-json-1.1"

# FakeBehaviour's failure kinds as Rekognition sends them: (HTTP status, __type).
ERRORS: dict[str, tuple[int, str]] = {
    "throttled": (400, "ThrottlingException"),
    "server_error": (500, "InternalServerError"),
    "unavailable": (503, "ServiceUnavailableException"),
    "bad_request": (400, "InvalidParameterException"),
    "invalid_image": (400, "InvalidImageFormatException"),
    "too_large": (400, "ImageTooLargeException"),
    "forbidden": (403, "AccessDeniedException"),
    "unauthorized": (400, "UnrecognizedClientException"),
}

OPERATIONS = ("DetectLabels", "DetectText", "DetectFaces")


def _box(width: float, height: float, box: tuple[float, float, float, float]) -> dict[str, float]:
    """Pixels (x, y, w, h) to Rekognition's BoundingBox, ratios of the image size."""
    x, y, w, h = box
    return {"Left": x / width, "Top": y / height, "Width": w / width, "Height": h / height}


def _polygon(bbox: dict[str, float]) -> list[dict[str, float]]:
    left, top, right, bottom = (
        bbox["Left"],
        bbox["Top"],
        bbox["Left"] + bbox["Width"],
        bbox["Top"] + bbox["Height"],
    )
    return [
        {"X": left, "Y": top},
        {"X": right, "Y": top},
        {"X": right, "Y": bottom},
        {"X": left, "Y": bottom},
    ]


def detect_labels(facts: dict, body: dict) -> dict[str, Any]:
    """DetectLabels: labels with Confidence in percent, the object instances under their label."""
    width, height = facts["width"], facts["height"]
    min_confidence = float(body.get("MinConfidence", 55.0))
    max_labels = int(body.get("MaxLabels", 1000))
    labels = []
    for name, score in facts["labels"]:
        if score * 100.0 < min_confidence:
            continue
        instances = [
            {"BoundingBox": _box(width, height, box), "Confidence": obj_score * 100.0}
            for obj_name, obj_score, box in facts["objects"]
            if obj_name == name
        ]
        labels.append(
            {
                "Name": name,
                "Confidence": score * 100.0,
                "Instances": instances,
                "Parents": [],
                "Aliases": [],
                "Categories": [],
            }
        )
    return {"Labels": labels[:max_labels], "LabelModelVersion": "3.0"}


def detect_text(facts: dict, body: dict) -> dict[str, Any]:
    """DetectText: each line as a LINE and its words as WORDs (as the real service does)."""
    width, height = facts["width"], facts["height"]
    detections: list[dict[str, Any]] = []
    for line_id, (text, box) in enumerate(facts["text"]):
        bbox = _box(width, height, box)
        geometry = {"BoundingBox": bbox, "Polygon": _polygon(bbox)}
        detections.append(
            {"DetectedText": text, "Type": "LINE", "Id": line_id, "Confidence": 99.0, "Geometry": geometry}
        )
        for word in text.split():
            detections.append(
                {
                    "DetectedText": word,
                    "Type": "WORD",
                    "Id": len(detections),
                    "ParentId": line_id,
                    "Confidence": 99.0,
                    "Geometry": geometry,
                }
            )
    return {"TextDetections": detections, "TextModelVersion": "3.0"}


def detect_faces(facts: dict, body: dict) -> dict[str, Any]:
    """DetectFaces: FaceDetails with the DEFAULT attributes' shape."""
    width, height = facts["width"], facts["height"]
    faces = [
        {
            "BoundingBox": _box(width, height, box),
            "Confidence": score * 100.0,
            "Landmarks": [],
            "Pose": {"Roll": 0.0, "Yaw": 0.0, "Pitch": 0.0},
            "Quality": {"Brightness": 80.0, "Sharpness": 90.0},
        }
        for score, box in facts["faces"]
    ]
    return {"FaceDetails": faces}


_ANSWERS = {"DetectLabels": detect_labels, "DetectText": detect_text, "DetectFaces": detect_faces}


class _Server(FakeServer):
    request_queue_size = 128  # the benchmark opens many connections at once
    fake: RekognitionFake


class _Handler(FakeHandler):
    server: _Server

    def do_POST(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout test): nothing left to answer.
            self.close_connection = True

    def _serve(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        target = self.headers.get("X-Amz-Target", "")
        service, _, operation = target.partition(".")
        with fake._lock:
            fake.targets.append(target)
        if service != "RekognitionService" or operation not in _ANSWERS:
            self._error(400, "UnknownOperationException", f"this fake does not serve {target!r}")
            return
        try:
            body = json.loads(raw or b"{}")
            data = base64.b64decode(body["Image"]["Bytes"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            self._error(400, "InvalidParameterException", "this fake takes Image.Bytes (base64) only")
            return

        verdict = fake.behaviour.judge([data], headers=dict(self.headers.items()))
        # Sleep outside every lock so concurrent requests overlap as on the real service.
        delay = fake.behaviour.latency_s + verdict.hang_s
        if delay:
            time.sleep(delay)
        if verdict.failure:
            self._error(*ERRORS[verdict.failure], f"fake {verdict.failure}", retry_after=verdict.retry_after)
            return
        # One image per request: its failure is the request's failure.
        image_failure = verdict.image_failures[0] if verdict.image_failures else None
        if image_failure == "timeout":
            time.sleep(fake.behaviour.hang_s)
        elif image_failure:
            self._error(*ERRORS[image_failure], f"fake {image_failure} for this image")
            return
        try:
            facts = describe(data)
        except Exception:  # PIL could not read it: what Rekognition says for undecodable bytes
            self._error(400, "InvalidImageFormatException", "Request has invalid image format")
            return
        self._send(200, _ANSWERS[operation](facts, body))

    def _error(self, status: int, error_type: str, message: str, retry_after: float | None = None) -> None:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        self._send(status, {"__type": error_type, "message": message}, headers)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class RekognitionFake(HttpFake):
    """A Rekognition endpoint on 127.0.0.1 (an OS-chosen port) for boto3's `endpoint_url`.

    `behaviour` decides latency, quota and failures; `targets` lists each request's X-Amz-Target.
    Use as a context manager, or call start() and stop().
    """

    handler_class = _Handler
    server_class = _Server
    thread_name = "rekognition-fake"

    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or FakeBehaviour(max_batch=1)
        self.targets: list[str] = []
        self._lock = threading.Lock()
