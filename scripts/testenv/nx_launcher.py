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
i. ``serverStatus`` reports ``opcounters`` (insert, query, update, delete,
   getmore, command) like MongoDB, counted per command received (an insert
   command counts its documents, update/delete their statements), so a
   benchmark can count the operations a client costs the server.

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
- Only collection-level streams deliver events (database/cluster ``watch`` get
  none); dropping or renaming a collection emits no drop/invalidate event, and
  a stream open across a drop/re-create sees no further events.
- Change tracking for a collection starts when the first stream on it is
  opened (writes before that are in no history).
- ``startAtOperationTime`` is ignored (starts now); ``$changeStream``
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
import logging
import os
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
    if tracker is None:
        return batch, nx_cs._wire_token(stream._watermark)
    collection = tracker["collection"]
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
    tracker = _orig_ensure_tracked(self, db_name, collection_name, get_collection)
    if tracker is not None:
        try:
            _install_horizon(tracker["collection"].db)
        except Exception as exc:
            logger.warning("cannot install change-log horizon trigger: %s", exc)
    return tracker


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


def _change_stream_token(cmd: dict[str, Any]) -> tuple[bool, Any]:
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        return False, None
    for stage in pipeline:
        if isinstance(stage, dict) and "$changeStream" in stage:
            opts = stage["$changeStream"]
            if not isinstance(opts, dict):
                return False, None
            if opts.get("resumeAfter") is not None:
                return True, opts["resumeAfter"]
            if opts.get("startAfter") is not None:
                return True, opts["startAfter"]
            return False, None
    return False, None


# ---------------------------------------------------------------------------
# i. serverStatus.opcounters
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


_orig_handle_command = nx_handler.NeoSQLiteHandler.handle_command
_orig_handle_insert = nx_handler.NeoSQLiteHandler.handle_insert
_orig_handle_query = nx_handler.NeoSQLiteHandler.handle_query


def _handle_command(self, msg):
    cmd = _body(msg)
    if cmd is None:
        return _orig_handle_command(self, msg)
    request_id = msg.get("request_id", 0)
    db_name = cmd.get("$db", "test")
    _count_op(cmd, msg)
    if "serverStatus" in cmd:
        rid, reply = _orig_handle_command(self, msg)
        if isinstance(reply, dict) and reply.get("ok"):
            reply["opcounters"] = _opcounters_now()
        return rid, reply

    if "aggregate" in cmd:
        has_token, token = _change_stream_token(cmd)
        if has_token:
            with self._lock_for(nx_handler._msg_db_name(msg)):
                try:
                    lost = resume_token_lost(
                        self.get_database(db_name), cmd.get("aggregate"), token
                    )
                except Exception as exc:
                    logger.warning("resume token check failed: %s", exc)
                    lost = False
                if lost:
                    return request_id, _history_lost_reply()
                return _orig_handle_command(self, msg)
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
            if manager.get_stream(cursor_id) is None:
                return request_id, _cursor_not_found(cursor_id)
            with _write_cond:
                seen = _write_gen
            rid, reply = _orig_handle_command(self, msg)
            cursor = reply.get("cursor") if isinstance(reply, dict) else None
            if not isinstance(cursor, dict) or cursor.get("nextBatch"):
                return rid, reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or _shutdown.is_set():
                return rid, reply
            with _write_cond:
                if _write_gen == seen:
                    _write_cond.wait(min(remaining, 0.5))

    return _finish_write(self, msg)


def _finish_write(self, msg):
    try:
        return _orig_handle_command(self, msg)
    finally:
        _bump()


def _handle_insert(self, msg):
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
    nx_cs.ChangeStreamManager.pull_stream = _pull_stream
    nx_cs.ChangeStreamManager.ensure_tracked = _ensure_tracked
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
