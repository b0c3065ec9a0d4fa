//! What a running binary's ops endpoints (`/metrics`, `/readyz`) answer,
//! read the way Prometheus and a kubelet read them: benches and tests watch
//! the binaries they start through these.

/// The whole HTTP response (status line, headers, body) to `GET path` on
/// `127.0.0.1:port`, as the ops servers answer it; `None` if nothing
/// answers within 5 s. Read to its `content-length`, not to the connection's
/// end: a server may keep a connection open (a CI run hung for minutes on
/// one that was never closed).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_with(port, path, &[]).await
}

/// [`http_get`] with an `Accept` header (`/metrics` answers OpenMetrics to
/// `application/openmetrics-text`).
pub async fn http_get_accepting(port: u16, path: &str, accept: &str) -> Option<String> {
    http_get_with(port, path, &[("accept", accept)]).await
}

/// [`http_get`] with request headers (a `traceparent`, an `Accept`).
pub async fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    tokio::time::timeout(std::time::Duration::from_secs(5), get(port, path, headers))
        .await
        .ok()?
}

async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
            if length.is_some_and(|length| bytes.len() >= end + 4 + length) {
                break;
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(bytes).ok()
}

/// The /metrics value of `name` (a counter or gauge without labels) served
/// on `127.0.0.1:port`.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}
