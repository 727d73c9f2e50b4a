/** Every error the client reports is an EventSyncError with a `code`. */
export class EventSyncError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly status?: number,
    readonly detail?: string,
  ) {
    super(message);
    this.name = "EventSyncError";
  }
}
/** The daemon refused the token (401 without one, 403 with a wrong one). Not retried. */
export class AuthError extends EventSyncError {
  constructor(status: number, detail?: string) {
    super(
      status === 401 ? "eventsync: missing bearer token (pass `token`)" : "eventsync: bearer token not accepted",
      status === 401 ? "unauthorized" : "forbidden",
      status,
      detail,
    );
    this.name = "AuthError";
  }
}
/** The stream is not configured on the daemon. Not retried. */
export class UnknownStreamError extends EventSyncError {
  constructor(
    readonly stream: string,
    detail?: string,
  ) {
    super(`eventsync: unknown stream ${JSON.stringify(stream)}${detail ? ` (${detail})` : ""}`, "unknown_stream", 404, detail);
    this.name = "UnknownStreamError";
  }
}
/** The daemon could not be reached, or answered 5xx; the client keeps retrying with backoff. */
export class UnreachableError extends EventSyncError {
  constructor(
    readonly url: string,
    cause: unknown,
    status?: number,
  ) {
    super(
      `eventsync: server unreachable at ${url}: ${cause instanceof Error ? cause.message : String(cause)}`,
      "unreachable",
      status,
    );
    this.name = "UnreachableError";
  }
}
/** The daemon rejected a request (4xx other than auth/unknown stream). */
export class RequestError extends EventSyncError {
  constructor(status: number, code: string, detail: string) {
    super(`eventsync: request rejected (${status} ${code}): ${detail}`, code, status, detail);
    this.name = "RequestError";
  }
}
/** The server sent something the client cannot apply (a broken patch, bad representation). */
export class ProtocolError extends EventSyncError {
  constructor(message: string) {
    super(`eventsync: ${message}`, "protocol");
    this.name = "ProtocolError";
  }
}
/** `waitFor` gave up. */
export class TimeoutError extends EventSyncError {
  constructor(message: string) {
    super(`eventsync: ${message}`, "timeout");
    this.name = "TimeoutError";
  }
}
/** The client was closed. */
export class ClosedError extends EventSyncError {
  constructor() {
    super("eventsync: client closed", "closed");
    this.name = "ClosedError";
  }
}
