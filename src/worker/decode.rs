//! Record value -> kser [`Message`], or a precise reason why not.

use serde_json::Value;

use crate::message::Message;

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

/// Decodes a record value.
pub fn decode(payload: Option<&[u8]>) -> Decoded {
    let invalid = |uuid, entrypoint, error: String| Decoded::Invalid {
        uuid,
        entrypoint,
        error,
    };
    let bytes = match payload {
        Some(bytes) if !bytes.is_empty() => bytes,
        _ => return invalid(None, None, "record has an empty value".into()),
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            return invalid(
                None,
                None,
                format!("record value is not valid UTF-8: {err}"),
            );
        }
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(err) => {
            return invalid(None, None, format!("record value is not valid JSON: {err}"));
        }
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
        Ok(message) => Decoded::Message(message),
        Err(err) => {
            let path = err.path().to_string();
            let error = if path == "." {
                format!("not a kser message: {}", err.inner())
            } else {
                format!("not a kser message: {path}: {}", err.inner())
            };
            invalid(uuid, entrypoint, error)
        }
    }
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
        match decode(Some(payload)) {
            Decoded::Invalid { uuid, error, .. } => (uuid, error),
            Decoded::Message(m) => panic!("decoded {m:?}"),
        }
    }

    #[test]
    fn decodes_a_message() {
        let decoded = decode(Some(br#"{"uuid":"u","entrypoint":"e","params":{"a":1}}"#));
        assert!(matches!(decoded, Decoded::Message(m) if m.params["a"] == 1));
    }

    #[test]
    fn says_precisely_what_is_wrong() {
        assert!(matches!(decode(None), Decoded::Invalid { .. }));
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
}
