/** A minimal Server-Sent Events parser over a fetch body (EventSource cannot send a bearer token). */
export interface SseMessage {
  id?: string;
  event: string;
  data: string;
}

/** Feeds text chunks; calls `onMessage` per event and `onComment` per comment line. */
export class SseParser {
  private buf = "";
  private data: string[] = [];
  private event = "";
  private id: string | undefined;
  constructor(
    private onMessage: (m: SseMessage) => void,
    private onComment: (c: string) => void = () => {},
  ) {}
  push(chunk: string): void {
    this.buf += chunk;
    for (;;) {
      const nl = this.buf.search(/\r\n|\r|\n/);
      if (nl < 0) break;
      // a lone '\r' at the end may be the first half of "\r\n": wait for more
      if (this.buf[nl] === "\r" && nl === this.buf.length - 1) break;
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + (this.buf.startsWith("\r\n", nl) ? 2 : 1));
      this.line(line);
    }
  }
  private line(line: string): void {
    if (line === "") {
      if (this.data.length > 0) {
        this.onMessage({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.event = "";
      this.id = undefined;
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trimStart());
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id") this.id = value;
  }
}
