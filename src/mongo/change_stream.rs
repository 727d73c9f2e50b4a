//! Reading a collection's change stream (`fullDocument: updateLookup`) and decoding its
//! raw events. Events are decoded by hand from raw BSON so that one undecodable document
//! becomes a dead letter instead of stopping the stream.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::options::FullDocumentType;
use mongodb::Collection;

/// What a change event reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// A document was inserted.
    Insert,
    /// A document was updated.
    Update,
    /// A document was replaced.
    Replace,
    /// A document was deleted.
    Delete,
    /// The collection was dropped.
    Drop,
    /// The collection was renamed.
    Rename,
    /// The database was dropped.
    DropDatabase,
    /// The stream was invalidated and must be re-opened.
    Invalidate,
    /// Anything else (DDL events a future server may add).
    Other(String),
}

/// One decoded change event.
#[derive(Debug, Clone)]
pub struct Change {
    /// The event's resume token.
    pub token: Document,
    /// What happened.
    pub kind: ChangeKind,
    /// The document `_id` (for document events).
    pub doc_id: Option<Bson>,
    /// The looked-up document: `Ok(None)` when the lookup found it gone (or for deletes);
    /// `Err` with a reason when present but not decodable.
    pub full_document: Result<Option<Document>, String>,
    /// Cluster time of the change.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the change.
    pub wall_time: Option<DateTime>,
    /// Size of the raw event, bytes.
    pub raw_len: usize,
}

/// A change stream of raw events.
pub type RawChangeStream = ChangeStream<RawDocumentBuf>;

/// Converts a stored token to the driver's type.
pub fn token_from_document(d: &Document) -> Option<ResumeToken> {
    bson::from_bson(Bson::Document(d.clone())).ok()
}

/// Converts the driver's token to a storable document.
pub fn token_to_document(t: &ResumeToken) -> Option<Document> {
    match bson::to_bson(t) {
        Ok(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

/// Opens a stream on `coll`, after `resume` when given.
pub async fn open(
    coll: &Collection<Document>,
    filter: Option<&Document>,
    resume: Option<&Document>,
    batch_size: u32,
    max_await: Duration,
) -> Result<RawChangeStream, mongodb::error::Error> {
    let pipeline: Vec<Document> = filter
        .map(|f| vec![bson::doc! { "$match": f.clone() }])
        .unwrap_or_default();
    let stream = coll
        .watch()
        .pipeline(pipeline)
        .full_document(FullDocumentType::UpdateLookup)
        .resume_after(resume.and_then(token_from_document))
        .batch_size(batch_size)
        .max_await_time(max_await)
        .await?;
    Ok(stream.with_type::<RawDocumentBuf>())
}

/// True when the server can no longer resume from the token (ChangeStreamHistoryLost,
/// ChangeStreamFatalError, an oplog that rolled past it, or InvalidResumeToken — e.g. the
/// token of an `invalidate`, which only `startAfter` accepts): the stream is opened anew
/// and the collection re-read.
pub fn is_history_lost(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => {
            matches!(c.code, 286 | 280 | 136 | 260)
                || c.code_name == "ChangeStreamHistoryLost"
                || c.message
                    .contains("resume point may no longer be in the oplog")
        }
        _ => false,
    }
}

/// Decodes one raw change event.
pub fn decode(raw: &RawDocumentBuf) -> Result<Change, String> {
    let token = match raw.get("_id") {
        Ok(Some(bson::RawBsonRef::Document(d))) => {
            Document::try_from(d).map_err(|e| format!("resume token: {e}"))?
        }
        _ => return Err("change event without a resume token".into()),
    };
    let op = raw
        .get_str("operationType")
        .map_err(|e| format!("operationType: {e}"))?;
    let kind = match op {
        "insert" => ChangeKind::Insert,
        "update" => ChangeKind::Update,
        "replace" => ChangeKind::Replace,
        "delete" => ChangeKind::Delete,
        "drop" => ChangeKind::Drop,
        "rename" => ChangeKind::Rename,
        "dropDatabase" => ChangeKind::DropDatabase,
        "invalidate" => ChangeKind::Invalidate,
        other => ChangeKind::Other(other.to_owned()),
    };
    let doc_id = match raw.get("documentKey") {
        Ok(Some(bson::RawBsonRef::Document(k))) => match k.get("_id") {
            Ok(Some(id)) => Some(
                Bson::try_from(id.to_raw_bson()).map_err(|e| format!("documentKey._id: {e}"))?,
            ),
            _ => None,
        },
        _ => None,
    };
    let full_document = match raw.get("fullDocument") {
        Ok(Some(bson::RawBsonRef::Document(d))) => Document::try_from(d)
            .map(Some)
            .map_err(|e| format!("fullDocument is not decodable: {e}")),
        Ok(Some(bson::RawBsonRef::Null)) | Ok(None) => Ok(None),
        Ok(Some(other)) => Err(format!("fullDocument has type {:?}", other.element_type())),
        Err(e) => Err(format!("fullDocument: {e}")),
    };
    let cluster_time = match raw.get("clusterTime") {
        Ok(Some(bson::RawBsonRef::Timestamp(t))) => Some(t),
        _ => None,
    };
    let wall_time = match raw.get("wallTime") {
        Ok(Some(bson::RawBsonRef::DateTime(t))) => Some(t),
        _ => None,
    };
    Ok(Change {
        token,
        kind,
        doc_id,
        full_document,
        cluster_time,
        wall_time,
        raw_len: raw.as_bytes().len(),
    })
}

/// The resume token of a change stream as a document (post-batch token when idle).
pub fn current_token(stream: &RawChangeStream) -> Option<Document> {
    stream.resume_token().as_ref().and_then(token_to_document)
}

/// An empty filter, for scans.
pub fn all() -> Document {
    doc! {}
}
