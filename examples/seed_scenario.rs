//! The seed scenario, end to end against a real daemon and server.
//!
//! Run it with one command from the repository root:
//!
//! ```text
//! scripts/example.sh
//! ```
//!
//! (It starts the test server with `scripts/testenv/start.sh` unless
//! `EVENTSYNC_TEST_MONGODB_URI` points at a MongoDB replica set, builds `eventsyncd`, and runs
//! `cargo run --example seed_scenario`, which starts the daemon itself.)
//!
//! A game server creates a player's game state with the thin client's upsert, updates it
//! twice (gold and experience, then a level-up); a sync client asks the daemon for the
//! events it is missing, applies them and reaches MongoDB's state exactly; it acknowledges
//! its vector; a further update reaches it live over Server-Sent Events.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::Document;
use eventsync::client::{ClientOptions, SyncCollection, Upserted};
use eventsync::diff::{self, repr};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct GameState {
    _id: String,
    player: String,
    gold: i64,
    experience: i64,
    level: i32,
    inventory: Vec<String>,
    #[serde(default)]
    version: i64,
}

/// The daemon process and its config directory; killed and removed when dropped.
struct Daemon(Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Two different free loopback ports: both listeners are bound before either is released,
/// so the OS cannot hand out the same port twice.
fn two_free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn start_daemon(uri: &str, app_db: &str, event_db: &str) -> Result<(Daemon, String), Error> {
    let bin = std::env::var("EVENTSYNCD_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug/eventsyncd").to_owned()
    });
    let (sync_port, ops_port) = two_free_ports()?;
    let dir = std::env::temp_dir().join(format!("eventsync-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    let mut f = std::fs::File::create(&config)?;
    write!(
        f,
        "[mongodb]\nuri = {uri:?}\nevent_database = {event_db:?}\n\n\
         [[streams]]\ndatabase = {app_db:?}\ncollection = \"game_states\"\n\n\
         [pipeline]\nmax_await_ms = 100\n\n\
         [lease]\nholder_id = \"seed-daemon\"\n\n\
         [sync]\nlisten = \"127.0.0.1:{sync_port}\"\ntokens = [\"seed-scenario-token-123\"]\ntail_poll_ms = 50\n\n\
         [ops]\nlisten = \"127.0.0.1:{ops_port}\"\n\n[log]\nlevel = \"warn\"\n"
    )?;
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!("cannot start {bin} (build it with `cargo build --bin eventsyncd`): {e}")
        })?;
    Ok((Daemon(child, dir), format!("http://127.0.0.1:{sync_port}")))
}

/// What the sync client holds: one document at a version.
#[derive(Default)]
struct Held {
    version: i64,
    doc: Option<Document>,
    position: i64,
}

impl Held {
    fn apply(&mut self, item: &Value) -> Result<(), Error> {
        match item["kind"].as_str() {
            Some("snapshot") => {
                self.version = item["version"].as_i64().unwrap_or(0);
                self.doc = match &item["document"] {
                    Value::Null => None,
                    d => Some(repr::from_value(d)?),
                };
            }
            Some("event") => {
                let to = item["to_version"].as_i64().unwrap_or(0);
                if to <= self.version {
                    return Ok(()); // already included
                }
                if item["from_version"].as_i64() != Some(self.version) {
                    return Err(format!("gap: hold {} but event is {item}", self.version).into());
                }
                self.doc = if item["op"] == "delete" {
                    None
                } else {
                    let patch: diff::Patch = serde_json::from_value(item["patch"].clone())?;
                    Some(diff::apply(&self.doc.take().unwrap_or_default(), &patch)?)
                };
                self.version = to;
            }
            _ => return Err(format!("unexpected item {item}").into()),
        }
        self.position = self.position.max(item["seq"].as_i64().unwrap_or(0));
        Ok(())
    }
}

fn bytes(d: &Document) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = d.to_writer(&mut v);
    v
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let uri = std::env::var("EVENTSYNC_TEST_MONGODB_URI")
        .or_else(|_| std::env::var("MONGODB_URI"))
        .map_err(|_| "set EVENTSYNC_TEST_MONGODB_URI (scripts/example.sh does)")?;
    let app_db = format!("seed_game_{}", std::process::id());
    let event_db = format!("seed_events_{}", std::process::id());
    let stream = format!("{app_db}.game_states");
    let mongo = mongodb::Client::with_uri_str(&uri).await?;
    let coll = mongo
        .database(&app_db)
        .collection::<Document>("game_states");

    let (_daemon, base) = start_daemon(&uri, &app_db, &event_db)?;
    let http = reqwest::Client::new();
    let token = "seed-scenario-token-123";
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut r = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let resp = r.send().await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            if !status.is_success() {
                return Err::<Value, Error>(format!("{status}: {v}").into());
            }
            Ok(v)
        }
    };
    let started = Instant::now();
    while call(reqwest::Method::GET, "/v1/streams".into(), None)
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the daemon did not come up within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("daemon up at {base}, watching {stream}");

    // 1. The game server writes through the thin client.
    let games =
        SyncCollection::<GameState>::new(coll.clone(), ClientOptions::new("game-server-1"))?;
    let head = |min: i64| {
        let call = &call;
        let stream = stream.clone();
        async move {
            let t = Instant::now();
            loop {
                let v = call(reqwest::Method::GET, format!("/v1/streams/{stream}"), None).await?;
                if v["head"].as_i64().unwrap_or(0) >= min {
                    return Ok::<(), Error>(());
                }
                if t.elapsed() > Duration::from_secs(30) {
                    return Err("events did not reach the log".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (state, how) = games
        .find_one_and_upsert(GameState {
            _id: "player-1".into(),
            player: "Ada".into(),
            gold: 100,
            experience: 0,
            level: 1,
            inventory: vec!["sword".into()],
            version: 0,
        })
        .await?;
    assert_eq!(how, Upserted::Created);
    println!(
        "created  v{}: gold {} xp {} level {}",
        state.version, state.gold, state.experience, state.level
    );
    head(1).await?;
    let u = games
        .find_one_and_update("player-1", |g| {
            g.gold += 250;
            g.experience += 1200;
        })
        .await?;
    println!(
        "updated  v{}: the thin client's patch of this write (stamp left out): {}",
        u.version,
        serde_json::to_string(&u.patch)?
    );
    head(2).await?;
    let u = games
        .find_one_and_update("player-1", |g| {
            g.level += 1;
            g.inventory.push("shield".into());
        })
        .await?;
    println!(
        "level-up v{}: the thin client's patch of this write (stamp left out): {}",
        u.version,
        serde_json::to_string(&u.patch)?
    );
    head(3).await?;

    // 2. A sync client registers and asks for what it is missing: it holds nothing.
    call(
        reqwest::Method::PUT,
        "/v1/clients/tablet-1".into(),
        Some(json!({ "description": "seed scenario" })),
    )
    .await?;
    println!(
        "the sync client asks the daemon what it is missing; the daemon's events hold the same \
         operations as the thin client's patches above, plus the stamp's changes (/version; \
         /_origin when the writer differs); the first event is an insert, a patch applied to {{}}:"
    );
    let mut held = Held::default();
    let mut cursor: Option<String> = None;
    let positions = loop {
        let page = call(
            reqwest::Method::POST,
            "/v1/sync/missing".into(),
            Some(json!({
                "client_id": "tablet-1",
                "vector": { "streams": [ { "stream": stream, "position": 0 } ] },
                "cursor": cursor,
                "limit": 2
            })),
        )
        .await?;
        for item in page["items"].as_array().into_iter().flatten() {
            println!(
                "  daemon's {} seq {}: {}",
                item["kind"],
                item["seq"],
                item.get("patch").unwrap_or(&item["document"])
            );
            held.apply(item)?;
        }
        if page["has_more"] != true {
            break page["positions"].clone();
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    };
    let actual = coll
        .find_one(bson::doc! { "_id": "player-1" })
        .await?
        .ok_or("document missing")?;
    let mine = held.doc.clone().ok_or("sync client holds no document")?;
    assert_eq!(
        bytes(&mine),
        bytes(&actual),
        "sync client differs from MongoDB"
    );
    println!(
        "sync client reached MongoDB's state exactly at version {}: {mine}",
        held.version
    );

    // 3. It acknowledges its vector (UpdateVectorClock).
    let acked = call(
        reqwest::Method::POST,
        "/v1/clients/tablet-1/ack".into(),
        Some(json!({ "streams": [ { "stream": stream, "position": held.position } ] })),
    )
    .await?;
    println!("acknowledged: {}", acked["vector"]);

    // 4. It follows live; a further update reaches it.
    let after = positions[&stream].as_i64().unwrap_or(held.position);
    let resp = http
        .get(format!("{base}/v1/streams/{stream}/live?after={after}"))
        .bearer_auth(token)
        .send()
        .await?;
    let mut body = resp.bytes_stream();
    let written = Instant::now();
    let u = games
        .find_one_and_update("player-1", |g| {
            g.gold -= 75;
            g.inventory.push("potion".into());
        })
        .await?;
    println!(
        "quest    v{}: the thin client's patch of this write (stamp left out): {}",
        u.version,
        serde_json::to_string(&u.patch)?
    );
    let mut buf = String::new();
    'read: while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(30), body.next()).await?
    {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let item: Value = serde_json::from_str(data)?;
                held.apply(&item)?;
                if held.version >= u.version {
                    break 'read;
                }
            }
        }
    }
    let actual = coll
        .find_one(bson::doc! { "_id": "player-1" })
        .await?
        .ok_or("document missing")?;
    assert_eq!(bytes(held.doc.as_ref().ok_or("gone")?), bytes(&actual));
    println!(
        "live event applied {:?} after the write; sync client at version {} equals MongoDB",
        written.elapsed(),
        held.version
    );

    mongo.database(&app_db).drop().await?;
    mongo.database(&event_db).drop().await?;
    println!("seed scenario OK");
    Ok(())
}
