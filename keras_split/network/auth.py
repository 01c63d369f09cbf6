"""Who is calling: bearer tokens (compared in constant time) and client certificates.

The server identifies every call before it reads the request body: a caller
without valid credentials costs it no handler work and no message parsing.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class Credentials:
    """The server's view of its clients.

    Args:
        tokens: `{token: client_id}`.
        mutual_tls: clients present certificates signed by the server's client
            CA (the TLS handshake has checked them); the certificate's common
            name is the client id. A token may be presented too, and must then
            name the same client.
    """

    def __init__(self, tokens: dict[str, str], mutual_tls: bool):
        self._tokens = [(token.encode(), client) for token, client in tokens.items()]
        self.mutual_tls = mutual_tls

    @staticmethod
    def presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        for key, value in metadata or ():
            if key == "authorization":
                return value.decode(errors="replace") if isinstance(value, bytes) else value
        return None

    def by_token(self, metadata) -> str | None:
        """The client id of the presented bearer token, or None."""
        value = self.presented(metadata)
        if value is None or not value.startswith("Bearer "):
            return None
        presented = value[len("Bearer "):].encode()
        found = None
        # Every token is compared, so the time does not tell how close a guess was.
        for token, client_id in self._tokens:
            if hmac.compare_digest(presented, token):
                found = client_id
        return found

    def identify(self, metadata, certificate_names: list[bytes] | None) -> tuple[str, str, bool]:
        """(client id, "", False) for a known caller; else ("", why, whether it is a
        permission problem rather than missing credentials)."""
        token_client = self.by_token(metadata)
        if not self.mutual_tls:
            if token_client is None:
                return "", "missing or unknown bearer token", False
            return token_client, "", False
        if self.presented(metadata) is not None and token_client is None:
            return "", "missing or unknown bearer token", False
        names = certificate_names or [b""]
        by_certificate = names[0].decode(errors="replace")
        if not by_certificate:
            return "", "no client certificate", False
        if token_client is not None and token_client != by_certificate:
            return "", (f"the token belongs to {token_client!r} but the client certificate "
                        f"to {by_certificate!r}"), True
        return by_certificate, "", False
