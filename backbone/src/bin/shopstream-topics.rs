//! shopstream-topics: make a Kafka cluster match topics.yaml.
//!
//! Exit codes: 0 done or nothing to do; 2 `plan` found changes pending;
//! 1 any error (bad catalog, unreachable broker, refused or failed change).

// A command-line tool: its results go to stdout, by design.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use backbone::admin::{Outcome, ProvisionTarget};
use backbone::catalog::Catalog;
use backbone::config::{Config, ConfigArgs};
use backbone::kafka::{KafkaConnection, EMBEDDED};
use backbone::provision::{self, is_managed, Plan};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "shopstream-topics",
    version,
    about = "Make a Kafka cluster match topics.yaml."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the catalog offline, without a broker. Exit 0 valid, 1 not.
    Validate,
    /// Show what apply would change. Exit 0 nothing to do, 2 changes pending, 1 error.
    Plan {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Plan deletion of undeclared topics under the catalog's managed prefixes.
        #[arg(long)]
        allow_delete: bool,
    },
    /// Carry out the plan. Running it again is a no-op; after a partial
    /// failure a rerun finishes the job.
    Apply {
        /// Do not ask for confirmation (required when not on a terminal).
        #[arg(long)]
        yes: bool,
        /// Delete undeclared topics under the catalog's managed prefixes.
        #[arg(long)]
        allow_delete: bool,
    },
    /// Show the live state of the managed topics.
    Describe {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Host the embedded cluster (`embedded://`, librdkafka's mock cluster)
    /// with the catalog applied, so processes on this machine can connect
    /// over loopback; serves until SIGTERM or ctrl-c. For demos and
    /// development: it keeps about 5 MiB per partition, nothing on disk.
    Serve {
        /// Write the bootstrap servers to this file once the topics exist
        /// (written whole, so a script can wait for it to appear).
        #[arg(long)]
        address_file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Plan found changes pending.
const CHANGES_PENDING: u8 = 2;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let (config, catalog, path) = Config::load_with_catalog(&cli.config)?;
    if let Command::Validate = cli.command {
        let desired = catalog.desired_topics().len();
        println!(
            "{}: valid: {} event topics, {desired} with retry tiers and dead-letter queues{}.",
            path.display(),
            catalog.topics.len(),
            catalog
                .profile
                .as_deref()
                .map(|p| format!(" (profile {p})"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let serving = matches!(cli.command, Command::Serve { .. });
    if serving && config.kafka.bootstrap_servers.trim() != EMBEDDED {
        return Err(format!(
            "serve hosts the embedded cluster; kafka.bootstrap_servers is {:?} (leave it unset or {EMBEDDED:?}, and use apply for a real cluster)",
            config.kafka.bootstrap_servers
        ));
    }
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms);
    let connection = KafkaConnection::connect_empty(&config.kafka).map_err(|e| e.to_string())?;
    let target = ProvisionTarget::new(&connection, timeout).map_err(|e| e.to_string())?;
    if target.is_embedded() && !serving {
        eprintln!(
            "note: embedded:// is an in-process mock cluster without an admin API; topics are created with its own calls and vanish when this command exits."
        );
    }
    // Bounded even if a client call ignores its own timeout.
    let state = tokio::time::timeout(timeout * 3, target.fetch_state())
        .await
        .map_err(|_| {
            format!(
                "no answer from {} within {:?}",
                target.broker(),
                timeout * 3
            )
        })?
        .map_err(|e| e.to_string())?;
    check_cluster_pin(&catalog, state.cluster_id.as_deref(), target.broker())?;

    match cli.command {
        Command::Validate => unreachable!("handled above"),
        Command::Describe { output } => {
            describe(&catalog, &state, output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            output,
            allow_delete,
        } => {
            let plan = provision::plan(
                &catalog.desired_topics(),
                &catalog.managed_prefixes,
                &state,
                allow_delete,
            );
            match output {
                Output::Text => print!(
                    "Plan for {} ({}):\n{}",
                    target.broker(),
                    path.display(),
                    provision::render(&plan)
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"broker": target.broker(), "catalog": path, "plan": plan})
                ),
            }
            Ok(if !plan.refusals.is_empty() {
                ExitCode::FAILURE
            } else if plan.changes.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(CHANGES_PENDING)
            })
        }
        Command::Apply { yes, allow_delete } => {
            apply(&catalog, &path, &state, &target, yes, allow_delete).await
        }
        Command::Serve { address_file } => {
            let code = apply(&catalog, &path, &state, &target, true, false).await?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            serve(connection.bootstrap_servers(), address_file.as_deref()).await
        }
    }
}

/// Shows the plan, asks unless `yes`, carries it out and reports each change.
async fn apply(
    catalog: &Catalog,
    path: &Path,
    state: &provision::ClusterState,
    target: &ProvisionTarget<'_>,
    yes: bool,
    allow_delete: bool,
) -> Result<ExitCode, String> {
    let plan = provision::plan(
        &catalog.desired_topics(),
        &catalog.managed_prefixes,
        state,
        allow_delete,
    );
    print!(
        "Plan for {} ({}):\n{}",
        target.broker(),
        path.display(),
        provision::render(&plan)
    );
    if plan.changes.is_empty() {
        return Ok(refusal_exit(&plan));
    }
    if !yes {
        confirm(plan.changes.len())?;
    }
    let outcomes = target.apply(&plan.changes).await;
    report(&outcomes);
    if outcomes.iter().any(|o| o.error.is_some()) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(refusal_exit(&plan))
}

/// Keeps the embedded cluster (owned by the caller) alive until a signal.
async fn serve(bootstrap_servers: &str, address_file: Option<&Path>) -> Result<ExitCode, String> {
    let shutdown = backbone::shutdown::on_signals().map_err(|e| e.to_string())?;
    if let Some(file) = address_file {
        // Written beside, then renamed: a reader never sees half an address.
        let partial = file.with_extension("partial");
        std::fs::write(&partial, format!("{bootstrap_servers}\n"))
            .and_then(|()| std::fs::rename(&partial, file))
            .map_err(|e| format!("cannot write --address-file {}: {e}", file.display()))?;
    }
    println!("Embedded Kafka serving at {bootstrap_servers} until SIGTERM or ctrl-c (in memory; about 5 MiB kept per partition).");
    let _ = std::io::stdout().flush();
    shutdown.cancelled().await;
    println!("Embedded Kafka stopped.");
    Ok(ExitCode::SUCCESS)
}

fn refusal_exit(plan: &Plan) -> ExitCode {
    if plan.refusals.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: {} change(s) refused; see above.",
            plan.refusals.len()
        );
        ExitCode::FAILURE
    }
}

/// With a `cluster_id` pin, refuse any other cluster, or one that hides its id.
fn check_cluster_pin(catalog: &Catalog, live: Option<&str>, broker: &str) -> Result<(), String> {
    match (&catalog.cluster_id, live) {
        (None, _) => Ok(()),
        (Some(pin), Some(id)) if pin == id => Ok(()),
        (Some(pin), Some(id)) => Err(format!(
            "the catalog is pinned to cluster {pin:?} but {broker} is cluster {id:?}; refusing to touch it (check --brokers and --profile)"
        )),
        (Some(pin), None) => Err(format!(
            "the catalog is pinned to cluster {pin:?} but {broker} did not report a cluster id; refusing to touch it"
        )),
    }
}

fn confirm(count: usize) -> Result<(), String> {
    if !std::io::stdin().is_terminal() {
        return Err(
            "apply changes a cluster: pass --yes to confirm when not running on a terminal".into(),
        );
    }
    print!("Apply {count} change(s)? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err("not applied".into())
    }
}

fn report(outcomes: &[Outcome]) {
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    println!(
        "Applied {} of {} change(s).",
        outcomes.len() - failed.len(),
        outcomes.len()
    );
    for outcome in outcomes {
        match &outcome.error {
            None => println!("  done    {}", outcome.change.summary()),
            Some(error) => println!("  FAILED  {}: {error}", outcome.change.summary()),
        }
    }
    if !failed.is_empty() {
        println!("Fix the cause and run apply again: it picks up what is left.");
    }
}

fn describe(catalog: &Catalog, state: &provision::ClusterState, output: Output) {
    let desired = catalog.desired_topics();
    let managed: Vec<(&String, &provision::LiveTopic)> = state
        .topics
        .iter()
        .filter(|(name, _)| {
            desired.iter().any(|d| &d.name == *name) || is_managed(name, &catalog.managed_prefixes)
        })
        .collect();
    let missing: Vec<&str> = desired
        .iter()
        .filter(|d| !state.topics.contains_key(&d.name))
        .map(|d| d.name.as_str())
        .collect();
    if output == Output::Json {
        let topics: serde_json::Map<String, serde_json::Value> = managed
            .iter()
            .map(|(name, topic)| {
                (
                    (*name).clone(),
                    serde_json::to_value(topic).unwrap_or_default(),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"cluster_id": state.cluster_id, "topics": topics, "missing": missing})
        );
        return;
    }
    println!(
        "{:<40} {:>10} {:>3}  {:<20} CONFIGS",
        "TOPIC", "PARTITIONS", "RF", "LEADERS"
    );
    for (name, topic) in managed {
        let leaders: Vec<String> = topic
            .partitions
            .iter()
            .map(|p| p.leader.to_string())
            .collect();
        let declared = desired.iter().find(|d| &d.name == name);
        // Explicit overrides, and the live value of every key the catalog declares.
        let configs: Vec<String> = topic
            .configs
            .iter()
            .filter(|(key, c)| c.explicit || declared.is_some_and(|d| d.configs.contains_key(*key)))
            .map(|(key, c)| format!("{key}={}", c.value.as_deref().unwrap_or("")))
            .collect();
        println!(
            "{:<40} {:>10} {:>3}  {:<20} {}",
            name,
            topic.partitions.len(),
            topic
                .replication_factor()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            leaders.join(","),
            configs.join(" ")
        );
    }
    for name in missing {
        println!("{name:<40} (missing: run shopstream-topics apply)");
    }
}
