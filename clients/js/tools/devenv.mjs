// Dev environment shared by the integration tests, the browser test and the demo: start eventsyncd against
// the test server, write with the stamp protocol (and without it), read MongoDB exactly.
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, openSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";
import { MongoClient, Long, Double as MDouble, ObjectId as MObjectId } from "mongodb";
import { JNum, stringify, encode, Double, Int64, Decimal128, ObjectId, DateTime, Binary, Timestamp, BSONRegExp, MinKey, MaxKey } from "../dist/index.js";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "../../..");

export function mongoUri() {
  const uri = process.env.EVENTSYNC_TEST_MONGODB_URI;
  if (!uri) throw new Error("EVENTSYNC_TEST_MONGODB_URI is not set: run `eval \"$(scripts/testenv/start.sh)\"` first");
  return uri;
}

export function daemonBinary() {
  const candidates = [process.env.EVENTSYNC_BIN, join(repoRoot, "target/debug/eventsyncd"), join(repoRoot, "target/release/eventsyncd")].filter(Boolean);
  const bin = candidates.find((p) => existsSync(p));
  if (!bin) throw new Error(`eventsyncd not built (looked at ${candidates.join(", ")}); run \`cargo build --bin eventsyncd\``);
  return bin;
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
    s.on("error", rej);
  });
}

export function unique(prefix) {
  return `${prefix}_${process.pid}_${Date.now().toString(36)}_${Math.floor(Math.random() * 1e6)}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function until(cond, what, ms = 30000, every = 50) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() - start > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}${last instanceof Error ? `: ${last.message}` : ""}`);
    await sleep(every);
  }
}

/** A running eventsyncd that can be killed and restarted on the same port. */
export class Daemon {
  constructor({ eventDb, streams, tokens = [], corsOrigins = [], syncPort, opsPort }) {
    Object.assign(this, { eventDb, streams, tokens, corsOrigins, syncPort, opsPort });
    this.dir = mkdtempSync(join(tmpdir(), "eventsync-js-"));
    this.config = join(this.dir, "config.toml");
    this.log = join(this.dir, "daemon.log");
    const q = (s) => JSON.stringify(s);
    let t = `[mongodb]\nuri = ${q(mongoUri())}\nevent_database = ${q(eventDb)}\n\n`;
    for (const s of streams) {
      const [db, coll] = s.split(".");
      t += `[[streams]]\ndatabase = ${q(db)}\ncollection = ${q(coll)}\n\n`;
    }
    t += `[pipeline]\nmax_await_ms = 100\nidle_checkpoint_ms = 200\nrestart_backoff_ms = 100\n\n`;
    t += `[lease]\nttl_ms = 3000\nrenew_ms = 500\nholder_id = "js-test"\n\n`;
    t += `[sync]\nlisten = "127.0.0.1:${syncPort}"\ntokens = [${tokens.map(q).join(", ")}]\ncors_origins = [${corsOrigins.map(q).join(", ")}]\ntail_poll_ms = 50\nkeep_alive_ms = 2000\n\n`;
    t += `[ops]\nlisten = "127.0.0.1:${opsPort}"\n\n[log]\nlevel = "info"\nformat = "text"\n`;
    writeFileSync(this.config, t);
  }
  static async start(opts) {
    const d = new Daemon({ ...opts, syncPort: opts.syncPort ?? (await freePort()), opsPort: await freePort() });
    await d.spawn();
    return d;
  }
  get url() {
    return `http://127.0.0.1:${this.syncPort}`;
  }
  async spawn() {
    const out = openSync(this.log, "a");
    this.child = spawn(daemonBinary(), ["--config", this.config], { stdio: ["ignore", "ignore", out], env: { ...process.env, RUST_LOG: "" } });
    this.exited = new Promise((r) => this.child.once("exit", r));
    const child = this.child;
    if (!Daemon.live) {
      Daemon.live = new Set();
      // never leave a daemon behind, even when a test run is cut short
      process.once("exit", () => Daemon.live.forEach((c) => c.exitCode === null && c.kill("SIGKILL")));
    }
    Daemon.live.add(child);
    child.once("exit", () => Daemon.live.delete(child));
    const headers = this.tokens.length ? { authorization: `Bearer ${this.tokens[0]}` } : {};
    await until(async () => {
      if (this.child.exitCode !== null) throw new Error(`eventsyncd exited (${this.child.exitCode}); log ${this.log}`);
      const r = await fetch(`${this.url}/v1/streams`, { headers }).catch(() => null);
      return r && r.ok;
    }, "eventsyncd to answer", 30000);
  }
  async kill9() {
    this.child.kill("SIGKILL");
    await this.exited;
  }
  async restart() {
    await this.spawn();
  }
  async stop() {
    if (this.child && this.child.exitCode === null) {
      this.child.kill("SIGTERM");
      const t = setTimeout(() => this.child.kill("SIGKILL"), 5000);
      await this.exited;
      clearTimeout(t);
    }
  }
}

export async function mongo() {
  const c = new MongoClient(mongoUri(), { serverSelectionTimeoutMS: 10000 });
  await c.connect();
  return c;
}

const READ = { promoteValues: false, promoteLongs: false, promoteBuffers: false, bsonRegExp: true };

/** A MongoDB value (read with promoteValues: false) in the exact representation. */
export function toRepr(v) {
  if (v === null || typeof v === "boolean" || typeof v === "string") return v;
  if (v instanceof Date) return encode(new DateTime(BigInt(v.getTime())));
  if (Array.isArray(v)) return v.map(toRepr);
  switch (v._bsontype) {
    case "Int32":
      return new JNum(String(v.value));
    case "Double":
      return encode(new Double(v.value));
    case "Long":
      return encode(new Int64(BigInt(v.toString())));
    case "Decimal128":
      return encode(new Decimal128(v.toString()));
    case "ObjectId":
    case "ObjectID":
      return encode(new ObjectId(v.toHexString()));
    case "Binary":
      return encode(new Binary(new Uint8Array(v.buffer), v.sub_type));
    case "Timestamp":
      return encode(new Timestamp(v.high >>> 0, v.low >>> 0));
    case "BSONRegExp":
      return encode(new BSONRegExp(v.pattern, v.options));
    case "MinKey":
      return encode(new MinKey());
    case "MaxKey":
      return encode(new MaxKey());
  }
  if (typeof v === "number") return Number.isInteger(v) ? new JNum(String(v)) : encode(new Double(v));
  const m = new Map();
  for (const k of Object.keys(v)) m.set(k.startsWith("$") ? "$" + k : k, toRepr(v[k]));
  return m;
}

/** Every document of a collection as exact representation text, by representation text of `_id`. */
export async function readExact(coll) {
  const out = new Map();
  for (const d of await coll.find({}, READ).toArray()) out.set(stringify(toRepr(d._id)), stringify(toRepr(d)));
  return out;
}

/** A write with the stamp protocol: CAS on `version`, +1, `_origin`. Returns the version written, or null. */
export async function stampedWrite(coll, id, origin, make, retries = 50) {
  for (let attempt = 0; attempt < retries; attempt++) {
    const cur = await coll.findOne({ _id: id }, { projection: { version: 1 } });
    if (cur === null) {
      const doc = { _id: id, version: Long.fromNumber(1), _origin: origin, ...make(0) };
      try {
        await coll.insertOne(doc);
        return 1;
      } catch (e) {
        if (e.code !== 11000) throw e;
        continue;
      }
    }
    if (cur.version === undefined || cur.version === null) {
      // an unstamped replace dropped the version: start a new incarnation
      await coll.deleteOne({ _id: id, version: { $exists: false } });
      continue;
    }
    const v = Number(cur.version);
    const next = { version: Long.fromNumber(v + 1), _origin: origin, ...make(v) };
    const r = await coll.findOneAndReplace({ _id: id, version: cur.version }, next, { includeResultMetadata: true });
    if (r.value) return v + 1;
    await sleep(Math.random() * Math.min(50, 2 ** attempt));
  }
  throw new Error(`CAS conflict on ${id} after ${retries} attempts`);
}

/** A stamped delete (CAS on version). */
export async function stampedDelete(coll, id) {
  const cur = await coll.findOne({ _id: id }, { projection: { version: 1 } });
  if (!cur || cur.version == null) return false;
  const r = await coll.deleteOne({ _id: id, version: cur.version });
  return r.deletedCount === 1;
}

/** A document body with many BSON types (those the test server can store). */
export function richBody(v, i, origin) {
  return {
    n: v + 1,
    big: Long.fromString("5000000000"),
    huge: Long.fromString("9007199254740993"),
    f: new MDouble(v / 2 + 0.25),
    whole: new MDouble(3),
    when: new Date(1700000000000 + i),
    ref: new MObjectId(),
    tags: ["a", "b", origin],
    nested: { k: "v", "a.b": 1, deep: { list: [1, "x", null] } },
    text: "héllo \u{1F600} \"q\"",
  };
}

/** A mixed load: stamped writers (upserts, edits, deletes) and an unstamped one. */
export async function mixedLoad(coll, { writers = 3, ops = 60, docs = 8, pauseMs = 0, onOp } = {}) {
  const stamped = Array.from({ length: writers }, (_, w) =>
    (async () => {
      const origin = `writer-${w}`;
      for (let i = 0; i < ops; i++) {
        const id = `p${Math.floor(Math.random() * docs)}`;
        const r = Math.random();
        if (r < 0.08) await stampedDelete(coll, id);
        else await stampedWrite(coll, id, origin, (v) => richBody(v, i, origin));
        onOp?.();
        if (pauseMs) await sleep(Math.random() * pauseMs);
      }
    })(),
  );
  const raw = (async () => {
    for (let i = 0; i < ops; i++) {
      const id = `p${Math.floor(Math.random() * docs)}`;
      if (i % 5 === 4) await coll.replaceOne({ _id: id }, { raw_replace: "yes", list: [1, 2, null] });
      else await coll.updateOne({ _id: id }, { $set: { raw: Long.fromNumber(i), note: `raw-${i}` } });
      onOp?.();
      if (pauseMs) await sleep(Math.random() * pauseMs);
    }
  })();
  await Promise.all([...stamped, raw]);
}

export { Long, Int32 } from "mongodb";
