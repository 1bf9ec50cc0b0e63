"""Model families; importing this package registers every preset."""

from afmp.models import afmp  # noqa: F401
