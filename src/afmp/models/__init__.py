"""Model families; importing this package registers every preset."""

from afmp.models import (
    afmp,  # noqa: F401
    convnet,  # noqa: F401
    points,  # noqa: F401
    text,  # noqa: F401, E402
    vit,  # noqa: F401, E402
)
