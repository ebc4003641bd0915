"""The daemon's searches (C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal and
FIND_ALL): a search is p11p's from init to final; the whole result is found at once on
the session's member (or taken from the application's find cache) when the client or
the group asks for it. Part of the Dispatcher (dispatch.py)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgpack
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.gen import requests as R
from p11p.daemon.members import Member
from p11p.daemon.shapes import GENERAL_ERROR, SHAPES
from p11p.daemon.virtual import FindState, VirtualSession
from p11p.protocol import spec
from p11p.protocol.constants import CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.dispatch")
Reply = list[Any]
OK = CKR["CKR_OK"]
_CODE = {f.name: f.code for f in spec.functions()}
FIND_BATCH = 256  # handles asked of the member per C_FindObjects when filling the cache
FIND_ALL_MAX = 65536  # results sent at once at most; past it the daemon keeps the search
FIND_CACHE_ENTRIES = 256  # per application context; past it the cache starts afresh
SEARCH_TRIES = 3  # whole searches, when the searched member fails after its part
DEVICE_ERROR = CKR["CKR_DEVICE_ERROR"]


class Searches:
    """The search handlers of the Dispatcher."""

    router: Router

    async def find_init(self, ctx: ApplicationContext, req: R.C_FindObjectsInit) -> Reply:
        """C_FindObjectsInit of a client that asks for the results one batch at a time:
        with `object_cache_ttl` > 0, or session objects of the application on several
        members, the whole result is found at once (or taken from the cache) and the
        batches are answered here (see `_found`)."""
        vs = ctx.sessions.get(req.session)
        if vs.find is not None and vs.find.cached:
            return [CKR["CKR_OPERATION_ACTIVE"]]
        if vs.find is not None or (vs.group.config.object_cache_ttl <= 0 and (
                len(vs.group.members) < 2 or not (self.router.resolve.scattered(ctx, vs, None)
                                                  or self.router.resolve.orphans(ctx, vs)))):
            return await self.router.call(ctx, vs, req.frame)  # off; or the member's find runs
        found = await self._found(ctx, vs, req.template)
        if isinstance(found, int):
            return [found]
        vs.find = FindState(req.template, pending=found, cached=True)
        return [OK]

    async def find_all(self, ctx: ApplicationContext, req: R.FIND_ALL) -> Reply:
        """FIND_ALL: C_FindObjectsInit whose reply carries every result, so the client
        library answers C_FindObjects and C_FindObjectsFinal itself: one round trip per
        look-up, and none to the member when the cache has it. The search is over on
        this side; a result too large to send stays here as a search of the session."""
        vs = ctx.sessions.get(req.session)
        if vs.find is not None:
            return [CKR["CKR_OPERATION_ACTIVE"], None]
        found = await self._found(ctx, vs, req.template)
        if isinstance(found, int):
            return [found, None]
        if len(found) > FIND_ALL_MAX:
            vs.find = FindState(req.template, pending=found, cached=True)
            return [OK, None]
        return [OK, found]

    async def _found(self, ctx: ApplicationContext, vs: VirtualSession,
                     template: Any) -> list[int] | int:
        """Every virtual handle a search with `template` finds, or the CK_RV that ended
        it. From the context's find cache when the group has `object_cache_ttl` > 0:
        the same template, the same login state, within the time-to-live, and no object
        written through p11p on the group since (any application's write ends every
        cached result). Otherwise the whole search runs on the member at once (init,
        all results, final), with the application's session objects held by other
        members added, and its result is kept. Objects created or destroyed behind
        p11p's back show within the time-to-live."""
        group = vs.group
        ttl = group.config.object_cache_ttl
        key = None
        if ttl > 0:
            try:
                login = ctx.logins.get(group)
                key = (group, None if login is None else login[0], msgpack.packb(template))
            except (TypeError, ValueError, OverflowError):
                key = None
        now = time.monotonic()
        generation = group.objects_generation
        # with an operation active, the member says whether a search may start beside it
        hit = ctx.find_cache.get(key) if key is not None and not vs.ops else None
        if hit is not None and hit[0] > now and hit[1] == generation:
            return list(hit[2])
        for _ in range(SEARCH_TRIES):
            result, searched = await self._placed(ctx, vs, template)
            if isinstance(result, int):
                return result
            if len(group.members) == 1:
                found = result
                break
            try:
                found = result + await self.router.resolve.found_elsewhere(
                    ctx, vs, template, searched)
                break
            except MemberUnavailable:
                # the searched member failed while the application's session objects were
                # made again there (found_moved failed it): the search runs again, where
                # the session goes now
                continue
        else:
            return DEVICE_ERROR
        found = list(dict.fromkeys(found))  # an object once, however many copies a member has
        if key is not None and group.objects_generation == generation:
            if len(ctx.find_cache) >= FIND_CACHE_ENTRIES:
                ctx.find_cache.clear()
            ctx.find_cache[key] = (now + ttl, generation, list(found))
        return found

    async def _placed(self, ctx: ApplicationContext, vs: VirtualSession,
                      template: Any) -> tuple[list[int] | int, Member | None]:
        """One whole search on the session's member, tried on another member when one
        still in service broke it with CKR_GENERAL_ERROR: its handles (or the CK_RV that
        ended it) and the member that answered."""
        spared: set[Member] = set()
        result: list[int] | int = GENERAL_ERROR
        while True:
            try:
                result = await self._search(ctx, vs, template, spared)
            except CKError:
                if not spared:
                    raise
                # the other member could not take it after all (it failed as it was
                # tried): the answer the first gave stands, as for any call (router.py)
                return result, vs.member
            searched = vs.member
            # a search is p11p's from init to final: one that a member still in service
            # broke with CKR_GENERAL_ERROR (a hiccup, README) runs again on another,
            # when the session can move
            if (result != GENERAL_ERROR or searched is None or not searched.health.usable
                    or not self.router.bind.rebuildable(vs, settled=True)
                    or not self.router.place.others(
                        ctx, vs, SHAPES[_CODE["C_FindObjectsInit"]], [], spared | {searched})):
                break
            log.info("%s: the search returned %s on %s, which still serves: trying another "
                     "member", vs.describe(), rv_name(result), searched.name)
            spared.add(searched)
            await self.router.bind.leave(ctx, vs, searched)
        return result, searched

    async def _search(self, ctx: ApplicationContext, vs: VirtualSession, template: Any,
                      spared: set[Member]) -> list[int] | int:
        """One search on the session's member (init, every batch, final): its handles,
        or the CK_RV that ended it (its final sent, so the session has none running)."""
        call = self.router.call
        reply = await call(ctx, vs, [_CODE["C_FindObjectsInit"], vs.handle, template], spared)
        if reply[0] != OK:
            return int(reply[0])
        found: list[int] = []
        while True:
            batch = await call(ctx, vs, [_CODE["C_FindObjects"], vs.handle, FIND_BATCH])
            if batch[0] != OK:
                await call(ctx, vs, [_CODE["C_FindObjectsFinal"], vs.handle])
                vs.find = None  # ended, whatever the final said
                return int(batch[0])
            found += batch[1]
            if len(batch[1]) < FIND_BATCH:
                break
        final = await call(ctx, vs, [_CODE["C_FindObjectsFinal"], vs.handle])
        if final[0] != OK:
            vs.find = None
            return int(final[0])
        return found

    async def find_final(self, ctx: ApplicationContext, req: R.C_FindObjectsFinal) -> Reply:
        vs = ctx.sessions.get(req.session)
        if vs.find is None:
            # a search is p11p's from init to final (record.py keeps it): none is running
            # in the member session either, and a member's fault is no answer to this
            return [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
        if vs.find.cached:
            vs.find = None
            return [OK]
        return await self.router.call(ctx, vs, req.frame)

    async def find_objects(self, ctx: ApplicationContext, req: R.C_FindObjects) -> Reply:
        vs = ctx.sessions.get(req.session)
        if vs.find is None:
            return [CKR["CKR_OPERATION_NOT_INITIALIZED"], None]  # as find_final
        if vs.find.pending is not None:
            return self.router.bind.pending_batch(vs, req.frame)
        return await self.router.call(ctx, vs, req.frame)
