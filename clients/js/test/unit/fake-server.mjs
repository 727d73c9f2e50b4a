// An in-process stand-in for the daemon's HTTP API, for unit tests of the client's
// protocol logic only (dedupe, gaps, reconnects, errors). The integration tests run the
// real daemon.
export class FakeDaemon {
  constructor({ streams = ["app.raid"], token } = {}) {
    this.streams = streams;
    this.token = token;
    this.events = []; // {stream, seq, id(text), key, from, to, op, patch(text), origin}
    this.docs = new Map(); // key -> {version, doc(text)|null}
    this.requests = [];
    this.lives = new Set();
    this.acks = [];
    this.resetRequired = false;
    this.down = false;
  }
  // Appends an event for document `id` (repr text) with `patch` (repr text).
  append(stream, idText, op, patch, { origin = null, docAfter } = {}) {
    const prev = this.docs.get(idText) ?? { version: 0, doc: null };
    const seq = this.events.filter((e) => e.stream === stream).length + 1;
    const ev = { stream, seq, id: idText, key: idText, from: prev.version, to: prev.version + 1, op, patch, origin };
    this.events.push(ev);
    this.docs.set(idText, { version: ev.to, doc: op === "delete" ? null : docAfter ?? prev.doc });
    for (const l of this.lives) if (l.stream === stream && (!l.docs || l.docs.includes(idText))) l.send(ev);
    return ev;
  }
  eventText(e) {
    return `{"kind":"event","stream":${JSON.stringify(e.stream)},"seq":${e.seq},"id":${e.id},"key":${JSON.stringify(e.key)},"from_version":${e.from},"to_version":${e.to},"op":${JSON.stringify(e.op)},"patch":${e.patch},"origin":${JSON.stringify(e.origin)},"stamped":${e.origin !== null},"appended_at":"2026-01-01T00:00:00Z"}`;
  }
  snapshotText(stream, idText, version, docText, seq) {
    return `{"kind":"snapshot","stream":${JSON.stringify(stream)},"seq":${seq},"id":${idText},"key":${JSON.stringify(idText)},"version":${version},"deleted":${docText === null},"document":${docText ?? "null"},"reason":"not_held"}`;
  }
  // Raw SSE text into every open live connection (to inject duplicates or gaps).
  inject(text) {
    for (const l of this.lives) l.raw(text);
  }
  closeLives() {
    for (const l of [...this.lives]) l.close();
  }
  json(status, obj) {
    return new Response(typeof obj === "string" ? obj : JSON.stringify(obj), { status, headers: { "content-type": "application/json" } });
  }
  fetch = async (url, init = {}) => {
    const u = new URL(url);
    const headers = Object.fromEntries(Object.entries(init.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    this.requests.push({ method: init.method ?? "GET", path: u.pathname, search: u.search, headers, body: init.body });
    if (this.down) throw new TypeError("fetch failed (connection refused)");
    if (this.token) {
      if (!headers.authorization) return this.json(401, { error: "unauthorized", detail: "missing bearer token" });
      if (headers.authorization !== `Bearer ${this.token}`) return this.json(403, { error: "forbidden", detail: "bearer token not accepted" });
    }
    const m = u.pathname.match(/^\/v1\/streams\/([^/]+)\/live$/);
    if (m) {
      const stream = decodeURIComponent(m[1]);
      if (!this.streams.includes(stream)) return this.json(404, { error: "not_found", detail: `unknown stream "${stream}"; known: ${this.streams}` });
      let after = Number(u.searchParams.get("after") ?? 0);
      if (headers["last-event-id"]) after = Number(headers["last-event-id"]);
      const docs = u.searchParams.getAll("doc");
      return this.live(stream, after, docs.length ? docs : null, init.signal);
    }
    if (u.pathname === "/v1/sync/missing") return this.missing(JSON.parse(init.body));
    if (/^\/v1\/clients\/[^/]+$/.test(u.pathname) && init.method === "PUT") return this.json(201, { client_id: "x" });
    if (/^\/v1\/clients\/[^/]+\/ack$/.test(u.pathname)) {
      this.acks.push(JSON.parse(init.body));
      this.resetRequired = false;
      return this.json(200, {});
    }
    return this.json(404, { error: "not_found", detail: "no such route" });
  };
  missing(req) {
    const s = req.vector.streams[0];
    if (!this.streams.includes(s.stream)) return this.json(400, { error: "bad_request", detail: `streams[0].stream: unknown stream "${s.stream}"` });
    const limit = req.limit ?? 100;
    const head = this.events.filter((e) => e.stream === s.stream).length;
    let items = [];
    if (s.documents) {
      for (const d of s.documents) {
        const idText = JSON.stringify(d.id);
        if (d.version === 0) {
          const cur = this.docs.get(idText) ?? { version: 0, doc: null };
          const lastSeq = Math.max(0, ...this.events.filter((e) => e.id === idText).map((e) => e.seq));
          items.push(this.snapshotText(s.stream, idText, cur.version, cur.doc, lastSeq));
        } else {
          for (const e of this.events) if (e.stream === s.stream && e.id === idText && e.to > d.version) items.push(this.eventText(e));
        }
      }
      return this.json(200, `{"items":[${items.join(",")}],"has_more":false,"next_cursor":null,"positions":{${JSON.stringify(s.stream)}:${head}},"compacted":false,"reset_required":false,"notices":[]}`);
    }
    const after = req.cursor ? Number(req.cursor) : s.position ?? 0;
    const evs = this.events.filter((e) => e.stream === s.stream && e.seq > after);
    const page = evs.slice(0, limit);
    const more = evs.length > limit;
    const last = page.length ? page[page.length - 1].seq : after;
    const reset = this.resetRequired;
    return this.json(
      200,
      `{"items":[${page.map((e) => this.eventText(e)).join(",")}],"has_more":${more},"next_cursor":${more ? JSON.stringify(String(last)) : "null"},"positions":{${JSON.stringify(s.stream)}:${last}},"compacted":false,"reset_required":${reset},"notices":${reset ? `[{"stream":${JSON.stringify(s.stream)},"through_seq":1,"reason":"compacted","at":"x"}]` : "[]"}}`,
    );
  }
  live(stream, after, docs, signal) {
    const enc = new TextEncoder();
    let controller;
    const conn = {
      stream,
      docs,
      raw: (t) => {
        try {
          controller.enqueue(enc.encode(t));
        } catch {}
      },
      send: (e) => conn.raw(`id: ${e.seq}\nevent: event\ndata: ${this.eventText(e)}\n\n`),
      close: () => {
        this.lives.delete(conn);
        try {
          controller.close();
        } catch {}
      },
    };
    const body = new ReadableStream({
      start: (c) => {
        controller = c;
        conn.raw(`: subscribed after ${after}\n\n`);
        for (const e of this.events) if (e.stream === stream && e.seq > after && (!docs || docs.includes(e.id))) conn.send(e);
      },
      cancel: () => this.lives.delete(conn),
    });
    signal?.addEventListener("abort", () => conn.close());
    this.lives.add(conn);
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  }
}

export function until(cond, what, ms = 5000) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const tick = () => {
      let v;
      try {
        v = cond();
      } catch (e) {
        return reject(e);
      }
      if (v) return resolve(v);
      if (Date.now() - start > ms) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 5);
    };
    tick();
  });
}
