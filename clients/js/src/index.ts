export {
  EventSyncClient,
  backoffDelay,
  httpError,
  type Change,
  type ClientOptions,
  type Stats,
  type Status,
  type StatusEvent,
  type Subscription,
} from "./client.js";
export * from "./errors.js";
export { JNum, JsonSyntaxError, parse, stringify, exactEqual, clone, type Json, type JObject } from "./json.js";
export { applyPatch, readPatch, pointerTokens, PatchError, type PatchOp } from "./patch.js";
export { SseParser, type SseMessage } from "./sse.js";
export { MemoryStorage, IndexedDBStorage, defaultStorage, type SyncStorage } from "./storage.js";
export * from "./values.js";
