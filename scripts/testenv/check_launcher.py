#!/usr/bin/env python3
"""Self-check of nx_launcher.py's reply corrections against a running server.

    .venv-test/bin/python scripts/testenv/check_launcher.py "$EVENTSYNC_TEST_MONGODB_URI"

Each check asserts one correction listed at the top of nx_launcher.py.  Uses
fresh collections (random suffix), so it can run against a server in use.
Exits non-zero on the first failure.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
import uuid

import bson
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import MongoClient, monitoring
from pymongo.errors import OperationFailure

HISTORY_LOST = 286
CURSOR_NOT_FOUND = 43
RAW = CodecOptions(document_class=RawBSONDocument, tz_aware=True)


class Replies(monitoring.CommandListener):
    """Records every command reply as the driver decoded it."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def started(self, event):
        pass

    def succeeded(self, event):
        with self.lock:
            self.replies.append((event.command_name, event.reply))

    def failed(self, event):
        pass

    def take(self) -> list[tuple[str, dict]]:
        with self.lock:
            out, self.replies = self.replies, []
        return out


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def ok(what: str) -> None:
    print(f"ok   {what}")


class RawStream:
    """A change stream driven by explicit aggregate/getMore commands, so every
    reply field (and its BSON type) is visible."""

    def __init__(self, db, coll: str, max_time_ms: int = 100, raw: bool = False, **opts) -> None:
        self.db = db
        self.coll = coll
        self.max_time_ms = max_time_ms
        self.codec = RAW if raw else CodecOptions()
        reply = db.command(
            "aggregate", coll, pipeline=self._pipeline(opts), cursor={}, codec_options=self.codec
        )
        cursor = reply["cursor"]
        check(type(cursor["id"]) is Int64, f"aggregate cursor.id is Int64 ({type(cursor['id'])})")
        check("postBatchResumeToken" in cursor, "aggregate reply has postBatchResumeToken")
        self.id = cursor["id"]
        self.pbrt = cursor["postBatchResumeToken"]
        self.first = list(cursor["firstBatch"])

    @staticmethod
    def _pipeline(opts: dict) -> list:
        extra = opts.pop("match", None)
        pipeline = [{"$changeStream": opts}]
        if extra is not None:
            pipeline.append({"$match": extra})
        return pipeline

    @property
    def getmore_coll(self) -> str:
        """getMore's ``collection``: a database-level stream (aggregate: 1) has none."""
        return self.coll if isinstance(self.coll, str) else "$cmd.aggregate"

    def get_more(self, max_time_ms: int | None = None, batch_size: int | None = None) -> list:
        kwargs = {"collection": self.getmore_coll, "maxTimeMS": max_time_ms or self.max_time_ms}
        if batch_size:
            kwargs["batchSize"] = batch_size
        reply = self.db.command("getMore", self.id, codec_options=self.codec, **kwargs)
        cursor = reply["cursor"]
        check(type(cursor["id"]) is Int64, "getMore cursor.id is Int64")
        check(cursor["id"] == self.id, "change stream cursor stays open")
        check("postBatchResumeToken" in cursor, "getMore reply has postBatchResumeToken")
        self.pbrt = cursor["postBatchResumeToken"]
        return list(cursor["nextBatch"])

    def drain(self, expect: int | None = None, timeout: float = 20.0) -> list:
        events: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.get_more()
            events += batch
            if expect is not None and len(events) >= expect:
                break
            if expect is None and not batch:
                break
        if expect is not None:
            check(len(events) == expect, f"expected {expect} events, got {len(events)}")
        return events

    def kill(self) -> dict:
        return self.db.command("killCursors", self.coll, cursors=[self.id])

    def until_closed(self, timeout: float = 20.0) -> list:
        """getMore until the server closes the cursor (id 0, as after an
        invalidate event); returns every event read on the way."""
        events: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.db.command("getMore", self.id, collection=self.getmore_coll,
                                    maxTimeMS=self.max_time_ms, codec_options=self.codec)
            cursor = reply["cursor"]
            check(type(cursor["id"]) is Int64, "getMore cursor.id is Int64")
            self.pbrt = cursor["postBatchResumeToken"]
            events += list(cursor["nextBatch"])
            if cursor["id"] == 0:
                return events
            check(cursor["id"] == self.id, "change stream cursor stays open until closed")
        raise AssertionError(f"cursor not closed within {timeout}s; events so far: {events}")


def token_rowid(token) -> int:
    return int(token["_data"].split(":")[1])


def check_event_shape(ev: dict, coll: str, dbname: str) -> None:
    """Fields the Rust driver's typed ChangeStreamEvent<Document> decodes."""
    check(isinstance(ev["_id"], dict), "event _id is a document")
    check(isinstance(ev["operationType"], str), "operationType is a string")
    check(type(ev["clusterTime"]) is Timestamp, f"clusterTime is Timestamp ({type(ev['clusterTime'])})")
    check(isinstance(ev["wallTime"], datetime.datetime), "wallTime is a datetime")
    check(ev["ns"] == {"db": dbname, "coll": coll}, f"ns is {{db, coll}}: {ev['ns']}")
    check(isinstance(ev["documentKey"], dict) and "_id" in ev["documentKey"], "documentKey has _id")
    check("updateDescription" not in ev, "no updateDescription field (nx sent null)")
    if ev["operationType"] == "delete":
        check("fullDocument" not in ev, "delete event has no fullDocument")


INVALID_RESUME_TOKEN = 260


def check_lifecycle_event(ev: dict, op: str, ns: dict | None, to: dict | None = None) -> None:
    """A lifecycle event has exactly the fields MongoDB's change-event pages list
    (drop/rename/invalidate; collectionUUID, lsid and txnNumber aside)."""
    check(ev["operationType"] == op, f"operationType {op}: {ev}")
    check(isinstance(ev["_id"], dict) and set(ev["_id"]) == {"_data"}, f"{op}: _id is a {{_data}} token")
    token_rowid(ev["_id"])  # in the launcher's nx:<row id> scheme
    check(type(ev["clusterTime"]) is Timestamp, f"{op}: clusterTime is a Timestamp")
    check(isinstance(ev["wallTime"], datetime.datetime), f"{op}: wallTime is a datetime")
    want = {"_id", "operationType", "clusterTime", "wallTime"}
    if ns is not None:
        want.add("ns")
        check(ev["ns"] == ns, f"{op}: ns {ev['ns']} == {ns}")
    if to is not None:
        want.add("to")
        check(ev["to"] == to, f"{op}: to {ev['to']} == {to}")
    check(set(ev) == want, f"{op}: fields {sorted(ev)} == {sorted(want)} (no documentKey/fullDocument)")


def check_ordered(events: list) -> None:
    """Tokens and clusterTimes of consecutive events strictly increase."""
    rows = [token_rowid(e["_id"]) for e in events]
    check(rows == sorted(set(rows)), f"tokens strictly increasing: {rows}")
    times = [e["clusterTime"] for e in events]
    check(all(a < b for a, b in zip(times, times[1:])), f"clusterTime strictly increasing: {times}")


def expect_closed(db, stream: "RawStream") -> None:
    """After the invalidate batch the cursor is gone: getMore -> CursorNotFound."""
    try:
        db.command("getMore", stream.id, collection=stream.getmore_coll, maxTimeMS=50)
        check(False, "getMore after an invalidate must fail")
    except OperationFailure as exc:
        check(exc.code == CURSOR_NOT_FOUND, f"getMore after invalidate: code 43, got {exc.code}")


def check_lifecycle(client, suffix: str) -> None:
    """i. drop / renameCollection / dropDatabase events, invalidate, resume."""
    db = client[f"launcher_life_{suffix}"]
    dbname = db.name
    coll = db["life"]
    ns = {"db": dbname, "coll": coll.name}

    # -- drop: drop then invalidate; the batch closes the cursor ---------------
    coll.insert_one({"_id": 0})
    live = RawStream(db, coll.name, fullDocument="updateLookup")
    behind = RawStream(db, coll.name)  # reads nothing before the drop
    coll.insert_one({"_id": 1, "v": Int64(2**40)})
    first = live.drain(expect=1)
    coll.drop()
    tail = live.until_closed()
    check([e["operationType"] for e in tail] == ["drop", "invalidate"], f"drop -> drop, invalidate: {tail}")
    check_lifecycle_event(tail[0], "drop", ns)
    check_lifecycle_event(tail[1], "invalidate", None)
    check_ordered(first + tail)
    check(live.pbrt == tail[1]["_id"], "postBatchResumeToken of the last batch == the invalidate token")
    expect_closed(db, live)
    # a stream that had not yet read the insert still gets it, exact-typed, then drop/invalidate
    late = behind.until_closed()
    check([e["operationType"] for e in late] == ["insert", "drop", "invalidate"], f"lagging stream: {late}")
    check(type(late[0]["fullDocument"]["v"]) is Int64, "insert read after the drop keeps its types")
    check([e["_id"] for e in late[1:]] == [e["_id"] for e in tail], "both streams see the same drop/invalidate")
    check(coll.name not in db.list_collection_names(), "the collection is gone")
    drop_token, inval_token = tail[0]["_id"], tail[1]["_id"]
    reopened = RawStream(db, coll.name)
    check(coll.name not in db.list_collection_names(),
          "opening a stream on the dropped collection does not re-create it")
    check(token_rowid(reopened.pbrt) >= token_rowid(inval_token),
          "a stream opened after the drop starts after the invalidate")
    reopened.kill()
    # a stream far behind (>1000 changes, nx's retention) still reads every change before the drop
    slow = db["life_slow"]
    slow.insert_one({"_id": -1})
    lagging = RawStream(db, slow.name)
    slow.insert_many([{"_id": i} for i in range(1100)])
    slow.drop()
    got = lagging.until_closed(timeout=60)
    check([e["operationType"] for e in got] == ["insert"] * 1100 + ["drop", "invalidate"]
          and [e["documentKey"]["_id"] for e in got[:1100]] == list(range(1100)),
          f"lagging stream: 1100 inserts, drop, invalidate (got {len(got)} events)")
    # pymongo's watch() ends at the invalidate (no resume attempt on the closed cursor)
    wcoll = db["life_watch"]
    wcoll.insert_one({"_id": "w"})
    with wcoll.watch(max_await_time_ms=100) as cs:
        wcoll.insert_one({"_id": "w2"})
        wcoll.drop()
        seen_ops = []
        deadline = time.monotonic() + 20
        while cs.alive and time.monotonic() < deadline:
            ev = cs.try_next()
            if ev is not None:
                seen_ops.append(ev["operationType"])
        check(seen_ops == ["insert", "drop", "invalidate"] and not cs.alive,
              f"watch(): insert, drop, invalidate, then the stream is closed: {seen_ops} alive={cs.alive}")
    # a $match that filters document events out still gets the invalidate
    wcoll.insert_one({"_id": "m"})
    deletes_only = RawStream(db, wcoll.name, match={"operationType": "delete"})
    wcoll.drop()
    tail = deletes_only.until_closed()
    check([e["operationType"] for e in tail] == ["invalidate"], f"$match stream: only the invalidate: {tail}")

    ok("i. drop: a collection stream gets drop {_id, operationType, clusterTime, wallTime, ns} then "
       "invalidate {_id, operationType, clusterTime, wallTime}; that batch has cursor id 0, then "
       "CursorNotFound; a stream opened on the dropped collection does not re-create it")

    # -- resume around the drop --------------------------------------------------
    try:
        RawStream(db, coll.name, resumeAfter=inval_token).kill()
        check(False, "resumeAfter an invalidate token must fail")
    except OperationFailure as exc:
        check(exc.code == INVALID_RESUME_TOKEN and exc.details.get("codeName") == "InvalidResumeToken",
              f"resumeAfter invalidate: code 260 InvalidResumeToken, got {exc.code} {exc.details}")
        check("not allowed from an invalidate notification" in str(exc.details.get("errmsg")),
              f"resumeAfter invalidate: errmsg {exc.details.get('errmsg')}")
    again = RawStream(db, coll.name, resumeAfter=first[0]["_id"]).until_closed()
    check([e["_id"] for e in again] == [drop_token, inval_token],
          f"resumeAfter the last insert replays drop, invalidate and closes: {again}")
    again = RawStream(db, coll.name, resumeAfter=drop_token).until_closed()
    check([e["_id"] for e in again] == [inval_token], "resumeAfter the drop replays the invalidate")
    ok("i. resumeAfter an invalidate -> 260 InvalidResumeToken; resumeAfter earlier tokens replays "
       "up to the invalidate and closes again")

    # -- re-created collection: startAfter the invalidate, and fresh streams -------
    # The re-creating write happens while no stream is open on the collection.
    coll.insert_one({"_id": "re", "when": datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)})
    after = RawStream(db, coll.name, fullDocument="updateLookup", startAfter=inval_token)
    fresh = RawStream(db, coll.name)
    coll.insert_one({"_id": "re2"})
    got = after.drain(expect=2)
    check([e["documentKey"]["_id"] for e in got] == ["re", "re2"],
          f"startAfter the invalidate: the re-created collection's writes, first one included: {got}")
    check(token_rowid(got[0]["_id"]) > token_rowid(inval_token), "new tokens sort after the invalidate")
    check(isinstance(got[0]["fullDocument"]["when"], datetime.datetime), "re-created: exact types")
    got = fresh.drain(expect=1)
    check(got[0]["documentKey"]["_id"] == "re2", "a stream opened on the re-created collection sees new writes")
    after.kill()
    fresh.kill()
    ok("i. startAfter the invalidate continues with the re-created collection (also its first write, "
       "made with no stream open); a new stream on it sees its new events")

    # -- renameCollection, onto an existing target with dropTarget -----------------
    src, dst, other = db["ren_src"], db["ren_dst"], db["ren_other"]
    src.insert_many([{"_id": 1, "from": "src"}, {"_id": 2, "from": "src"}])
    dst.insert_one({"_id": 1, "from": "dst"})
    on_src, on_dst = RawStream(db, src.name), RawStream(db, dst.name)
    src_ns, dst_ns = {"db": dbname, "coll": src.name}, {"db": dbname, "coll": dst.name}
    try:
        src.rename(dst.name)
        check(False, "rename onto an existing collection without dropTarget must fail")
    except OperationFailure as exc:
        check(exc.code == 48, f"rename onto existing: NamespaceExists 48, got {exc.code}")
    try:
        db["ren_missing"].rename("ren_whatever")
        check(False, "rename of a missing collection must fail")
    except OperationFailure as exc:
        check(exc.code == 26, f"rename of a missing collection: NamespaceNotFound 26, got {exc.code}")
    src.rename(dst.name, dropTarget=True)
    for stream in (on_src, on_dst):
        tail = stream.until_closed()
        check([e["operationType"] for e in tail] == ["rename", "invalidate"],
              f"rename -> rename, invalidate on {stream.coll}: {tail}")
        check_lifecycle_event(tail[0], "rename", src_ns, to=dst_ns)
        check_lifecycle_event(tail[1], "invalidate", None)
        check_ordered(tail)
        expect_closed(db, stream)
        if stream is on_src:
            src_inval = tail[1]["_id"]
        else:
            dst_inval = tail[1]["_id"]
    names = db.list_collection_names()
    check(src.name not in names and dst.name in names, f"renamed: {names}")
    check(sorted(d["from"] for d in dst.find()) == ["src", "src"], "the target holds the source's documents")
    # writes after the rename land on the right stream
    on_dst2 = RawStream(db, dst.name, startAfter=dst_inval)
    on_src2 = RawStream(db, src.name, startAfter=src_inval)
    dst.update_one({"_id": 2}, {"$set": {"moved": True}})
    src.insert_one({"_id": "new-src"})
    got = on_dst2.drain(expect=1)
    check(got[0]["operationType"] == "update" and got[0]["ns"] == dst_ns and got[0]["documentKey"] == {"_id": 2},
          f"write to the renamed collection: on its new name only: {got}")
    got = on_src2.drain(expect=1)
    check(got[0]["operationType"] == "insert" and got[0]["ns"] == src_ns,
          f"re-created source name: its own insert only: {got}")
    on_dst2.kill()
    on_src2.kill()
    # plain rename to a new name: both sides still get rename + invalidate
    other.insert_one({"_id": 1})
    on_other, on_new = RawStream(db, other.name), RawStream(db, "ren_new")
    db.command("renameCollection", f"{dbname}.{other.name}", to=f"{dbname}.ren_new")
    for stream in (on_other, on_new):
        tail = stream.until_closed()
        check([e["operationType"] for e in tail] == ["rename", "invalidate"], f"plain rename: {tail}")
        check(tail[0]["to"] == {"db": dbname, "coll": "ren_new"}, "plain rename: to")
    ok("i. renameCollection (admin command, dropTarget honoured; 48/26 errors): streams on source and "
       "target get rename {.., ns: source, to: target} then invalidate; later writes go to the right stream")

    # -- dropDatabase ---------------------------------------------------------------
    gone = client[f"launcher_life_db_{suffix}"]
    whole_db = RawStream(gone, 1)  # a database-level stream (db.watch())
    gone["p"].insert_one({"_id": 1})
    gone["q"].insert_one({"_id": 1})
    gone["s"].insert_one({"_id": 1})
    on_p, on_q = RawStream(gone, "p"), RawStream(gone, "q")
    gone["p"].insert_one({"_id": 2})
    before = on_p.drain(expect=1)
    gone["s"].rename("t")
    client.drop_database(gone.name)
    # database stream: rename (no invalidate), a drop per collection, dropDatabase, invalidate
    db_events = whole_db.until_closed()
    ops = [e["operationType"] for e in db_events]
    check(ops == ["rename", "drop", "drop", "drop", "dropDatabase", "invalidate"],
          f"database stream: rename, drop x3, dropDatabase, invalidate: {ops}")
    check_lifecycle_event(db_events[0], "rename", {"db": gone.name, "coll": "s"},
                          to={"db": gone.name, "coll": "t"})
    for ev in db_events[1:4]:
        check_lifecycle_event(ev, "drop", ev["ns"])
    check(sorted(e["ns"]["coll"] for e in db_events[1:4]) == ["p", "q", "t"], "a drop per collection")
    check_lifecycle_event(db_events[4], "dropDatabase", {"db": gone.name})
    check_lifecycle_event(db_events[5], "invalidate", None)
    check_ordered(db_events)
    expect_closed(gone, whole_db)
    for stream, name in ((on_p, "p"), (on_q, "q")):
        tail = stream.until_closed()
        check([e["operationType"] for e in tail] == ["drop", "invalidate"],
              f"dropDatabase -> drop, invalidate on a collection stream ({name}): {tail}")
        check_lifecycle_event(tail[0], "drop", {"db": gone.name, "coll": name})
        expect_closed(gone, stream)
        if name == "p":
            check_ordered(before + tail)
            p_inval = tail[1]["_id"]
    check(gone.list_collection_names() == [], "dropDatabase: no collections left")
    try:
        RawStream(gone, "p", resumeAfter=p_inval).kill()
        check(False, "resumeAfter the dropDatabase invalidate must fail")
    except OperationFailure as exc:
        check(exc.code == INVALID_RESUME_TOKEN, f"resumeAfter: 260, got {exc.code}")
    reborn = RawStream(gone, "p", startAfter=p_inval)
    gone["p"].insert_one({"_id": 3})
    got = reborn.drain(expect=1)
    check(got[0]["documentKey"] == {"_id": 3} and token_rowid(got[0]["_id"]) > token_rowid(p_inval),
          "startAfter the dropDatabase invalidate: the re-created collection, tokens still ordered")
    reborn.kill()
    client.drop_database(gone.name)
    client.drop_database(dbname)
    ok("i. dropDatabase: each collection stream gets drop then invalidate; a database stream gets "
       "rename/drop of its collections, then dropDatabase {.., ns: {db}} and invalidate; the change "
       "log survives, so startAfter continues with ordered tokens and resumeAfter the invalidate -> 260")


def main(uri: str) -> int:
    listener = Replies()
    client = MongoClient(uri, event_listeners=[listener], serverSelectionTimeoutMS=10000)
    client.admin.command("ping")
    suffix = uuid.uuid4().hex[:8]
    db = client[f"launcher_check_{suffix}"]
    dbname = db.name

    # ---- a. Int64 cursor ids; no id:0 -> Int64 rewrite ---------------------
    data = db[f"data_{suffix}"]
    data.insert_many([{"_id": i, "id": 0, "n": i} for i in range(5)])
    listener.take()
    docs = list(data.find({}, batch_size=2).sort("_id", 1))
    check(len(docs) == 5, "find with batches returns all documents")
    cursor_replies = [r for name, r in listener.take() if name in ("find", "getMore")]
    check(len(cursor_replies) >= 3, "find used getMore")
    for reply in cursor_replies:
        check(type(reply["cursor"]["id"]) is Int64, f"find/getMore cursor.id is Int64: {reply['cursor']}")
    check(cursor_replies[0]["cursor"]["id"] != 0, "first find batch left a cursor open")
    check(cursor_replies[-1]["cursor"]["id"] == 0, "last batch closes the cursor")
    raw_doc = data.with_options(codec_options=RAW).find_one({"_id": 0})
    check(raw_doc.raw == bson.encode({"_id": 0, "id": 0, "n": 0}),
          "document field id: 0 stays Int32 (nx rewrote it to Int64)")
    # CursorNotFound on an exhausted / unknown data cursor
    first = db.command("find", data.name, batchSize=2)
    cid = first["cursor"]["id"]
    check(type(cid) is Int64 and cid != 0, "find command cursor.id is a non-zero Int64")
    killed = db.command("killCursors", data.name, cursors=[cid])
    check(killed["cursorsKilled"] == [cid] and type(killed["cursorsKilled"][0]) is Int64,
          f"killCursors reports the killed data cursor as Int64: {killed}")
    try:
        db.command("getMore", cid, collection=data.name)
        check(False, "getMore on a killed data cursor must fail")
    except OperationFailure as exc:
        check(exc.code == CURSOR_NOT_FOUND, f"getMore on killed data cursor: code 43, got {exc.code}")
    ok("a. cursor ids are Int64 (find, getMore, aggregate, killCursors); id:0 fields stay Int32; "
       "getMore on a dead cursor -> CursorNotFound")

    # ---- b-e. change events ------------------------------------------------
    coll = db[f"events_{suffix}"]
    coll.insert_one({"_id": "before-watch"})
    s_lookup = RawStream(db, coll.name, fullDocument="updateLookup")
    s_default = RawStream(db, coll.name)
    check(s_lookup.first == [] and s_default.first == [], "change streams start empty")
    oid = ObjectId()
    when = datetime.datetime(2021, 3, 4, 5, 6, 7, 891000, tzinfo=datetime.timezone.utc)
    typed = {
        "_id": 1,
        "big": Int64(2**40 + 3),
        "neg_big": Int64(-(2**35)),
        "i32": 7,
        "f": 1.5,
        "s": "text",
        "b": True,
        "none": None,
        "when": when,
        "oid": oid,
        "arr": [1, "two", {"three": ObjectId()}, [when]],
        "sub": {"x": {"y": Int64(2**50)}},
        "id": 0,
    }
    coll.insert_one(typed)
    coll.insert_one({"_id": oid, "kind": "objectid"})
    coll.insert_one({"_id": "str-id", "kind": "string"})
    coll.update_one({"_id": 1}, {"$set": {"s": "changed"}})
    coll.update_one({"_id": 1}, {"$set": {"s": "changed again"}, "$inc": {"i32": 1}})
    coll.replace_one({"_id": "str-id"}, {"kind": "replaced"})
    coll.update_one({"_id": oid}, {"$set": {"gone": True}})
    coll.delete_one({"_id": oid})
    coll.delete_one({"_id": "str-id"})
    n_events = 9

    ev_l = s_lookup.drain(expect=n_events)
    ev_d = s_default.drain(expect=n_events)
    for ev in ev_l + ev_d:
        check_event_shape(ev, coll.name, dbname)
    ops = [e["operationType"] for e in ev_l]
    check(ops == ["insert"] * 3 + ["update"] * 4 + ["delete"] * 2,
          f"operation types in order (replace reported as update): {ops}")
    check([e["_id"] for e in ev_l] == [e["_id"] for e in ev_d], "both streams see the same events")

    # b. clusterTime Timestamp strictly increasing
    times = [e["clusterTime"] for e in ev_l]
    check(all(a < b for a, b in zip(times, times[1:])), f"clusterTime strictly increasing: {times}")
    now = time.time()
    check(all(abs(t.time - now) < 600 for t in times), "clusterTime seconds are the time of the change")
    check(all(abs(e["wallTime"].timestamp() - now) < 600 for e in ev_l), "wallTime is the time of the change")
    ok("b. clusterTime is a strictly increasing BSON Timestamp; wallTime is a datetime")

    # c. exact-typed fullDocument
    expected_raw = bson.encode(typed)
    # the insert event, re-read with raw decoding, byte-compared with the inserted document
    replay = RawStream(db, coll.name, raw=True, fullDocument="updateLookup",
                       resumeAfter={"_data": f"nx:{token_rowid(ev_l[0]['_id']) - 1}"})
    replayed = replay.drain(expect=n_events)
    replay.kill()
    ins = replayed[0]
    check(ins["fullDocument"].raw == expected_raw,
          "insert fullDocument is byte-identical to the inserted BSON (Int64 > 2**31, ObjectId, "
          f"datetime, nested):\n  got  {bson.decode(ins['fullDocument'].raw)}\n  want {typed}")
    check(type(ev_l[0]["fullDocument"]["big"]) is Int64, "Int64 > 2**31 stays Int64")
    check(ev_l[0]["fullDocument"]["when"] == when.replace(tzinfo=None), "datetime keeps milliseconds")
    check(isinstance(ev_l[0]["fullDocument"]["oid"], ObjectId), "ObjectId stays ObjectId")
    found = coll.with_options(codec_options=RAW).find_one({"_id": 1})
    # updateLookup: both update events of _id 1 carry the *current* document
    upd1 = [e for e in replayed if e["operationType"] == "update" and bson.decode(e["documentKey"].raw)["_id"] == 1]
    check(len(upd1) == 2, "two update events for _id 1")
    for e in upd1:
        check(e["fullDocument"] is not None and e["fullDocument"].raw == found.raw, "updateLookup fullDocument == current document (exact bytes)")
    check(ev_l[3]["fullDocument"]["s"] == "changed again",
          "updateLookup may already contain later writes (runs ahead)")
    upd_oid = ev_l[6]
    check(upd_oid["documentKey"]["_id"] == oid and "fullDocument" in upd_oid
          and upd_oid["fullDocument"] is None,
          f"updateLookup of a since-deleted document is null: {upd_oid}")
    check(ev_l[5]["fullDocument"] is None, "replaced-then-deleted document looks up as null")
    # default stream: inserts carry fullDocument, updates none, deletes none
    for e in ev_d:
        if e["operationType"] == "insert":
            check("fullDocument" in e and e["fullDocument"] is not None, "default stream: insert has fullDocument")
        else:
            check("fullDocument" not in e, f"default stream: {e['operationType']} has no fullDocument")
    check(ev_d[0]["fullDocument"] == ev_l[0]["fullDocument"], "insert fullDocument same in both modes")
    ok("c. fullDocument exact-typed: insert = inserted document (byte-identical), updateLookup = current "
       "document or null, no fullDocument on updates without updateLookup nor on deletes")

    # d. typed documentKey
    keys = [e["documentKey"]["_id"] for e in ev_l]
    check(keys == [1, oid, "str-id", 1, 1, "str-id", oid, oid, "str-id"], f"documentKey ids: {keys}")
    check(type(keys[0]) is int and type(keys[7]) is ObjectId and type(keys[8]) is str,
          "documentKey._id types int/ObjectId/str, also on deletes")
    ok("d. documentKey._id keeps the real _id type (int, ObjectId, string), deletes included")

    # e. no updateDescription anywhere
    check(all("updateDescription" not in e for e in ev_l + ev_d), "no updateDescription")
    ok("e. updateDescription: null removed (inserts, updates, deletes)")

    # ---- h. postBatchResumeToken -------------------------------------------
    check(s_lookup.pbrt == ev_l[-1]["_id"], "PBRT after the batch == last event token")
    before = s_lookup.pbrt
    check(s_lookup.get_more() == [] and s_lookup.pbrt == before, "empty batch keeps PBRT at the watermark")
    deletes_only = RawStream(db, coll.name, match={"operationType": "delete"})
    coll.insert_one({"_id": "filtered"})
    coll.delete_one({"_id": "filtered"})
    got = deletes_only.drain(expect=1)
    check(got[0]["operationType"] == "delete" and deletes_only.pbrt == got[0]["_id"],
          "$match stream: PBRT == its last delivered event")
    coll.insert_one({"_id": "filtered-2"})
    check(deletes_only.drain() == [], "a filtered-out event is not delivered")
    check(token_rowid(deletes_only.pbrt) > token_rowid(got[0]["_id"]),
          "PBRT advances past filtered-out events")
    deletes_only.kill()
    s_default.drain(expect=3)
    s_lookup.drain(expect=3)
    ok("h. postBatchResumeToken on aggregate and getMore; == last event; advances on empty "
       "(filtered) batches; stays put when idle")

    # getMore awaitData: empty batch after maxTimeMS; early return on a write
    t0 = time.monotonic()
    check(s_lookup.get_more(max_time_ms=400) == [], "idle getMore returns an empty batch")
    took = time.monotonic() - t0
    check(0.3 <= took < 3.0, f"idle getMore waits ~maxTimeMS (400 ms) then returns: {took:.2f}s")
    result: dict = {}

    def waiter():
        t = time.monotonic()
        result["batch"] = s_lookup.get_more(max_time_ms=10000)
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.3)
    coll.insert_one({"_id": "wake"})
    th.join(15)
    check(not th.is_alive(), "waiting getMore returned")
    check(len(result["batch"]) == 1 and result["took"] < 3.0,
          f"waiting getMore returns early when a write lands: {result}")
    ok("h. getMore with maxTimeMS: empty batch after ~maxTimeMS, early return on a write")

    # killCursors on a change stream; getMore afterwards -> CursorNotFound
    killed = s_lookup.kill()
    check(killed["cursorsKilled"] == [s_lookup.id] and type(killed["cursorsKilled"][0]) is Int64,
          f"killCursors kills the change stream: {killed}")
    try:
        db.command("getMore", s_lookup.id, collection=coll.name, maxTimeMS=100)
        check(False, "getMore on a killed change stream must fail")
    except OperationFailure as exc:
        check(exc.code == CURSOR_NOT_FOUND, f"killed change stream: code 43, got {exc.code}")
    s_default.kill()
    ok("h. killCursors works on change streams; later getMore -> CursorNotFound (resumable)")

    # driver-level watch() round trip (pymongo's own ChangeStream)
    listener.take()
    with coll.watch(full_document="updateLookup", max_await_time_ms=200) as cs:
        coll.insert_one({"_id": "via-watch", "v": Int64(2**33)})
        ev = None
        deadline = time.monotonic() + 10
        while ev is None and time.monotonic() < deadline:
            ev = cs.try_next()
        check(ev is not None and ev["fullDocument"] == {"_id": "via-watch", "v": 2**33}, f"watch(): {ev}")
        check(type(ev["fullDocument"]["v"]) is Int64, "watch(): Int64 kept")
        check(cs.resume_token == ev["_id"] or token_rowid(cs.resume_token) >= token_rowid(ev["_id"]),
              "watch(): resume token tracks events")
    for name, reply in listener.take():
        if name in ("aggregate", "getMore"):
            check(type(reply["cursor"]["id"]) is Int64, "watch(): cursor ids Int64")
    ok("pymongo watch() decodes the corrected events")

    # ---- f. resume and ChangeStreamHistoryLost -----------------------------
    hist = db[f"history_{suffix}"]
    early = RawStream(db, hist.name)
    hist.insert_one({"_id": "first"})
    first_ev = early.drain(expect=1)[0]
    early.kill()
    early_token = first_ev["_id"]

    reader = RawStream(db, hist.name)
    total = 1150
    for start in range(0, total, 250):
        hist.insert_many([{"_id": i, "n": i} for i in range(start, min(start + 250, total))])
    seen = reader.drain(expect=total)
    reader.get_more(max_time_ms=50)  # one more pull: prune with the reader at the end
    check([e["documentKey"]["_id"] for e in seen] == list(range(total)), "reader saw every change in order")

    def resume(token, **extra):
        return RawStream(db, hist.name, resumeAfter=token, **extra)

    def expect_lost(token, what):
        try:
            s = resume(token)
            s.kill()
            check(False, f"{what}: resume must fail with ChangeStreamHistoryLost")
        except OperationFailure as exc:
            check(exc.code == HISTORY_LOST, f"{what}: code 286, got {exc.code} {exc.details}")
            check(exc.details.get("codeName") == "ChangeStreamHistoryLost", f"{what}: codeName")
            check("may no longer be in the oplog" in str(exc.details.get("errmsg")), f"{what}: errmsg")

    expect_lost(early_token, "token pruned by nx (1150 later changes)")
    # nx keeps the newest 1000 rows: resuming after seen[-1001] needs only retained rows;
    # after seen[-1002] it would need the pruned row of seen[-1001].
    expect_lost(seen[-1002]["_id"], "token just before the retained window")
    boundary = resume(seen[-1001]["_id"])
    got = boundary.drain(expect=1000)
    check([e["_id"] for e in got] == [e["_id"] for e in seen[-1000:]],
          "resume from the oldest valid token delivers exactly the following events")
    boundary.kill()
    mid = RawStream(db, hist.name, startAfter=seen[-300]["_id"])
    got = mid.drain(expect=299)
    check([e["_id"] for e in got] == [e["_id"] for e in seen[-299:]], "startAfter delivers exactly the following events")
    check(mid.get_more(max_time_ms=50) == [], "and nothing more")
    mid.kill()
    expect_lost({"_data": "garbage"}, "unrecognized token")
    expect_lost({"_data": "nx:999999999999"}, "token from another history (beyond newest row)")
    # newest token: resumes normally and then delivers exactly the new changes
    newest = resume(reader.pbrt)
    check(newest.get_more(max_time_ms=50) == [], "resume from the newest token: nothing old")
    hist.update_one({"_id": 5}, {"$set": {"n": -5}})
    got = newest.drain(expect=1)
    check(got[0]["operationType"] == "update" and got[0]["documentKey"] == {"_id": 5},
          "resume from the newest token delivers the next change")
    newest.kill()
    reader.kill()
    # never-written collection: a token of its (empty) stream resumes normally
    fresh = db[f"fresh_{suffix}"]
    s = RawStream(db, fresh.name)
    empty_token = s.pbrt
    s.kill()
    s = RawStream(db, fresh.name, resumeAfter=empty_token)
    fresh.insert_one({"_id": "x"})
    got = s.drain(expect=1)
    check(got[0]["documentKey"] == {"_id": "x"}, "resume on a never-written collection works")
    s.kill()
    # pymongo's watch(resume_after=...) surfaces the error too
    try:
        with hist.watch(resume_after=early_token) as cs:
            cs.try_next()
        check(False, "watch(resume_after=pruned) must fail")
    except OperationFailure as exc:
        check(exc.code == HISTORY_LOST, f"watch(): code 286, got {exc.code}")
    ok("f. resume: pruned/unknown/foreign tokens -> 286 ChangeStreamHistoryLost; boundary, "
       "newest and never-written tokens resume with exactly the following events")

    # ---- i. lifecycle events ---------------------------------------------------
    check_lifecycle(client, suffix)

    # ---- g. hello -------------------------------------------------------------
    hello = client.admin.command("hello")
    check(hello.get("isWritablePrimary") is True, "hello: writable primary")
    ok("g. hello unchanged (connect with directConnection=true)")

    # ---- i. local.oplog.rs: oldest and newest retained change ------------------
    sa = db[f"startat_{suffix}"]
    with sa.watch() as s:
        sa.insert_one({"_id": "early"})
        s.try_next()
        first = client.local["oplog.rs"].find_one({}, sort=[("$natural", 1)])
        last = client.local["oplog.rs"].find_one({}, sort=[("$natural", -1)])
        check(first is not None and last is not None, "local.oplog.rs answers a first and a last entry")
        check(type(first["ts"]) is Timestamp and isinstance(first["wall"], datetime.datetime),
              f"oplog entries carry ts (Timestamp) and wall (datetime): {first}")
        check((first["ts"].time, first["ts"].inc) <= (last["ts"].time, last["ts"].inc),
              f"oldest entry not after the newest: {first} {last}")
        check(isinstance(last["ns"], str) and "." in last["ns"], f"entries name their namespace: {last}")
        ok("i. local.oplog.rs sorted by $natural answers the oldest / newest retained change")

        # ---- j. startAtOperationTime ---------------------------------------------
        start = time.time()
        while int(time.time()) == int(start):
            time.sleep(0.05)
        at = Timestamp(int(time.time()), 0)
        sa.insert_one({"_id": "late-1"})
        sa.insert_one({"_id": "late-2"})
        s.try_next()
    with sa.watch(start_at_operation_time=at) as s2:
        got = [s2.next()["documentKey"]["_id"] for _ in range(2)]
    check(got == ["late-1", "late-2"], f"startAtOperationTime starts at the time asked: {got}")
    ok("j. startAtOperationTime starts at the first change at or after that cluster time")

    # ---- k. serverStatus.opcounters -------------------------------------------
    ops0 = client.admin.command("serverStatus")["opcounters"]
    opc = db[f"opc_{uuid.uuid4().hex[:8]}"]
    opc.insert_many([{"_id": i} for i in range(3)])
    list(opc.find({}))
    opc.update_one({"_id": 0}, {"$set": {"x": 1}})
    opc.delete_one({"_id": 1})
    ops1 = client.admin.command("serverStatus")["opcounters"]
    delta = {k: ops1[k] - ops0[k] for k in ops0}
    check(all(type(v) is Int64 for v in ops1.values()), f"opcounters are Int64: {ops1}")
    check(delta["insert"] == 3 and delta["query"] == 1 and delta["update"] == 1
          and delta["delete"] == 1 and delta["command"] >= 1, f"opcounters deltas: {delta}")
    ok("k. serverStatus reports opcounters (insert per document, query, update, delete, getmore, command)")
    st0 = client.admin.command("serverStatus")
    big = "x" * 200_000
    opc.insert_one({"_id": "big", "s": big})
    for _ in range(20):
        opc.find_one({"_id": "big"})
    st1 = client.admin.command("serverStatus")
    net = {k: st1["network"][k] - st0["network"][k] for k in ("bytesIn", "bytesOut", "numRequests")}
    check(net["bytesIn"] >= 200_000 and net["bytesOut"] >= 20 * 200_000 and net["numRequests"] >= 22,
          f"network counts the wire bytes: {net}")
    cpu0 = st0["extra_info"]["user_time_us"] + st0["extra_info"]["system_time_us"]
    cpu1 = st1["extra_info"]["user_time_us"] + st1["extra_info"]["system_time_us"]
    check(cpu1 > cpu0, f"extra_info reports the server's CPU time: {cpu0} -> {cpu1}")
    ok("k. serverStatus reports network bytesIn/bytesOut/numRequests and extra_info CPU times")

    client.drop_database(dbname)
    print("ALL CHECKS PASSED")

    # ---- j. $or with other top-level conditions keeps them all ---------------
    leases = db[f"leases_{suffix}"]
    leases.insert_many([
        {"_id": "s1", "holder": "r2", "exp": 100, "epoch": 1},
        {"_id": "s2", "holder": "r0", "exp": 100, "epoch": 1},
        {"_id": "s3", "holder": "r0", "exp": 50, "epoch": 1},
    ])
    claim = {"_id": "s2", "$or": [{"holder": "r2"}, {"exp": {"$lte": 60}}]}
    got = leases.find_one_and_update(claim, {"$inc": {"epoch": 1}})
    check(got is None, f"findAndModify {{_id, $or}} matches only that _id (got {got})")
    check(leases.update_one(claim, {"$set": {"z": 1}}).matched_count == 0,
          "update {_id, $or} matches only that _id")
    check(leases.count_documents({"epoch": 2}) == 0 and leases.count_documents({"z": 1}) == 0,
          "no other document was modified")
    got = leases.find_one_and_update({"_id": "s3", "$or": [{"holder": "r2"}, {"exp": {"$lte": 60}}]},
                                     {"$inc": {"epoch": 1}}, return_document=True)
    check(got is not None and got["_id"] == "s3" and got["epoch"] == 2, "a matching {_id, $or} is updated")
    ok("j. $or with other top-level conditions")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except AssertionError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        sys.exit(1)
