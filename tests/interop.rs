//! Wire compatibility with Python kser 0.8.27 and kser-crypto 0.1.13, in
//! both directions, using the real Python libraries (`KSER_TEST_PYTHON`, set
//! up by `scripts/test`).

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{TestEnv, WorkerProcess, example_path, text};
use kser::{KafkaConfig, Producer};
use serde_json::{Value, json};

fn python(script: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    python_with(script, args, stdin, &[])
}

fn python_with(script: &str, args: &[&str], stdin: Option<&[u8]>, vars: &[(&str, &str)]) -> String {
    let interpreter = std::env::var("KSER_TEST_PYTHON").expect(
        "KSER_TEST_PYTHON is not set: run the tests with scripts/test, which installs Python kser",
    );
    let mut command = Command::new(interpreter);
    command
        .args(["-W", "ignore", "-c", script])
        .args(args)
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("python");
    if let Some(input) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write");
    }
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "python failed: {}", text(&out.stderr));
    text(&out.stdout)
}

const PYTHON_PRODUCE: &str = r#"
import sys
from kser.schemas import Message
message = Message(
    uuid=sys.argv[1],
    entrypoint="showcase.Echo",
    params={"text": "from python"},
    result={"uuid": "py-result", "retcode": 0, "stdout": "earlier", "retval": {"k": 1}},
    metadata={"origin": "python"},
)
sys.stdout.write(message.dumps())
"#;

const PYTHON_READ: &str = r#"
import json, sys
from kser.schemas import Message
message = Message.loads(sys.stdin.read())
print(json.dumps({
    "uuid": message.uuid,
    "entrypoint": message.entrypoint,
    "params": message.params,
    "metadata": message.metadata,
    "retcode": message.result.retcode,
}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_message_from_python_kser_runs_on_our_worker() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    let uuid = uuid::Uuid::new_v4().to_string();
    let payload = python(PYTHON_PRODUCE, &[&uuid], None);
    // Python kser sends no key and no headers.
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    producer
        .send_raw(&env.topic, None, Some(payload.as_bytes()))
        .await
        .expect("send");

    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(status["result"]["stdout"], "from python");
    assert_eq!(status["metadata"], json!({"origin": "python"}));
    let forwarded = &status["result"]["retval"]["forwarded"];
    assert_eq!(
        forwarded["uuid"], "py-result",
        "the carried result reached the task"
    );
    assert_eq!(forwarded["retval"], json!({"k": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_from_our_cli_is_read_by_python_kser() {
    let env = TestEnv::new();
    // `send` records the message as PENDING in kser's tables first.
    assert!(env.kser(&["migrate"]).status.success());
    let out = env.kser(&[
        "send",
        "showcase.Echo",
        "--params",
        r#"{"text": "to python", "n": [1, 2]}"#,
        "--metadata",
        r#"{"trace": "abc"}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let uuid = text(&out.stdout).trim().to_owned();

    let (key, payload) = common::first_record(&env).await;
    assert_eq!(key.as_deref(), Some(uuid.as_bytes()), "keyed by uuid");

    let read: Value =
        serde_json::from_str(&python(PYTHON_READ, &[], Some(&payload))).expect("JSON");
    assert_eq!(read["uuid"], uuid.as_str());
    assert_eq!(read["entrypoint"], "showcase.Echo");
    assert_eq!(read["params"], json!({"text": "to python", "n": [1, 2]}));
    assert_eq!(read["metadata"], json!({"trace": "abc"}));
    assert_eq!(read["retcode"], 0);
}

/// The key of the encrypted tests, as `KSER_SECRETBOX_KEY` holds it.
const SECRETBOX_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// kser-crypto's producer (`CryptoProducer._send`) writes exactly this.
const PYTHON_CRYPTO_PRODUCE: &str = r#"
import sys
from kser.schemas import Message
from kser_crypto.schemas import CryptoSchema
message = Message(
    uuid=sys.argv[1],
    entrypoint="showcase.Echo",
    params={"text": "from python, encrypted " + "x" * 100},
    metadata={"origin": "kser-crypto"},
)
sys.stdout.write(CryptoSchema(context={}).encode(message))
"#;

/// kser-crypto's consumer (`CryptoController.run`) reads with this.
const PYTHON_CRYPTO_READ: &str = r#"
import json, sys
from kser_crypto.schemas import CryptoMessage
message = CryptoMessage.loads(sys.stdin.read())
print(json.dumps({
    "uuid": message.uuid,
    "entrypoint": message.entrypoint,
    "params": message.params,
    "metadata": message.metadata,
}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_message_from_python_kser_crypto_runs_on_our_worker() {
    let env = TestEnv::new();
    let log = env.dir.path().join("worker-crypto.log");
    let mut command = env.command(&example_path("showcase"));
    command
        .arg("worker")
        .env("KSER_SECRETBOX_KEY", SECRETBOX_KEY)
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"));
    let mut worker = WorkerProcess::spawn(&mut command, log);
    worker.wait_assigned();

    let uuid = uuid::Uuid::new_v4().to_string();
    let payload = python_with(
        PYTHON_CRYPTO_PRODUCE,
        &[&uuid],
        None,
        &[("KSER_SECRETBOX_KEY", SECRETBOX_KEY)],
    );
    let record: Value = serde_json::from_str(&payload).expect("JSON");
    assert!(
        record["data"].as_str().expect("data").contains('\n'),
        "Python breaks its base64 into lines: {payload}"
    );
    assert!(!payload.contains("from python"), "{payload}");
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    producer
        .send_raw(&env.topic, None, Some(payload.as_bytes()))
        .await
        .expect("send");

    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(
        status["result"]["stdout"],
        format!("from python, encrypted {}", "x".repeat(100))
    );
    assert_eq!(status["metadata"], json!({"origin": "kser-crypto"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_message_from_our_cli_is_read_by_python_kser_crypto() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let out = env
        .command(Path::new(env!("CARGO_BIN_EXE_kser")))
        .args([
            "send",
            "--encrypt",
            "showcase.Echo",
            "--params",
            r#"{"text": "to python, encrypted", "n": [1, 2]}"#,
            "--metadata",
            r#"{"trace": "abc"}"#,
        ])
        .env("KSER_SECRETBOX_KEY", SECRETBOX_KEY)
        .output()
        .expect("kser");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let uuid = text(&out.stdout).trim().to_owned();

    let (key, payload) = common::first_record(&env).await;
    assert_eq!(key.as_deref(), Some(uuid.as_bytes()), "keyed by uuid");
    assert!(
        !text(&payload).contains("to python"),
        "encrypted: {}",
        text(&payload)
    );

    let read = python_with(
        PYTHON_CRYPTO_READ,
        &[],
        Some(&payload),
        &[("KSER_SECRETBOX_KEY", SECRETBOX_KEY)],
    );
    let read: Value = serde_json::from_str(&read).expect("JSON");
    assert_eq!(read["uuid"], uuid.as_str());
    assert_eq!(read["entrypoint"], "showcase.Echo");
    assert_eq!(
        read["params"],
        json!({"text": "to python, encrypted", "n": [1, 2]})
    );
    assert_eq!(read["metadata"], json!({"trace": "abc"}));
}
