//! What a running binary's ops endpoints (`/metrics`, `/readyz`) answer,
//! read the way Prometheus and a kubelet read them: benches and tests watch
//! the binaries they start through these.

/// The whole HTTP response (status line, headers, body) to `GET path` on
/// `127.0.0.1:port`, as the ops servers answer it; `None` if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// The /metrics value of `name` (a counter or gauge without labels) served
/// on `127.0.0.1:port`.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}
