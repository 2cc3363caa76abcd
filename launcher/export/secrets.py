"""Which environment variables must come from a Kubernetes Secret rather than a manifest.

A manifest is committed, diffed and printed by CI: a credential written into one leaks. The test
is deliberately broad (a false positive only costs the user one Secret key to create).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlparse

# Broader than plan.SECRET_HINTS (which only redacts printing): PASS also catches PASSWD/PASSPHRASE,
# AUTH catches AUTHORIZATION and *_AUTH_HEADER.
SECRET_NAME_HINTS = ("TOKEN", "SECRET", "PASS", "KEY", "AUTH", "CREDENTIAL")


def url_has_credentials(value: str) -> bool:
    """user:password@ (or a bare user@, e.g. a NATS token) in any of a comma-separated list of URLs."""
    for part in value.split(","):
        part = part.strip()
        if "://" not in part:
            continue
        with contextlib.suppress(ValueError):
            url = urlparse(part)
            if url.username or url.password:
                return True
    return False


def looks_secret(name: str, value: str) -> bool:
    upper = name.upper()
    return any(h in upper for h in SECRET_NAME_HINTS) or url_has_credentials(value)
