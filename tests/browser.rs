//! The console in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, which
//! scripts/test installs). It opens the dashboard, follows an operation to
//! its page, sees its three steps, resumes it after a failure and sees it
//! succeed; a `<script>` payload shows as text.
//!
//! With `KSER_SCREENSHOT_DIR` set, it saves the pages it sees there as PNG
//! (the README's screenshots).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestEnv, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// chromedriver, stopped when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (apt-get install chromium chromium-driver; scripts/test does)");
    let driver = Driver(driver);
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    let started = Instant::now();
    loop {
        match ClientBuilder::native()
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(err) if started.elapsed() > Duration::from_secs(30) => {
                panic!("could not start headless Chromium: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn screenshot(client: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("KSER_SCREENSHOT_DIR") {
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png)
            .expect("write screenshot");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operation_is_followed_resumed_and_seen_to_succeed_in_a_browser() {
    let env = TestEnv::new();
    let port = free_port();
    let mut worker = env.start_worker("showcase", &["--http", &format!("127.0.0.1:{port}")]);
    worker.wait_assigned();
    let flag = env.dir.path().join("flag");
    let operation = env.send(
        "showcase",
        "showcase.Pipeline",
        &json!({"flag": flag.to_str()}).to_string(),
    );
    assert_eq!(env.wait_final(&operation)["status"], "FAILED");
    let xss = env.send(
        "showcase",
        "showcase.Echo",
        r#"{"text": "<script>alert(1)</script>"}"#,
    );
    env.wait_final(&xss);
    let base = format!("http://127.0.0.1:{port}");

    let (_driver, client) = browser().await;
    client.goto(&format!("{base}/")).await.expect("dashboard");
    let title = client.find(Locator::Css("h1")).await.expect("h1");
    assert_eq!(title.text().await.expect("text"), "Dashboard");
    client
        .find(Locator::Css("svg.chart"))
        .await
        .expect("the throughput chart");
    screenshot(&client, "dashboard").await;

    // Dashboard → Operations → the operation's page, by its links.
    client
        .find(Locator::LinkText("Operations"))
        .await
        .expect("nav")
        .click()
        .await
        .expect("click");
    client
        .find(Locator::LinkText(&operation))
        .await
        .expect("the operation is listed, its uuid a link")
        .click()
        .await
        .expect("click");
    let url = client.current_url().await.expect("url");
    assert!(
        url.path().ends_with(&format!("/operations/{operation}")),
        "{url}"
    );
    let steps = client
        .find_all(Locator::Css("ol.timeline li"))
        .await
        .expect("steps");
    assert_eq!(steps.len(), 3, "three steps");
    let first = steps[0].text().await.expect("text");
    assert!(
        first.contains("SUCCESS") && first.contains("\"first\": 1"),
        "{first}"
    );
    let second = steps[1].text().await.expect("text");
    assert!(
        second.contains("FAILED") && second.contains("waiting for"),
        "{second}"
    );

    // Fix the cause, press Resume, and see the operation succeed.
    std::fs::write(&flag, "").expect("flag");
    client
        .find(Locator::XPath("//button[text()='Resume']"))
        .await
        .expect("Resume")
        .click()
        .await
        .expect("click");
    let notice = client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("p.notice"))
        .await
        .expect("the notice after the redirect");
    assert!(
        notice
            .text()
            .await
            .expect("text")
            .contains("resumed operation")
    );
    let started = Instant::now();
    loop {
        client.refresh().await.expect("refresh");
        let status = client
            .find(Locator::Css("dd span.status"))
            .await
            .expect("status")
            .text()
            .await
            .expect("text");
        if status == "SUCCESS" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still {status}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = client
        .find_all(Locator::Css("ol.timeline li.success"))
        .await
        .expect("steps");
    assert_eq!(done.len(), 3);
    let third = done[2].text().await.expect("text");
    assert!(third.contains("\"third\": 3"), "{third}");
    screenshot(&client, "operation").await;

    // A script in a payload is text on the page, never run.
    client
        .goto(&format!("{base}/tasks/{xss}"))
        .await
        .expect("task page");
    let params = client
        .find(Locator::Css("pre"))
        .await
        .expect("params")
        .text()
        .await
        .expect("text");
    assert!(params.contains("<script>alert(1)</script>"), "{params}");
    assert!(
        client.get_alert_text().await.is_err(),
        "no alert was opened"
    );
    client.close().await.expect("close");
    worker.terminate(Duration::from_secs(30));
}
