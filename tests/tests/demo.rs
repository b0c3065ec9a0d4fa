//! scripts/demo as a new user runs it: every binary as its own process, the
//! embedded broker hosted by `shopstream-topics serve`, a report at the end,
//! and nothing left running afterwards, ctrl-c included.
//!
//! The demo uses the binaries `cargo test --workspace` built (DEMO_BIN_DIR),
//! so it does not build a release of its own here.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shopstream_tests::{bin_dir, clickhouse, repo_root, unique_name};

fn demo(tmp: &Path) -> Command {
    let mut command = Command::new(repo_root().join("scripts/demo"));
    command
        .env("DEMO_BIN_DIR", bin_dir())
        .env("DEMO_DATABASE", unique_name("demo").replace('-', "_"))
        .env("DEMO_RATE", "200")
        // Every file and process of the demo lives under this directory.
        .env("TMPDIR", tmp)
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .env_remove("CLICKHOUSE_URL")
        .stdin(Stdio::null());
    command
}

/// Processes whose command line mentions `dir`: the demo's, if any remain.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(&needle) {
            found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn number_after(text: &str, prefix: &str) -> u64 {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"));
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {line:?}"))
}

#[tokio::test]
async fn the_demo_runs_every_process_prints_the_report_and_stops_them() {
    let tmp = tempfile::tempdir().unwrap();
    let output = demo(tmp.path())
        .env("CLICKHOUSE_URL", clickhouse().await.url())
        .env("DEMO_DURATION", "10s")
        .output()
        .expect("scripts/demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{stderr}",
        output.status
    );

    // The publisher's events all reached the projections and the report.
    let sent = number_after(&stdout, "Sent ");
    assert!(sent > 1000, "{stdout}");
    let rows: u64 = [
        "user_events",
        "order_events",
        "chat_messages",
        "search_queries",
    ]
    .iter()
    .map(|table| number_after(&stdout, table))
    .sum();
    assert_eq!(rows, sent, "events-store rows\n{stdout}");
    for heading in [
        "Revenue and orders by category",
        "Order funnel",
        "Busiest chat rooms",
        "Searches: ",
        "Active users: ",
    ] {
        assert!(stdout.contains(heading), "{heading} in\n{stdout}");
    }
    let created = number_after(&stdout, "created ");
    assert!(created > 0, "{stdout}");
    assert_eq!(
        number_after(&stdout, "order_status_current"),
        created,
        "every order created has its status row\n{stdout}"
    );
    // shopstream-check recomputed the run and found every read model exact.
    assert!(
        stdout.contains(&format!("Checked {sent} events")) && stdout.contains("\n0 findings."),
        "{stdout}"
    );
    assert!(stdout.contains("Verdict: exact."), "{stdout}");
    for step in [
        "Kafka: the embedded broker",
        "Applied 16 of 16 change(s).",
        "Stopping analytics",
        "Stopping worker",
        "Stopping kafka",
    ] {
        assert!(stderr.contains(step), "{step} in\n{stderr}");
    }
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
}

/// Where ctrl-c lands in the demo, and how the test holds the demo there so
/// the signal cannot arrive a phase too early or too late.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// `shopstream-topics serve` is starting (held by its wrapper).
    Provisioning,
    /// The worker is starting and not ready (held by its wrapper).
    StartUp,
    /// `shopstream-publish` runs for ten minutes.
    Publishing,
    /// The worker holds every record in a batch that lingers for ten
    /// minutes, so the demo waits for it.
    Waiting,
    /// `shopstream-analytics report` is running (held by its wrapper).
    Report,
}

/// A copy of the binaries' directory where `binary`, when its arguments
/// contain `argument`, touches `marker` and then waits to be stopped instead
/// of running: the demo stays in the phase that runs it.
fn holding_bin_dir(tmp: &Path, binary: &str, argument: &str, marker: &Path) -> PathBuf {
    let dir = tmp.join("bin");
    std::fs::create_dir_all(&dir).expect("test setup");
    for entry in std::fs::read_dir(bin_dir()).expect("test setup").flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if !path.is_file() || name == binary {
            continue;
        }
        std::os::unix::fs::symlink(&path, dir.join(&name)).expect("test setup");
    }
    let real = bin_dir().join(binary);
    std::fs::write(
        dir.join(binary),
        format!(
            "#!/usr/bin/env bash\n[[ \" $* \" == *\" {argument} \"* ]] || exec {real} \"$@\"\ntouch {marker}\nwhile :; do sleep 0.2; done\n",
            real = real.display(),
            marker = marker.display()
        ),
    )
    .expect("test setup");
    std::fs::set_permissions(
        dir.join(binary),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("test setup");
    dir
}

/// Runs the demo until it is in `phase`, presses ctrl-c (SIGINT to its
/// whole process group, as a terminal does) and checks that it stops at
/// once, exit 130, with nothing it started left running.
async fn ctrl_c_stops_everything_while(phase: Phase) {
    let tmp = tempfile::tempdir().expect("test setup");
    let marker = tmp.path().join("in-phase");
    let mut command = demo(tmp.path());
    command.env("DEMO_DURATION", "10m");
    let held = |binary, argument| holding_bin_dir(tmp.path(), binary, argument, &marker);
    match phase {
        // Its own ClickHouse too, so ctrl-c has a server to stop.
        Phase::Provisioning => {
            command.env("DEMO_BIN_DIR", held("shopstream-topics", "serve"));
        }
        Phase::StartUp => {
            command.env("DEMO_BIN_DIR", held("shopstream-worker", "--config"));
        }
        Phase::Publishing => {}
        Phase::Waiting => {
            command
                .env("DEMO_DURATION", "3s")
                .env("SHOPSTREAM_WORKER__BATCH_LINGER_MS", "600000");
        }
        Phase::Report => {
            command
                .env("DEMO_DURATION", "3s")
                .env("DEMO_BIN_DIR", held("shopstream-analytics", "report"));
        }
    }
    if !matches!(phase, Phase::Provisioning) {
        command.env("CLICKHOUSE_URL", clickhouse().await.url());
    }
    with_default_sigint(&mut command);
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("scripts/demo runs");
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        let stderr = child.stderr.take().expect("test setup");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = log.lock().expect("test setup");
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let in_phase = || match phase {
        Phase::Publishing => log.lock().expect("test setup").contains("Published "),
        Phase::Waiting => log
            .lock()
            .expect("test setup")
            .contains("Waiting for the worker"),
        _ => marker.exists(),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while !in_phase() {
        assert!(
            Instant::now() < deadline,
            "the demo did not reach {phase:?} within 180 s:\n{}",
            log.lock().expect("test setup")
        );
        assert!(
            child.try_wait().expect("test setup").is_none(),
            "the demo exited before {phase:?}:\n{}",
            log.lock().expect("test setup")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !processes_under(tmp.path()).is_empty(),
        "the demo's processes are running"
    );

    let group = format!("-{}", child.id());
    assert!(Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .expect("test setup")
        .success());
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("test setup") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop within 90 s of ctrl-c in {phase:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().expect("test setup");
    let log = log.lock().expect("test setup").clone();
    assert_eq!(status.code(), Some(130), "ctrl-c in {phase:?}:\n{log}");
    assert!(log.contains("Interrupted; stopping everything."), "{log}");
    let next_step = match phase {
        Phase::Report => "Projections (",
        _ => "Analytics report",
    };
    assert!(
        !log.contains(next_step),
        "went on to {next_step:?} after ctrl-c in {phase:?}:\n{log}"
    );
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new(), "{log}");
}

#[tokio::test]
async fn ctrl_c_while_provisioning_stops_every_process_the_demo_started() {
    ctrl_c_stops_everything_while(Phase::Provisioning).await;
}

#[tokio::test]
async fn ctrl_c_while_starting_up_stops_every_process_the_demo_started() {
    ctrl_c_stops_everything_while(Phase::StartUp).await;
}

#[tokio::test]
async fn ctrl_c_while_publishing_stops_every_process_the_demo_started() {
    ctrl_c_stops_everything_while(Phase::Publishing).await;
}

#[tokio::test]
async fn ctrl_c_while_waiting_for_the_consumers_stops_every_process_the_demo_started() {
    ctrl_c_stops_everything_while(Phase::Waiting).await;
}

#[tokio::test]
async fn ctrl_c_during_the_report_stops_every_process_the_demo_started() {
    ctrl_c_stops_everything_while(Phase::Report).await;
}

#[test]
fn bad_demo_settings_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    for (variable, value, message) in [
        (
            "DEMO_DURATION",
            "2 minutes",
            "DEMO_DURATION must be a duration such as 90s, 2m or 1h, got '2 minutes'",
        ),
        ("DEMO_DURATION", "0s", "DEMO_DURATION must be a duration"),
        (
            "DEMO_RATE",
            "fast",
            "DEMO_RATE must be a whole number of events per second above 0, got 'fast'",
        ),
        ("DEMO_RATE", "0", "DEMO_RATE must be a whole number"),
        (
            "DEMO_DATABASE",
            "shop; DROP TABLE x",
            "DEMO_DATABASE must be a ClickHouse identifier",
        ),
    ] {
        let output = demo(tmp.path())
            .env(variable, value)
            .output()
            .expect("scripts/demo runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{variable}={value}: {stderr}"
        );
        assert!(stderr.contains(message), "{variable}={value}: {stderr}");
        assert!(!stderr.contains("==>"), "nothing started: {stderr}");
    }
}

/// A test run started in the background of a non-interactive shell inherits
/// SIGINT ignored, and bash cannot trap a signal ignored at its start: the
/// demo gets SIGINT's default action, as from a terminal.
#[allow(unsafe_code)]
fn with_default_sigint(command: &mut Command) {
    // SAFETY: `signal` is async-signal-safe, as `pre_exec` requires.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
}
