//! Property tests of the type-exact diff: `apply(a, diff(a, b)) == b` byte for byte, and
//! `diff(a, a)` is empty, over random documents holding every BSON type.

use bson::spec::BinarySubtype;
use bson::{doc, oid::ObjectId, Binary, Bson, DateTime, Decimal128, Document, Regex, Timestamp};
use eventsync::diff::{apply, diff, repr};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}",
        Just("$x".to_owned()),
        Just("$$y".to_owned()),
        Just("a.b".to_owned()),
        Just("s/l~ash".to_owned()),
        Just("".to_owned()),
        Just("$numberLong".to_owned()),
        Just("_id".to_owned()),
    ]
}

fn leaf() -> impl Strategy<Value = Bson> {
    prop_oneof![
        any::<i32>().prop_map(Bson::Int32),
        any::<i64>().prop_map(Bson::Int64),
        any::<f64>().prop_map(Bson::Double),
        prop_oneof![
            Just(0.0),
            Just(-0.0),
            Just(1.0),
            Just(2.5),
            Just(f64::NAN),
            Just(f64::INFINITY)
        ]
        .prop_map(Bson::Double),
        ".{0,6}".prop_map(Bson::String),
        any::<bool>().prop_map(Bson::Boolean),
        Just(Bson::Null),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
        (-62_000_000_000_000i64..250_000_000_000_000i64)
            .prop_map(|ms| Bson::DateTime(DateTime::from_millis(ms))),
        // Decimals as MongoDB produces them (canonical encodings of decimal strings).
        ("-?[0-9]{1,20}", 0..10usize, -30i32..30).prop_map(|(digits, point, exp)| {
            let s = if point > 0 && point < digits.trim_start_matches('-').len() {
                let (a, b) = digits.split_at(digits.len() - point);
                format!("{a}.{b}E{exp}")
            } else {
                format!("{digits}E{exp}")
            };
            Bson::Decimal128(s.parse::<Decimal128>().expect("valid decimal"))
        }),
        prop_oneof![Just("NaN"), Just("Infinity"), Just("-Infinity"), Just("-0")]
            .prop_map(|s| Bson::Decimal128(s.parse::<Decimal128>().expect("valid decimal"))),
        (
            prop::collection::vec(any::<u8>(), 0..8),
            prop_oneof![Just(0u8), Just(4), Just(5), Just(0x80)]
        )
            .prop_map(|(bytes, st)| Bson::Binary(Binary {
                subtype: BinarySubtype::from(st),
                bytes
            })),
        (any::<u32>(), any::<u32>())
            .prop_map(|(time, increment)| Bson::Timestamp(Timestamp { time, increment })),
        ("[a-z]{0,3}", "[imsx]{0,2}").prop_map(|(pattern, options)| {
            let mut o: Vec<char> = options.chars().collect();
            o.sort_unstable();
            o.dedup();
            Bson::RegularExpression(Regex {
                pattern,
                options: o.into_iter().collect(),
            })
        }),
        Just(Bson::MinKey),
        Just(Bson::MaxKey),
        "[a-z]{0,4}".prop_map(Bson::JavaScriptCode),
        "[a-z]{0,4}".prop_map(Bson::Symbol),
    ]
}

fn value() -> impl Strategy<Value = Bson> {
    leaf().prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Bson::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|kvs| { Bson::Document(kvs.into_iter().collect::<Document>()) }),
        ]
    })
}

fn document() -> impl Strategy<Value = Document> {
    prop::collection::vec((key(), value()), 0..7).prop_map(|kvs| kvs.into_iter().collect())
}

/// A second document derived from the first, so that diffs are small as well as large.
fn edited(base: Document) -> impl Strategy<Value = Document> {
    let keys: Vec<String> = base.keys().cloned().collect();
    (
        prop::collection::vec((0..keys.len().max(1), value(), 0..4u8), 0..4),
        document(),
        any::<bool>(),
    )
        .prop_map(move |(edits, fresh, use_fresh)| {
            if use_fresh {
                return fresh;
            }
            let mut d = base.clone();
            for (i, v, how) in edits {
                let Some(k) = keys.get(i) else { continue };
                match how {
                    0 => {
                        d.remove(k);
                    }
                    1 => {
                        d.insert(format!("{k}n"), v);
                    }
                    _ => {
                        d.insert(k.clone(), v);
                    }
                }
            }
            d
        })
}

fn bytes(d: &Document) -> Vec<u8> {
    let mut out = Vec::new();
    d.to_writer(&mut out).expect("serialisable document");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn apply_of_diff_reproduces_target_exactly(
        (a, b) in document().prop_flat_map(|a| (Just(a.clone()), edited(a)))
    ) {
        let patch = diff(&a, &b);
        let got = apply(&a, &patch).expect("patch applies");
        prop_assert_eq!(bytes(&got), bytes(&b), "patch {}", serde_json::to_string(&patch).unwrap());
        // Through the wire: the patch survives JSON text.
        let text = serde_json::to_string(&patch).unwrap();
        let back: eventsync::diff::Patch = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(bytes(&apply(&a, &back).unwrap()), bytes(&b));
    }

    #[test]
    fn diff_of_identical_documents_is_empty(a in document()) {
        prop_assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn representation_round_trips(a in document()) {
        let text = repr::to_value(&a).to_string();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(bytes(&repr::from_value(&v).unwrap()), bytes(&a));
    }
}

#[test]
fn numeric_types_are_distinct_in_patches() {
    let a = doc! { "n": 1_i32 };
    for b in [
        doc! { "n": 1_i64 },
        doc! { "n": 1.0 },
        doc! { "n": "1".parse::<Decimal128>().unwrap() },
    ] {
        let patch = diff(&a, &b);
        assert_eq!(patch.len(), 1, "{a} -> {b} must change the type");
        assert_eq!(bytes(&apply(&a, &patch).unwrap()), bytes(&b));
    }
}

#[test]
fn key_order_is_preserved_through_removes() {
    let a = doc! { "a": 1, "b": 2, "c": 3, "d": 4 };
    let b = doc! { "a": 1, "c": 3, "d": 5 };
    let got = apply(&a, &diff(&a, &b)).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), vec!["a", "c", "d"]);
    let reordered = doc! { "d": 4, "a": 1 };
    assert_eq!(
        bytes(&apply(&a, &diff(&a, &reordered)).unwrap()),
        bytes(&reordered)
    );
}

#[test]
fn a_patch_that_does_not_fit_is_an_error_and_changes_nothing() {
    let a = doc! { "x": 1 };
    let patch: eventsync::diff::Patch = serde_json::from_str(
        r#"[{"op":"replace","path":"/x","value":2},{"op":"remove","path":"/missing"}]"#,
    )
    .unwrap();
    let err = apply(&a, &patch).unwrap_err().to_string();
    assert!(err.contains("/missing"), "{err}");
}

#[test]
fn single_dollar_user_keys_are_rejected_when_decoding() {
    let v: serde_json::Value = serde_json::from_str(r#"{"a": {"$bogus": 1, "b": 2}}"#).unwrap();
    assert!(repr::from_value(&v).is_err());
}
