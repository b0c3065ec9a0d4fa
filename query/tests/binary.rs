//! shopstream-query as deployed: configured by file and environment, it
//! refuses bad settings by name, serves, and exits 0 on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> std::path::PathBuf {
    shopstream_tests::bin_dir().join("shopstream-query")
}

#[test]
fn bad_settings_are_refused_naming_the_file_line_and_field() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("shopstream.yaml");
    std::fs::write(
        &file,
        "query:\n  listen_address: everywhere\n  query_timout_ms: 5\n",
    )
    .expect("write");
    let output = Command::new(binary())
        .arg("--config")
        .arg(&file)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("shopstream.yaml:3"), "{stderr}");
    assert!(stderr.contains("query_timout_ms"), "{stderr}");
    assert!(
        stderr.contains("query_timeout_ms"),
        "names the valid fields: {stderr}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let output = Command::new(binary())
        .env("SHOPSTREAM_QUERY__LISTEN_ADDRESS", &address)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("listening on query.listen_address {address}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn it_serves_then_exits_0_on_sigterm() {
    let clickhouse = shopstream_tests::clickhouse().await;
    let port = shopstream_tests::free_port().expect("port");
    let mut child = Command::new(binary())
        .env("SHOPSTREAM_CLICKHOUSE__URL", clickhouse.url())
        .env(
            "SHOPSTREAM_QUERY__LISTEN_ADDRESS",
            format!("127.0.0.1:{port}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let ready = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        if ready == Some(200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not ready: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let stopped = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
