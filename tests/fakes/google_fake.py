"""Local fakes of Google Cloud Vision v1 `images:annotate`, speaking the real wire protocols so that the real
client library (gRPC or REST transport) talks to them unchanged:

- `GoogleGrpcFake`: an in-process gRPC server for `google.cloud.vision.v1.ImageAnnotator/BatchAnnotateImages`.
- `GoogleRestFake`: an HTTP/1.1 server for `POST /v1/images:annotate` with protobuf-JSON bodies.

Both ask a `FakeBehaviour` what to do with each request and answer with `describe(data)` for the features the
request asked for. Point a provider at `fake.endpoint` (`http://127.0.0.1:PORT`).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.cloud import vision
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from fakes.behaviour import FakeBehaviour, Verdict, describe
from fakes.http_fake import FakeHandler, FakeServer, HttpFake, LocalFake

SERVICE = "google.cloud.vision.v1.ImageAnnotator"
GOOGLE_MAX_BATCH = 16

# Whole-request failure -> (gRPC status, HTTP status, message), as Google sends them.
WHOLE_FAILURES: dict[str, tuple[grpc.StatusCode, int, str]] = {
    "throttled": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "Quota exceeded for quota metric 'Requests'."),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, 503, "The service is currently unavailable."),
    "server_error": (grpc.StatusCode.INTERNAL, 500, "Internal error encountered."),
    "bad_request": (grpc.StatusCode.INVALID_ARGUMENT, 400, "Request contains an invalid argument."),
    "unauthorized": (
        grpc.StatusCode.UNAUTHENTICATED,
        401,
        "Request had invalid authentication credentials.",
    ),
    "forbidden": (grpc.StatusCode.PERMISSION_DENIED, 403, "The caller does not have permission."),
    "invalid_image": (grpc.StatusCode.INVALID_ARGUMENT, 400, "Bad image data."),
}

# Per-image failure -> (google.rpc.Code, message) in that image's AnnotateImageResponse.error.
IMAGE_FAILURES: dict[str, tuple[int, str]] = {
    "invalid_image": (code_pb2.INVALID_ARGUMENT, "Bad image data."),
    "too_large": (code_pb2.INVALID_ARGUMENT, "Image size exceeds limit."),
    "bad_request": (code_pb2.INVALID_ARGUMENT, "Request contains an invalid argument."),
    "throttled": (code_pb2.RESOURCE_EXHAUSTED, "Quota exceeded."),
    "unavailable": (code_pb2.UNAVAILABLE, "The service is currently unavailable."),
    "timeout": (code_pb2.DEADLINE_EXCEEDED, "Deadline exceeded."),
    "server_error": (code_pb2.INTERNAL, "Internal error encountered."),
    "unauthorized": (code_pb2.UNAUTHENTICATED, "Request had invalid authentication credentials."),
    "forbidden": (code_pb2.PERMISSION_DENIED, "The caller does not have permission."),
}

Type = vision.Feature.Type


# ---- the answer, shared by both fakes ----------------------------------------------------------------------


def build_response(
    request: vision.BatchAnnotateImagesRequest, verdict: Verdict
) -> vision.BatchAnnotateImagesResponse:
    """One AnnotateImageResponse per image: the verdict's per-image failure, or `describe(data)` for the
    features that image asked for."""
    answers = []
    for index, item in enumerate(request.requests):
        failure = verdict.image_failures[index] if index < len(verdict.image_failures) else None
        if failure is not None:
            code, message = IMAGE_FAILURES[failure]
            answers.append(vision.AnnotateImageResponse(error=status_pb2.Status(code=code, message=message)))
            continue
        try:
            facts = describe(item.image.content)
        except Exception:  # not an image PIL can decode: Google says so for that image only
            answers.append(
                vision.AnnotateImageResponse(
                    error=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="Bad image data.")
                )
            )
            continue
        answers.append(_answer(facts, item.features))
    return vision.BatchAnnotateImagesResponse(responses=answers)


def _answer(facts: dict, features) -> vision.AnnotateImageResponse:
    answer = vision.AnnotateImageResponse()
    width, height = facts["width"], facts["height"]
    for feature in features:
        limit = feature.max_results or None
        if feature.type_ == Type.LABEL_DETECTION:
            answer.label_annotations = [
                vision.EntityAnnotation(
                    mid=f"/m/fake{name.lower()}", description=name, score=score, topicality=score
                )
                for name, score in facts["labels"][:limit]
            ]
        elif feature.type_ in (Type.TEXT_DETECTION, Type.DOCUMENT_TEXT_DETECTION):
            # As Google: text_annotations[0] is the whole text, then the pieces; full_text_annotation has the
            # page/block/paragraph/word/symbol tree (filled for both OCR features).
            lines = facts["text"]
            full = "".join(f"{text}\n" for text, _ in lines)
            whole = _pixel_poly(_union([box for _, box in lines]))
            answer.text_annotations = [
                vision.EntityAnnotation(locale="en", description=full, bounding_poly=whole)
            ] + [
                vision.EntityAnnotation(description=text, bounding_poly=_pixel_poly(box))
                for text, box in lines
            ]
            blocks = [
                vision.Block(
                    bounding_box=_pixel_poly(box),
                    confidence=0.98,
                    block_type=vision.Block.BlockType.TEXT,
                    paragraphs=[
                        vision.Paragraph(
                            bounding_box=_pixel_poly(box),
                            confidence=0.98,
                            words=[
                                vision.Word(
                                    confidence=0.98, symbols=[vision.Symbol(text=char) for char in word]
                                )
                                for word in text.split()
                            ],
                        )
                    ],
                )
                for text, box in lines
            ]
            answer.full_text_annotation = vision.TextAnnotation(
                text=full, pages=[vision.Page(width=width, height=height, confidence=0.98, blocks=blocks)]
            )
        elif feature.type_ == Type.OBJECT_LOCALIZATION:
            answer.localized_object_annotations = [
                vision.LocalizedObjectAnnotation(
                    mid=f"/m/fake{name.lower()}",
                    name=name,
                    score=score,
                    bounding_poly=_normalized_poly(box, width, height),
                )
                for name, score, box in facts["objects"][:limit]
            ]
        elif feature.type_ == Type.FACE_DETECTION:
            answer.face_annotations = [
                vision.FaceAnnotation(
                    bounding_poly=_pixel_poly(box),
                    fd_bounding_poly=_pixel_poly(box),
                    detection_confidence=score,
                    landmarking_confidence=0.5,
                    joy_likelihood=vision.Likelihood.VERY_UNLIKELY,
                )
                for score, box in facts["faces"][:limit]
            ]
    return answer


def _corners(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x, y, w, h = box
    return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


def _pixel_poly(box) -> vision.BoundingPoly:
    """Google gives pixel vertices as integers (text, faces)."""
    return vision.BoundingPoly(vertices=[vision.Vertex(x=round(x), y=round(y)) for x, y in _corners(box)])


def _normalized_poly(box, width: int, height: int) -> vision.BoundingPoly:
    """Objects come as fractions of the image."""
    return vision.BoundingPoly(
        normalized_vertices=[vision.NormalizedVertex(x=x / width, y=y / height) for x, y in _corners(box)]
    )


def _union(boxes) -> tuple[float, float, float, float]:
    if not boxes:
        return (0.0, 0.0, 0.0, 0.0)
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return (left, top, right - left, bottom - top)


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(round((seconds - int(seconds)) * 1e9)))
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return packed


# ---- gRPC --------------------------------------------------------------------------------------------------


class GoogleGrpcFake(LocalFake):
    """`google.cloud.vision.v1.ImageAnnotator/BatchAnnotateImages` over plaintext gRPC on 127.0.0.1.

    Attributes: `behaviour` (the FakeBehaviour), `port` (set by start), `endpoint` ("http://127.0.0.1:PORT").
    """

    def __init__(self, behaviour: FakeBehaviour, *, max_workers: int = 64) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.max_workers = max_workers
        self._server: grpc.Server | None = None

    def start(self) -> GoogleGrpcFake:
        """Bind an OS-chosen port and serve in background threads."""
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "BatchAnnotateImages": grpc.unary_unary_rpc_method_handler(
                    self._batch_annotate_images,
                    request_deserializer=vision.BatchAnnotateImagesRequest.deserialize,
                    response_serializer=vision.BatchAnnotateImagesResponse.serialize,
                )
            },
        )
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="google-grpc-fake"),
            handlers=(handler,),
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop at once, cancelling requests still in flight (a hanging one included)."""
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def _batch_annotate_images(
        self, request: vision.BatchAnnotateImagesRequest, context: grpc.ServicerContext
    ) -> vision.BatchAnnotateImagesResponse:
        images = [item.image.content for item in request.requests]
        verdict = self.behaviour.judge(images, headers=dict(context.invocation_metadata()))
        if self.behaviour.latency_s:
            time.sleep(self.behaviour.latency_s)
        if verdict.failure is None and len(images) > GOOGLE_MAX_BATCH:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"Too many images per request: {len(images)} > 16."
            )
        if verdict.failure is not None:
            code, _, message = WHOLE_FAILURES[verdict.failure]
            if verdict.retry_after is not None:
                # Google's rich error model: a RetryInfo detail travels in grpc-status-details-bin.
                status = status_pb2.Status(
                    code=code.value[0], message=message, details=[_retry_info(verdict.retry_after)]
                )
                context.abort_with_status(rpc_status.to_status(status))
            context.abort(code, message)
        if verdict.hang_s:
            time.sleep(verdict.hang_s)
        return build_response(request, verdict)


# ---- REST --------------------------------------------------------------------------------------------------


class _Handler(FakeHandler):
    @property
    def behaviour(self) -> FakeBehaviour:
        return self.server.fake.behaviour

    def do_GET(self) -> None:
        self._error(404, "NOT_FOUND", "Not found.")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?", 1)[0] != "/v1/images:annotate":
            self._error(404, "NOT_FOUND", "Not found.")
            return
        try:
            request = vision.BatchAnnotateImagesRequest.from_json(body.decode(), ignore_unknown_fields=True)
        except Exception as exc:
            self._error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
            return
        images = [item.image.content for item in request.requests]
        verdict = self.behaviour.judge(images, headers=dict(self.headers.items()))
        if self.behaviour.latency_s:
            time.sleep(self.behaviour.latency_s)
        if verdict.failure is None and len(images) > GOOGLE_MAX_BATCH:
            self._error(400, "INVALID_ARGUMENT", f"Too many images per request: {len(images)} > 16.")
            return
        if verdict.failure is not None:
            code, http_status, message = WHOLE_FAILURES[verdict.failure]
            self._error(http_status, code.name, message, verdict.retry_after)
            return
        if verdict.hang_s:
            time.sleep(verdict.hang_s)
        self._send(200, vision.BatchAnnotateImagesResponse.to_json(build_response(request, verdict)).encode())

    def _error(self, http_status: int, status: str, message: str, retry_after: float | None = None) -> None:
        error: dict = {"code": http_status, "message": message, "status": status}
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}
            ]
        self._send(http_status, json.dumps({"error": error}).encode(), headers)

    def _send(self, http_status: int, payload: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(http_status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            self.close_connection = True


class _Server(FakeServer):
    request_queue_size = 256  # the default 5 drops connections under a burst of concurrent requests

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (timeout) leaves a broken pipe behind: expected, not worth a traceback.
        pass


class GoogleRestFake(HttpFake):
    """`POST /v1/images:annotate` (protobuf JSON) over plaintext HTTP/1.1 on 127.0.0.1.

    Attributes: `behaviour` (the FakeBehaviour), `port` (set by start), `endpoint` ("http://127.0.0.1:PORT",
    with its scheme: the REST transport prepends https:// to an endpoint without one).
    """

    handler_class = _Handler
    server_class = _Server
    thread_name = "google-rest-fake"

    def __init__(self, behaviour: FakeBehaviour) -> None:
        super().__init__()
        self.behaviour = behaviour
