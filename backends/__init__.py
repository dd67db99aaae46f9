"""Route backends: importing this package registers every one of them."""

from visionroute.backends import training, vision_api  # noqa: F401  (registration side effect)
from visionroute.backends.base import (  # noqa: F401
    Backend,
    BackendContext,
    BackendResult,
    BackendUnavailable,
    create_backend,
    list_backends,
    register_backend,
)
