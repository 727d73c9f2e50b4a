//! Golden fixtures shared with the TypeScript client (`clients/js/fixtures/patches.json`):
//! (before, patch, after) cases computed by the Rust diff over every BSON type, `$`/`.`
//! keys, `-0.0`, NaN, big Int64 values and random edits. The JS tests apply each patch to
//! `before` and must reproduce `after` byte for byte.
//!
//! This test fails when the committed file differs from what the diff produces now.
//! Regenerate with:
//!
//! ```sh
//! EVENTSYNC_UPDATE_FIXTURES=1 cargo test --test golden_fixtures
//! ```

use bson::spec::BinarySubtype;
use bson::{
    doc, oid::ObjectId, Binary, Bson, DateTime, Decimal128, Document, JavaScriptCodeWithScope,
    Regex, Timestamp,
};
use eventsync::diff::{apply, diff, repr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/clients/js/fixtures/patches.json"
);

fn dec(s: &str) -> Bson {
    Bson::Decimal128(s.parse::<Decimal128>().expect("valid decimal"))
}

fn bin(subtype: u8, bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::from(subtype),
        bytes: bytes.to_vec(),
    })
}

/// One value of every BSON type (several for the tricky ones).
fn every_type() -> Vec<(&'static str, Bson)> {
    let oid = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").expect("oid");
    let db_pointer = Bson::try_from(serde_json::json!({
        "$dbPointer": { "$ref": "things", "$id": { "$oid": "64b7f0c2a1b2c3d4e5f60718" } }
    }))
    .expect("dbPointer");
    vec![
        ("int32", Bson::Int32(-42)),
        ("int32_max", Bson::Int32(i32::MAX)),
        ("int64_small", Bson::Int64(5)),
        ("int64_big", Bson::Int64(9_007_199_254_740_993)),
        ("int64_max", Bson::Int64(i64::MAX)),
        ("int64_min", Bson::Int64(i64::MIN)),
        ("double", Bson::Double(0.1)),
        ("double_integral", Bson::Double(5.0)),
        ("double_big", Bson::Double(1e300)),
        ("double_1e16", Bson::Double(1e16)),
        ("double_1e21", Bson::Double(1.2345678901234568e21)),
        ("double_small", Bson::Double(1e-7)),
        ("double_1e15", Bson::Double(1e15)),
        ("double_2_pow_53", Bson::Double(9_007_199_254_740_993.0)),
        ("double_1e_5", Bson::Double(1.5e-5)),
        ("double_1e_6", Bson::Double(1e-6)),
        ("double_fraction", Bson::Double(123_456_789.012_345_68)),
        ("double_0_0001", Bson::Double(0.0001)),
        ("double_subnormal", Bson::Double(5e-324)),
        ("double_max", Bson::Double(f64::MAX)),
        ("double_neg_zero", Bson::Double(-0.0)),
        ("double_zero", Bson::Double(0.0)),
        ("double_nan", Bson::Double(f64::NAN)),
        ("double_inf", Bson::Double(f64::INFINITY)),
        ("double_neg_inf", Bson::Double(f64::NEG_INFINITY)),
        ("decimal", dec("1.10")),
        ("decimal_big", dec("1234567890123456789012345678901234")),
        ("decimal_exp", dec("-1.5E-30")),
        ("decimal_neg_zero", dec("-0")),
        ("decimal_nan", dec("NaN")),
        ("decimal_inf", dec("-Infinity")),
        (
            "string",
            Bson::String("héllo \"wörld\" \\ / \u{1F600}".into()),
        ),
        (
            "string_control",
            Bson::String("tab\tnl\ncr\r\u{1}\u{7f}\u{2028}".into()),
        ),
        ("string_empty", Bson::String(String::new())),
        ("bool", Bson::Boolean(true)),
        ("null", Bson::Null),
        ("object_id", Bson::ObjectId(oid)),
        (
            "date",
            Bson::DateTime(DateTime::from_millis(1_700_000_000_123)),
        ),
        (
            "date_negative",
            Bson::DateTime(DateTime::from_millis(-62_135_596_800_000)),
        ),
        ("date_far", Bson::DateTime(DateTime::from_millis(i64::MAX))),
        ("binary", bin(0, b"\x00\x01\xfe\xff bytes")),
        ("binary_uuid", bin(4, &[0x12; 16])),
        ("binary_user", bin(0x80, b"")),
        (
            "timestamp",
            Bson::Timestamp(Timestamp {
                time: u32::MAX,
                increment: 7,
            }),
        ),
        (
            "regex",
            Bson::RegularExpression(Regex {
                pattern: "^a.*\\d$".into(),
                options: "imsx".into(),
            }),
        ),
        ("min_key", Bson::MinKey),
        ("max_key", Bson::MaxKey),
        (
            "code",
            Bson::JavaScriptCode("function () { return 1; }".into()),
        ),
        (
            "code_with_scope",
            Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "x + y".into(),
                scope: doc! { "x": 1, "y": 2_i64 },
            }),
        ),
        ("symbol", Bson::Symbol("sym".into())),
        ("undefined", Bson::Undefined),
        ("db_pointer", db_pointer),
        (
            "array",
            Bson::Array(vec![Bson::Int32(1), Bson::Int64(1), Bson::Double(1.0)]),
        ),
        (
            "document",
            Bson::Document(doc! { "$inner": 1, "a.b": { "c": Bson::Null } }),
        ),
    ]
}

fn text(d: &Document) -> String {
    repr::to_text(d)
}

struct Case {
    name: String,
    before: Document,
    after: Document,
}

fn case(name: impl Into<String>, before: Document, after: Document) -> Case {
    Case {
        name: name.into(),
        before,
        after,
    }
}

fn named_cases() -> Vec<Case> {
    let mut out = Vec::new();
    let all = every_type();
    let base = doc! { "_id": 1, "version": 1_i64, "name": "raid" };
    for (i, (name, v)) in all.iter().enumerate() {
        let mut with = base.clone();
        with.insert("v", v.clone());
        out.push(case(format!("add {name}"), base.clone(), with.clone()));
        out.push(case(format!("remove {name}"), with.clone(), base.clone()));
        let (next_name, next) = &all[(i + 1) % all.len()];
        let mut other = base.clone();
        other.insert("v", next.clone());
        out.push(case(
            format!("replace {name} with {next_name}"),
            with,
            other,
        ));
    }
    // Every type at once, inserted into an empty document (the shape of an insert event).
    let mut everything = Document::new();
    for (name, v) in &all {
        everything.insert(*name, v.clone());
    }
    out.push(case(
        "insert every type",
        Document::new(),
        everything.clone(),
    ));
    let mut nested = doc! { "_id": "every", "list": [] };
    nested.insert(
        "list",
        Bson::Array(all.iter().map(|(_, v)| v.clone()).collect()),
    );
    out.push(case("array of every type", doc! { "_id": "every" }, nested));
    // Same value, different type: must be a replace.
    out.push(case(
        "int32 to int64 same value",
        doc! { "n": 1 },
        doc! { "n": 1_i64 },
    ));
    out.push(case(
        "int32 to double same value",
        doc! { "n": 1 },
        doc! { "n": 1.0 },
    ));
    out.push(case(
        "double zero to negative zero",
        doc! { "n": 0.0 },
        doc! { "n": -0.0 },
    ));
    out.push(case(
        "nan stays nan",
        doc! { "n": f64::NAN, "m": 1 },
        doc! { "n": f64::NAN, "m": 2 },
    ));
    // Keys that need escaping in the representation or in JSON Pointers.
    out.push(case(
        "dollar and dot keys",
        doc! { "$set": 1, "a.b": 2, "$$x": 3 },
        doc! { "$set": 2, "a.b": { "$inc": 1 }, "$$x": 3, "$numberLong": "7" },
    ));
    out.push(case(
        "pointer escapes",
        doc! { "a/b": 1, "m~n": 2, "": 3 },
        doc! { "a/b": 2, "m~n": { "~1": [1] }, "": 4 },
    ));
    out.push(case(
        "integer-like keys keep their order",
        doc! { "b": 1, "10": 2, "2": 3 },
        doc! { "b": 1, "10": 2, "2": 4, "1": 5, "__proto__": { "x": 1 } },
    ));
    out.push(case(
        "key order change replaces the object",
        doc! { "a": 1, "b": 2 },
        doc! { "b": 2, "a": 1 },
    ));
    out.push(case(
        "array grows and shrinks",
        doc! { "a": [1, 2, 3, 4], "b": [1] },
        doc! { "a": [1, 5], "b": [1, [2, { "c": 3 }], 4_i64] },
    ));
    out.push(case(
        "nested documents",
        doc! { "boss": { "hp": 1000_i64, "phase": 1 }, "players": { "p1": { "dmg": 10 } } },
        doc! { "boss": { "hp": 990_i64, "phase": 1 }, "players": { "p1": { "dmg": 20 }, "p2": { "dmg": 5 } } },
    ));
    out.push(case(
        "delete all keys",
        doc! { "a": 1, "b": { "c": 2 } },
        Document::new(),
    ));
    out.push(case("identical", base.clone(), base));
    out
}

fn random_leaf(rng: &mut StdRng) -> Bson {
    let all = every_type();
    match rng.gen_range(0..8) {
        0 => Bson::Int32(rng.gen()),
        1 => Bson::Int64(rng.gen()),
        2 => Bson::Double(f64::from_bits(rng.gen::<u64>())),
        3 => Bson::Double(rng.gen_range(-1e6..1e6)),
        4 => Bson::Double(f64::from(rng.gen_range(-1000..1000)) / 8.0),
        5 => Bson::String(
            (0..rng.gen_range(0..5))
                .map(|_| ['a', '$', '.', '/', '~', 'é', '"', '\n'][rng.gen_range(0..8)])
                .collect(),
        ),
        _ => all[rng.gen_range(0..all.len())].1.clone(),
    }
}

fn random_key(rng: &mut StdRng) -> String {
    [
        "a", "b", "c", "$x", "$$y", "a.b", "s/l~ash", "", "0", "10", "_id",
    ][rng.gen_range(0..11)]
    .to_owned()
}

fn random_value(rng: &mut StdRng, depth: u32) -> Bson {
    if depth == 0 || rng.gen_range(0..3) > 0 {
        return random_leaf(rng);
    }
    if rng.gen() {
        Bson::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        )
    } else {
        Bson::Document(random_doc(rng, depth - 1))
    }
}

fn random_doc(rng: &mut StdRng, depth: u32) -> Document {
    let mut d = Document::new();
    for _ in 0..rng.gen_range(0..6) {
        d.insert(random_key(rng), random_value(rng, depth));
    }
    d
}

fn edit(rng: &mut StdRng, value: &Bson, depth: u32) -> Bson {
    match value {
        Bson::Document(d) if depth > 0 && rng.gen_range(0..4) > 0 => {
            let mut d = d.clone();
            let keys: Vec<String> = d.keys().cloned().collect();
            for _ in 0..rng.gen_range(1..4) {
                match (rng.gen_range(0..4), keys.is_empty()) {
                    (0, false) => {
                        d.remove(&keys[rng.gen_range(0..keys.len())]);
                    }
                    (1, false) => {
                        let k = &keys[rng.gen_range(0..keys.len())];
                        if let Some(old) = d.get(k).cloned() {
                            d.insert(k.clone(), edit(rng, &old, depth - 1));
                        }
                    }
                    _ => {
                        d.insert(random_key(rng), random_value(rng, 2));
                    }
                }
            }
            Bson::Document(d)
        }
        Bson::Array(items) if depth > 0 && rng.gen() => {
            let mut items = items.clone();
            match rng.gen_range(0..3) {
                0 if !items.is_empty() => {
                    items.truncate(rng.gen_range(0..items.len()));
                }
                1 if !items.is_empty() => {
                    let i = rng.gen_range(0..items.len());
                    items[i] = edit(rng, &items[i], depth - 1);
                }
                _ => items.push(random_value(rng, 1)),
            }
            Bson::Array(items)
        }
        _ => random_value(rng, 2),
    }
}

fn random_cases(n: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(0x6576_656e_7473);
    (0..n)
        .map(|i| {
            let before = random_doc(&mut rng, 3);
            let after = match edit(&mut rng, &Bson::Document(before.clone()), 3) {
                Bson::Document(d) => d,
                _ => random_doc(&mut rng, 3),
            };
            case(format!("random {i}"), before, after)
        })
        .collect()
}

fn bytes(d: &Document) -> Vec<u8> {
    let mut v = Vec::new();
    d.to_writer(&mut v).expect("serialisable");
    v
}

fn render(cases: &[Case]) -> String {
    let mut out = String::from("{\n");
    out += "  \"about\": \"(before, patch, after) cases from the Rust diff over the type-preserving representation; generated by tests/golden_fixtures.rs (EVENTSYNC_UPDATE_FIXTURES=1 cargo test --test golden_fixtures). before/patch/after are JSON texts: applying patch to before must give after byte for byte.\",\n";
    out += &format!("  \"count\": {},\n  \"cases\": [\n", cases.len());
    for (i, c) in cases.iter().enumerate() {
        let patch = diff(&c.before, &c.after);
        let applied = apply(&c.before, &patch).expect("patch applies");
        assert_eq!(
            bytes(&applied),
            bytes(&c.after),
            "case {:?}: the Rust apply must reproduce after",
            c.name
        );
        let line = serde_json::json!({
            "name": c.name,
            "before": text(&c.before),
            "patch": serde_json::to_string(&patch).expect("patch JSON"),
            "after": text(&c.after),
        });
        out += "    ";
        out += &line.to_string();
        if i + 1 < cases.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out += "  ]\n}\n";
    out
}

#[test]
fn golden_patch_fixtures_are_up_to_date() {
    let mut cases = named_cases();
    cases.extend(random_cases(300));
    let text = render(&cases);
    if std::env::var_os("EVENTSYNC_UPDATE_FIXTURES").is_some() {
        std::fs::create_dir_all(std::path::Path::new(FIXTURES).parent().expect("dir"))
            .expect("create fixtures dir");
        std::fs::write(FIXTURES, &text).expect("write fixtures");
        eprintln!("wrote {} cases to {FIXTURES}", cases.len());
        return;
    }
    let committed = std::fs::read_to_string(FIXTURES).unwrap_or_default();
    assert!(
        committed == text,
        "{FIXTURES} is missing or out of date with the Rust diff; regenerate it with \
         `EVENTSYNC_UPDATE_FIXTURES=1 cargo test --test golden_fixtures` and commit it"
    );
}

#[test]
fn fixtures_cover_every_bson_type() {
    // Every element type the representation knows appears in the named cases.
    let mut seen = std::collections::BTreeSet::new();
    for (_, v) in every_type() {
        seen.insert(format!("{:?}", v.element_type()));
    }
    for t in [
        "Double",
        "String",
        "EmbeddedDocument",
        "Array",
        "Binary",
        "Undefined",
        "ObjectId",
        "Boolean",
        "DateTime",
        "Null",
        "RegularExpression",
        "DbPointer",
        "JavaScriptCode",
        "Symbol",
        "JavaScriptCodeWithScope",
        "Int32",
        "Timestamp",
        "Int64",
        "Decimal128",
        "MaxKey",
        "MinKey",
    ] {
        assert!(seen.contains(t), "no fixture value of type {t}");
    }
}
