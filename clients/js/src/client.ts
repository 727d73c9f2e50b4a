/**
 * The sync client: follows streams (or chosen documents of a stream) of an eventsyncd
 * daemon, catches up with `POST /v1/sync/missing` (paginated, snapshots included), then
 * follows the live SSE stream from the position reached, and keeps a local, type-exact
 * state of every followed document.
 */
import {
  AuthError,
  ClosedError,
  EventSyncError,
  ProtocolError,
  RequestError,
  TimeoutError,
  UnknownStreamError,
  UnreachableError,
} from "./errors.js";
import { type JObject, type Json, JNum, get, parse, stringify } from "./json.js";
import { applyPatch, type PatchOp, readPatch } from "./patch.js";
import { SseParser } from "./sse.js";
import { defaultStorage, type SyncStorage } from "./storage.js";
import { decode, type Document, encode, type Value } from "./values.js";

/** Options of {@link EventSyncClient}. */
export interface ClientOptions {
  /** Base URL of the daemon's sync port, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** Bearer token (one of the daemon's `sync.tokens`). */
  token?: string;
  /**
   * This client's id: it registers under it and acknowledges its state vector (debounced),
   * which lets compaction know what it holds. Default: a random id kept in `storage`.
   */
  clientId?: string;
  /** Where state survives restarts. Default: IndexedDB in browsers, memory elsewhere. */
  storage?: SyncStorage;
  /** The fetch implementation (default: the global one). */
  fetch?: typeof fetch;
  /** Delay of the persist-then-ack after applying, ms (default 250). */
  ackDebounceMs?: number;
  /** Items per page of `/v1/sync/missing` (default 500). */
  pageSize?: number;
  /** First and largest reconnect delay, ms (default 250 and 10000); each wait is jittered. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** A live connection silent for this long is considered dead and reopened, ms (default 45000; the daemon sends keep-alives). */
  idleTimeoutMs?: number;
}

/** Stream status. */
export type Status = "idle" | "catching-up" | "live" | "reconnecting" | "error";

/** A change applied to the local state. */
export interface Change {
  stream: string;
  /** The document `_id`, decoded. */
  id: Value;
  /** The daemon's document key (canonical Extended JSON of `_id`). */
  key: string;
  /** `insert`, `update`, `replace`, `delete`, or `snapshot` (a full state). */
  op: "insert" | "update" | "replace" | "delete" | "snapshot";
  /** The log version now held. */
  version: number;
  /** Stream position of the change. */
  seq: number;
  /** The new state (`null`: deleted or absent). */
  document: Document | null;
  /** The state before. */
  previous: Document | null;
  /** The RFC 6902 patch applied (events only), over the representation. */
  patch?: PatchOp[];
  /** The writer's client id (stamped writes), or null. */
  origin: string | null;
  /** How it arrived. */
  source: "catch-up" | "live" | "repair";
}

/** A status change. */
export interface StatusEvent {
  stream: string;
  status: Status;
  error?: EventSyncError;
}

/** What to follow. */
export type Subscription = string | { stream: string; documents?: Value[] };

/** Counters, for tests and monitoring. */
export interface Stats {
  applied: number;
  snapshots: number;
  duplicates: number;
  gaps: number;
  repairs: number;
  reconnects: number;
  resets: number;
  missingRequests: number;
  missingItems: number;
  acks: number;
}

interface Entry {
  key: string;
  id: Json;
  version: number;
  seq: number;
  doc: Json | null;
  decoded?: Document | null;
}

type Listener<T> = (e: T) => void;

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(t);
        resolve();
      },
      { once: true },
    );
  });
}

/** Jittered exponential backoff: a uniform wait in [d/2, d], d = min(max, initial·2^attempt). */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number, random = Math.random): number {
  const d = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return d / 2 + random() * (d / 2);
}

function num(v: Json | undefined, what: string): number {
  if (!(v instanceof JNum) || v.isFloat) throw new ProtocolError(`${what} is not an integer`);
  return Number(v.text);
}

/** The client. One instance can follow several streams. */
export class EventSyncClient {
  readonly url: string;
  readonly stats: Stats = {
    applied: 0,
    snapshots: 0,
    duplicates: 0,
    gaps: 0,
    repairs: 0,
    reconnects: 0,
    resets: 0,
    missingRequests: 0,
    missingItems: 0,
    acks: 0,
  };
  /** The last error reported (also sent as an `error` event). */
  lastError: EventSyncError | undefined;
  private readonly opts: ClientOptions;
  private readonly fetchFn: typeof fetch;
  readonly storage: SyncStorage;
  private clientIdP: Promise<string> | undefined;
  private registered: Promise<void> | undefined;
  private readonly streams = new Map<string, StreamSync>();
  private readonly listeners = new Map<string, Set<Listener<never>>>();
  closed = false;

  constructor(opts: ClientOptions) {
    if (!opts || typeof opts.url !== "string") throw new TypeError("EventSyncClient: `url` is required");
    this.opts = opts;
    this.url = opts.url.replace(/\/+$/, "");
    const f = opts.fetch ?? globalThis.fetch;
    if (!f) throw new TypeError("EventSyncClient: no fetch implementation (Node >= 20 or pass `fetch`)");
    this.fetchFn = f.bind(globalThis);
    this.storage = opts.storage ?? defaultStorage();
  }

  /** Listens to `change`, `status` or `error`; returns a function that stops listening. */
  on(event: "change", f: Listener<Change>): () => void;
  on(event: "status", f: Listener<StatusEvent>): () => void;
  on(event: "error", f: Listener<EventSyncError>): () => void;
  on(event: string, f: Listener<never>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(f);
    return () => set!.delete(f);
  }

  /** @internal */
  emit(event: "change", e: Change): void;
  emit(event: "status", e: StatusEvent): void;
  emit(event: "error", e: EventSyncError): void;
  emit(event: string, e: unknown): void {
    if (event === "error") this.lastError = e as EventSyncError;
    for (const f of this.listeners.get(event) ?? []) {
      try {
        (f as Listener<unknown>)(e);
      } catch (err) {
        // a listener's bug must not stop the sync loop
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  /** The client id in use (generated and persisted when not given). */
  clientId(): Promise<string> {
    if (!this.clientIdP) {
      this.clientIdP = (async () => {
        if (this.opts.clientId) return this.opts.clientId;
        const stored = await this.storage.get("client-id");
        if (stored) return stored;
        const id = "js-" + Array.from(crypto.getRandomValues(new Uint8Array(9)), (b) => b.toString(16).padStart(2, "0")).join("");
        await this.storage.set("client-id", id);
        return id;
      })();
    }
    return this.clientIdP;
  }

  /**
   * Follows a whole stream (`"db.collection"`) or chosen documents of it
   * (`{ stream, documents: [id, …] }`); `onChange` is called for every change applied.
   * Returns a function that unsubscribes.
   */
  subscribe(what: Subscription, onChange?: (c: Change) => void): () => void {
    if (this.closed) throw new ClosedError();
    const stream = typeof what === "string" ? what : what.stream;
    if (!stream) throw new TypeError("subscribe: a stream name is required");
    let s = this.streams.get(stream);
    if (!s) {
      s = new StreamSync(this, stream);
      this.streams.set(stream, s);
    }
    const sub = { documents: typeof what === "string" || !what.documents ? undefined : what.documents, onChange };
    s.add(sub);
    return () => {
      const st = this.streams.get(stream);
      if (!st) return;
      st.remove(sub);
      if (st.empty()) {
        this.streams.delete(stream);
        void st.stop();
      }
    };
  }

  private stream(stream?: string): StreamSync {
    if (stream === undefined) {
      if (this.streams.size !== 1) throw new TypeError("pass the stream: this client follows " + this.streams.size + " streams");
      return this.streams.values().next().value as StreamSync;
    }
    const s = this.streams.get(stream);
    if (!s) throw new TypeError(`not subscribed to ${JSON.stringify(stream)}`);
    return s;
  }

  /** The local state of a document (`undefined` when not held or deleted). */
  getState(id: Value, stream?: string): Document | undefined {
    return this.stream(stream).get(stringify(encode(id))) ?? undefined;
  }

  /** The log version held of a document (0: none). */
  getVersion(id: Value, stream?: string): number {
    return this.stream(stream).entry(stringify(encode(id)))?.version ?? 0;
  }

  /** Every live document held of a stream, by representation text of `_id`. */
  getDocuments(stream?: string): Map<string, Document> {
    return this.stream(stream).all();
  }

  /** The exact representation text of a held document (what byte-exact comparisons use). */
  getStateText(id: Value, stream?: string): string | undefined {
    const e = this.stream(stream).entry(stringify(encode(id)));
    return e && e.doc !== null ? stringify(e.doc) : undefined;
  }

  /** The current status of a stream. */
  status(stream?: string): Status {
    return this.stream(stream).status;
  }

  /** Resolves once the stream is live (caught up and connected). Rejects on a fatal error. */
  ready(stream?: string, timeoutMs = 30000): Promise<void> {
    const s = this.stream(stream);
    if (s.status === "live") return Promise.resolve();
    if (s.status === "error" && s.fatal) return Promise.reject(s.fatal);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        off();
        reject(new TimeoutError(`stream ${s.stream} not live after ${timeoutMs} ms (status ${s.status}${this.lastError ? `; last error: ${this.lastError.message}` : ""})`));
      }, timeoutMs);
      const off = this.on("status", (e) => {
        if (e.stream !== s.stream) return;
        if (e.status === "live") {
          clearTimeout(t);
          off();
          resolve();
        } else if (e.status === "error" && s.fatal) {
          clearTimeout(t);
          off();
          reject(s.fatal);
        }
      });
    });
  }

  /**
   * Read-your-writes: resolves when the write that stamped `version` on document `id` by
   * `origin` is in the log (write checkpoint) and, when this client follows the document,
   * applied locally. Resolves to the log version and stream position of that write.
   */
  async waitFor(
    origin: string,
    version: number,
    target: { id: Value; stream?: string; timeoutMs?: number },
  ): Promise<{ logVersion: number; seq: number | null; originMatches: boolean | null }> {
    const stream = target.stream ?? this.stream().stream;
    const keyText = stringify(encode(target.id));
    const deadline = Date.now() + (target.timeoutMs ?? 30000);
    const path =
      `/v1/streams/${encodeURIComponent(stream)}/documents/${encodeURIComponent(keyText)}/write-checkpoint` +
      `?origin=${encodeURIComponent(origin)}&version=${version}`;
    let delay = 25;
    let last = "";
    for (;;) {
      if (this.closed) throw new ClosedError();
      let res: Json | undefined;
      try {
        res = await this.request("GET", path, undefined, stream);
      } catch (e) {
        if (!(e instanceof UnreachableError)) throw e;
        last = e.message;
      }
      if (res !== undefined) {
        last = String(get(res, "status"));
        if (get(res, "reached") === true) {
          const logVersion = num(get(res, "log_version"), "log_version");
          const seqJ = get(res, "seq");
          const seq = seqJ instanceof JNum ? Number(seqJ.text) : null;
          const om = get(res, "origin_matches");
          const s = this.streams.get(stream);
          if (s && s.follows(keyText)) await s.waitVersion(keyText, logVersion, deadline);
          return { logVersion, seq, originMatches: typeof om === "boolean" ? om : null };
        }
      }
      if (Date.now() + delay > deadline) {
        throw new TimeoutError(`write ${origin}@${version} of ${keyText} not in the log after ${target.timeoutMs ?? 30000} ms (${last})`);
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 500);
    }
  }

  /** Stops every stream, writes the state, sends a last ack. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.streams.values()].map((s) => s.stop()));
    this.streams.clear();
  }

  /** @internal */
  get options(): ClientOptions {
    return this.opts;
  }

  /** @internal  HTTP with typed errors; the body and the reply in the exact JSON form. */
  async request(method: string, path: string, body?: Json, stream?: string, signal?: AbortSignal): Promise<Json> {
    const headers: Record<string, string> = { accept: "application/json" };
    if (this.opts.token) headers.authorization = `Bearer ${this.opts.token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let res: Response;
    try {
      res = await this.fetchFn(this.url + path, {
        method,
        headers,
        body: body === undefined ? undefined : stringify(body),
        signal,
      });
    } catch (e) {
      throw new UnreachableError(this.url, e);
    }
    const text = await res.text().catch((e) => {
      throw new UnreachableError(this.url, e);
    });
    if (!res.ok) throw httpError(res.status, text, this.url, stream);
    try {
      return text === "" ? null : parse(text);
    } catch (e) {
      throw new ProtocolError(`unreadable reply to ${method} ${path}: ${(e as Error).message}`);
    }
  }

  /** @internal  Registers once (needed for acks). */
  register(): Promise<void> {
    if (!this.registered) {
      this.registered = (async () => {
        const id = await this.clientId();
        await this.request("PUT", `/v1/clients/${encodeURIComponent(id)}`, new Map([["description", "@eventsync/client"]]));
      })();
      this.registered.catch(() => (this.registered = undefined));
    }
    return this.registered;
  }

  /** @internal */
  fetchRaw(url: string, init: RequestInit): Promise<Response> {
    return this.fetchFn(url, init);
  }
}

/** Maps an HTTP error reply to a typed error. */
export function httpError(status: number, text: string, url: string, stream?: string): EventSyncError {
  let code = "http_" + status;
  let detail = text.slice(0, 500);
  try {
    const j = JSON.parse(text) as { error?: string; detail?: string };
    if (j.error) code = j.error;
    if (j.detail) detail = j.detail;
  } catch {
    /* not JSON */
  }
  if (status === 401 || status === 403) return new AuthError(status, detail);
  if (status === 404 && stream && /unknown stream/.test(detail)) return new UnknownStreamError(stream, detail);
  if (status >= 500 || status === 429) return new UnreachableError(url, new Error(`${status} ${code}: ${detail}`), status);
  return new RequestError(status, code, detail);
}

interface Sub {
  documents?: Value[];
  onChange?: (c: Change) => void;
}

const STATE_VERSION = 1;

/** The sync of one stream. @internal */
class StreamSync {
  status: Status = "idle";
  fatal: EventSyncError | undefined;
  private subs = new Set<Sub>();
  private docs = new Map<string, Entry>();
  /** Whole-stream following: every event up to here is applied. */
  private position = 0;
  /** Last SSE id seen (the Last-Event-ID of a reconnect). */
  private lastSeq = 0;
  private loaded: Promise<void> | undefined;
  private abort: AbortController | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;
  private restartWanted = false;
  private flushTimer: ReturnType<typeof setTimeout> | undefined;
  private flushing: Promise<void> = Promise.resolve();
  private dirty = false;
  private versionWaiters = new Set<() => void>();

  constructor(
    private client: EventSyncClient,
    readonly stream: string,
  ) {}

  add(sub: Sub): void {
    this.subs.add(sub);
    this.restart();
  }
  remove(sub: Sub): void {
    this.subs.delete(sub);
  }
  empty(): boolean {
    return this.subs.size === 0;
  }

  /** The followed documents (representation text of `_id`), or null for the whole stream. */
  private followed(): Map<string, Json> | null {
    const out = new Map<string, Json>();
    for (const s of this.subs) {
      if (!s.documents) return null;
      for (const id of s.documents) {
        const j = encode(id);
        out.set(stringify(j), j);
      }
    }
    return out;
  }

  follows(idText: string): boolean {
    const f = this.followed();
    return f === null || f.has(idText);
  }

  entry(idText: string): Entry | undefined {
    return this.docs.get(idText);
  }

  get(idText: string): Document | null | undefined {
    const e = this.docs.get(idText);
    if (!e || e.doc === null) return undefined;
    if (e.decoded === undefined) e.decoded = decode(e.doc) as Document;
    return e.decoded;
  }

  all(): Map<string, Document> {
    const out = new Map<string, Document>();
    for (const k of this.docs.keys()) {
      const d = this.get(k);
      if (d) out.set(k, d);
    }
    return out;
  }

  private setStatus(status: Status, error?: EventSyncError): void {
    if (this.status === status && !error) return;
    this.status = status;
    this.client.emit("status", { stream: this.stream, status, error });
  }

  private restart(): void {
    if (this.running) {
      this.restartWanted = true;
      this.abort?.abort();
      return;
    }
    this.running = this.run().finally(() => (this.running = undefined));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abort?.abort();
    await this.running;
    if (this.flushTimer) clearTimeout(this.flushTimer);
    await this.flush().catch(() => {});
  }

  private storageKey(): string {
    return `stream:${this.stream}`;
  }

  private async load(): Promise<void> {
    const text = await this.client.storage.get(this.storageKey());
    if (!text) return;
    try {
      const s = JSON.parse(text) as {
        v: number;
        position: number;
        lastSeq: number;
        docs: [string, string, string, number, number, string | null][];
      };
      if (s.v !== STATE_VERSION) return;
      this.position = s.position;
      this.lastSeq = s.lastSeq;
      for (const [idText, key, idJson, version, seq, doc] of s.docs) {
        this.docs.set(idText, { key, id: parse(idJson), version, seq, doc: doc === null ? null : parse(doc) });
      }
    } catch {
      // unreadable saved state: start over
      this.docs.clear();
      this.position = 0;
      this.lastSeq = 0;
    }
  }

  private async run(): Promise<void> {
    if (!this.loaded) this.loaded = this.load();
    await this.loaded;
    const { initialMs = 250, maxMs = 10000 } = this.client.options.backoff ?? {};
    let attempt = 0;
    let needCatchUp = true;
    while (!this.stopped) {
      this.restartWanted = false;
      const abort = (this.abort = new AbortController());
      try {
        if (needCatchUp) {
          // while retrying after a failure the status stays `reconnecting` until live
          if (this.status !== "reconnecting") this.setStatus("catching-up");
          await this.catchUp(abort.signal);
          needCatchUp = false;
        }
        await this.live(abort.signal, () => {
          attempt = 0;
          this.setStatus("live");
        });
      } catch (e) {
        if (this.stopped) break;
        if (this.restartWanted) {
          needCatchUp = true;
          continue;
        }
        const err = e instanceof EventSyncError ? e : new ProtocolError(String((e as Error)?.message ?? e));
        if (err instanceof AuthError || err instanceof UnknownStreamError || err instanceof RequestError) {
          this.fatal = err;
          this.client.emit("error", err);
          this.setStatus("error", err);
          return;
        }
        if (err instanceof ProtocolError) needCatchUp = true;
        this.client.emit("error", err);
        this.setStatus("reconnecting", err);
        this.client.stats.reconnects++;
        await sleep(backoffDelay(attempt++, initialMs, maxMs), abort.signal);
        if (this.restartWanted) needCatchUp = true;
      }
    }
    this.setStatus("idle");
  }

  private vector(docsOnly?: Map<string, Json>): Json {
    const followed = docsOnly ?? this.followed();
    const entry: JObject = new Map<string, Json>([["stream", this.stream]]);
    if (followed === null) {
      entry.set("position", new JNum(String(this.position)));
    } else {
      entry.set(
        "documents",
        [...followed].map(
          ([idText, id]) =>
            new Map<string, Json>([
              ["id", id],
              ["version", new JNum(String(this.docs.get(idText)?.version ?? 0))],
            ]),
        ),
      );
    }
    return new Map([["streams", [entry]]]);
  }

  /** Pages through `/v1/sync/missing` for `vector`, applying every item. */
  private async fetchMissing(vector: Json, source: Change["source"], signal: AbortSignal, stopOnReset = true): Promise<JObject> {
    let cursor: string | null = null;
    const limit = this.client.options.pageSize ?? 500;
    for (;;) {
      const body: JObject = new Map<string, Json>([
        ["vector", vector],
        ["limit", new JNum(String(limit))],
      ]);
      if (cursor) body.set("cursor", cursor);
      this.client.stats.missingRequests++;
      const res = await this.client.request("POST", "/v1/sync/missing", body, this.stream, signal);
      if (!(res instanceof Map)) throw new ProtocolError("missing: reply is not an object");
      const items = get(res, "items");
      if (!Array.isArray(items)) throw new ProtocolError("missing: no items");
      this.client.stats.missingItems += items.length;
      if (stopOnReset && source !== "repair" && get(res, "reset_required") === true && !cursor) return res;
      for (const item of items) {
        if (signal.aborted) throw new UnreachableError(this.client.url, new Error("aborted"));
        await this.apply(item, source, signal);
      }
      if (get(res, "has_more") === true) {
        const c = get(res, "next_cursor");
        if (typeof c !== "string") throw new ProtocolError("missing: has_more without next_cursor");
        cursor = c;
        continue;
      }
      return res;
    }
  }

  private async catchUp(signal: AbortSignal): Promise<void> {
    let res = await this.fetchMissing(this.vector(), "catch-up", signal);
    if (get(res, "reset_required") === true) {
      // Compaction passed events this client had not acknowledged: start the stream over
      // from snapshots, then acknowledge at once (which settles the notice).
      const notices = get(res, "notices");
      const mine = !Array.isArray(notices) || notices.some((n) => get(n, "stream") === this.stream);
      if (mine) {
        this.client.stats.resets++;
        this.docs.clear();
        this.position = 0;
        this.lastSeq = 0;
        this.emitReset();
      }
      res = await this.fetchMissing(this.vector(), "catch-up", signal, false);
      await this.flush(true);
    }
    const pos = get(get(res, "positions"), this.stream);
    if (pos instanceof JNum) {
      const p = Number(pos.text);
      if (this.followed() === null) this.position = Math.max(this.position, p);
      this.lastSeq = Math.max(this.lastSeq, p);
    }
    this.schedule();
  }

  private emitReset(): void {
    this.client.emit("status", { stream: this.stream, status: "catching-up" });
  }

  private async live(signal: AbortSignal, onOpen: () => void): Promise<void> {
    const followed = this.followed();
    let url = `${this.client.url}/v1/streams/${encodeURIComponent(this.stream)}/live?after=${this.lastSeq}`;
    if (followed) for (const idText of followed.keys()) url += `&doc=${encodeURIComponent(idText)}`;
    const headers: Record<string, string> = { accept: "text/event-stream" };
    const token = this.client.options.token;
    if (token) headers.authorization = `Bearer ${token}`;
    if (this.lastSeq > 0) headers["last-event-id"] = String(this.lastSeq);
    const idleMs = this.client.options.idleTimeoutMs ?? 45000;
    const conn = new AbortController();
    const onAbort = () => conn.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    let idle: ReturnType<typeof setTimeout> | undefined;
    let idleFired = false;
    const touch = () => {
      if (idle) clearTimeout(idle);
      idle = setTimeout(() => {
        idleFired = true;
        conn.abort();
      }, idleMs);
    };
    try {
      touch();
      let res: Response;
      try {
        res = await this.client.fetchRaw(url, { headers, signal: conn.signal });
      } catch (e) {
        throw new UnreachableError(this.client.url, idleFired ? new Error(`no answer for ${idleMs} ms`) : e);
      }
      if (!res.ok) throw httpError(res.status, await res.text().catch(() => ""), this.client.url, this.stream);
      if (!res.body) throw new ProtocolError("live: no response body");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const queue: { id?: string; event: string; data: string }[] = [];
      const parser = new SseParser(
        (m) => queue.push(m),
        (c) => {
          if (c.startsWith("subscribed")) onOpen();
        },
      );
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (e) {
          throw new UnreachableError(this.client.url, idleFired ? new Error(`live stream silent for ${idleMs} ms`) : e);
        }
        if (chunk.done) throw new UnreachableError(this.client.url, new Error("live stream closed by the server"));
        touch();
        parser.push(decoder.decode(chunk.value, { stream: true }));
        while (queue.length > 0) {
          const m = queue.shift()!;
          if (m.event !== "event" && m.event !== "snapshot") continue;
          let item: Json;
          try {
            item = parse(m.data);
          } catch (e) {
            throw new ProtocolError(`live: unreadable item: ${(e as Error).message}`);
          }
          await this.apply(item, "live", signal);
          if (m.id && /^\d+$/.test(m.id)) this.lastSeq = Math.max(this.lastSeq, Number(m.id));
        }
      }
    } finally {
      if (idle) clearTimeout(idle);
      signal.removeEventListener("abort", onAbort);
      conn.abort();
    }
  }

  /** Applies one event or snapshot: drops duplicates, repairs gaps. */
  private async apply(item: Json, source: Change["source"], signal: AbortSignal): Promise<void> {
    const kind = get(item, "kind");
    const id = get(item, "id");
    const key = get(item, "key");
    if (id === undefined || typeof key !== "string") throw new ProtocolError("item without id/key");
    const seq = num(get(item, "seq"), "seq");
    const idText = stringify(id);
    const followed = this.followed();
    if (followed && !followed.has(idText)) return; // not ours (the live filter already excludes these)
    const cur = this.docs.get(idText);
    const held = cur?.version ?? 0;
    const previous = cur?.doc ?? null;
    let next: Entry;
    let change: Omit<Change, "document" | "previous">;
    if (kind === "snapshot") {
      const version = num(get(item, "version"), "version");
      if (cur && version <= held) {
        this.client.stats.duplicates++;
        return this.advance(seq, followed);
      }
      const deleted = get(item, "deleted") === true;
      const doc = get(item, "document");
      next = { key, id, version, seq, doc: deleted || doc === undefined ? null : doc };
      change = { stream: this.stream, id: decode(id), key, op: "snapshot", version, seq, origin: null, source };
      this.client.stats.snapshots++;
    } else if (kind === "event") {
      const from = num(get(item, "from_version"), "from_version");
      const to = num(get(item, "to_version"), "to_version");
      if (to <= held) {
        this.client.stats.duplicates++;
        return this.advance(seq, followed);
      }
      if (from !== held) {
        // A gap (or an overlap) in this document's chain: fetch what it is missing.
        this.client.stats.gaps++;
        if (source === "repair") throw new ProtocolError(`chain of ${key} still broken after a re-fetch (held ${held}, event (${from}, ${to}])`);
        await this.repair(idText, id, signal);
        return this.advance(seq, followed);
      }
      const op = get(item, "op");
      const originJ = get(item, "origin");
      let doc: Json | null;
      let patch: PatchOp[] | undefined;
      if (op === "delete") {
        doc = null;
      } else {
        try {
          patch = readPatch(get(item, "patch") ?? []);
          doc = applyPatch(previous ?? new Map(), patch);
        } catch (e) {
          throw new ProtocolError(`event ${seq} of ${key} does not apply: ${(e as Error).message}`);
        }
      }
      next = { key, id, version: to, seq, doc };
      change = {
        stream: this.stream,
        id: decode(id),
        key,
        op: (typeof op === "string" ? op : "update") as Change["op"],
        version: to,
        seq,
        patch,
        origin: typeof originJ === "string" ? originJ : null,
        source,
      };
      this.client.stats.applied++;
    } else {
      return; // an item kind this client does not know: skip it
    }
    this.docs.set(idText, next);
    this.advance(seq, followed);
    const prevDecoded = cur ? (cur.decoded !== undefined ? cur.decoded : cur.doc === null ? null : (decode(cur.doc) as Document)) : null;
    const full: Change = { ...change, previous: prevDecoded, document: this.get(idText) ?? null };
    for (const w of this.versionWaiters) w();
    this.schedule();
    for (const s of this.subs) {
      try {
        s.onChange?.(full);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
    this.client.emit("change", full);
  }

  private advance(seq: number, followed: Map<string, Json> | null): void {
    if (followed === null) this.position = Math.max(this.position, seq);
  }

  private async repair(idText: string, id: Json, signal: AbortSignal): Promise<void> {
    this.client.stats.repairs++;
    await this.fetchMissing(this.vector(new Map([[idText, id]])), "repair", signal);
  }

  /** Waits until the document is held at `version` or later. */
  waitVersion(idText: string, version: number, deadline: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if ((this.docs.get(idText)?.version ?? 0) >= version) {
          this.versionWaiters.delete(check);
          clearTimeout(t);
          resolve();
        }
      };
      const t = setTimeout(() => {
        this.versionWaiters.delete(check);
        reject(new TimeoutError(`document ${idText} not applied up to version ${version} in time (status ${this.status})`));
      }, Math.max(0, deadline - Date.now()));
      this.versionWaiters.add(check);
      check();
    });
  }

  /** Schedules the debounced persist-then-ack. */
  private schedule(): void {
    this.dirty = true;
    if (this.flushTimer) return;
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      this.flush().catch((e) => this.client.emit("error", e instanceof EventSyncError ? e : new UnreachableError(this.client.url, e)));
    }, this.client.options.ackDebounceMs ?? 250);
  }

  /** Writes the state, then acknowledges it (never acks what is not saved). */
  flush(force = false): Promise<void> {
    const run = async () => {
      if (!this.dirty && !force) return;
      this.dirty = false;
      const docs: [string, string, string, number, number, string | null][] = [];
      for (const [idText, e] of this.docs) docs.push([idText, e.key, stringify(e.id), e.version, e.seq, e.doc === null ? null : stringify(e.doc)]);
      const vector = this.vector();
      await this.client.storage.set(
        this.storageKey(),
        JSON.stringify({ v: STATE_VERSION, position: this.position, lastSeq: this.lastSeq, docs }),
      );
      await this.client.register();
      const id = await this.client.clientId();
      await this.client.request("POST", `/v1/clients/${encodeURIComponent(id)}/ack`, vector, this.stream);
      this.client.stats.acks++;
    };
    this.flushing = this.flushing.then(run, run);
    return this.flushing;
  }
}
