//! A TCP proxy in front of ClickHouse's HTTP port that sees which responses
//! answer an INSERT. It announces each acknowledged insert (so a test can
//! kill a process right after the acknowledgement and before its commit),
//! and can cut the next inserts' responses after ClickHouse stored the rows:
//! the client sees the connection close with no answer, like a network that
//! failed on the way back, or refuse every request for a while (ClickHouse
//! unreachable for this client only). Every byte that passes is
//! ClickHouse's own.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    cut: AtomicUsize,
    cuts_done: AtomicUsize,
    requests: AtomicUsize,
    refusing: AtomicBool,
    acknowledged: broadcast::Sender<String>,
}

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct ClickHouseProxy {
    address: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl ClickHouseProxy {
    /// Proxies to the HTTP interface at `upstream_url` (`http://host:port`).
    pub async fn start(upstream_url: &str) -> anyhow::Result<Self> {
        let upstream: SocketAddr = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (acknowledged, _) = broadcast::channel(1024);
        let state = Arc::new(State {
            upstream,
            cut: AtomicUsize::new(0),
            cuts_done: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            acknowledged,
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                if state.refusing.load(Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(state.upstream).await {
                        relay(client, server, state).await;
                    }
                });
            }
        });
        Ok(Self {
            address,
            state,
            task,
        })
    }

    /// The URL clients use instead of ClickHouse's.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Cuts the responses of the next `n` inserts after they were stored.
    pub fn cut_next_inserts(&self, n: usize) {
        self.state.cut.store(n, Ordering::SeqCst);
    }

    /// While `on`, every request fails: new connections are closed at once,
    /// and a kept-alive one when its next request arrives.
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// Insert responses cut so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts_done.load(Ordering::SeqCst)
    }

    /// HTTP requests sent to ClickHouse so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Announces each insert whose answer reached the client: the request
    /// line, which names the table.
    pub fn acknowledged_inserts(&self) -> broadcast::Receiver<String> {
        self.state.acknowledged.subscribe()
    }
}

impl Drop for ClickHouseProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways; the clickhouse crate sends one request at a time per
/// connection, so each response answers the oldest request line seen.
async fn relay(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let seen = requests.clone();
    let counted = state.clone();
    let upward = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if counted.refusing.load(Ordering::SeqCst) {
                break;
            }
            if chunk.starts_with(b"POST ") || chunk.starts_with(b"GET ") {
                let line = chunk.split(|b| *b == b'\r').next().unwrap_or_default();
                seen.lock()
                    .expect("proxy lock")
                    .push_back(String::from_utf8_lossy(line).into_owned());
                counted.requests.fetch_add(1, Ordering::SeqCst);
            }
            if server_write.write_all(chunk).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let answered = if chunk.starts_with(b"HTTP/1.") {
            requests.lock().expect("proxy lock").pop_front()
        } else {
            None
        };
        let insert = answered
            .as_ref()
            .filter(|line| line.to_ascii_uppercase().contains("INSERT"));
        if insert.is_some()
            && state
                .cut
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            // Stored, and the answer never arrives.
            state.cuts_done.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if client_write.write_all(chunk).await.is_err() {
            break;
        }
        if let Some(line) = insert {
            let _ = state.acknowledged.send(line.clone());
        }
    }
    upward.abort();
    let _ = client_write.shutdown().await;
}
