//! The kser wire envelope: [`Message`] and the [`TaskResult`] it carries.
//!
//! Messages are UTF-8 JSON objects in the Kafka record value, exchanged with
//! Python kser 0.8 in both directions. Unknown fields are ignored on read;
//! missing optional fields take the same defaults Python uses.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// A JSON object, the type of `params`, `metadata` and `retval`.
pub type JsonObject = Map<String, Value>;

/// One kser message: which entrypoint to run, with which parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The message id; also the id of the task row it produces.
    pub uuid: String,
    /// The registered name to route to, e.g. `dice.DiceRoll`.
    pub entrypoint: String,
    /// Task parameters, checked against the task's `Params` type before it runs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub params: JsonObject,
    /// The result carried along, forwarded from a previous task.
    #[serde(default)]
    pub result: Option<TaskResult>,
    /// Free context, passed through untouched.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: JsonObject,
}

impl Message {
    /// A message for `entrypoint` with a fresh UUID4 and the given parameters.
    pub fn new(entrypoint: impl Into<String>, params: JsonObject) -> Self {
        Self {
            uuid: uuid::Uuid::new_v4().to_string(),
            entrypoint: entrypoint.into(),
            params,
            result: None,
            metadata: JsonObject::new(),
        }
    }

    /// Serializes the message as the JSON bytes of a Kafka record value.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing maps with string keys and plain values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The outcome of a task, in the wire format Python kser calls `Result`.
///
/// A task succeeded when it returned a result with `retcode == 0`; any other
/// retcode is a failure. Errors are carried as results with an HTTP-like
/// retcode (400 for bad input, 500 for anything unexpected), the message in
/// `stderr` and details in `retval.error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The uuid of the task it is the result of (a new one when missing).
    #[serde(default = "new_uuid", deserialize_with = "null_as_new_uuid")]
    pub uuid: String,
    /// 0 for success; anything else is a failure.
    #[serde(default, deserialize_with = "null_as_default")]
    pub retcode: i32,
    /// What the task says it did.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stdout: String,
    /// What went wrong, for a failure.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stderr: String,
    /// Values the task returns, a JSON object (forwarded to the next step).
    #[serde(default, deserialize_with = "null_as_default")]
    pub retval: JsonObject,
}

impl Default for TaskResult {
    fn default() -> Self {
        Self::ok()
    }
}

impl TaskResult {
    /// An empty successful result (`retcode` 0) with a fresh uuid.
    pub fn ok() -> Self {
        Self {
            uuid: new_uuid(),
            retcode: 0,
            stdout: String::new(),
            stderr: String::new(),
            retval: JsonObject::new(),
        }
    }

    /// An error result: `retcode`, the message in `stderr`, and in
    /// `retval.error` the code, message, kind and `details` (as Python's
    /// `extra`).
    pub fn error(
        retcode: i32,
        kind: ErrorKind,
        message: impl Into<String>,
        details: Value,
    ) -> Self {
        let message = message.into();
        let mut error = JsonObject::new();
        error.insert("code".into(), Value::from(retcode));
        error.insert("message".into(), Value::from(message.clone()));
        error.insert("kind".into(), Value::from(kind.as_str()));
        if !details.is_null() {
            error.insert("extra".into(), details);
        }
        let mut retval = JsonObject::new();
        retval.insert("error".into(), Value::Object(error));
        Self {
            uuid: new_uuid(),
            retcode,
            stdout: String::new(),
            stderr: message,
            retval,
        }
    }

    /// Sets `stdout`.
    pub fn with_stdout(mut self, stdout: impl Into<String>) -> Self {
        self.stdout = stdout.into();
        self
    }

    /// Sets `stderr`.
    pub fn with_stderr(mut self, stderr: impl Into<String>) -> Self {
        self.stderr = stderr.into();
        self
    }

    /// Sets `retcode`; anything but 0 makes the task FAILED.
    pub fn with_retcode(mut self, retcode: i32) -> Self {
        self.retcode = retcode;
        self
    }

    /// Adds one key to `retval`.
    pub fn with_value(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.retval.insert(key.into(), value.into());
        self
    }

    /// Whether this result counts as success (`retcode == 0`).
    pub fn is_success(&self) -> bool {
        self.retcode == 0
    }

    /// The error kind recorded in `retval.error.kind`, for a failed result.
    pub fn error_kind(&self) -> Option<&str> {
        self.retval.get("error")?.get("kind")?.as_str()
    }

    /// A one-line description of the failure (`stderr`, or the retcode when
    /// `stderr` is empty); `None` for a success.
    pub fn failure_message(&self) -> Option<String> {
        if self.is_success() {
            None
        } else if self.stderr.trim().is_empty() {
            Some(format!("task returned retcode {}", self.retcode))
        } else {
            Some(self.stderr.trim().to_owned())
        }
    }

    /// Combines this result with a newer one, as results travel from one task
    /// to the next: the higher retcode wins, `retval` is updated with the newer
    /// keys, and `stdout`/`stderr` are replaced only by non-empty newer text.
    /// The uuid of `self` is kept.
    pub fn merge(&mut self, newer: &TaskResult) {
        self.retcode = self.retcode.max(newer.retcode);
        for (key, value) in &newer.retval {
            self.retval.insert(key.clone(), value.clone());
        }
        if !newer.stdout.is_empty() {
            self.stdout.clone_from(&newer.stdout);
        }
        if !newer.stderr.is_empty() {
            self.stderr.clone_from(&newer.stderr);
        }
    }
}

/// Why a task failed, as recorded in `retval.error.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The record is not a kser message (bad UTF-8, bad JSON, wrong shape).
    InvalidMessage,
    /// No task is registered under the message's entrypoint.
    UnknownEntrypoint,
    /// The parameters do not match the task's `Params` type.
    InvalidParams,
    /// The task failed and said a retry may succeed.
    Retryable,
    /// The task failed for good.
    Fatal,
    /// The task panicked.
    Panic,
    /// The attempt ran longer than its policy's timeout.
    Timeout,
}

impl ErrorKind {
    /// The name stored in `retval.error.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::UnknownEntrypoint => "unknown_entrypoint",
            Self::InvalidParams => "invalid_params",
            Self::Retryable => "retryable",
            Self::Fatal => "fatal",
            Self::Panic => "panic",
            Self::Timeout => "timeout",
        }
    }
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Python kser may send `null` where it means "the default".
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn null_as_new_uuid<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_else(new_uuid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Exactly what Python kser 0.8.27 `Message(...).dumps()` prints.
    const PYTHON_MESSAGE: &str = r#"{"metadata": {}, "uuid": "abc", "params": {"sides": 6}, "result": {"retcode": 0, "stderr": "", "stdout": "", "uuid": "abc", "retval": {}}, "entrypoint": "dice.DiceRoll"}"#;

    #[test]
    fn reads_python_kser_message() {
        let message: Message = serde_json::from_str(PYTHON_MESSAGE).expect("valid message");
        assert_eq!(message.uuid, "abc");
        assert_eq!(message.entrypoint, "dice.DiceRoll");
        assert_eq!(message.params["sides"], json!(6));
        let result = message.result.expect("result");
        assert_eq!(result.uuid, "abc");
        assert!(result.is_success());
    }

    #[test]
    fn round_trips_through_json() {
        let message: Message = serde_json::from_str(PYTHON_MESSAGE).expect("valid message");
        let again: Message = serde_json::from_slice(&message.to_bytes()).expect("round trip");
        assert_eq!(message, again);
        let value: Value = serde_json::from_slice(&message.to_bytes()).expect("json");
        for field in ["uuid", "entrypoint", "params", "result", "metadata"] {
            assert!(value.get(field).is_some(), "missing {field}");
        }
    }

    #[test]
    fn minimal_message_takes_defaults_and_ignores_unknown_fields() {
        let message: Message =
            serde_json::from_str(r#"{"uuid":"u","entrypoint":"e","extra":[1],"params":null}"#)
                .expect("valid message");
        assert!(message.params.is_empty());
        assert!(message.metadata.is_empty());
        assert!(message.result.is_none());
    }

    #[test]
    fn result_defaults_when_fields_missing() {
        let result: TaskResult = serde_json::from_str("{}").expect("valid result");
        assert_eq!(result.retcode, 0);
        assert!(uuid::Uuid::parse_str(&result.uuid).is_ok());
        assert!(result.stdout.is_empty() && result.retval.is_empty());
    }

    #[test]
    fn missing_uuid_is_rejected() {
        let err = serde_json::from_str::<Message>(r#"{"entrypoint":"e"}"#).unwrap_err();
        assert!(err.to_string().contains("uuid"), "{err}");
    }

    #[test]
    fn merge_follows_python_rules() {
        let mut a = TaskResult::ok()
            .with_stdout("first")
            .with_stderr("warn")
            .with_value("a", 1)
            .with_value("shared", "old");
        let b = TaskResult::ok()
            .with_retcode(0)
            .with_value("b", 2)
            .with_value("shared", "new");
        let uuid = a.uuid.clone();
        a.merge(&b);
        assert_eq!(a.uuid, uuid);
        assert_eq!(a.stdout, "first", "empty newer stdout keeps the old one");
        assert_eq!(a.stderr, "warn");
        assert_eq!(
            Value::Object(a.retval.clone()),
            json!({"a": 1, "b": 2, "shared": "new"})
        );

        let c = TaskResult::ok().with_stdout("second").with_retcode(500);
        a.merge(&c);
        assert_eq!(a.stdout, "second");
        assert_eq!(a.retcode, 500);
        a.merge(&TaskResult::ok().with_retcode(400));
        assert_eq!(a.retcode, 500, "the higher retcode wins");
    }

    #[test]
    fn error_result_carries_message_and_details() {
        let result = TaskResult::error(
            400,
            ErrorKind::InvalidParams,
            "missing field `sides`",
            json!({"field": "sides"}),
        );
        assert!(!result.is_success());
        assert_eq!(result.stderr, "missing field `sides`");
        assert_eq!(result.retval["error"]["code"], json!(400));
        assert_eq!(result.retval["error"]["extra"]["field"], json!("sides"));
        assert_eq!(result.error_kind(), Some("invalid_params"));
        assert_eq!(
            result.failure_message().as_deref(),
            Some("missing field `sides`")
        );
        assert_eq!(TaskResult::ok().failure_message(), None);
    }
}
