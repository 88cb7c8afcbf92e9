//! `send --batch` tells the truth when it is cut short: on SIGINT it stops
//! reading, finishes what it holds and prints exactly the uuids it sent, with
//! no PENDING row left without its message; against a broker that accepts
//! nothing it gives up after one chunk instead of timing out line by line.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use common::cluster::Cluster;
use common::{TestEnv, text};

fn line(n: usize) -> String {
    format!(
        "{{\"entrypoint\": \"showcase.Echo\", \"uuid\": \"line-{n}\", \"params\": {{\"text\": \"{n}\"}}}}\n"
    )
}

/// Starts `send --batch -`, writes lines 0..count and waits until it has
/// printed their uuids; returns it with its open stdin and stdout.
fn send_lines(
    mut command: std::process::Command,
    count: usize,
) -> (Child, ChildStdin, BufReader<ChildStdout>, Vec<String>) {
    let mut send = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let mut stdin = send.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(send.stdout.take().expect("stdout"));
    for n in 0..count {
        stdin.write_all(line(n).as_bytes()).expect("write");
    }
    stdin.flush().expect("flush");
    let mut printed = Vec::new();
    while printed.len() < count {
        let mut uuid = String::new();
        assert!(
            stdout.read_line(&mut uuid).expect("read") > 0,
            "send ended early"
        );
        printed.push(uuid.trim().to_owned());
    }
    (send, stdin, stdout, printed)
}

#[test]
fn sigint_stops_a_batch_with_every_printed_uuid_sent_and_no_orphan_row() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let mut command = env.command(Path::new(env!("CARGO_BIN_EXE_kser")));
    command.args(["send", "--batch", "-"]);
    // A producer of lines that is still writing: five lines, sent.
    let (send, stdin, mut stdout, mut printed) = send_lines(command, 5);
    // Interrupted while waiting for more input that never comes.
    let status = std::process::Command::new("kill")
        .args(["-INT", &send.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read");
    printed.extend(rest.lines().map(str::to_owned));
    let output = send.wait_with_output().expect("wait");
    let stderr = text(&output.stderr);
    drop(stdin);

    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("sent 5 messages"), "{stderr}");
    let expected: Vec<String> = (0..5).map(|n| format!("line-{n}")).collect();
    assert_eq!(printed, expected);
    // Each printed uuid has its row and its message; no other row exists.
    assert_eq!(
        env.sql("SELECT string_agg(uuid, ',' ORDER BY uuid) FROM kser.tasks"),
        expected.join(",")
    );
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        5,
        Duration::from_secs(60),
    );
    worker.terminate(Duration::from_secs(30));
}

/// The cluster dies while `send` runs: the chunk in hand fails within one
/// message timeout, `send` gives up instead of trying every later line for
/// as long, and keeps only the rows of messages it sent.
#[test]
fn a_broker_that_dies_mid_batch_is_given_up_after_one_chunk() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let cluster = Cluster::up();
    let mut command = env.command(Path::new(env!("CARGO_BIN_EXE_kser")));
    command.env("KSER_BROKERS", cluster.brokers()).args([
        "send",
        "--batch",
        "-",
        "-X",
        "message.timeout.ms=3000",
    ]);
    let (send, mut stdin, _, _) = send_lines(command, 10);
    for node in 1..=3 {
        cluster.kill(node);
    }
    // Far more input than one chunk, all of it ready.
    let rest: String = (10..5000).map(line).collect();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(rest.as_bytes());
    });
    let output = send.wait_with_output().expect("wait");
    let _ = writer.join();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("gave up: the broker accepted none of the last"),
        "{stderr}"
    );
    assert!(stderr.contains("was read or sent"), "{stderr}");
    assert!(stderr.contains("sent 10 messages"), "{stderr}");
    // Only the messages sent have rows; the failed chunk's were removed.
    assert_eq!(env.sql("SELECT count(*) FROM kser.tasks"), "10");
}
