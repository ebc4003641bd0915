"""PKCS#11 URIs selecting a member's token (RFC 7512)."""

from __future__ import annotations

import pytest
from p11p.daemon.uri import URIError, parse


def test_path_attributes_percent_decoded() -> None:
    assert parse("pkcs11:token=My%20Token;serial=1234;manufacturer=SoftHSM%20project;"
                 "model=SoftHSM%20v2;slot-id=7") == {
        "token": "My Token", "serial": "1234", "manufacturer": "SoftHSM project",
        "model": "SoftHSM v2", "slot-id": "7"}


@pytest.mark.parametrize("uri, why", [
    ("token=x", "starts with"),
    ("pkcs11:", "selects no token"),
    ("pkcs11:token=a?pin-value=1234", "query attributes"),
    ("pkcs11:object=key", "does not select a token"),
    ("pkcs11:token=a;token=b", "given twice"),
    ("pkcs11:token", "malformed"),
    ("pkcs11:slot-id=x", "decimal"),
    ("pkcs11:token=%ff", "UTF-8"),
])
def test_refused(uri: str, why: str) -> None:
    with pytest.raises(URIError, match=why):
        parse(uri)
