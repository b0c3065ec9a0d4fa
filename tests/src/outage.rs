//! A tansu broker of the test's own behind a TCP proxy that can make it
//! unreachable: every connection cut and new ones refused for a while, as
//! when the network to a broker fails. The broker keeps running and keeps
//! its log, so what comes back is what it acknowledged. Clients find the
//! broker through the proxy only: tansu advertises the proxy's address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{free_port, Children};

/// The broker and its proxy; both stop when dropped.
#[derive(Debug)]
pub struct UnreachableTansu {
    proxy: SocketAddr,
    refusing: Arc<AtomicBool>,
    /// Connections cut open, and connections refused, so far.
    severed: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    /// Bumped to cut every connection open.
    cuts: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
    _broker: Children,
    _log: tempfile::TempDir,
}

impl UnreachableTansu {
    /// Starts tansu 0.6.0 (from PATH, where scripts/test puts it, or
    /// scripts/test's cache) in memory behind a proxy on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = listener.local_addr()?;
        let port = free_port()?;
        let log = tempfile::tempdir()?;
        let broker = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
            ])
            .args(["--advertised-listener-url", &format!("tcp://{proxy}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.path().join("tansu.log"))?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("tansu does not start ({e}); scripts/test installs it"))?;
        let broker = Children(vec![broker]);
        let upstream: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let started = Instant::now();
        while TcpStream::connect(upstream).await.is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {upstream} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refusing = Arc::new(AtomicBool::new(false));
        let (severed, refused) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let (cuts, _) = watch::channel(0u64);
        let accept = {
            let (refusing, cuts) = (refusing.clone(), cuts.clone());
            let (severed, refused) = (Arc::clone(&severed), refused.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    let severed = Arc::clone(&severed);
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {
                                severed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            })
        };
        Ok(Self {
            proxy,
            refusing,
            severed,
            refused,
            cuts,
            accept,
            _broker: broker,
            _log: log,
        })
    }

    /// The address clients bootstrap from (the proxy's).
    pub fn bootstrap_servers(&self) -> String {
        self.proxy.to_string()
    }

    /// The connections open through the proxy (each relay watches `cuts`).
    pub fn connections(&self) -> usize {
        self.cuts.receiver_count()
    }

    /// Cuts every connection and refuses new ones for `length`; how many
    /// connections it cut, and how many it refused meanwhile.
    pub async fn unreachable_for(&self, length: Duration) -> (usize, usize) {
        let before = (
            self.severed.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        );
        self.refusing.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
        tokio::time::sleep(length).await;
        self.refusing.store(false, Ordering::SeqCst);
        (
            self.severed.load(Ordering::SeqCst) - before.0,
            self.refused.load(Ordering::SeqCst) - before.1,
        )
    }
}

impl Drop for UnreachableTansu {
    fn drop(&mut self) {
        self.accept.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

/// tansu on PATH, else where scripts/test caches it.
fn tansu_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .unwrap_or_default();
        cache.join("shopstream/tansu-0.6.0/tansu")
    })
}
