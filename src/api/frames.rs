//! Items of a stream encoded once: the JSON of an event or snapshot (the shape of
//! [`super::model::Item`]) and its Server-Sent Events frame, shared by every subscriber and
//! by `/v1/sync/missing`.
//!
//! Events are read from the log as raw BSON (only the fields a client sees, no resume
//! token) and written to JSON straight from it: no intermediate `Document`, no re-parse of
//! the stored patch into a JSON tree (it is checked for well-formedness and copied as is).

use std::collections::HashSet;
use std::io::Write as _;

use axum::body::Bytes;
use bson::raw::{RawBsonRef, RawDocument};
use bson::{doc, Bson, DateTime, Document, RawDocumentBuf};

use super::error::ApiError;
use super::model::{Item, SnapshotOut, SnapshotReason};
use crate::diff::repr;
use crate::mongo::events::EventRecord;
use crate::mongo::snapshots::SnapshotRecord;
use crate::mongo::{Store, StoreError};
use crate::ops::metrics;

/// One item of a stream, encoded.
#[derive(Debug)]
pub struct Frame {
    /// Stream position.
    pub seq: i64,
    /// Document key (for document filters).
    pub doc_key: Box<str>,
    /// True for a compaction snapshot.
    pub snapshot: bool,
    /// `id: <seq>\nevent: <kind>\ndata: <json>\n\n`.
    sse: Bytes,
    /// Where the JSON is in `sse`.
    json_start: usize,
}

impl Frame {
    fn new(seq: i64, doc_key: &str, snapshot: bool, json: &[u8]) -> Self {
        let kind = if snapshot { "snapshot" } else { "event" };
        let mut buf = Vec::with_capacity(json.len() + 40);
        let _ = write!(buf, "id: {seq}\nevent: {kind}\ndata: ");
        let json_start = buf.len();
        buf.extend_from_slice(json);
        buf.extend_from_slice(b"\n\n");
        Self {
            seq,
            doc_key: doc_key.into(),
            snapshot,
            sse: Bytes::from(buf),
            json_start,
        }
    }

    /// The SSE frame (shared, no copy).
    pub fn sse(&self) -> Bytes {
        self.sse.clone()
    }

    /// The item's JSON.
    pub fn json(&self) -> &[u8] {
        &self.sse[self.json_start..self.sse.len() - 2]
    }

    /// Bytes held.
    pub fn size(&self) -> usize {
        self.sse.len() + self.doc_key.len() + std::mem::size_of::<Self>()
    }

    /// Whether a document filter lets it through.
    pub fn wanted(&self, keys: Option<&HashSet<String>>) -> bool {
        keys.is_none_or(|k| k.contains(&*self.doc_key))
    }
}

/// The fields of an event as a client sees them.
struct EventView<'a> {
    stream: &'a str,
    seq: i64,
    doc_id: Bson,
    doc_key: &'a str,
    from_version: i64,
    to_version: i64,
    op: &'static str,
    patch: &'a str,
    origin: Option<&'a str>,
    stamped: bool,
    wall_time: Option<DateTime>,
    appended_at: DateTime,
}

fn rfc3339(t: DateTime) -> String {
    t.try_to_rfc3339_string()
        .unwrap_or_else(|_| t.timestamp_millis().to_string())
}

fn op_name(s: &str) -> Option<&'static str> {
    Some(match s {
        "insert" => "insert",
        "update" => "update",
        "replace" => "replace",
        "delete" => "delete",
        _ => return None,
    })
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

impl EventView<'_> {
    /// The JSON of `Item::Event(EventOut)`, same fields in the same order.
    fn frame(&self) -> Result<Frame, ApiError> {
        // The stored patch is the daemon's own JSON; check it is well-formed before it is
        // copied into a response as is.
        serde_json::from_str::<serde::de::IgnoredAny>(self.patch)
            .map_err(|err| ApiError::Internal(format!("event {} patch: {err}", self.seq)))?;
        let mut b = Vec::with_capacity(self.patch.len() + self.doc_key.len() * 2 + 256);
        b.extend_from_slice(b"{\"kind\":\"event\",\"stream\":");
        json_str(&mut b, self.stream);
        let _ = write!(b, ",\"seq\":{},\"id\":", self.seq);
        let _ = serde_json::to_writer(&mut b, &repr::bson_to_value(&self.doc_id));
        b.extend_from_slice(b",\"key\":");
        json_str(&mut b, self.doc_key);
        let _ = write!(
            b,
            ",\"from_version\":{},\"to_version\":{},\"op\":\"{}\",\"patch\":",
            self.from_version, self.to_version, self.op
        );
        if self.patch.contains(['\n', '\r']) {
            // Not compact (written by another tool): an SSE data line cannot hold it.
            let v: serde_json::Value = serde_json::from_str(self.patch)
                .map_err(|err| ApiError::Internal(format!("event {} patch: {err}", self.seq)))?;
            let _ = serde_json::to_writer(&mut b, &v);
        } else {
            b.extend_from_slice(self.patch.as_bytes());
        }
        b.extend_from_slice(b",\"origin\":");
        match self.origin {
            Some(o) => json_str(&mut b, o),
            None => b.extend_from_slice(b"null"),
        }
        let _ = write!(b, ",\"stamped\":{}", self.stamped);
        if let Some(w) = self.wall_time {
            b.extend_from_slice(b",\"wall_time\":");
            json_str(&mut b, &rfc3339(w));
        }
        b.extend_from_slice(b",\"appended_at\":");
        json_str(&mut b, &rfc3339(self.appended_at));
        b.push(b'}');
        Ok(Frame::new(self.seq, self.doc_key, false, &b))
    }
}

/// Encodes an event handed over by the appender.
pub fn event_frame(e: &EventRecord) -> Result<Frame, ApiError> {
    EventView {
        stream: &e.stream,
        seq: e.seq,
        doc_id: e.doc_id.clone(),
        doc_key: &e.doc_key,
        from_version: e.from_version,
        to_version: e.to_version,
        op: e.op.as_str(),
        patch: &e.patch,
        origin: e.origin.as_deref(),
        stamped: e.stamped,
        wall_time: e.wall_time,
        appended_at: e.appended_at,
    }
    .frame()
}

fn raw_int(d: &RawDocument, k: &str) -> Option<i64> {
    match d.get(k).ok()?? {
        RawBsonRef::Int64(v) => Some(v),
        RawBsonRef::Int32(v) => Some(i64::from(v)),
        RawBsonRef::Double(v) if v.fract() == 0.0 => Some(v as i64),
        _ => None,
    }
}

fn raw_flag(d: &RawDocument, k: &str) -> Option<bool> {
    match d.get(k).ok()?? {
        RawBsonRef::Boolean(b) => Some(b),
        RawBsonRef::Int32(v) => Some(v != 0),
        RawBsonRef::Int64(v) => Some(v != 0),
        _ => None,
    }
}

fn raw_str<'a>(d: &'a RawDocument, k: &str) -> Option<&'a str> {
    match d.get(k).ok()?? {
        RawBsonRef::String(s) => Some(s),
        _ => None,
    }
}

fn raw_date(d: &RawDocument, k: &str) -> Option<DateTime> {
    match d.get(k).ok()?? {
        RawBsonRef::DateTime(t) => Some(t),
        _ => None,
    }
}

/// Encodes an event read from the log as raw BSON (read as leniently as
/// [`EventRecord::from_document`]).
pub fn raw_event_frame(d: &RawDocument) -> Result<Frame, ApiError> {
    let corrupt = |what: &str| {
        ApiError::from(StoreError::Corrupt {
            what: "event",
            id: format!("seq {:?}", raw_int(d, "seq")),
            reason: what.to_owned(),
        })
    };
    let doc_id = match d.get("doc_id") {
        Ok(Some(v)) => Bson::try_from(v.to_raw_bson()).map_err(|e| corrupt(&e.to_string()))?,
        _ => return Err(corrupt("doc_id missing")),
    };
    EventView {
        stream: raw_str(d, "stream").ok_or_else(|| corrupt("stream"))?,
        seq: raw_int(d, "seq").ok_or_else(|| corrupt("seq: not an integer"))?,
        doc_id,
        doc_key: raw_str(d, "doc_key").ok_or_else(|| corrupt("doc_key"))?,
        from_version: raw_int(d, "from_version")
            .ok_or_else(|| corrupt("from_version: not an integer"))?,
        to_version: raw_int(d, "to_version")
            .ok_or_else(|| corrupt("to_version: not an integer"))?,
        op: raw_str(d, "op")
            .and_then(op_name)
            .ok_or_else(|| corrupt("unknown op"))?,
        patch: raw_str(d, "patch").ok_or_else(|| corrupt("patch"))?,
        origin: raw_str(d, "origin"),
        stamped: raw_flag(d, "stamped").unwrap_or(true),
        wall_time: raw_date(d, "wall_time"),
        appended_at: raw_date(d, "appended_at").unwrap_or_else(DateTime::now),
    }
    .frame()
}

/// Encodes a compaction snapshot.
pub fn snapshot_frame(s: &crate::mongo::snapshots::SnapshotRecord) -> Result<Frame, ApiError> {
    let item = Item::Snapshot(SnapshotOut::from_record(s, SnapshotReason::Compacted));
    let json = serde_json::to_vec(&item)
        .map_err(|e| ApiError::Internal(format!("snapshot {}: {e}", s.seq)))?;
    Ok(Frame::new(s.seq, &s.doc_key, true, &json))
}

/// Counts one query of the log (events or snapshots by position) by `reader`.
pub fn count_read(reader: &'static str) {
    metrics().log_reads.with_label_values(&[reader]).inc();
}

/// The fields of an event a client sees.
fn projection() -> Document {
    doc! {
        "_id": 0, "stream": 1, "seq": 1, "doc_id": 1, "doc_key": 1, "from_version": 1,
        "to_version": 1, "op": 1, "patch": 1, "origin": 1, "stamped": 1, "wall_time": 1,
        "appended_at": 1,
    }
}

/// Events of a stream after `after` (optionally only some documents), in order, at most
/// `limit`, encoded straight from raw BSON. One query.
pub async fn read_events(
    store: &Store,
    stream: &str,
    after: i64,
    keys: Option<&[String]>,
    limit: usize,
    reader: &'static str,
) -> Result<Vec<Frame>, ApiError> {
    let mut filter = doc! { "stream": stream, "seq": { "$gt": after } };
    if let Some(keys) = keys {
        filter.insert("doc_key", doc! { "$in": keys.to_vec() });
    }
    count_read(reader);
    let limit = limit.max(1);
    let mut cursor = store
        .events()
        .clone_with_type::<RawDocumentBuf>()
        .find(filter)
        .sort(doc! { "seq": 1 })
        .limit(limit as i64)
        .batch_size(limit.min(u32::MAX as usize) as u32)
        .projection(projection())
        .await
        .map_err(StoreError::from)?;
    let mut out = Vec::with_capacity(limit.min(4096));
    while cursor.advance().await.map_err(StoreError::from)? {
        let raw = cursor.current();
        out.push(raw_event_frame(raw)?);
    }
    Ok(out)
}

/// What a page is read from: the log's events and compaction's snapshots. [`Store`]
/// reads MongoDB; a test can stand in to move snapshots between the reads.
pub trait PageSource: Sync {
    /// Events after `after` (of `keys` only, when given), in position order.
    fn events(
        &self,
        stream: &str,
        after: i64,
        keys: Option<&[String]>,
        limit: usize,
        reader: &'static str,
    ) -> impl std::future::Future<Output = Result<Vec<Frame>, ApiError>> + Send;

    /// Snapshots whose position is after `after`, in position order.
    fn snapshots(
        &self,
        stream: &str,
        after: i64,
        keys: Option<&[String]>,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<SnapshotRecord>, ApiError>> + Send;
}

impl PageSource for Store {
    async fn events(
        &self,
        stream: &str,
        after: i64,
        keys: Option<&[String]>,
        limit: usize,
        reader: &'static str,
    ) -> Result<Vec<Frame>, ApiError> {
        read_events(self, stream, after, keys, limit, reader).await
    }

    async fn snapshots(
        &self,
        stream: &str,
        after: i64,
        keys: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, ApiError> {
        Ok(self
            .snapshots_after(stream, after, keys, limit as i64)
            .await?)
    }
}

/// Events and compaction snapshots of a stream after `after`, merged by position, at
/// most `limit`, encoded once (served by `/v1/sync/missing` and the live tails).
///
/// Where compaction removed events of the range, snapshots are read before and after the
/// events and the page is read again until both agree (see the body). The snapshot query
/// is skipped when it cannot add anything: without a document filter, events that are
/// dense from `after + 1` (or none at all) leave no position a snapshot could stand for —
/// compaction keeps the newest event of every document, so a snapshot past the last event
/// read would imply a later event the read would have returned.
pub async fn read_page<P: PageSource>(
    store: &P,
    stream: &str,
    after: i64,
    keys: Option<&[String]>,
    limit: usize,
    reader: &'static str,
) -> Result<Vec<Frame>, ApiError> {
    let events = store.events(stream, after, keys, limit, reader).await?;
    let dense = events
        .iter()
        .enumerate()
        .all(|(i, f)| f.seq == after + 1 + i as i64);
    if keys.is_none() && dense {
        return Ok(events);
    }
    // Compaction removed events in the range (or is removing them). It stores a snapshot
    // before it deletes the events it replaces, so snapshots read before and after the
    // events, and found the same, are consistent with them: no event of the page lacks the
    // snapshot it follows. Otherwise the page is read again.
    let mut attempts = 0;
    let (events, snaps) = loop {
        attempts += 1;
        count_read(reader);
        let before = store.snapshots(stream, after, keys, limit).await?;
        let events = store.events(stream, after, keys, limit, reader).await?;
        count_read(reader);
        let snaps = store.snapshots(stream, after, keys, limit).await?;
        let same = before.len() == snaps.len()
            && before
                .iter()
                .zip(&snaps)
                .all(|(a, b)| a.doc_key == b.doc_key && a.version == b.version);
        if same {
            break (events, snaps);
        }
        if attempts >= 10 {
            return Err(ApiError::Unavailable(
                "compaction kept moving snapshots while the page was read; retry".into(),
            ));
        }
    };
    if snaps.is_empty() {
        return Ok(events);
    }
    let mut items = events;
    for s in &snaps {
        items.push(snapshot_frame(s)?);
    }
    // A snapshot and an event never share a position (the snapshot's is that of a deleted
    // event); if the deletion has not happened yet, both appear and the snapshot, which
    // sorts after the event, restates the same version.
    items.sort_by_key(|f| (f.seq, f.snapshot));
    items.truncate(limit);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::EventOut;
    use crate::mongo::events::Operation;

    fn record(origin: Option<&str>, wall: bool) -> EventRecord {
        EventRecord {
            stream: "db.c\"x".into(),
            seq: 42,
            ns: "db.c".into(),
            doc_id: Bson::Int64(7),
            doc_key: crate::mongo::doc_key(&Bson::Int64(7)),
            from_version: 3,
            to_version: 4,
            op: Operation::Update,
            // As the daemon stores it: serde_json's compact text.
            patch: serde_json::to_string(&serde_json::json!([
                { "op": "replace", "path": "/a", "value": { "$numberLong": "5" } },
                { "op": "add", "path": "/z\u{e9}", "value": 1.5e300 },
                { "op": "add", "path": "/s", "value": "line\nbreak \"q\"" },
            ]))
            .unwrap(),
            origin: origin.map(str::to_owned),
            stamped: origin.is_some(),
            stamp: None,
            cluster_time: None,
            wall_time: wall.then(|| DateTime::from_millis(1_700_000_000_123)),
            appended_at: DateTime::from_millis(1_700_000_001_000),
            token: Some(doc! { "_data": "x" }),
        }
    }

    #[test]
    fn encoded_events_equal_the_serde_items() {
        for (origin, wall) in [(Some("w\u{1}1"), true), (None, false)] {
            let r = record(origin, wall);
            let expected =
                serde_json::to_vec(&Item::Event(EventOut::from_record(&r).unwrap())).unwrap();
            let f = event_frame(&r).unwrap();
            assert_eq!(
                String::from_utf8_lossy(f.json()),
                String::from_utf8_lossy(&expected)
            );
            let raw = r.to_raw().unwrap();
            let g = raw_event_frame(&raw).unwrap();
            assert_eq!(g.json(), f.json());
            assert_eq!(g.seq, 42);
            let sse = String::from_utf8(f.sse().to_vec()).unwrap();
            assert!(sse.starts_with("id: 42\nevent: event\ndata: {"), "{sse}");
            assert!(sse.ends_with("}\n\n"));
            assert_eq!(sse.matches('\n').count(), 4, "one data line: {sse}");
        }
    }

    #[test]
    fn a_patch_stored_with_line_breaks_still_makes_one_data_line() {
        let mut r = record(None, true);
        r.patch = "[\n {\"op\": \"remove\", \"path\": \"/a\"}\r\n]".into();
        let f = event_frame(&r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(f.json()).unwrap();
        assert_eq!(
            v["patch"],
            serde_json::json!([{ "op": "remove", "path": "/a" }])
        );
        assert_eq!(
            String::from_utf8(f.sse().to_vec())
                .unwrap()
                .matches('\n')
                .count(),
            4
        );
    }

    #[test]
    fn a_broken_stored_patch_is_an_error_not_a_broken_response() {
        let mut r = record(None, false);
        r.patch = "[{\"op\":".into();
        assert!(matches!(event_frame(&r), Err(ApiError::Internal(_))));
        let mut d = r.to_document().unwrap();
        d.insert("seq", "x");
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        assert!(raw_event_frame(&raw).is_err());
    }

    /// A log compacted between a page's reads: the first events read returns the state
    /// before, then compaction replaces `d`'s snapshot (version 5 → 6) and deletes the
    /// event it covers. A client at `d`'s version 3 (position 20) must get a snapshot
    /// before any later event of `d`.
    struct CompactedMidPage {
        state: std::sync::Mutex<(Vec<EventRecord>, Vec<SnapshotRecord>, bool)>,
    }

    fn step(seq: i64, from: i64) -> EventRecord {
        EventRecord {
            seq,
            from_version: from,
            to_version: from + 1,
            patch: format!(
                "[{{\"op\":\"replace\",\"path\":\"/v\",\"value\":{}}}]",
                from + 1
            ),
            ..record(None, false)
        }
    }

    fn snapshot(version: i64, seq: i64) -> SnapshotRecord {
        SnapshotRecord {
            ns: "db.c\"x".into(),
            doc_key: crate::mongo::doc_key(&Bson::Int64(7)),
            doc_id: Bson::Int64(7),
            version,
            seq,
            doc: Some(doc! { "_id": 7_i64, "v": version }),
            compacted_at: DateTime::from_millis(1_700_000_000_000),
        }
    }

    impl PageSource for CompactedMidPage {
        async fn events(
            &self,
            _stream: &str,
            after: i64,
            _keys: Option<&[String]>,
            _limit: usize,
            _reader: &'static str,
        ) -> Result<Vec<Frame>, ApiError> {
            let mut st = self.state.lock().unwrap();
            let page =
                st.0.iter()
                    .filter(|e| e.seq > after)
                    .map(event_frame)
                    .collect::<Result<Vec<_>, _>>()?;
            if !st.2 {
                // Compaction runs right after this read: snapshot first, then the delete.
                st.2 = true;
                st.1 = vec![snapshot(6, 30)];
                st.0.retain(|e| e.to_version > 6);
            }
            Ok(page)
        }

        async fn snapshots(
            &self,
            _stream: &str,
            after: i64,
            _keys: Option<&[String]>,
            _limit: usize,
        ) -> Result<Vec<SnapshotRecord>, ApiError> {
            let st = self.state.lock().unwrap();
            Ok(st.1.iter().filter(|s| s.seq > after).cloned().collect())
        }
    }

    #[tokio::test]
    async fn a_page_never_separates_events_from_the_snapshot_they_follow() {
        // d: v1..v3 at positions ≤ 20 (the client has v3); v4, v5 compacted into a
        // snapshot at position 25; v6 at 30 and v7 at 40 still in the log.
        let source = CompactedMidPage {
            state: std::sync::Mutex::new((
                vec![step(30, 5), step(40, 6)],
                vec![snapshot(5, 25)],
                false,
            )),
        };
        let page = read_page(&source, "db.c\"x", 20, None, 100, "missing")
            .await
            .expect("page");
        let first = page.first().expect("a page");
        assert!(
            first.snapshot,
            "the first item of the document must be a snapshot, not an event from a version \
             the client does not hold: {:?}",
            page.iter().map(|f| (f.seq, f.snapshot)).collect::<Vec<_>>()
        );
        // And the events after it continue from the snapshot's version.
        let seqs: Vec<(i64, bool)> = page.iter().map(|f| (f.seq, f.snapshot)).collect();
        assert_eq!(seqs, vec![(30, true), (40, false)]);
    }
}
