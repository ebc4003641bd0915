"""`p11p keys GROUP`: the group's token objects by identity (class, label, CKA_ID, key
type, CKA_APPLICATION) and the members holding each.

The daemon reads each member in service on a warm helper of its own (as a health probe
does), logged in when the command gives a PIN (private objects show only then; the PIN
goes to C_Login and nowhere else). The command marks the objects some member lacks and
exits 1 when members differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import HelperLimit
from p11p.daemon.sync import Side
from p11p.protocol.constants import CKK, CKO, CKU

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

_CLASSES = {v: k[4:].lower().replace("_", "-") for k, v in CKO.items()}
_KEY_TYPES = {v: k[4:] for k, v in CKK.items()}


async def list_keys(daemon: Daemon, label: str, pin: str | None) -> dict[str, Any]:
    group = next((g for g in daemon.groups if g.label == label), None)
    if group is None:
        return {"error": f"no group {label!r}"}
    login = (CKU["CKU_USER"], pin.encode()) if pin is not None else None
    holders: dict[tuple[Any, ...], list[str]] = {}
    read, unread = [], []
    for member in group.members:
        if not member.health.usable:
            unread.append({"member": member.name, "why": member.health.state.value})
            continue
        why = await _read(member, login, holders)
        if why:
            unread.append({"member": member.name, "why": why})
        else:
            read.append(member.name)
    objects = [{"class": k[0], "label": k[1], "id": k[2], "key_type": k[3],
                "application": k[4], "members": v}
               for k, v in sorted(holders.items(), key=lambda kv: tuple(map(str, kv[0])))]
    return {"group": group.label, "members": read, "unread": unread, "objects": objects,
            "logged_in": login is not None}


async def _read(member: Any, login: tuple[int, bytes] | None,
                holders: dict[tuple[Any, ...], list[str]]) -> str:
    try:
        helper, epoch = await member.helpers.borrow()
    except (MemberUnavailable, HelperLimit) as exc:
        return str(exc)
    side = Side(member, helper)
    try:
        if not await side.open(login):
            return "no session" + (" (login refused)" if login is not None else "")
        for identity in await side.objects():
            key = (_CLASSES.get(identity.object_class, str(identity.object_class))
                   if identity.object_class is not None else None,
                   identity.label.decode(errors="replace") if identity.label is not None else None,
                   identity.object_id.hex() if identity.object_id is not None else None,
                   _KEY_TYPES.get(identity.key_type, str(identity.key_type))
                   if identity.key_type is not None else None,
                   identity.application.decode(errors="replace")
                   if identity.application is not None else None)
            holders.setdefault(key, []).append(member.name)
        return ""
    except MemberUnavailable as exc:
        return str(exc)
    finally:
        await side.close(login is not None)
        member.helpers.give_back(helper, epoch)


def format_keys(reply: dict[str, Any]) -> tuple[str, bool]:
    """The listing for people, and whether the members differ."""
    members = reply["members"]
    lines = [f"group {reply['group']}: {len(reply['objects'])} token objects on "
             f"{', '.join(members) or 'no member'}"
             + ("" if reply["logged_in"] else " (public objects only: --pin for all)")]
    differ = False
    lines.append(f"  {'class':<12} {'key type':<10} {'label':<24} {'id':<18} members")
    for o in reply["objects"]:
        lacking = [m for m in members if m not in o["members"]]
        differ = differ or bool(lacking)
        mark = "*" if lacking else " "
        label = (o["label"] or "-") + (f" [{o['application']}]" if o.get("application") else "")
        lines.append(f"{mark} {o['class'] or '-':<12} {o['key_type'] or '-':<10} "
                     f"{label:<24} {o['id'] or '-':<18} {', '.join(o['members'])}"
                     + (f"  (lacking: {', '.join(lacking)})" if lacking else ""))
    for u in reply["unread"]:
        lines.append(f"  member {u['member']} not read: {u['why']}")
    lines.append("members differ (*)" if differ else "members agree")
    return "\n".join(lines), differ
