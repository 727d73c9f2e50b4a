#!/usr/bin/env python3
"""Run the nx-27017 MongoDB wire-protocol server (PyPI ``nx-27017==0.8.1``) with
its replies corrected to what a real MongoDB replica set sends.

Test setup only.  This is the real nx server; the launcher only patches how
nx shapes its replies (and reads its own change log), it never invents data.
The daemon must not know about any of this.

Usage (same CLI as ``nx-27017``):
    python nx_launcher.py --db memory|FILE --host 127.0.0.1 -p PORT
When not given, ``--pid-file`` defaults to ``$TMPDIR/nx_launcher_<port>.pid``
(replaced at start; the nx default ``/tmp/nx_27017.pid`` would stop a second
server from starting) and ``--log-file`` to /dev/null (logs go to stderr).
``--db FILE`` keeps every logical database in one SQLite file, where
databases share collections (``a.x`` is ``b.x``); ``--data-dir DIR`` keeps one
file per database, isolated like MongoDB (what the scripts use).

Differences corrected (each asserted by check_launcher.py)
-----------------------------------------------------------
a. Cursor ids (``cursor.id`` of every reply, killCursors id lists) are BSON
   Int64; nx sends Int32 when small, which the Rust driver rejects.  nx's
   reply encoder also turned any document field ``id: 0`` (Int32) into Int64;
   the launcher's encoder does not.
b. Change events: ``clusterTime`` is a BSON Timestamp(seconds of the change,
   change-log row id), strictly increasing per event; ``wallTime`` is the
   datetime of the change (second resolution: nx records no more).
c. ``fullDocument`` is exact-typed (nx sent its raw storage JSON: dates as
   {"$date"}, ObjectIds as {"__neosqlite_objectid__"}):
   - insert: the document as inserted, decoded from the change log with the
     collection's own loader (the same code path ``find`` uses);
   - update with ``fullDocument: "updateLookup"``: the *current* document
     looked up by ``_id`` through the collection when the batch is built (may
     already contain later writes; ``null`` when the document is gone), as
     MongoDB's updateLookup; with "whenAvailable"/"required": the post-image
     recorded in the change log; otherwise no ``fullDocument`` field;
   - delete: no ``fullDocument`` field.
d. ``documentKey._id`` has the document's real ``_id`` type (nx sent integer
   ids as strings); taken from the ``_id`` nx logged with the change.
e. ``updateDescription: null`` is removed from every event.  Update events
   carry no ``updateDescription`` (nx cannot tell what changed): consumers must
   diff ``fullDocument``.  A ``replace`` is still reported as
   ``operationType: "update"`` (nx cannot tell them apart) — consumers must not
   depend on the distinction.
f. ``$changeStream.resumeAfter``/``startAfter`` with a token whose history is
   gone fails like MongoDB: ``{ok: 0, code: 286, codeName:
   "ChangeStreamHistoryLost"}``.  nx silently restarted "now".  A token of
   change-log row N is valid iff no row of that collection with id > N was
   ever deleted (a trigger records the highest deleted row id per collection
   in ``_neosqlite_launcher_cs_horizon``, whichever nx path pruned it), and N
   is not beyond the newest row id this database ever issued (e.g. a token
   from an earlier in-memory server).  Unparseable tokens also get 286.
   nx prunes a collection's history only while some stream on it reads, down
   to the newest 1000 rows behind the slowest open stream; so to provoke 286,
   close the stream, keep another one open and read it through >1000 changes.
h. ``cursor.postBatchResumeToken`` of change-stream replies is the stream's
   high-water mark (last event of the batch, or past events the pipeline
   filtered out, or the current point when the batch is empty); nx kept the
   last *delivered* event, so it did not advance past filtered events.
   - getMore on a change stream waits for events up to ``maxTimeMS`` (1 s
     when absent) like a MongoDB awaitData cursor, instead of returning at
     once (which makes drivers spin); it returns early when a write lands.
   - getMore on an unknown/killed/exhausted cursor fails with CursorNotFound
     (code 43; drivers resume change streams on it) instead of nx's
     ``{ok: 1, cursor: {id: 0}}``, which ends a change stream silently.
   - A getMore batch of change events stays within 16 MB (at least 1 event).
   - The server's thread pool is enlarged (256) so waiting getMores do not
     starve other commands.
i. The oplog window is visible the way MongoDB shows it: ``find`` on
   ``local.oplog.rs`` sorted by ``{$natural: 1}`` (or ``-1``) answers the
   oldest (newest) change the server still retains, over every tracked
   collection's change log, as ``{ts: Timestamp(seconds, row id), wall:
   datetime, op, ns}`` (nx has no ``local`` database and answered nothing).
   Retention follows nx's pruning (see f.), so writes read by an open stream
   push the oldest entry forward as MongoDB's capped oplog does.
j. ``$changeStream.startAtOperationTime: Timestamp(t, i)`` starts at the first
   change of the collection at or after that cluster time (with ``i > 0``: at
   change-log row ``i``, the increment the launcher's cluster times carry;
   else at the first change of second ``t`` or later), as a ``resumeAfter`` of
   the change before it (so a point whose history is gone fails with 286).
   nx ignored it and started "now".

i. Collection lifecycle events (nx emitted none).  ``drop``,
   ``renameCollection`` and ``dropDatabase`` are performed by the launcher,
   which appends MongoDB's events for them to nx's change log (same row-id
   sequence, so their tokens are ``{_data: "nx:N"}`` ordered with the rest):
   - drop of a collection: ``drop`` {_id, operationType, clusterTime,
     wallTime, ns} then ``invalidate`` {_id, operationType, clusterTime,
     wallTime} on streams of that collection;
   - renameCollection a -> b (``dropTarget`` honoured; nx renamed inside the
     ``admin`` database): ``rename`` {..., ns: a, to: b} then ``invalidate``,
     on streams of a and of b (a replaced target gets no drop event, as in
     MongoDB, SERVER-53478);
   - dropDatabase: each collection dropped as above (a collection stream
     sees ``drop`` then ``invalidate``).  The change log survives (nx deleted
     the database file with it), so the emptied database may still be
     listed by listDatabases;
   - a database-level stream (``db.watch()``; nx delivers no document events
     on it) gets these lifecycle events as MongoDB sends them: ``drop`` and
     ``rename`` of its collections, and for dropDatabase a ``drop`` per
     collection, ``dropDatabase`` {.., ns: {db}}, then ``invalidate``;
   - the batch with the ``invalidate`` ends there with cursor id 0; a later
     getMore fails with CursorNotFound (43);
   - ``startAfter`` an invalidate token starts after it (events of a
     re-created collection); ``resumeAfter`` it fails with
     ``{code: 260, codeName: "InvalidResumeToken"}``;
   - a dropped/renamed collection that was tracked is tracked again on the
     first write that re-creates it, so that write is in the stream history;
   - opening a stream on a collection that does not exist does not create it
     (nx did: a stream re-opened after a drop brought the collection back);
     the stream starts after the newest change of the database, and tracking
     starts with the write that creates the collection.
k. ``serverStatus`` reports ``opcounters`` (insert, query, update, delete,
   getmore, command) like MongoDB, counted per command received (an insert
   command counts its documents, update/delete their statements), so a
   benchmark can count the operations a client costs the server; also
   ``network`` (``bytesIn``, ``bytesOut``, ``numRequests``: wire messages
   received and sent) and ``extra_info`` (``user_time_us``,
   ``system_time_us``: the server process's CPU), as MongoDB reports them on
   Linux.

l. A query that combines ``$or`` with other top-level conditions (e.g. a
   lease claim ``{_id: S, $or: [{holder: H}, {expires_at_ms: {$lte: now}}]}``)
   keeps every condition: nx's ``findAndModify`` and ``update`` dropped the
   others when a ``$or`` branch matched another document, and so modified the
   wrong document (another stream's lease).  Such a query is sent to nx as the
   equivalent ``{$and: [{_id: S}, {$or: [...]}]}`` (MongoDB semantics:
   top-level conditions are ANDed, https://www.mongodb.com/docs/manual/reference/operator/query/and/).
m. ``$expr`` with ``$toHashedIndexKey`` (nx cannot evaluate either), as a
   partitioned stream uses it: ``{$expr: {$eq: [{$mod: [{$add: [{$mod:
   [{$toHashedIndexKey: "$documentKey._id"}, P]}, P]}, P]}, p]}}``.  Evaluated
   by the launcher with MongoDB's hashed-index hash (MD5 of seed 0, the
   canonical type and the BSON value; first 8 bytes little-endian; checked
   against the documented example "string to hash" -> 763543691661428748,
   https://www.mongodb.com/docs/manual/reference/operator/aggregation/toHashedIndexKey/)
   for numbers, strings, ObjectIds, Booleans, dates and null, and the
   operators ``$eq``, ``$mod`` (sign of the dividend), ``$add`` and field
   paths: in change-stream ``$match`` stages, and in ``find`` filters (the
   ``$expr`` is replaced by ``_id: {$in: [ids it selects]}``, computed over
   the collection under the database lock).

Differences not corrected (know them; don't depend on them)
-----------------------------------------------------------
- Storage: Decimal128, Timestamp and Regex values cannot be stored (error
  code 8); Binary subtypes are lost (read back as subtype 0); Int64 values that
  fit in int32 read back as Int32; integer ``_id`` 1 and string ``_id`` "1"
  collide (duplicate key).
- ``hello`` reports a standalone (no ``setName``/``hosts``): connect with
  ``?directConnection=true``; drivers refuse transactions on it.  nx allows
  change streams on it (MongoDB would need a replica set).  Commands carry no
  ``operationTime``/``$clusterTime``.
- Only collection-level streams deliver document events (database-level
  streams get only lifecycle events, cluster-level ones nothing).
- Change tracking for a collection starts when the first stream on it is
  opened (writes before that are in no history).
- ``$changeStream``
  pipelines apply only ``$match`` (equality, $eq/$ne/$in/$nin/$exists);
  ``fullDocumentBeforeChange`` and ``showExpandedEvents`` are ignored.
- Transactions are not isolated in the stream (writes appear before commit
  and stay after an abort); events have no ``lsid``/``txnNumber``.
- Resume tokens are ``{_data: "nx:<row id>"}``; ``wallTime`` has 1 s
  resolution; change-stream cursors die with the connection that opened them
  (drivers resume on the CursorNotFound that follows).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import resource
import struct
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal as PyDecimal
from typing import Any

from bson import Decimal128
from bson import ObjectId as BsonObjectId
from bson import encode as bson_encode
from bson.int64 import Int64
from bson.timestamp import Timestamp
from neosqlite.objectid import ObjectId as NeoObjectId

from nx_27017 import changestream as nx_cs
from nx_27017 import daemon as nx_daemon
from nx_27017 import handler as nx_handler
from nx_27017 import server as nx_server
from nx_27017 import wire_protocol as nx_wire

logger = logging.getLogger("nx_27017.launcher")

_HISTORY_LOST_MSG = (
    "Resume of change stream was not possible, as the resume point may no "
    "longer be in the oplog."
)
_HORIZON_TABLE = "_neosqlite_launcher_cs_horizon"
_HORIZON_TRIGGER = "_neosqlite_launcher_cs_horizon_trigger"
_BATCH_BYTES = 16 * 1024 * 1024
_DEFAULT_AWAIT_MS = 1000

# ---------------------------------------------------------------------------
# a. Int64 cursor ids in every reply
# ---------------------------------------------------------------------------

_CURSOR_ID_LISTS = ("cursorsKilled", "cursorsNotFound", "cursorsAlive", "cursorsUnknown")


def _as_int64(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return Int64(value)
    return value


def fix_reply(document: Any) -> Any:
    """Return a copy of a command reply with MongoDB-typed cursor ids."""
    if not isinstance(document, dict):
        return document
    doc = dict(document)
    cursor = doc.get("cursor")
    if isinstance(cursor, dict) and "id" in cursor:
        cursor = dict(cursor)
        cursor["id"] = _as_int64(cursor["id"])
        doc["cursor"] = cursor
    for key in _CURSOR_ID_LISTS:
        if isinstance(doc.get(key), list):
            doc[key] = [_as_int64(v) for v in doc[key]]
    return doc


def to_bson_types(value: Any) -> Any:
    """NeoSQLite ObjectId -> bson ObjectId, Decimal -> Decimal128, recursively.

    Replaces nx's converter, which also turned every field named ``id`` whose
    value is 0 (in user documents too) into Int64; cursor ids are handled by
    fix_reply instead.
    """
    if isinstance(value, dict):
        return {k: to_bson_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_bson_types(v) for v in value]
    if isinstance(value, NeoObjectId):
        return BsonObjectId(value.binary)
    if isinstance(value, PyDecimal):
        return Decimal128(value)
    return value


def _build_op_msg_reply(request_id, response_to, document, flags=0):
    doc_data = bson_encode(fix_reply(to_bson_types(document)))
    body = struct.pack("<I", flags) + struct.pack("<B", 0) + doc_data
    header = struct.pack(
        "<iiii", 16 + len(body), request_id, response_to, nx_wire.WireProtocol.OP_MSG
    )
    _count_bytes("bytesOut", 16 + len(body))
    return header + body


def _build_reply(request_id, response_to, documents, flags=0):
    docs_data = b"".join(
        bson_encode(fix_reply(to_bson_types(d))) for d in documents
    )
    body = (
        struct.pack("<I", flags)
        + struct.pack("<q", 0)
        + struct.pack("<i", 0)
        + struct.pack("<i", len(documents))
        + docs_data
    )
    header = struct.pack(
        "<iiii", 16 + len(body), request_id, response_to, nx_wire.WireProtocol.OP_REPLY
    )
    _count_bytes("bytesOut", 16 + len(body))
    return header + body


# ---------------------------------------------------------------------------
# b-e, h. Change events built from nx's change log
# ---------------------------------------------------------------------------


def _row_time(raw: Any) -> datetime:
    """Time of a change-log row (SQLite CURRENT_TIMESTAMP, UTC)."""
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=timezone.utc)
    if isinstance(raw, str):
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f"):
            try:
                return datetime.strptime(raw, fmt).replace(tzinfo=timezone.utc)
            except ValueError:
                pass
    return datetime.now(timezone.utc).replace(microsecond=0)


def _bson_size(doc: dict[str, Any]) -> int:
    try:
        return len(bson_encode(doc))
    except Exception:
        return 0


class _Lookup:
    """updateLookup through the handler's own database/collection access."""

    def __init__(self, manager: Any, stream: Any) -> None:
        self._manager = manager
        self._stream = stream
        self._coll: Any = None
        self._resolved = False

    def _collection(self) -> Any:
        if not self._resolved:
            self._resolved = True
            handler = getattr(self._manager, "_nx_launcher_handler", None)
            if handler is not None:
                db = handler.get_database(self._stream.db_name)
                name = self._stream.collection_name
                # Like the handler's find: never create a dropped collection.
                if name in db.list_collection_names():
                    self._coll = db[name]
        return self._coll

    def __call__(self, doc_id: Any) -> Any:
        coll = self._collection()
        if coll is None:
            return None
        return coll.find_one({"_id": doc_id})


def _build_event(
    stream: Any, collection: Any, lookup: _Lookup, row: Any
) -> dict[str, Any]:
    rowid, operation, document_id, data, id_value, ts = row[:6]
    rowid = int(rowid)
    if operation in _LIFECYCLE_OPS:
        return _lifecycle_event(stream, rowid, operation, data, _row_time(ts))
    stored = None
    if data:
        try:
            # The collection's own loader, as used by find(): exact types.
            stored = collection._load_with_stored_id(document_id, data, id_value)
        except Exception as exc:  # pragma: no cover - corrupt row
            logger.debug("change-log row %s undecodable: %s", rowid, exc)
    if isinstance(stored, dict) and "_id" in stored:
        key = stored["_id"]
    else:
        key = nx_cs._restore_id(id_value, document_id)
    when = _row_time(ts)
    event: dict[str, Any] = {
        "_id": nx_cs._wire_token(rowid),
        "operationType": operation,
        "clusterTime": Timestamp(int(when.timestamp()), rowid % (2**32)),
        "wallTime": when,
    }
    mode = stream.full_document
    if operation == "insert":
        event["fullDocument"] = stored
    elif operation == "update":
        if mode == "updateLookup":
            event["fullDocument"] = lookup(key)
        elif mode in ("whenAvailable", "required"):
            event["fullDocument"] = stored
    event["ns"] = {"db": stream.db_name, "coll": stream.collection_name}
    event["documentKey"] = {"_id": key}
    return to_bson_types(event)


def _pull_stream(self, stream, batch_size: int = 101):
    """Replacement for ChangeStreamManager.pull_stream (same change log)."""
    with self._lock:
        tracker = self._trackers.get((stream.db_name, stream.collection_name))
    batch: list[dict[str, Any]] = []
    if getattr(stream, "_nx_launcher_invalidated", False):
        return batch, nx_cs._wire_token(stream._watermark)
    if not isinstance(stream.collection_name, str):
        return _pull_database_stream(self, stream, batch_size)
    if tracker is not None:
        collection = tracker["collection"]
    else:
        # i. A drop/rename ended the collection's tracking while this stream
        # was open: it still has to read its lifecycle events (and any older
        # rows it had not reached) from the change log.
        collection = _decoder_collection(self, stream)
        if collection is None:
            return batch, nx_cs._wire_token(stream._watermark)
    try:
        from neosqlite.collection.jsonb_support import (
            json_data_column,
            supports_jsonb,
        )

        data_expr = json_data_column(supports_jsonb(collection.db), "document_data")
        rows = collection.db.execute(
            "SELECT id, operation, document_id, "
            f"{data_expr} AS document_data, document_id_value, timestamp "
            "FROM _neosqlite_changestream "
            "WHERE collection_name = ? AND id > ? ORDER BY id LIMIT ?",
            (stream.collection_name, stream._watermark, batch_size),
        ).fetchall()
    except Exception as exc:
        logger.debug("change stream pull skipped: %s", exc)
        return batch, nx_cs._wire_token(stream._watermark)
    lookup = _Lookup(self, stream)
    used = 0
    high = stream._watermark
    for row in rows:
        rowid = int(row[0])
        event = _build_event(stream, collection, lookup, row)
        if event["operationType"] == "invalidate":
            # i. The invalidate event ends the stream: delivered whatever the
            # pipeline filters, nothing after it, and the cursor closes
            # (_handle_command answers this getMore with cursor id 0).
            batch.append(event)
            stream._last_token_id = rowid
            stream._nx_launcher_invalidated = True
            high = rowid
            break
        if nx_cs._pipeline_matches(event, stream.pipeline):
            size = _bson_size(event)
            if batch and used + size > _BATCH_BYTES:
                break
            used += size
            batch.append(event)
            stream._last_token_id = rowid
        high = max(high, rowid)
    stream._watermark = high
    self._prune(stream.db_name, stream.collection_name)
    return batch, nx_cs._wire_token(stream._watermark)


# ---------------------------------------------------------------------------
# f. ChangeStreamHistoryLost
# ---------------------------------------------------------------------------


def _install_horizon(sqlite_conn: Any) -> None:
    """Record, per collection, the highest change-log row id ever deleted."""
    sqlite_conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_HORIZON_TABLE} ("
        "collection_name TEXT PRIMARY KEY, horizon INTEGER NOT NULL)"
    )
    sqlite_conn.execute(
        f"CREATE TRIGGER IF NOT EXISTS {_HORIZON_TRIGGER} "
        "AFTER DELETE ON _neosqlite_changestream BEGIN "
        f"INSERT INTO {_HORIZON_TABLE} (collection_name, horizon) "
        "VALUES (OLD.collection_name, OLD.id) "
        "ON CONFLICT(collection_name) DO UPDATE SET "
        "horizon = MAX(horizon, excluded.horizon); END"
    )
    if not sqlite_conn.in_transaction:
        sqlite_conn.commit()


_orig_ensure_tracked = nx_cs.ChangeStreamManager.ensure_tracked


def _ensure_tracked(self, db_name, collection_name, get_collection):
    handler = getattr(self, "_nx_launcher_handler", None)
    if (
        handler is not None
        and isinstance(collection_name, str)
        and collection_name not in handler.get_database(db_name).list_collection_names()
    ):
        # i. Watching a collection does not create it (nx created it, so a
        # stream re-opened after a drop resurrected the collection).  It is
        # tracked from the write that creates it (_retrack_before_write).
        with self._lock:
            self._nx_launcher_retrack.add((db_name, collection_name))
        return None
    tracker = _orig_ensure_tracked(self, db_name, collection_name, get_collection)
    if tracker is not None:
        try:
            _install_horizon(tracker["collection"].db)
        except Exception as exc:
            logger.warning("cannot install change-log horizon trigger: %s", exc)
    return tracker


_orig_create_stream = nx_cs.ChangeStreamManager.create_stream


def _create_stream(self, collection_name, pipeline, resume_after=None,
                   start_at_operation_time=None, full_document=None, db_name="test",
                   owner=None, start_after=None, get_collection=None):
    stream = _orig_create_stream(
        self, collection_name, pipeline, resume_after=resume_after,
        start_at_operation_time=start_at_operation_time, full_document=full_document,
        db_name=db_name, owner=owner, start_after=start_after, get_collection=get_collection,
    )
    with self._lock:
        tracked = (db_name, collection_name) in self._trackers
    handler = getattr(self, "_nx_launcher_handler", None)
    if handler is not None and not isinstance(collection_name, str):
        # i. A database-level stream: its lifecycle events go to the change log.
        sqlite_conn = handler.get_database(db_name).db
        sqlite_conn.execute(_CHANGE_LOG_DDL)
        if not sqlite_conn.in_transaction:
            sqlite_conn.commit()
    if resume_after is None and start_after is None and not tracked and handler is not None:
        # i. A stream on a collection that does not exist (yet) starts "now":
        # after the newest change-log row of the database (nx started at 0,
        # i.e. it replayed the history of an earlier collection of that name).
        newest = _scalar(
            handler.get_database(db_name).db,
            "SELECT seq FROM sqlite_sequence WHERE name = '_neosqlite_changestream'",
        )
        stream._watermark = int(newest or 0)
    return stream


def _scalar(sqlite_conn: Any, sql: str, args: tuple = ()) -> Any:
    try:
        row = sqlite_conn.execute(sql, args).fetchone()
    except Exception:
        return None
    return row[0] if row else None


def resume_token_lost(db: Any, collection_name: Any, token: Any) -> bool:
    """True when resuming after ``token`` would silently skip changes."""
    rowid = nx_cs._wire_rowid(token)
    if rowid is None or rowid < 0:
        return True
    sqlite_conn = db.db
    newest = _scalar(
        sqlite_conn,
        "SELECT seq FROM sqlite_sequence WHERE name = '_neosqlite_changestream'",
    )
    if rowid > int(newest or 0):
        return True  # not issued by this database's history
    horizon = _scalar(
        sqlite_conn,
        f"SELECT horizon FROM {_HORIZON_TABLE} WHERE collection_name = ?",
        (str(collection_name),),
    )
    return horizon is not None and rowid < int(horizon)


def _history_lost_reply() -> dict[str, Any]:
    return {
        "ok": 0,
        "errmsg": _HISTORY_LOST_MSG,
        "code": 286,
        "codeName": "ChangeStreamHistoryLost",
    }


def _cursor_not_found(cursor_id: Any) -> dict[str, Any]:
    return {
        "ok": 0,
        "errmsg": f"cursor id {cursor_id} not found",
        "code": 43,
        "codeName": "CursorNotFound",
    }


# ---------------------------------------------------------------------------
# i. Collection lifecycle events: drop, rename, dropDatabase -> invalidate
# ---------------------------------------------------------------------------
#
# nx records only document writes (SQLite triggers on the collection's table).
# The launcher performs drop / renameCollection / dropDatabase itself and
# appends the events MongoDB emits for them to the same change log
# (``_neosqlite_changestream``), so they get row ids -- and resume tokens --
# from the same sequence as every other event.  A lifecycle row keeps its
# extra fields (``ns``/``to`` of a rename) as JSON in ``document_data``.
# ``_neosqlite_launcher_invalidates`` remembers which row ids are invalidate
# events (never pruned), so that ``resumeAfter`` one fails with code 260.
# Shapes: https://www.mongodb.com/docs/manual/reference/change-events/ (drop,
# rename, dropDatabase, invalidate pages); which commands reach a collection
# stream (drop; rename from or to it; not dropDatabase itself): MongoDB's
# change-stream match filter, and SERVER-53478 for rename with dropTarget.

_LIFECYCLE_OPS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})
# collection_name of the rows only database-level streams read ("$" cannot
# start a collection name)
_DB_ROWS = "$database"
# nx's (neosqlite's) change log, created for a database-level stream opened
# before any collection stream of its database
_CHANGE_LOG_DDL = """
    CREATE TABLE IF NOT EXISTS _neosqlite_changestream (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        collection_name TEXT NOT NULL,
        operation TEXT NOT NULL,
        document_id INTEGER,
        document_data TEXT,
        document_id_value TEXT,
        timestamp DATETIME DEFAULT CURRENT_TIMESTAMP
    )
"""
_INVALIDATES_TABLE = "_neosqlite_launcher_invalidates"
_INVALID_RESUME_MSG = (
    "Attempting to resume a change stream using 'resumeAfter' is not allowed "
    "from an invalidate notification."
)


def _lifecycle_event(
    stream: Any, rowid: int, operation: str, data: Any, when: datetime
) -> dict[str, Any]:
    """The change event of a lifecycle row, shaped as MongoDB documents it:
    drop: {_id, operationType, clusterTime, wallTime, ns};
    rename: the same plus ``to`` (``ns`` is the source, also on the stream of
    the target); invalidate: {_id, operationType, clusterTime, wallTime}."""
    extra: dict[str, Any] = {}
    if data:
        try:
            loaded = json.loads(data.decode() if isinstance(data, bytes) else data)
            if isinstance(loaded, dict):
                extra = loaded
        except (ValueError, TypeError, UnicodeDecodeError):
            pass
    event: dict[str, Any] = {
        "_id": nx_cs._wire_token(rowid),
        "operationType": operation,
        "clusterTime": Timestamp(int(when.timestamp()), rowid % (2**32)),
        "wallTime": when,
    }
    if operation == "invalidate":
        return event
    ns = extra.get("ns") or {"db": stream.db_name, "coll": stream.collection_name}
    if operation == "dropDatabase":
        ns = {"db": ns.get("db", stream.db_name)}
    event["ns"] = ns
    if operation == "rename" and "to" in extra:
        event["to"] = extra["to"]
    return event


def _decoder_collection(manager: Any, stream: Any) -> Any:
    """A Collection object over the stream's table used only to decode change
    rows (``create=False``: it never creates a dropped collection)."""
    handler = getattr(manager, "_nx_launcher_handler", None)
    if handler is None or not isinstance(stream.collection_name, str):
        return None
    try:
        from neosqlite.collection import Collection as NeoCollection

        database = handler.get_database(stream.db_name)
        return NeoCollection(
            database.db, stream.collection_name, create=False, database=database
        )
    except Exception as exc:
        logger.debug("no decoder for %s.%s: %s", stream.db_name, stream.collection_name, exc)
        return None


def _table_exists(sqlite_conn: Any, name: str) -> bool:
    return bool(
        _scalar(
            sqlite_conn,
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
            (name,),
        )
    )


def _append_lifecycle(database: Any, rows: list[tuple[str, str, dict | None]]) -> None:
    """Append (collection, operation, extra fields) rows to the change log of
    ``database`` (a neosqlite Connection).  Without a change log no stream was
    ever opened in this database, so there is nobody to tell."""
    sqlite_conn = database.db
    if not _table_exists(sqlite_conn, "_neosqlite_changestream"):
        return
    sqlite_conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_INVALIDATES_TABLE} (id INTEGER PRIMARY KEY)"
    )
    for coll, operation, extra in rows:
        cur = sqlite_conn.execute(
            "INSERT INTO _neosqlite_changestream "
            "(collection_name, operation, document_id, document_data, document_id_value) "
            "VALUES (?, ?, NULL, ?, NULL)",
            (coll, operation, json.dumps(extra) if extra else None),
        )
        if operation == "invalidate":
            sqlite_conn.execute(
                f"INSERT INTO {_INVALIDATES_TABLE} (id) VALUES (?)", (cur.lastrowid,)
            )
    if not sqlite_conn.in_transaction:
        sqlite_conn.commit()


def is_invalidate_token(database: Any, token: Any) -> bool:
    """True when ``token`` is the resume token of an invalidate event."""
    rowid = nx_cs._wire_rowid(token)
    if rowid is None or not _table_exists(database.db, _INVALIDATES_TABLE):
        return False
    return bool(
        _scalar(database.db, f"SELECT COUNT(*) FROM {_INVALIDATES_TABLE} WHERE id = ?", (rowid,))
    )


def _invalid_resume_reply() -> dict[str, Any]:
    return {
        "ok": 0,
        "errmsg": _INVALID_RESUME_MSG,
        "code": 260,
        "codeName": "InvalidResumeToken",
    }


def _untrack(manager: Any, db_name: str, coll: str) -> None:
    """End nx's change tracking of a collection that is about to be dropped or
    renamed: its triggers go (SQLite would keep them on a renamed table,
    still logging under the old name) and the collection is remembered so that
    the next write to a re-created collection of that name is tracked again
    (``_retrack_before_write``), as MongoDB's oplog records it.  Open streams
    keep reading the change log without the tracker (``_decoder_collection``)."""
    with manager._lock:
        tracker = manager._trackers.pop((db_name, coll), None)
        if tracker is not None:
            manager._nx_launcher_retrack.add((db_name, coll))
    if tracker is not None:
        _end_tracking(tracker)


def _end_tracking(tracker: dict[str, Any]) -> None:
    """Drop a tracked collection's change triggers and retire nx's watcher
    for it, keeping its change-log rows: closing the watcher (what nx does)
    would prune them to the newest 1000, behind streams still reading them."""
    from neosqlite import changestream as neo_cs

    watcher = tracker.get("watcher")
    collection = tracker["collection"]
    sqlite_conn = collection.db
    name = getattr(watcher, "_sanitized_name", None) or collection.name
    for kind in ("insert", "update", "delete"):
        sqlite_conn.execute(f'DROP TRIGGER IF EXISTS "_neosqlite_{name}_{kind}_trigger"')
    if watcher is not None:
        # what watcher.close() does, minus the prune: a later watcher on this
        # name must find no registered stream, so that it creates triggers
        watcher._closed = True
        entry = neo_cs._registry_entry(sqlite_conn)
        entry["counts"].pop(collection.name, None)
        entry["streams"].pop(collection.name, None)
    if not sqlite_conn.in_transaction:
        sqlite_conn.commit()


def _retrack_before_write(handler: Any, cmd: dict[str, Any], msg: Any) -> None:
    """Before a write to a collection whose tracking a drop/rename ended,
    install tracking again, so the write (which may re-create the collection)
    is in the change log.  Writes that cannot create the collection are
    tracked only when it exists."""
    manager = handler._change_stream_manager
    for name in ("insert", "update", "delete", "findAndModify", "findandmodify"):
        coll = cmd.get(name)
        if isinstance(coll, str):
            break
    else:
        return
    db_name = cmd.get("$db", "test")
    key = (db_name, coll)
    with manager._lock:
        pending = key in manager._nx_launcher_retrack
    if not pending:
        return
    database = handler.get_database(db_name)
    if name != "insert" and coll not in database.list_collection_names():
        upsert = bool(cmd.get("upsert")) or any(
            isinstance(u, dict) and u.get("upsert")
            for u in list(cmd.get("updates") or []) + _payload_docs(msg, "updates")
        )
        if not upsert:
            return
    database[coll]  # creates the collection, as the write itself would
    if manager.ensure_tracked(db_name, coll, lambda: database[coll]) is not None:
        with manager._lock:
            manager._nx_launcher_retrack.discard(key)


def _payload_docs(msg: Any, key: str) -> list[Any]:
    """Documents of an OP_MSG document sequence (``updates``, ``documents``)."""
    out: list[Any] = []
    try:
        for kind, doc in msg.get("sections", []):
            if kind == "payload" and isinstance(doc, dict) and isinstance(doc.get(key), list):
                out += doc[key]
    except Exception:
        pass
    return out


def _drop_collection(handler: Any, db_name: str, coll: str) -> bool:
    """Drop ``db_name.coll`` and log drop + invalidate; False if it did not exist."""
    database = handler.get_database(db_name)
    if coll not in database.list_collection_names():
        return False
    _untrack(handler._change_stream_manager, db_name, coll)
    database.drop_collection(coll)
    ns = {"db": db_name, "coll": coll}
    _append_lifecycle(database, [(coll, "drop", {"ns": ns}), (coll, "invalidate", None)])
    return True


def _handle_drop(handler: Any, request_id: Any, cmd: dict[str, Any]):
    """``drop``: as MongoDB, a collection stream sees drop then invalidate."""
    coll = cmd.get("drop")
    db_name = cmd.get("$db", "test")
    if not isinstance(coll, str) or handler._is_gridfs_collection(coll) or coll.startswith("sqlite_"):
        return None  # nx's own handling (errors, GridFS buckets)
    with handler._lock_for(db_name):
        _drop_collection(handler, db_name, coll)
    return request_id, {"ok": 1}


def _handle_drop_database(handler: Any, request_id: Any, cmd: dict[str, Any]):
    """``dropDatabase``: every collection is dropped as by ``drop`` (a stream
    on one sees drop then invalidate).  Unlike nx, the database's change log
    survives (MongoDB's oplog is not part of the database), so tokens issued
    before stay valid and ordered with the ones after."""
    db_name = cmd.get("$db", "test")
    if handler._mode == "single":
        return None  # one file holds every database: nx's own (lossy) way
    with handler._lock_for(db_name):
        database = handler.get_database(db_name)
        for coll in database.list_collection_names():
            _drop_collection(handler, db_name, coll)
        # Read by database-level streams only (_pull_database_stream).
        _append_lifecycle(
            database,
            [(_DB_ROWS, "dropDatabase", {"ns": {"db": db_name}}), (_DB_ROWS, "invalidate", None)],
        )
    return request_id, {"dropped": db_name, "ok": 1}


def _pull_database_stream(manager: Any, stream: Any, batch_size: int):
    """A database-level stream (``db.watch()``, ``aggregate: 1``): nx records
    no document changes for it, but it gets the database's lifecycle events
    as MongoDB sends them: ``drop`` and ``rename`` of its collections (they do
    not invalidate it), and on dropDatabase, after a ``drop`` per collection,
    ``dropDatabase`` then ``invalidate``."""
    batch: list[dict[str, Any]] = []
    handler = getattr(manager, "_nx_launcher_handler", None)
    if handler is None:
        return batch, nx_cs._wire_token(stream._watermark)
    try:
        rows = handler.get_database(stream.db_name).db.execute(
            "SELECT id, operation, collection_name, document_data, timestamp "
            "FROM _neosqlite_changestream WHERE id > ? AND (operation IN ('drop', 'rename') "
            "OR collection_name = ?) ORDER BY id LIMIT ?",
            (stream._watermark, _DB_ROWS, batch_size),
        ).fetchall()
    except Exception as exc:
        logger.debug("database stream pull skipped: %s", exc)
        return batch, nx_cs._wire_token(stream._watermark)
    high = stream._watermark
    for rowid, operation, coll, data, ts in rows:
        rowid = int(rowid)
        high = rowid
        event = _lifecycle_event(stream, rowid, operation, data, _row_time(ts))
        if operation == "rename" and event.get("ns", {}).get("coll") != coll:
            continue  # the copy of a rename logged for the target's streams
        if operation == "invalidate":
            batch.append(event)
            stream._last_token_id = rowid
            stream._nx_launcher_invalidated = True
            break
        if nx_cs._pipeline_matches(event, stream.pipeline):
            batch.append(event)
            stream._last_token_id = rowid
    stream._watermark = high
    return batch, nx_cs._wire_token(stream._watermark)


def _split_ns(ns: Any) -> tuple[str, str] | None:
    if not isinstance(ns, str) or "." not in ns:
        return None
    db_name, coll = ns.split(".", 1)
    return (db_name, coll) if db_name and coll else None


def _command_error(code: int, code_name: str, errmsg: str) -> dict[str, Any]:
    return {"ok": 0, "errmsg": errmsg, "code": code, "codeName": code_name}


def _handle_rename(handler: Any, request_id: Any, cmd: dict[str, Any]):
    """``renameCollection`` (sent to admin with full names; nx renamed inside
    the admin database and ignored ``dropTarget``).  Streams on the source and
    on the target both see ``rename`` (ns = source, to = target) then
    ``invalidate``; with ``dropTarget`` the replaced target gets no separate
    drop event (MongoDB's behaviour, SERVER-53478)."""
    src, dst = _split_ns(cmd.get("renameCollection")), _split_ns(cmd.get("to"))
    if src is None or dst is None:
        return request_id, _command_error(73, "InvalidNamespace", "renameCollection needs full names")
    if src[0] != dst[0]:
        return request_id, _command_error(
            20, "IllegalOperation", "launcher: renameCollection across databases is not supported"
        )
    db_name, (a, b) = src[0], (src[1], dst[1])
    with handler._lock_for(db_name):
        database = handler.get_database(db_name)
        names = database.list_collection_names()
        if a not in names:
            return request_id, _command_error(26, "NamespaceNotFound", "source namespace does not exist")
        if a == b:
            return request_id, _command_error(20, "IllegalOperation", "Can't rename a collection to itself")
        if b in names and not cmd.get("dropTarget"):
            return request_id, _command_error(48, "NamespaceExists", "target namespace exists")
        manager = handler._change_stream_manager
        _untrack(manager, db_name, a)
        _untrack(manager, db_name, b)
        if b in names:
            database.drop_collection(b)
        database.rename_collection(a, b)
        extra = {"ns": {"db": db_name, "coll": a}, "to": {"db": db_name, "coll": b}}
        _append_lifecycle(
            database,
            [(a, "rename", extra), (a, "invalidate", None), (b, "rename", extra), (b, "invalidate", None)],
        )
    return request_id, {"ok": 1}


# ---------------------------------------------------------------------------
# Command-level wrapper: token check, awaitData, CursorNotFound
# ---------------------------------------------------------------------------

_write_cond = threading.Condition()
_write_gen = 0
_shutdown = threading.Event()


def _bump() -> None:
    global _write_gen
    with _write_cond:
        _write_gen += 1
        _write_cond.notify_all()


def _body(msg: Any) -> dict[str, Any] | None:
    try:
        for kind, doc in msg.get("sections", []):
            if kind == "body" and isinstance(doc, dict):
                return doc
    except Exception:
        pass
    return None


def _change_stream_token(cmd: dict[str, Any]) -> tuple[str | None, Any]:
    """(``"resumeAfter"``/``"startAfter"``/None, token) of a change-stream aggregate."""
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        return None, None
    for stage in pipeline:
        if isinstance(stage, dict) and "$changeStream" in stage:
            opts = stage["$changeStream"]
            if not isinstance(opts, dict):
                return None, None
            for option in ("resumeAfter", "startAfter"):
                if opts.get(option) is not None:
                    return option, opts[option]
            return None, None
    return None, None


# ---------------------------------------------------------------------------
# k. serverStatus.opcounters
# ---------------------------------------------------------------------------

_opcounters = {"insert": 0, "query": 0, "update": 0, "delete": 0, "getmore": 0, "command": 0}
_opcounters_lock = threading.Lock()
_OPCOUNTER_OF = {"find": "query", "getMore": "getmore", "insert": "insert",
                 "update": "update", "delete": "delete"}
_OPCOUNTER_LIST = {"insert": "documents", "update": "updates", "delete": "deletes"}


def _count_op(cmd: dict[str, Any], msg: Any) -> None:
    name = next(iter(cmd), None)
    kind = _OPCOUNTER_OF.get(name, "command")
    n = 1
    if kind in _OPCOUNTER_LIST:
        items = cmd.get(_OPCOUNTER_LIST[kind])
        if not isinstance(items, list):
            # Sent as a document sequence (OP_MSG kind 1 section).
            items = []
            try:
                for k, docs in msg.get("sections", []):
                    if k == "body":
                        continue
                    if isinstance(docs, dict):
                        docs = [v for v in docs.values() if isinstance(v, list)]
                        docs = [d for v in docs for d in v]
                    if isinstance(docs, (list, tuple)):
                        items.extend(docs)
            except Exception:
                items = []
        n = len(items) or 1
    with _opcounters_lock:
        _opcounters[kind] += n


def _opcounters_now() -> dict[str, Any]:
    with _opcounters_lock:
        return {k: Int64(v) for k, v in _opcounters.items()}


_network = {"bytesIn": 0, "bytesOut": 0, "numRequests": 0}


def _count_bytes(kind: str, n: int) -> None:
    with _opcounters_lock:
        _network[kind] += n
        if kind == "bytesIn":
            _network["numRequests"] += 1


def _network_now() -> dict[str, Any]:
    with _opcounters_lock:
        return {k: Int64(v) for k, v in _network.items()}


def _extra_info_now() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "note": "fields vary by platform",
        "user_time_us": Int64(int(usage.ru_utime * 1e6)),
        "system_time_us": Int64(int(usage.ru_stime * 1e6)),
    }


def _counting_parse(parse):
    def parse_counted(message_bytes):
        _count_bytes("bytesIn", len(message_bytes))
        return parse(message_bytes)

    return staticmethod(parse_counted)


_orig_handle_command = nx_handler.NeoSQLiteHandler.handle_command
_orig_handle_insert = nx_handler.NeoSQLiteHandler.handle_insert
_orig_handle_query = nx_handler.NeoSQLiteHandler.handle_query


def _rewrite_start_at(self, cmd: dict[str, Any], db_name: str) -> None:
    """j. startAtOperationTime -> resumeAfter of the change before that time."""
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        return
    for stage in pipeline:
        opts = stage.get("$changeStream") if isinstance(stage, dict) else None
        if not isinstance(opts, dict):
            continue
        at = opts.get("startAtOperationTime")
        if not isinstance(at, Timestamp):
            return
        conn = self.get_database(db_name).db
        coll = str(cmd.get("aggregate"))
        if at.inc > 0:
            first = _scalar(
                conn,
                "SELECT MIN(id) FROM _neosqlite_changestream WHERE collection_name = ? AND id >= ?",
                (coll, int(at.inc)),
            )
        else:
            when = datetime.fromtimestamp(at.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            first = _scalar(
                conn,
                "SELECT MIN(id) FROM _neosqlite_changestream WHERE collection_name = ? AND timestamp >= ?",
                (coll, when),
            )
        if first is None:
            first = int(_scalar(
                conn,
                "SELECT seq FROM sqlite_sequence WHERE name = '_neosqlite_changestream'",
            ) or 0) + 1
        del opts["startAtOperationTime"]
        opts["resumeAfter"] = nx_cs._wire_token(int(first) - 1)
        return


def _oplog_entries(self) -> list[tuple[datetime, int, str, str, str]]:
    """Oldest and newest retained change-log rows of every tracked collection."""
    manager = self._change_stream_manager
    with manager._lock:
        trackers = list(manager._trackers.items())
    seen: set[int] = set()
    out = []
    for (db_name, _coll), tracker in trackers:
        conn = tracker["collection"].db
        if id(conn) in seen:
            continue
        seen.add(id(conn))
        with self._lock_for(db_name):
            for order in ("ASC", "DESC"):
                try:
                    row = conn.execute(
                        "SELECT id, timestamp, operation, collection_name "
                        f"FROM _neosqlite_changestream ORDER BY id {order} LIMIT 1"
                    ).fetchone()
                except Exception:
                    row = None
                if row:
                    out.append((_row_time(row[1]), int(row[0]), str(row[2]), db_name, str(row[3])))
    return out


def _oplog_reply(self, cmd: dict[str, Any]) -> dict[str, Any]:
    entries = _oplog_entries(self)
    sort = cmd.get("sort") or {}
    newest = isinstance(sort, dict) and sort.get("$natural", 1) < 0
    batch = []
    if entries:
        when, rowid, op, db_name, coll = (max if newest else min)(entries, key=lambda e: (e[0], e[1]))
        batch.append(
            {
                "ts": Timestamp(int(when.timestamp()), rowid % (2**32)),
                "wall": when,
                "op": {"insert": "i", "update": "u", "delete": "d"}.get(op, "n"),
                "ns": f"{db_name}.{coll}",
            }
        )
    return {
        "cursor": {"id": Int64(0), "ns": "local.oplog.rs", "firstBatch": to_bson_types(batch)},
        "ok": 1,
    }

def hashed_index_key(value: Any) -> int | None:
    """m. MongoDB's hashed-index hash of a value (None: type not supported)."""
    import hashlib

    if isinstance(value, bool):
        ctype, data = 40, b"\x01" if value else b"\x00"
    elif isinstance(value, (int, float, Int64)) and not isinstance(value, bool):
        ctype, data = 10, struct.pack("<q", int(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        ctype, data = 15, struct.pack("<i", len(raw) + 1) + raw + b"\x00"
    elif isinstance(value, (BsonObjectId, NeoObjectId)):
        ctype, data = 35, bytes(BsonObjectId(str(value)).binary)
    elif isinstance(value, datetime):
        ms = int(value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp() * 1000)
        ctype, data = 45, struct.pack("<q", ms)
    elif value is None:
        ctype, data = 5, b""
    else:
        return None
    digest = hashlib.md5(struct.pack("<i", 0) + struct.pack("<i", ctype) + data).digest()
    return struct.unpack("<q", digest[:8])[0]


_MISSING = object()


def _eval_expr(expr: Any, doc: dict[str, Any]) -> Any:
    """m. The subset of aggregation expressions partitioned streams use."""
    if isinstance(expr, str) and expr.startswith("$"):
        cur: Any = doc
        for part in expr[1:].split("."):
            if not isinstance(cur, dict) or part not in cur:
                return None
            cur = cur[part]
        return cur
    if isinstance(expr, dict) and len(expr) == 1:
        (op, arg), = expr.items()
        if op == "$toHashedIndexKey":
            return hashed_index_key(_eval_expr(arg, doc))
        args = [_eval_expr(a, doc) for a in (arg if isinstance(arg, list) else [arg])]
        if op == "$eq" and len(args) == 2:
            return args[0] == args[1]
        if any(a is None for a in args):
            return None
        if op == "$add":
            return sum(args)
        if op == "$mod" and len(args) == 2 and args[1] != 0:
            r = abs(int(args[0])) % abs(int(args[1]))
            return -r if args[0] < 0 else r
        raise ValueError(f"unsupported expression operator {op}")
    return expr


def _uses_hash(expr: Any) -> bool:
    if isinstance(expr, dict):
        return "$toHashedIndexKey" in expr or any(_uses_hash(v) for v in expr.values())
    if isinstance(expr, list):
        return any(_uses_hash(v) for v in expr)
    return False


_orig_pipeline_matches = nx_cs._pipeline_matches


def _pipeline_matches(change: dict[str, Any], pipeline: list[dict[str, Any]]) -> bool:
    """m. ``$match`` stages with a hashed ``$expr`` are evaluated here."""
    rest = []
    for stage in pipeline:
        spec = stage.get("$match") if isinstance(stage, dict) else None
        if isinstance(spec, dict) and "$expr" in spec and _uses_hash(spec["$expr"]):
            if _eval_expr(spec["$expr"], change) is not True:
                return False
            others = {k: v for k, v in spec.items() if k != "$expr"}
            if others:
                rest.append({"$match": others})
        else:
            rest.append(stage)
    return _orig_pipeline_matches(change, rest)


nx_cs._pipeline_matches = _pipeline_matches


def _fix_hashed_find(handler: Any, cmd: dict[str, Any]) -> None:
    """m. ``find`` with a hashed ``$expr``: replaced by the ``_id``s it selects."""
    coll_name = cmd.get("find")
    query = cmd.get("filter")
    if not isinstance(coll_name, str) or not isinstance(query, dict):
        return
    expr = query.get("$expr")
    if expr is None or not _uses_hash(expr):
        return
    db_name = cmd.get("$db", "test")
    ids: list[Any] = []
    with handler._lock_for(db_name):
        database = handler.get_database(db_name)
        if coll_name in database.list_collection_names():
            for doc in database[coll_name].find({}, {"_id": 1}):
                if _eval_expr(expr, doc) is True:
                    ids.append(doc["_id"])
    others = {k: v for k, v in query.items() if k != "$expr"}
    selected = {"_id": {"$in": ids}}
    cmd["filter"] = {"$and": [others, selected]} if others else selected


def _and_or(query: Any) -> Any:
    """l. ``{a: 1, $or: [...]}`` -> ``{$and: [{a: 1}, {$or: [...]}]}``."""
    if not isinstance(query, dict) or "$or" not in query or len(query) < 2:
        return query
    parts = [{k: v} for k, v in query.items() if k != "$or"]
    return {"$and": parts + [{"$or": query["$or"]}]}


def _fix_queries(cmd: dict[str, Any], msg: Any) -> None:
    """l. Rewrites the queries of findAndModify, update and delete in place
    (command body and OP_MSG document sequences)."""
    if "findAndModify" in cmd or "findandmodify" in cmd:
        if "query" in cmd:
            cmd["query"] = _and_or(cmd["query"])
    for command, key in (("update", "updates"), ("delete", "deletes")):
        if command in cmd:
            for op in list(cmd.get(key) or []) + _payload_docs(msg, key):
                if isinstance(op, dict) and "q" in op:
                    op["q"] = _and_or(op["q"])


def _handle_command(self, msg):
    cmd = _body(msg)
    if cmd is None:
        return _orig_handle_command(self, msg)
    try:
        _fix_queries(cmd, msg)
    except Exception as exc:
        logger.warning("cannot rewrite a $or query: %s", exc)
    try:
        _fix_hashed_find(self, cmd)
    except Exception as exc:
        logger.warning("cannot evaluate a hashed $expr: %s", exc)
    request_id = msg.get("request_id", 0)
    db_name = cmd.get("$db", "test")
    _count_op(cmd, msg)
    if "serverStatus" in cmd:
        rid, reply = _orig_handle_command(self, msg)
        if isinstance(reply, dict) and reply.get("ok"):
            reply["opcounters"] = _opcounters_now()
            reply["network"] = _network_now()
            reply["extra_info"] = _extra_info_now()
        return rid, reply

    if db_name == "local" and cmd.get("find") == "oplog.rs":
        try:
            return request_id, _oplog_reply(self, cmd)
        except Exception as exc:  # pragma: no cover - never break the server
            logger.warning("oplog emulation failed: %s", exc)
            return request_id, {"cursor": {"id": Int64(0), "ns": "local.oplog.rs", "firstBatch": []}, "ok": 1}

    if "aggregate" in cmd:
        try:
            with self._lock_for(nx_handler._msg_db_name(msg)):
                _rewrite_start_at(self, cmd, db_name)
        except Exception as exc:
            logger.warning("startAtOperationTime emulation failed: %s", exc)
        option, token = _change_stream_token(cmd)
        if option is not None:
            with self._lock_for(nx_handler._msg_db_name(msg)):
                database = self.get_database(db_name)
                # i. MongoDB refuses resumeAfter (not startAfter) an invalidate.
                if option == "resumeAfter" and is_invalidate_token(database, token):
                    return request_id, _invalid_resume_reply()
                try:
                    lost = resume_token_lost(database, cmd.get("aggregate"), token)
                except Exception as exc:
                    logger.warning("resume token check failed: %s", exc)
                    lost = False
                if lost:
                    return request_id, _history_lost_reply()
                return _orig_handle_command(self, msg)
        return _finish_write(self, msg)

    # i. Lifecycle commands, performed by the launcher so that they are logged.
    for name, handle in (
        ("drop", _handle_drop),
        ("dropDatabase", _handle_drop_database),
        ("renameCollection", _handle_rename),
    ):
        if name in cmd:
            try:
                done = handle(self, request_id, cmd)
            finally:
                _bump()  # wake waiting getMores: they may have events now
            if done is not None:
                return done
            return _finish_write(self, msg)

    if "getMore" in cmd:
        try:
            cursor_id = int(cmd.get("getMore"))
        except (TypeError, ValueError):
            return _orig_handle_command(self, msg)
        manager = self._change_stream_manager
        if manager.get_stream(cursor_id) is None:
            with self._cursors_lock:
                known = cursor_id in self._cursors
            if not known:
                return request_id, _cursor_not_found(cursor_id)
            return _orig_handle_command(self, msg)
        try:
            wait_ms = int(cmd.get("maxTimeMS", _DEFAULT_AWAIT_MS))
        except (TypeError, ValueError):
            wait_ms = _DEFAULT_AWAIT_MS
        deadline = time.monotonic() + max(wait_ms, 0) / 1000.0
        while True:
            stream = manager.get_stream(cursor_id)
            if stream is None:
                return request_id, _cursor_not_found(cursor_id)
            with _write_cond:
                seen = _write_gen
            rid, reply = _orig_handle_command(self, msg)
            cursor = reply.get("cursor") if isinstance(reply, dict) else None
            if getattr(stream, "_nx_launcher_invalidated", False) and isinstance(cursor, dict):
                # i. The batch ends with the invalidate event: the cursor is
                # exhausted (id 0) and gone, a further getMore gets CursorNotFound.
                cursor["id"] = Int64(0)
                manager.close_stream(cursor_id)
                return rid, reply
            if not isinstance(cursor, dict) or cursor.get("nextBatch"):
                return rid, reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or _shutdown.is_set():
                return rid, reply
            with _write_cond:
                if _write_gen == seen:
                    _write_cond.wait(min(remaining, 0.5))

    _retrack(self, msg)
    return _finish_write(self, msg)


def _retrack(self, msg) -> None:
    """i. See _retrack_before_write (OP_MSG writes reach handle_command or,
    with document sequences, handle_insert)."""
    cmd = _body(msg)
    if cmd is None:
        return
    try:
        with self._lock_for(nx_handler._msg_db_name(msg)):
            _retrack_before_write(self, cmd, msg)
    except Exception as exc:
        logger.warning("cannot re-track before a write: %s", exc)


def _finish_write(self, msg):
    try:
        return _orig_handle_command(self, msg)
    finally:
        _bump()


def _handle_insert(self, msg):
    _retrack(self, msg)
    _count_op(_body(msg) or {"insert": None}, msg)
    try:
        return _orig_handle_insert(self, msg)
    finally:
        _bump()


def _handle_query(self, msg):
    try:
        return _orig_handle_query(self, msg)
    finally:
        _bump()


_orig_handler_init = nx_handler.NeoSQLiteHandler.__init__


def _handler_init(self, *args, **kwargs):
    _orig_handler_init(self, *args, **kwargs)
    self._change_stream_manager._nx_launcher_handler = self
    # (db, collection) pairs whose tracking a drop/rename ended (see _untrack)
    self._change_stream_manager._nx_launcher_retrack = set()


def _signal_exit_handler(signum, frame):
    """nx's SIGTERM/SIGINT handler, plus: end waiting getMores at once (the
    executor threads are joined on exit)."""
    _shutdown.set()
    _bump()
    sys.exit(0)


_orig_run_server = nx_server.run_server


async def _run_server(host, port, handler):
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="nx")
    )
    await _orig_run_server(host, port, handler)


def apply_patches() -> None:
    nx_wire.ResponseBuilder.build_op_msg_reply = staticmethod(_build_op_msg_reply)
    nx_wire.ResponseBuilder.build_reply = staticmethod(_build_reply)
    nx_wire.OP_MSG.parse = _counting_parse(nx_wire.OP_MSG.parse)
    nx_wire.OP_QUERY.parse = _counting_parse(nx_wire.OP_QUERY.parse)
    nx_cs.ChangeStreamManager.pull_stream = _pull_stream
    nx_cs.ChangeStreamManager.ensure_tracked = _ensure_tracked
    nx_cs.ChangeStreamManager.create_stream = _create_stream
    nx_handler.NeoSQLiteHandler.__init__ = _handler_init
    nx_handler.NeoSQLiteHandler.handle_command = _handle_command
    nx_handler.NeoSQLiteHandler.handle_insert = _handle_insert
    nx_handler.NeoSQLiteHandler.handle_query = _handle_query
    nx_server.run_server = _run_server
    nx_daemon._signal_exit_handler = _signal_exit_handler


def _default_args(argv: list[str]) -> list[str]:
    def given(*names: str) -> bool:
        return any(a == n or a.startswith(n + "=") for a in argv for n in names)

    port = "27017"
    for i, a in enumerate(argv):
        if a in ("-p", "--port") and i + 1 < len(argv):
            port = argv[i + 1]
        elif a.startswith("--port="):
            port = a.split("=", 1)[1]
    out = list(argv)
    if not given("--pid-file"):
        # nx refuses to start while its pid file names a live process; a server
        # killed with SIGKILL leaves one behind.  The port bind alone decides.
        pid_file = os.path.join(tempfile.gettempdir(), f"nx_launcher_{port}.pid")
        try:
            os.unlink(pid_file)
        except OSError:
            pass
        out += ["--pid-file", pid_file]
    if not given("--log-file"):
        out += ["--log-file", os.devnull]
    return out


def main() -> None:
    apply_patches()
    from nx_27017.nx_27017 import main as nx_main

    sys.argv = [sys.argv[0]] + _default_args(sys.argv[1:])
    nx_main()


if __name__ == "__main__":
    main()
