"""PKCS#11 URIs (RFC 7512) that select a member's token: `pkcs11:token=...;serial=...`.

Only the path attributes that name a token or slot are meaningful for a member
(token, serial, manufacturer, model, slot-id); query attributes are refused, since a
member's URI is no place for a PIN (`pin-value`) and p11p loads the module itself.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

TOKEN_ATTRIBUTES = ("token", "serial", "manufacturer", "model", "slot-id")


class URIError(ValueError):
    pass


def parse(uri: str) -> dict[str, str]:
    """The path attributes of a PKCS#11 URI, percent-decoded."""
    if not uri.startswith("pkcs11:"):
        raise URIError("a PKCS#11 URI starts with 'pkcs11:'")
    body = uri[len("pkcs11:"):]
    if "?" in body:
        raise URIError("query attributes (such as pin-value) are not accepted in a member's URI")
    attrs: dict[str, str] = {}
    for part in filter(None, body.split(";")):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise URIError(f"malformed attribute {part!r}")
        if name in attrs:
            raise URIError(f"attribute {name!r} given twice")
        try:
            decoded = unquote_to_bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise URIError(f"attribute {name!r} is not UTF-8") from None
        if name not in TOKEN_ATTRIBUTES:
            raise URIError(f"attribute {name!r} does not select a token "
                           f"(use {', '.join(TOKEN_ATTRIBUTES)})")
        attrs[name] = decoded
    if not attrs:
        raise URIError("the URI selects no token")
    if "slot-id" in attrs and not attrs["slot-id"].isdigit():
        raise URIError("slot-id is a decimal number")
    return attrs
