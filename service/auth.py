"""The bearer-token check, one for both APIs (gRPC metadata and the HTTP header carry the same value)."""

from __future__ import annotations

import hmac


class BearerToken:
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def admits(self, authorization: str) -> bool:
        """Whether an `authorization` value is `Bearer TOKEN`. Constant-time: the time taken says nothing about how
        much of the token matched."""
        return hmac.compare_digest(authorization.encode(), self._expected)
