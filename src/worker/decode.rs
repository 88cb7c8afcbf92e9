//! Record value -> kser [`Message`], or a precise reason why not.
//!
//! A value encrypted by kser-crypto (`{"data", "nonce"}`) is decrypted first
//! with the worker's key; one that cannot be is invalid, without a uuid, so
//! it is dead-lettered as it came, and its error says "cannot decrypt" and
//! nothing of its content.
//!
//! One file on purpose, over the house's ~500 lines: the decoder is about
//! 260 lines, and the rest are its tests, kept beside it, with the property
//! tests that show the fast path (a well-formed plain record, read in one
//! pass) and the careful one (field by field) decide alike.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::crypto::{DecryptError, Envelope, SecretBox};
use crate::message::Message;

/// The longest uuid kser takes, in bytes. Postgres would index a longer one
/// up to about 2,700 bytes, then refuse it; no uuid needs that much.
pub const MAX_UUID_BYTES: usize = 128;

/// The longest entrypoint name kser takes, in bytes.
pub const MAX_ENTRYPOINT_BYTES: usize = 256;

/// What a record turned out to be.
#[derive(Debug)]
pub enum Decoded {
    /// A well-formed kser message.
    Message(Message),
    /// Not a kser message. `uuid` and `entrypoint` are whatever could be
    /// read, so the failure can still be recorded against the message.
    Invalid {
        uuid: Option<String>,
        entrypoint: Option<String>,
        error: String,
    },
}

/// Decodes a record value, plain or encrypted for `secretbox`.
pub fn decode(payload: Option<&[u8]>, secretbox: Option<&SecretBox>) -> Decoded {
    // The common case in one pass: a well-formed plain message is read
    // straight into a `Message`. Anything else (an envelope, a field in
    // doubt, an error to explain) takes the careful path, which decides
    // exactly as it would have alone.
    if let Some(message) = payload.and_then(well_formed) {
        return Decoded::Message(message);
    }
    decode_carefully(payload, secretbox)
}

/// A plain record value that is a kser message Postgres can store, read in
/// one pass, or `None` to look closer. (An envelope has no `uuid`, so it is
/// never read as a message here.)
fn well_formed(bytes: &[u8]) -> Option<Message> {
    let message: Message = serde_json::from_slice(bytes).ok()?;
    let fits = |text: &str, max: usize| {
        !text.trim().is_empty() && !text.contains('\0') && text.len() <= max
    };
    let ok = fits(&message.uuid, MAX_UUID_BYTES)
        && fits(&message.entrypoint, MAX_ENTRYPOINT_BYTES)
        // JSON writes NUL as \u0000: without one, nothing holds NUL.
        && (!may_hold_nul(bytes) || nul_path(&message).is_none());
    ok.then_some(message)
}

/// Whether JSON text may encode a NUL character (`\u0000`).
fn may_hold_nul(json: &[u8]) -> bool {
    json.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

/// Decodes a record value field by field, explaining what is wrong.
fn decode_carefully(payload: Option<&[u8]>, secretbox: Option<&SecretBox>) -> Decoded {
    let value = match parse(payload) {
        Ok(value) => value,
        Err(error) => return invalid(None, None, error),
    };
    let Some(envelope) = Envelope::from_json(&value) else {
        return message(value, false);
    };
    let opened = match secretbox {
        Some(secretbox) => secretbox.open(&envelope),
        None => Err(DecryptError::NoKey),
    };
    let plaintext = match opened {
        Ok(plaintext) => plaintext,
        Err(err) => return invalid(None, None, err.to_string()),
    };
    match parse(Some(&plaintext)) {
        Ok(value) => message(value, true),
        Err(error) => invalid(None, None, format!("decrypted, but {error}")),
    }
}

fn invalid(uuid: Option<String>, entrypoint: Option<String>, error: String) -> Decoded {
    Decoded::Invalid {
        uuid,
        entrypoint,
        error,
    }
}

/// The record value as JSON.
fn parse(payload: Option<&[u8]>) -> Result<Value, String> {
    let bytes = match payload {
        Some(bytes) if !bytes.is_empty() => bytes,
        _ => return Err("record has an empty value".into()),
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|err| format!("record value is not valid UTF-8: {err}"))?;
    serde_json::from_str(text).map_err(|err| format!("record value is not valid JSON: {err}"))
}

/// A parsed record value as a kser message. For a message that was
/// `encrypted`, errors name the faulty field but quote none of its content.
fn message(value: Value, encrypted: bool) -> Decoded {
    let invalid = |uuid, entrypoint, error: String| {
        let error = if encrypted {
            format!("decrypted, but {error}")
        } else {
            error
        };
        invalid(uuid, entrypoint, error)
    };
    let Value::Object(object) = &value else {
        return invalid(
            None,
            None,
            format!(
                "not a kser message: expected a JSON object, found {}",
                json_type(&value)
            ),
        );
    };
    let text_field = |name: &str| {
        object
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty() && !s.contains('\0'))
            .map(str::to_owned)
    };
    let uuid = text_field("uuid");
    let entrypoint = text_field("entrypoint");
    if let Some(long) = uuid.as_ref().filter(|u| u.len() > MAX_UUID_BYTES) {
        // Not stored under it: the record goes to the dead-letter topic.
        return invalid(
            None,
            None,
            format!(
                "not a kser message: field `uuid` is {} bytes long; kser takes at most {MAX_UUID_BYTES}",
                long.len()
            ),
        );
    }
    let entrypoint = entrypoint.filter(|e| e.len() <= MAX_ENTRYPOINT_BYTES);
    if uuid.is_none() {
        return invalid(
            None,
            entrypoint,
            "not a kser message: missing or empty field `uuid`".into(),
        );
    }
    match serde_path_to_error::deserialize::<_, Message>(value) {
        Ok(message) if message.entrypoint.trim().is_empty() => invalid(
            uuid,
            None,
            "not a kser message: field `entrypoint` is empty".into(),
        ),
        Ok(message) if message.entrypoint.contains('\0') => invalid(
            uuid,
            None,
            "not a kser message: field `entrypoint` holds a \\u0000 character, which Postgres cannot store".into(),
        ),
        Ok(message) if message.entrypoint.len() > MAX_ENTRYPOINT_BYTES => invalid(
            uuid,
            None,
            format!(
                "not a kser message: field `entrypoint` is {} bytes long; kser takes at most {MAX_ENTRYPOINT_BYTES}",
                message.entrypoint.len()
            ),
        ),
        Ok(message) => match nul_path(&message) {
            Some(path) => invalid(
                uuid,
                entrypoint,
                format!(
                    "not a kser message: {path} holds a \\u0000 character, which Postgres cannot store (jsonb refuses it)"
                ),
            ),
            None => Decoded::Message(message),
        },
        Err(err) => {
            let path = err.path().to_string();
            let error = if path == "." {
                format!("not a kser message: {}", err.inner())
            } else if encrypted {
                format!("not a kser message: {path}: wrong type or value (not shown)")
            } else {
                format!("not a kser message: {path}: {}", err.inner())
            };
            invalid(uuid, entrypoint, error)
        }
    }
}

/// Where in a message's JSON a string or key holds NUL, which jsonb cannot
/// store: `params.a[2]`, or `None`.
fn nul_path(message: &Message) -> Option<String> {
    let in_object = |name: &str, object: &crate::message::JsonObject| {
        object.iter().find_map(|(key, value)| {
            let path = format!("{name}.{key}");
            if key.contains('\0') {
                Some(format!("{name}: a key"))
            } else {
                nul_in(value, path)
            }
        })
    };
    let result = message
        .result
        .as_ref()
        .and_then(|r| serde_json::to_value(r).ok());
    in_object("params", &message.params)
        .or_else(|| in_object("metadata", &message.metadata))
        .or_else(|| result.and_then(|r| nul_in(&r, "result".into())))
}

fn nul_in(value: &Value, path: String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, format!("{path}[{i}]"))),
        Value::Object(object) => object.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(format!("{path}: a key"))
            } else {
                nul_in(item, format!("{path}.{key}"))
            }
        }),
        _ => None,
    }
}

/// A record timestamp as Postgres can store it (4713 BC to 294276 AD):
/// `None` for one it cannot, or none at all, rather than a row it refuses.
pub fn storable_timestamp(millis: Option<i64>) -> Option<DateTime<Utc>> {
    let time = DateTime::from_timestamp_millis(millis?)?;
    // chrono reaches further back than Postgres, not further ahead.
    // 4713 BC is year -4712 in chrono's (astronomical) numbering.
    let earliest = chrono::NaiveDate::from_ymd_opt(-4712, 11, 24)?
        .and_hms_opt(0, 0, 0)?
        .and_utc();
    (time >= earliest).then_some(time)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(payload: &[u8]) -> (Option<String>, String) {
        match decode(Some(payload), None) {
            Decoded::Invalid { uuid, error, .. } => (uuid, error),
            Decoded::Message(m) => panic!("decoded {m:?}"),
        }
    }

    #[test]
    fn decodes_a_message() {
        let decoded = decode(
            Some(br#"{"uuid":"u","entrypoint":"e","params":{"a":1}}"#),
            None,
        );
        assert!(matches!(decoded, Decoded::Message(m) if m.params["a"] == 1));
    }

    #[test]
    fn says_precisely_what_is_wrong() {
        assert!(matches!(decode(None, None), Decoded::Invalid { .. }));
        assert!(error_of(b"\xff\xfe").1.contains("UTF-8"));
        assert!(error_of(b"{\"uuid\":").1.contains("not valid JSON"));
        assert!(error_of(b"[1,2]").1.contains("found an array"));
        assert!(error_of(br#"{"entrypoint":"e"}"#).1.contains("`uuid`"));
        let (uuid, error) = error_of(br#"{"uuid":"u1"}"#);
        assert_eq!(uuid.as_deref(), Some("u1"), "the uuid is kept");
        assert!(error.contains("entrypoint"), "{error}");
        let (uuid, error) = error_of(br#"{"uuid":"u2","entrypoint":"e","params":[1]}"#);
        assert_eq!(uuid.as_deref(), Some("u2"));
        assert!(error.contains("params"), "{error}");
    }

    #[test]
    fn refuses_what_postgres_cannot_hold() {
        let long = "u".repeat(MAX_UUID_BYTES + 1);
        let (uuid, error) = error_of(format!(r#"{{"uuid":"{long}","entrypoint":"e"}}"#).as_bytes());
        assert_eq!(uuid, None, "dead-lettered, not stored under that uuid");
        assert!(error.contains("`uuid` is 129 bytes long"), "{error}");
        let ok = "u".repeat(MAX_UUID_BYTES);
        let payload = format!(r#"{{"uuid":"{ok}","entrypoint":"e"}}"#);
        assert!(matches!(
            decode(Some(payload.as_bytes()), None),
            Decoded::Message(_)
        ));

        let name = "e".repeat(MAX_ENTRYPOINT_BYTES + 1);
        let (uuid, error) = error_of(format!(r#"{{"uuid":"u","entrypoint":"{name}"}}"#).as_bytes());
        assert_eq!(uuid.as_deref(), Some("u"));
        assert!(error.contains("`entrypoint` is 257 bytes long"), "{error}");

        for (payload, path) in [
            (
                r#"{"uuid":"u","entrypoint":"e","params":{"a":["x","b\u0000"]}}"#,
                "params.a[1]",
            ),
            (
                r#"{"uuid":"u","entrypoint":"e","metadata":{"k":{"n":"\u0000"}}}"#,
                "metadata.k.n",
            ),
            (
                r#"{"uuid":"u","entrypoint":"e","params":{"k\u0000":1}}"#,
                "params: a key",
            ),
        ] {
            let (uuid, error) = error_of(payload.as_bytes());
            assert_eq!(uuid.as_deref(), Some("u"));
            assert!(error.contains(path) && error.contains("\\u0000"), "{error}");
        }
    }

    #[test]
    fn timestamps_postgres_cannot_store_are_dropped() {
        assert!(storable_timestamp(Some(0)).is_some());
        assert!(storable_timestamp(Some(-1_000_000_000_000)).is_some());
        // 7000 BC, and beyond chrono.
        assert_eq!(storable_timestamp(Some(-283_000_000_000_000)), None);
        assert_eq!(storable_timestamp(Some(i64::MAX)), None);
        assert_eq!(storable_timestamp(None), None);
    }

    fn encrypted_error(payload: &[u8], secretbox: Option<&SecretBox>) -> (Option<String>, String) {
        match decode(Some(payload), secretbox) {
            Decoded::Invalid { uuid, error, .. } => (uuid, error),
            Decoded::Message(m) => panic!("decoded {m:?}"),
        }
    }

    #[test]
    fn decrypts_with_the_key_and_reads_plain_messages_too() {
        let secretbox = SecretBox::new([3; 32]);
        let plain = br#"{"uuid":"u","entrypoint":"e","params":{"secret":"s3"}}"#;
        let sealed = secretbox.seal(plain);
        for payload in [&plain[..], &sealed[..]] {
            match decode(Some(payload), Some(&secretbox)) {
                Decoded::Message(m) => assert_eq!(m.params["secret"], "s3"),
                Decoded::Invalid { error, .. } => panic!("{error}"),
            }
        }
    }

    #[test]
    fn an_undecryptable_record_is_invalid_without_a_uuid() {
        let secretbox = SecretBox::new([3; 32]);
        let sealed = secretbox.seal(br#"{"uuid":"u","entrypoint":"e","params":{"secret":"s3"}}"#);
        let other = SecretBox::new([4; 32]);
        for key in [Some(&other), None] {
            let (uuid, error) = encrypted_error(&sealed, key);
            assert_eq!(uuid, None, "dead-lettered as is");
            assert!(error.starts_with("cannot decrypt"), "{error}");
        }
        let mut tampered: Value = serde_json::from_slice(&sealed).expect("JSON");
        tampered["nonce"] = Value::from("AAECAwQFBgcICQoLDA0ODxAREhMUFRYX");
        let (_, error) = encrypted_error(tampered.to_string().as_bytes(), Some(&secretbox));
        assert_eq!(
            error,
            "cannot decrypt: wrong key, or the record was altered"
        );
    }

    #[test]
    fn a_decrypted_bad_message_keeps_its_content_out_of_the_error() {
        let secretbox = SecretBox::new([3; 32]);
        let sealed = secretbox.seal(br#"{"uuid":"u9","entrypoint":"e","params":"s3cret"}"#);
        let (uuid, error) = encrypted_error(&sealed, Some(&secretbox));
        assert_eq!(uuid.as_deref(), Some("u9"));
        assert!(
            error.starts_with("decrypted, but not a kser message: params"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
        let (uuid, error) = encrypted_error(&secretbox.seal(b"s3cret"), Some(&secretbox));
        assert_eq!(uuid, None);
        assert!(
            error.starts_with("decrypted, but record value is not valid JSON"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }
}

/// Property tests: the decoder never panics, whatever a record holds, and its
/// one-pass path decides exactly as the careful one. `PROPTEST_CASES` sets
/// how many inputs each property tries (256 by default).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;

    /// Strings that stress the checks: empty, blank, NUL, control
    /// characters, long ones, non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("  ".to_owned()),
            Just("a\0b".to_owned()),
            "[a-z0-9.-]{1,12}",
            "\\PC{0,8}",
            "[\\x00-\\x1f]{1,3}",
            (1usize..400).prop_map(|n| "u".repeat(n)),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(text(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// Objects shaped like kser messages, each field present or not, right
    /// or wrong.
    fn message_like() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::option::of(prop_oneof![text().prop_map(Value::from), json_value()]),
            prop::option::of(prop_oneof![text().prop_map(Value::from), json_value()]),
            prop::option::of(json_value()),
            prop::option::of(json_value()),
            prop::option::of(prop_oneof![
                json_value(),
                Just(json!({"uuid": "r", "retcode": 0, "stdout": "", "stderr": "", "retval": {}})),
            ]),
        )
            .prop_map(|(uuid, entrypoint, params, metadata, result)| {
                let mut object = Map::new();
                for (name, value) in [
                    ("uuid", uuid),
                    ("entrypoint", entrypoint),
                    ("params", params),
                    ("metadata", metadata),
                    ("result", result),
                ] {
                    if let Some(value) = value {
                        object.insert(name.to_owned(), value);
                    }
                }
                serde_json::to_vec(&Value::Object(object)).expect("JSON")
            })
    }

    /// Both paths' decisions, comparable: a result without a uuid gets a
    /// random one, which is left out.
    fn decided(payload: &[u8]) -> (String, String) {
        let comparable = |decoded: Decoded| match decoded {
            Decoded::Message(mut message) => {
                if let Some(result) = &mut message.result {
                    result.uuid.clear();
                }
                format!("{message:?}")
            }
            invalid => format!("{invalid:?}"),
        };
        (
            comparable(decode(Some(payload), None)),
            comparable(decode_carefully(Some(payload), None)),
        )
    }

    proptest! {
        #[test]
        fn any_bytes_are_decided_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let (fast, careful) = decided(&bytes);
            prop_assert_eq!(fast, careful);
        }

        #[test]
        fn message_like_records_are_decided_alike(payload in message_like()) {
            let (fast, careful) = decided(&payload);
            prop_assert_eq!(fast, careful);
            // What is decoded as a message is storable as it is.
            if let Decoded::Message(message) = decode(Some(&payload), None) {
                prop_assert!(!message.uuid.trim().is_empty());
                prop_assert!(message.uuid.len() <= MAX_UUID_BYTES);
                prop_assert!(!message.uuid.contains('\0'));
                prop_assert!(!message.entrypoint.trim().is_empty());
                prop_assert!(!message.entrypoint.contains('\0'));
                prop_assert!(nul_path(&message).is_none());
            }
        }

        #[test]
        fn valid_messages_round_trip(
            entrypoint in "[a-z]{1,8}\\.[A-Z][a-z]{0,8}",
            params in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..4),
        ) {
            let params: Map<String, Value> = params.into_iter().collect();
            let message = Message::new(entrypoint, params);
            let holds_nul = nul_path(&message).is_some();
            match decode(Some(&message.to_bytes()), None) {
                Decoded::Message(back) => prop_assert_eq!(back, message),
                Decoded::Invalid { error, .. } => prop_assert!(holds_nul, "{}", error),
            }
        }

        #[test]
        fn sealed_records_decode_as_their_plaintext(payload in message_like()) {
            let secretbox = SecretBox::new([7; 32]);
            let sealed = secretbox.seal(&payload);
            let plain = decode(Some(&payload), None);
            match (decode(Some(&sealed), Some(&secretbox)), plain) {
                (Decoded::Message(a), Decoded::Message(b)) => {
                    prop_assert_eq!((&a.uuid, &a.entrypoint, &a.params), (&b.uuid, &b.entrypoint, &b.params));
                }
                (Decoded::Invalid { error, .. }, Decoded::Invalid { .. }) => {
                    prop_assert!(error.starts_with("decrypted, but"), "{}", error);
                }
                (a, b) => prop_assert!(false, "sealed {:?}, plain {:?}", a, b),
            }
        }
    }
}
