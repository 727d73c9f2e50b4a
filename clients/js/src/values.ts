/**
 * The lossless mapping between the daemon's type-preserving representation (see the
 * daemon README, "The type-preserving representation") and JavaScript values.
 *
 * | BSON                | representation                        | JavaScript                         |
 * |---------------------|---------------------------------------|------------------------------------|
 * | Int32               | `5`                                   | `number`                           |
 * | Double              | `5.0`, `{"$numberDouble": "NaN"}`     | {@link Double} (`valueOf()` → number) |
 * | Int64               | `{"$numberLong": "5"}`                | {@link Int64} (`bigint` value)     |
 * | Decimal128          | `{"$numberDecimal": "1.10"}`          | {@link Decimal128} (string value)  |
 * | String, Boolean, Null | themselves                          | `string`, `boolean`, `null`        |
 * | Array               | array                                 | `Array`                            |
 * | Document            | object (`$x` keys written `$$x`)      | plain object, key order kept (see {@link keyOrder}) |
 * | ObjectId            | `{"$oid": …}`                         | {@link ObjectId}                   |
 * | DateTime            | `{"$date": {"$numberLong": …}}`       | {@link DateTime} (`bigint` ms, `toDate()`) |
 * | Binary              | `{"$binary": {base64, subType}}`      | {@link Binary} (`Uint8Array`)      |
 * | Timestamp           | `{"$timestamp": {t, i}}`              | {@link Timestamp}                  |
 * | Regex               | `{"$regularExpression": …}`           | {@link BSONRegExp}                 |
 * | MinKey, MaxKey      | `{"$minKey": 1}`, `{"$maxKey": 1}`    | {@link MinKey}, {@link MaxKey}     |
 * | Code (with scope), Symbol, DBPointer, Undefined | canonical Extended JSON | {@link Code}, {@link BSONSymbol}, {@link DBPointer}, {@link BSONUndefined} |
 *
 * `encode(decode(x))` prints the same bytes as `x`. Int64 and Decimal128 never pass
 * through `Number`. Encoding plain JS values: an integer `number` in the Int32 range is
 * an Int32, any other `number` a Double, a `bigint` an Int64, a `Date` a DateTime, a
 * `Uint8Array` a Binary (subtype 0).
 */
import { JNum, type JObject, type Json, get, parse, stringify } from "./json.js";

/** The representation is not a valid encoding of a BSON value. */
export class ReprError extends Error {
  constructor(message: string) {
    super(`not a type-preserving BSON encoding: ${message}`);
    this.name = "ReprError";
  }
}

/** A BSON Double. `valueOf()` gives the number, so arithmetic works. */
export class Double {
  constructor(readonly value: number) {}
  valueOf(): number {
    return this.value;
  }
  toString(): string {
    return formatDouble(this.value);
  }
}
/** A BSON Int64, as a `bigint`. */
export class Int64 {
  readonly value: bigint;
  constructor(value: bigint | number | string) {
    this.value = BigInt.asIntN(64, BigInt(value));
    if (this.value !== BigInt(value)) throw new RangeError(`${value} does not fit Int64`);
  }
  valueOf(): bigint {
    return this.value;
  }
  toString(): string {
    return this.value.toString();
  }
}
/** A BSON Decimal128, as its canonical string (never parsed into a binary float). */
export class Decimal128 {
  constructor(readonly value: string) {}
  toString(): string {
    return this.value;
  }
}
/** A BSON ObjectId (24 lowercase hex digits). */
export class ObjectId {
  readonly hex: string;
  constructor(hex: string) {
    if (!/^[0-9a-fA-F]{24}$/.test(hex)) throw new ReprError(`ObjectId ${JSON.stringify(hex)}`);
    this.hex = hex.toLowerCase();
  }
  toString(): string {
    return this.hex;
  }
  /** The creation time embedded in the id. */
  getTimestamp(): Date {
    return new Date(parseInt(this.hex.slice(0, 8), 16) * 1000);
  }
}
/** A BSON DateTime: milliseconds since the epoch as a `bigint` (any Int64, even outside `Date`'s range). */
export class DateTime {
  readonly ms: bigint;
  constructor(ms: bigint | number) {
    this.ms = BigInt(ms);
  }
  static fromDate(d: Date): DateTime {
    return new DateTime(BigInt(d.getTime()));
  }
  /** As a JS `Date` (an invalid Date when outside its range). */
  toDate(): Date {
    const n = Number(this.ms);
    return new Date(Math.abs(n) <= 8.64e15 ? n : NaN);
  }
  toString(): string {
    const d = this.toDate();
    return isNaN(d.getTime()) ? `DateTime(${this.ms})` : d.toISOString();
  }
}
/** BSON Binary data with its subtype. */
export class Binary {
  constructor(
    readonly bytes: Uint8Array,
    readonly subType: number = 0,
  ) {}
  get base64(): string {
    let s = "";
    for (let i = 0; i < this.bytes.length; i++) s += String.fromCharCode(this.bytes[i]);
    return btoa(s);
  }
  static fromBase64(b64: string, subType = 0): Binary {
    const s = atob(b64);
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return new Binary(bytes, subType);
  }
}
/** A BSON Timestamp (seconds `t`, increment `i`). */
export class Timestamp {
  constructor(
    readonly t: number,
    readonly i: number,
  ) {}
}
/** A BSON regular expression (kept as pattern and options; not compiled). */
export class BSONRegExp {
  constructor(
    readonly pattern: string,
    readonly options: string,
  ) {}
}
/** BSON MinKey. */
export class MinKey {}
/** BSON MaxKey. */
export class MaxKey {}
/** BSON JavaScript code; `scope` (code with scope) is kept as canonical Extended JSON. */
export class Code {
  constructor(
    readonly code: string,
    readonly scope?: Json,
  ) {}
}
/** BSON Symbol. */
export class BSONSymbol {
  constructor(readonly value: string) {}
}
/** BSON DBPointer. */
export class DBPointer {
  constructor(
    readonly ref: string,
    readonly id: ObjectId,
  ) {}
}
/** BSON Undefined. */
export class BSONUndefined {}

/** A decoded BSON value. */
export type Value =
  | null
  | boolean
  | string
  | number
  | Double
  | Int64
  | Decimal128
  | ObjectId
  | DateTime
  | Binary
  | Timestamp
  | BSONRegExp
  | MinKey
  | MaxKey
  | Code
  | BSONSymbol
  | DBPointer
  | BSONUndefined
  | Value[]
  | Document;
/** A decoded document. */
export interface Document {
  [key: string]: Value;
}

/**
 * The original key order of a decoded document, when JavaScript would enumerate its keys
 * differently (integer-like keys such as `"10"` come first in a JS object). `encode` uses
 * it, so documents round-trip exactly.
 */
export const keyOrder: unique symbol = Symbol("eventsync.keyOrder");

/**
 * Formats a finite Double the way the daemon does (Rust `ryu`, as used by serde_json):
 * shortest round-trip digits, always with a fraction or exponent (`5.0`, `1e+300`, `1e-7`).
 */
export function formatDouble(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mant, expText] = Math.abs(x).toExponential().split("e");
  const digits = mant.replace(".", "");
  const length = digits.length;
  const kk = Number(expText) + 1; // 10^(kk-1) <= |x| < 10^kk
  const k = kk - length;
  if (k >= 0 && kk <= 16) return sign + digits + "0".repeat(k) + ".0";
  if (kk > 0 && kk <= 16) return sign + digits.slice(0, kk) + "." + digits.slice(kk);
  if (kk > -5 && kk <= 0) return sign + "0." + "0".repeat(-kk) + digits;
  const exp = kk - 1 > 0 ? "e+" + (kk - 1) : "e" + (kk - 1);
  if (length === 1) return sign + digits + exp;
  return sign + digits[0] + "." + digits.slice(1) + exp;
}

function str(v: Json | undefined, what: string): string {
  if (typeof v !== "string") throw new ReprError(`${what} must be a string`);
  return v;
}
function u32(v: Json | undefined, what: string): number {
  if (!(v instanceof JNum) || v.isFloat) throw new ReprError(`${what} must be an integer`);
  const n = Number(v.text);
  if (!(n >= 0 && n <= 0xffffffff)) throw new ReprError(`${what} out of range`);
  return n;
}

function isWrapper(m: JObject): boolean {
  const first = m.keys().next();
  return !first.done && first.value.startsWith("$") && !first.value.startsWith("$$");
}

function decodeDouble(text: string): Double {
  switch (text) {
    case "NaN":
      return new Double(NaN);
    case "Infinity":
      return new Double(Infinity);
    case "-Infinity":
      return new Double(-Infinity);
  }
  const n = Number(text);
  if (Number.isNaN(n)) throw new ReprError(`$numberDouble ${JSON.stringify(text)}`);
  return new Double(n);
}

function decodeWrapper(m: JObject): Value {
  const [key] = m.keys();
  const v = m.get(key);
  const only = (n: number) => {
    if (m.size !== n) throw new ReprError(`unexpected members next to ${key}`);
  };
  switch (key) {
    case "$numberLong":
      only(1);
      return new Int64(BigInt(str(v, key)));
    case "$numberInt": {
      only(1);
      const n = Number(str(v, key));
      if (!Number.isInteger(n) || n !== (n | 0)) throw new ReprError(`$numberInt ${String(v)}`);
      return n;
    }
    case "$numberDouble":
      only(1);
      return decodeDouble(str(v, key));
    case "$numberDecimal":
      only(1);
      return new Decimal128(str(v, key));
    case "$oid":
      only(1);
      return new ObjectId(str(v, key));
    case "$symbol":
      only(1);
      return new BSONSymbol(str(v, key));
    case "$date": {
      only(1);
      const n = get(v as Json, "$numberLong");
      if (!(v instanceof Map) || v.size !== 1 || typeof n !== "string") {
        throw new ReprError(`$date must be {"$numberLong": "…"}`);
      }
      return new DateTime(BigInt(n));
    }
    case "$binary": {
      only(1);
      const b64 = str(get(v as Json, "base64"), "$binary.base64");
      const sub = str(get(v as Json, "subType"), "$binary.subType");
      return Binary.fromBase64(b64, parseInt(sub, 16));
    }
    case "$timestamp":
      only(1);
      return new Timestamp(u32(get(v as Json, "t"), "$timestamp.t"), u32(get(v as Json, "i"), "$timestamp.i"));
    case "$regularExpression":
      only(1);
      return new BSONRegExp(
        str(get(v as Json, "pattern"), "$regularExpression.pattern"),
        str(get(v as Json, "options"), "$regularExpression.options"),
      );
    case "$minKey":
      only(1);
      return new MinKey();
    case "$maxKey":
      only(1);
      return new MaxKey();
    case "$undefined":
      only(1);
      return new BSONUndefined();
    case "$code":
      if (m.size === 2 && m.has("$scope")) return new Code(str(v, key), m.get("$scope") as Json);
      only(1);
      return new Code(str(v, key));
    case "$dbPointer": {
      only(1);
      const id = decode(get(v as Json, "$id") as Json);
      if (!(id instanceof ObjectId)) throw new ReprError("$dbPointer.$id must be an ObjectId");
      return new DBPointer(str(get(v as Json, "$ref"), "$dbPointer.$ref"), id);
    }
  }
  throw new ReprError(`unknown wrapper ${JSON.stringify(key)} (user keys starting with '$' are written '$$')`);
}

function unescapeKey(k: string): string {
  if (!k.startsWith("$")) return k;
  if (k.startsWith("$$")) return k.slice(1);
  throw new ReprError(`key ${JSON.stringify(k)} starts with a single '$' outside a wrapper`);
}

function setOwn(o: Document, k: string, v: Value): void {
  if (k === "__proto__") Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
  else o[k] = v;
}

/** Decodes the exact JSON form of the representation into JavaScript values. */
export function decode(v: Json): Value {
  if (v === null || typeof v === "boolean" || typeof v === "string") return v;
  if (v instanceof JNum) {
    if (v.isFloat) return new Double(v.toNumber());
    const n = Number(v.text);
    if (n !== (n | 0)) {
      throw new ReprError(`integer ${v.text} does not fit Int32; Int64 values are written {"$numberLong": "${v.text}"}`);
    }
    return n;
  }
  if (Array.isArray(v)) return v.map(decode);
  if (isWrapper(v)) return decodeWrapper(v);
  const out: Document = {};
  const keys: string[] = [];
  for (const [k, x] of v) {
    const key = unescapeKey(k);
    keys.push(key);
    setOwn(out, key, decode(x));
  }
  const natural = Object.keys(out);
  if (natural.some((k, i) => k !== keys[i])) {
    Object.defineProperty(out, keyOrder, { value: keys, enumerable: false });
  }
  return out;
}

/** Decodes representation text (e.g. a document as the daemon sends it). */
export function decodeText(text: string): Value {
  return decode(parse(text));
}

function wrap(key: string, v: Json): JObject {
  return new Map([[key, v]]);
}

/** Encodes a JavaScript value into the exact JSON form of the representation. */
export function encode(v: Value | bigint | Date | Uint8Array | undefined): Json {
  if (v === null || typeof v === "boolean" || typeof v === "string") return v;
  if (v === undefined) throw new ReprError("undefined is not a BSON value (use BSONUndefined or null)");
  if (typeof v === "number") {
    if (Number.isInteger(v) && v === (v | 0) && !Object.is(v, -0)) return new JNum(String(v));
    return encode(new Double(v));
  }
  if (typeof v === "bigint") return encode(new Int64(v));
  if (Array.isArray(v)) return v.map((x) => encode(x));
  if (v instanceof Double) {
    const x = v.value;
    if (Number.isNaN(x)) return wrap("$numberDouble", "NaN");
    if (x === Infinity) return wrap("$numberDouble", "Infinity");
    if (x === -Infinity) return wrap("$numberDouble", "-Infinity");
    if (Object.is(x, -0)) return wrap("$numberDouble", "-0.0");
    return new JNum(formatDouble(x));
  }
  if (v instanceof Int64) return wrap("$numberLong", v.value.toString());
  if (v instanceof Decimal128) return wrap("$numberDecimal", v.value);
  if (v instanceof ObjectId) return wrap("$oid", v.hex);
  if (v instanceof DateTime) return wrap("$date", wrap("$numberLong", v.ms.toString()));
  if (v instanceof Date) return encode(DateTime.fromDate(v));
  if (v instanceof Uint8Array) return encode(new Binary(v));
  if (v instanceof Binary) {
    return wrap(
      "$binary",
      new Map<string, Json>([
        ["base64", v.base64],
        ["subType", v.subType.toString(16).padStart(2, "0")],
      ]),
    );
  }
  if (v instanceof Timestamp) {
    return wrap(
      "$timestamp",
      new Map<string, Json>([
        ["t", new JNum(String(v.t))],
        ["i", new JNum(String(v.i))],
      ]),
    );
  }
  if (v instanceof BSONRegExp) {
    return wrap(
      "$regularExpression",
      new Map<string, Json>([
        ["pattern", v.pattern],
        ["options", v.options],
      ]),
    );
  }
  if (v instanceof MinKey) return wrap("$minKey", new JNum("1"));
  if (v instanceof MaxKey) return wrap("$maxKey", new JNum("1"));
  if (v instanceof BSONUndefined) return wrap("$undefined", true);
  if (v instanceof Code) {
    const m = wrap("$code", v.code);
    if (v.scope !== undefined) m.set("$scope", v.scope);
    return m;
  }
  if (v instanceof BSONSymbol) return wrap("$symbol", v.value);
  if (v instanceof DBPointer) {
    return wrap(
      "$dbPointer",
      new Map<string, Json>([
        ["$ref", v.ref],
        ["$id", encode(v.id)],
      ]),
    );
  }
  if (typeof v === "object") {
    const doc = v as Document & { [keyOrder]?: string[] };
    let keys = Object.keys(doc);
    const order = doc[keyOrder];
    if (order && order.length === keys.length && order.every((k) => Object.prototype.hasOwnProperty.call(doc, k))) {
      keys = order;
    }
    const m: JObject = new Map();
    for (const k of keys) {
      const x = doc[k];
      if (x === undefined) continue; // like JSON.stringify: an absent member
      m.set(k.startsWith("$") ? "$" + k : k, encode(x));
    }
    return m;
  }
  throw new ReprError(`cannot encode a ${typeof v}`);
}

/** Encodes a JavaScript value as representation text. */
export function encodeText(v: Value | bigint | Date | Uint8Array): string {
  return stringify(encode(v));
}

/**
 * A plain, lossy JavaScript view (for display or JSON APIs): Double → number, Int64 →
 * number when safe else string, Decimal128 → string, DateTime → Date, ObjectId → hex.
 */
export function toPlain(v: Value): unknown {
  if (v === null || typeof v !== "object") return v;
  if (Array.isArray(v)) return v.map(toPlain);
  if (v instanceof Double) return v.value;
  if (v instanceof Int64) {
    const n = Number(v.value);
    return Number.isSafeInteger(n) ? n : v.value.toString();
  }
  if (v instanceof Decimal128 || v instanceof ObjectId) return v.toString();
  if (v instanceof DateTime) return v.toDate();
  if (v instanceof BSONSymbol) return v.value;
  if (v instanceof Binary || v instanceof Timestamp || v instanceof BSONRegExp) return v;
  if (v instanceof MinKey || v instanceof MaxKey || v instanceof Code || v instanceof DBPointer || v instanceof BSONUndefined) return v;
  const out: Record<string, unknown> = {};
  for (const k of Object.keys(v)) out[k] = toPlain((v as Document)[k]);
  return out;
}
