/**
 * Exact JSON: a parser and printer that keep what `JSON.parse` loses.
 *
 * - numbers keep their text ({@link JNum}), so `5` (Int32) and `5.0` (Double) stay
 *   different and `9007199254740993` is not rounded;
 * - objects are `Map`s, so key order is kept exactly (plain JS objects move integer-like
 *   keys such as `"10"` to the front, and treat `"__proto__"` specially).
 *
 * {@link stringify} prints compactly, as serde_json does, so `stringify(parse(t)) === t`
 * for any text the daemon sends.
 */

/** A JSON number, kept as its text. */
export class JNum {
  constructor(readonly text: string) {}
  /** True for a number written with a fraction or exponent (a BSON Double). */
  get isFloat(): boolean {
    return /[.eE]/.test(this.text);
  }
  /** The value as a JS number (may round). */
  toNumber(): number {
    return Number(this.text);
  }
}

/** A JSON value in its exact form. */
export type Json = null | boolean | string | JNum | Json[] | JObject;
/** A JSON object with its key order. */
export type JObject = Map<string, Json>;

/** The text is not valid JSON. */
export class JsonSyntaxError extends SyntaxError {
  constructor(message: string, readonly offset: number) {
    super(`${message} at offset ${offset}`);
    this.name = "JsonSyntaxError";
  }
}

const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

/** Parses JSON text into the exact form. */
export function parse(text: string): Json {
  let i = 0;
  const n = text.length;
  const ws = () => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 10 || c === 13 || c === 9) i++;
      else break;
    }
  };
  const fail = (what: string): never => {
    throw new JsonSyntaxError(what, i);
  };
  const str = (): string => {
    // text[i] === '"'
    const start = i + 1;
    let j = start;
    let escaped = false;
    for (;;) {
      if (j >= n) fail("unterminated string");
      const c = text.charCodeAt(j);
      if (c === 34) break;
      if (c === 92) {
        escaped = true;
        j += 2;
        continue;
      }
      if (c < 32) {
        i = j;
        fail("control character in string");
      }
      j++;
    }
    i = j + 1;
    if (!escaped) return text.slice(start, j);
    try {
      return JSON.parse(text.slice(start - 1, j + 1)) as string;
    } catch {
      i = start;
      return fail("invalid string escape");
    }
  };
  const value = (depth: number): Json => {
    if (depth > 1000) fail("nesting too deep");
    ws();
    const c = text[i];
    switch (c) {
      case "{": {
        i++;
        const m: JObject = new Map();
        ws();
        if (text[i] === "}") {
          i++;
          return m;
        }
        for (;;) {
          ws();
          if (text[i] !== '"') fail("expected a key");
          const k = str();
          ws();
          if (text[i] !== ":") fail("expected ':'");
          i++;
          const v = value(depth + 1);
          m.delete(k); // a repeated key: the last wins, placed last (as serde_json does)
          m.set(k, v);
          ws();
          if (text[i] === ",") {
            i++;
            continue;
          }
          if (text[i] === "}") {
            i++;
            return m;
          }
          fail("expected ',' or '}'");
        }
      }
      case "[": {
        i++;
        const a: Json[] = [];
        ws();
        if (text[i] === "]") {
          i++;
          return a;
        }
        for (;;) {
          a.push(value(depth + 1));
          ws();
          if (text[i] === ",") {
            i++;
            continue;
          }
          if (text[i] === "]") {
            i++;
            return a;
          }
          fail("expected ',' or ']'");
        }
      }
      case '"':
        return str();
      case "t":
        if (text.startsWith("true", i)) {
          i += 4;
          return true;
        }
        break;
      case "f":
        if (text.startsWith("false", i)) {
          i += 5;
          return false;
        }
        break;
      case "n":
        if (text.startsWith("null", i)) {
          i += 4;
          return null;
        }
        break;
      default: {
        NUMBER.lastIndex = i;
        const m = NUMBER.exec(text);
        if (m) {
          i += m[0].length;
          return new JNum(m[0]);
        }
      }
    }
    return fail("unexpected character");
  };
  const v = value(0);
  ws();
  if (i !== n) fail("trailing characters");
  return v;
}

/** Prints the exact form as compact JSON text (serde_json's `to_string` layout). */
export function stringify(v: Json): string {
  if (v === null) return "null";
  switch (typeof v) {
    case "boolean":
      return v ? "true" : "false";
    case "string":
      return JSON.stringify(v);
  }
  if (v instanceof JNum) return v.text;
  if (Array.isArray(v)) return "[" + v.map(stringify).join(",") + "]";
  let out = "{";
  let first = true;
  for (const [k, x] of v) {
    if (!first) out += ",";
    first = false;
    out += JSON.stringify(k) + ":" + stringify(x);
  }
  return out + "}";
}

/** A deep copy. */
export function clone(v: Json): Json {
  if (v === null || typeof v !== "object" || v instanceof JNum) return v;
  if (Array.isArray(v)) return v.map(clone);
  const m: JObject = new Map();
  for (const [k, x] of v) m.set(k, clone(x));
  return m;
}

/**
 * Exact equality: same types (Int32 `1` differs from Double `1.0`), same key order.
 * Mirrors the Rust `exact_eq`.
 */
export function exactEqual(a: Json, b: Json): boolean {
  if (a === b) return true;
  if (a instanceof JNum && b instanceof JNum) {
    if (a.isFloat !== b.isFloat) return false;
    return a.isFloat ? a.toNumber() === b.toNumber() : BigInt(a.text) === BigInt(b.text);
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    return a.length === b.length && a.every((x, i) => exactEqual(x, b[i]));
  }
  if (a instanceof Map && b instanceof Map) {
    if (a.size !== b.size) return false;
    const ib = b.entries();
    for (const [k, x] of a) {
      const [kb, y] = ib.next().value as [string, Json];
      if (k !== kb || !exactEqual(x, y)) return false;
    }
    return true;
  }
  return false;
}

/** Reads a member of a JSON object (or undefined). */
export function get(o: Json | undefined, key: string): Json | undefined {
  return o instanceof Map ? o.get(key) : undefined;
}
