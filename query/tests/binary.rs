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

/// Runs the binary with `envs` until it answers /healthz on `port`, calls
/// `during`, stops it with SIGTERM and returns everything it logged.
async fn logs_of_a_run(
    envs: &[(&str, String)],
    port: u16,
    during: impl std::future::Future<Output = ()>,
) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("log");
    let mut child = Command::new(binary())
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("log"),
        ))
        .spawn()
        .expect("starts");
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(started.elapsed() < Duration::from_secs(20), "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    during.await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    std::fs::read_to_string(&log).expect("log")
}

#[tokio::test]
async fn tokens_never_reach_the_logs_and_an_open_service_on_the_network_is_warned_of() {
    let clickhouse = shopstream_tests::clickhouse().await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    let secret = "sentinel-token-7f3a91";
    std::fs::write(&tokens, format!("{secret}\n")).expect("write");
    let port = shopstream_tests::free_port().expect("port");
    let http = reqwest::Client::new();
    let logged = logs_of_a_run(
        &[
            ("SHOPSTREAM_CLICKHOUSE__URL", clickhouse.url().to_owned()),
            (
                "SHOPSTREAM_QUERY__LISTEN_ADDRESS",
                format!("127.0.0.1:{port}"),
            ),
            (
                "SHOPSTREAM_QUERY__AUTH__TOKENS_FILE",
                tokens.display().to_string(),
            ),
        ],
        port,
        async {
            for token in [secret, "sentinel-wrong-token"] {
                let status = http
                    .get(format!("http://127.0.0.1:{port}/api/v1/openapi.json"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("answers")
                    .status()
                    .as_u16();
                assert_eq!(status, if token == secret { 200 } else { 401 });
            }
        },
    )
    .await;
    assert!(logged.contains("Serving the query API"), "{logged}");
    assert!(
        !logged.contains("sentinel"),
        "a token in the logs: {logged}"
    );
    assert!(!logged.contains("without auth"), "{logged}");

    // Every address, no tokens: served, with a warning.
    let port = shopstream_tests::free_port().expect("port");
    let logged = logs_of_a_run(
        &[
            ("SHOPSTREAM_CLICKHOUSE__URL", clickhouse.url().to_owned()),
            (
                "SHOPSTREAM_QUERY__LISTEN_ADDRESS",
                format!("0.0.0.0:{port}"),
            ),
        ],
        port,
        async {},
    )
    .await;
    assert!(logged.contains("without auth"), "{logged}");
}
