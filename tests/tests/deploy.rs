//! deploy/ checked offline, since no Docker engine or cluster runs here: the
//! Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
//! from PyPI), the compose file against the compose specification
//! (check-jsonschema, from PyPI), each with a broken copy that must fail; and
//! what no schema knows: the configuration they carry loads, probes and
//! grace periods match it, the autoscalers stop at the partition count,
//! every command names a binary the image has, and every alert rule is
//! PromQL that reads metrics the binaries export.

// Helpers as well as tests: a panic is how a check fails here.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use backbone::catalog::Catalog;
use backbone::config::{Config, ConfigArgs};
use serde_yaml::Value;
use shopstream_tests::repo_root;

/// Kubernetes versions validated against: the oldest still common and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

/// Runs a validator from PyPI; `Err` carries its output.
fn validator(program: &str, args: &[&str], file: &Path) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e}; install it with: python3 -m pip install kubernetes-validate==1.37.0 check-jsonschema==0.39.0 (scripts/test does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn kubernetes_validate(file: &Path, version: &str) -> Result<String, String> {
    validator(
        "kubernetes-validate",
        &["--strict", "--no-warn", "-k", version],
        file,
    )
}

fn compose_validate(file: &Path) -> Result<String, String> {
    validator(
        "check-jsonschema",
        &["--builtin-schema", "vendor.compose-spec"],
        file,
    )
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut value = <Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Compose's `<<: *anchor` merge keys, as compose applies them.
            value.apply_merge().expect("merge keys");
            value
        })
        .collect()
}

/// The manifests kustomization.yaml applies, then the examples.
fn manifests() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let k8s = deploy().join("k8s");
    let kustomization = &documents(&k8s.join("kustomization.yaml"))[0];
    let applied: Vec<PathBuf> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| k8s.join(r.as_str().expect("a file name")))
        .collect();
    let yaml_in = |dir: &Path| -> BTreeSet<PathBuf> {
        std::fs::read_dir(dir)
            .expect("deploy/k8s")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect()
    };
    let mut on_disk = yaml_in(&k8s);
    on_disk.remove(&k8s.join("kustomization.yaml"));
    assert_eq!(
        on_disk,
        applied.iter().cloned().collect(),
        "every manifest in deploy/k8s is in kustomization.yaml (examples go in examples/)"
    );
    (
        applied,
        yaml_in(&k8s.join("examples")).into_iter().collect(),
    )
}

#[test]
fn every_kubernetes_manifest_is_valid_for_kubernetes() {
    let (applied, examples) = manifests();
    assert!(!examples.is_empty());
    for file in applied.iter().chain(&examples) {
        for version in KUBERNETES_VERSIONS {
            if let Err(output) = kubernetes_validate(file, version) {
                panic!("{} against Kubernetes {version}:\n{output}", file.display());
            }
        }
    }

    // Negative control: the validator does reject a broken manifest.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("worker.yaml");
    let text = std::fs::read_to_string(deploy().join("k8s/worker.yaml")).unwrap();
    let typo = text.replace(
        "terminationGracePeriodSeconds",
        "terminationGracePeriodSecond",
    );
    assert_ne!(typo, text);
    std::fs::write(&broken, typo).unwrap();
    let output = kubernetes_validate(&broken, KUBERNETES_VERSIONS[1])
        .expect_err("an unknown field fails strict validation");
    assert!(output.contains("terminationGracePeriodSecond"), "{output}");
}

#[test]
fn the_compose_file_is_valid_for_the_compose_specification() {
    let file = deploy().join("docker-compose.yml");
    if let Err(output) = compose_validate(&file) {
        panic!("{}:\n{output}", file.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &broken,
        text.replace("stop_grace_period:", "stop_grace_periods:"),
    )
    .unwrap();
    let output = compose_validate(&broken).expect_err("an unknown key fails");
    assert!(output.contains("stop_grace_periods"), "{output}");
}

/// The binaries the workspace builds, from `cargo metadata`.
fn workspace_binaries() -> BTreeSet<String> {
    let output = shopstream_tests::succeeds(
        Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--offline",
            ])
            .current_dir(repo_root()),
        "cargo metadata",
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// What the runtime stage of deploy/Dockerfile holds and sets.
struct Image {
    binaries: BTreeSet<String>,
    env: Vec<(String, String)>,
    user: String,
    exposed: BTreeSet<u16>,
}

fn image() -> Image {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    // Continuation lines joined, so an instruction is one line.
    let joined = text.replace("\\\n", " ");
    let runtime = joined
        .rsplit_once("\nFROM ")
        .expect("a multi-stage build")
        .1;
    let copied = joined
        .lines()
        .find(|l| l.contains("cp shopstream-topics"))
        .expect("the binaries are copied to /out");
    let binaries = copied
        .split("cp ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take_while(|w| *w != "/out/")
        .map(str::to_owned)
        .collect();
    let instruction = |name: &str| -> Vec<&str> {
        runtime
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .collect()
    };
    let env = instruction("ENV ")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("ENV key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Image {
        binaries,
        env,
        user: instruction("USER ").concat(),
        exposed: instruction("EXPOSE ")
            .iter()
            .flat_map(|l| l.split_whitespace())
            .map(|p| p.parse().unwrap())
            .collect(),
    }
}

fn port(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn load(file: Option<&Path>, env: &[(String, String)]) -> Config {
    let args = ConfigArgs {
        config: file.map(Path::to_path_buf),
        ..ConfigArgs::default()
    };
    Config::load_from(&args, env.to_vec()).unwrap_or_else(|p| panic!("invalid configuration:\n{p}"))
}

#[test]
fn the_image_has_every_binary_and_its_settings_are_valid_configuration() {
    let image = image();
    assert_eq!(
        image.binaries,
        workspace_binaries(),
        "deploy/Dockerfile copies every binary the workspace builds"
    );
    assert!(
        image.user.parse::<u32>().is_ok_and(|uid| uid > 0),
        "runs as a numeric non-root user, got USER {:?}",
        image.user
    );
    let config = load(None, &image.env);
    assert_eq!(
        image.exposed,
        BTreeSet::from([
            port(&config.worker.metrics_address),
            port(&config.analytics.metrics_address),
            port(&config.query.listen_address)
        ])
    );
    assert!(config.worker.metrics_address.starts_with("0.0.0.0:"));
    assert!(config.analytics.metrics_address.starts_with("0.0.0.0:"));
    assert!(config.query.listen_address.starts_with("0.0.0.0:"));
}

/// The binary a command or entrypoint runs.
fn program(command: &Value) -> &str {
    command[0].as_str().expect("a command as a list")
}

#[test]
fn the_compose_services_run_binaries_of_the_image_with_valid_configuration() {
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let image = image();
    let services = compose["services"].as_mapping().unwrap();
    let kraft = &services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"];
    assert_eq!(
        kraft.as_str(),
        Some("broker,controller"),
        "Kafka in KRaft mode"
    );
    assert!(services["clickhouse"]["image"]
        .as_str()
        .unwrap()
        .starts_with("clickhouse/clickhouse-server:"));
    let mut ours = BTreeSet::new();
    for (name, service) in services {
        if service["image"].as_str() != Some("shopstream:dev") {
            continue;
        }
        let name = name.as_str().unwrap();
        ours.insert(name.to_owned());
        assert!(
            image.binaries.contains(program(&service["command"])),
            "{name} runs {:?}",
            service["command"]
        );
        // The image's environment, then the service's: what the binary sees.
        let mut env = image.env.clone();
        for (k, v) in service["environment"].as_mapping().unwrap() {
            let value = v
                .as_str()
                .unwrap()
                .replace("${CLICKHOUSE_PASSWORD:-shopstream}", "x");
            env.push((k.as_str().unwrap().to_owned(), value));
        }
        let config = load(None, &env);
        assert_eq!(config.kafka.bootstrap_servers, "kafka:9092", "{name}");
        assert!(config.clickhouse.url.contains("clickhouse:8123"), "{name}");
        if let Some(grace) = service["stop_grace_period"].as_str() {
            let seconds: u64 = grace.trim_end_matches('s').parse().unwrap();
            assert!(
                seconds * 1000 > config.worker.drain_timeout_ms + 10_000,
                "{name}: stop_grace_period {grace} leaves no time after the drain"
            );
        }
    }
    assert_eq!(
        ours,
        BTreeSet::from(["topics", "worker", "analytics", "query", "publisher"].map(String::from))
    );
    assert_eq!(
        services["topics"]["command"],
        serde_yaml::from_str::<Value>("[shopstream-topics, apply, --yes]").unwrap()
    );
}

#[test]
fn the_kubernetes_workloads_match_their_configuration_and_the_catalog() {
    let (applied, examples) = manifests();
    let objects: Vec<Value> = applied
        .iter()
        .chain(&examples)
        .flat_map(|f| documents(f))
        .collect();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };

    // The configuration the pods mount loads, and names the catalog in the image.
    let config_map = find("ConfigMap", "shopstream-config");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shopstream.yaml");
    std::fs::write(
        &file,
        config_map["data"]["shopstream.yaml"].as_str().unwrap(),
    )
    .unwrap();
    let image = image();
    let config = load(Some(&file), &image.env);
    assert_eq!(
        config.catalog.path,
        Path::new("/etc/shopstream/topics.yaml")
    );
    let catalog = Catalog::load(
        &repo_root().join("topics.yaml"),
        config.catalog.profile.as_deref(),
    )
    .unwrap();
    let partitions = catalog
        .desired_topics()
        .iter()
        .map(|t| t.partitions)
        .max()
        .unwrap();

    for (name, metrics_address) in [
        ("shopstream-worker", &config.worker.metrics_address),
        ("shopstream-analytics", &config.analytics.metrics_address),
        ("shopstream-query", &config.query.listen_address),
    ] {
        let pod = &find("Deployment", name)["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(program(&container["command"]), name);
        assert_eq!(container["command"][1], "--config");
        let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
        assert_eq!(
            container["command"][2].as_str().unwrap(),
            format!("{mount}/shopstream.yaml"),
            "{name} reads the mounted ConfigMap"
        );
        assert_eq!(
            container["ports"][0]["containerPort"].as_u64(),
            Some(u64::from(port(metrics_address))),
            "{name}: the metrics port is the one the configuration listens on"
        );
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"],
                container["ports"][0]["name"]
            );
        }
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace * 1000 > config.worker.drain_timeout_ms + 10_000,
            "{name}: terminationGracePeriodSeconds {grace} leaves no time after the {} ms drain",
            config.worker.drain_timeout_ms
        );
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !container["resources"][bound][resource].is_null(),
                    "{name}: resources.{bound}.{resource}"
                );
            }
        }
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["runAsUser"]
                .as_u64()
                .map(|u| u.to_string()),
            Some(image.user.clone())
        );
        let password = &container["env"][0];
        assert_eq!(password["name"], "SHOPSTREAM_CLICKHOUSE__PASSWORD");
        assert!(
            password["value"].is_null(),
            "{name}: the password comes from a Secret"
        );
        assert_eq!(
            password["valueFrom"]["secretKeyRef"]["name"],
            "shopstream-clickhouse"
        );

        if name == "shopstream-query" {
            // The tokens file the configuration names is the mounted Secret.
            let tokens_file = config
                .query
                .auth
                .tokens_file
                .as_ref()
                .expect("the deployed query service wants tokens");
            let tokens = |list: &Value| {
                list.as_sequence()
                    .unwrap()
                    .iter()
                    .find(|entry| entry["name"] == "tokens")
                    .cloned()
                    .expect("a tokens volume and mount")
            };
            assert_eq!(
                tokens_file.parent().and_then(|p| p.to_str()),
                tokens(&container["volumeMounts"])["mountPath"].as_str()
            );
            assert_eq!(
                tokens(&pod["volumes"])["secret"]["secretName"],
                "shopstream-query-tokens"
            );
            // Stateless, not a consumer: no partition-bound autoscaler.
            continue;
        }
        let hpa = &find("HorizontalPodAutoscaler", name)["spec"];
        assert_eq!(hpa["scaleTargetRef"]["name"], name);
        assert_eq!(
            hpa["maxReplicas"].as_i64(),
            Some(i64::from(partitions)),
            "{name}: the replica ceiling is the largest partition count in topics.yaml"
        );
        let targets: BTreeSet<(String, u64)> = hpa["metrics"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["resource"]["name"].as_str().unwrap().to_owned(),
                    m["resource"]["target"]["averageUtilization"]
                        .as_u64()
                        .unwrap(),
                )
            })
            .collect();
        assert_eq!(
            targets,
            BTreeSet::from([("cpu".to_owned(), 70), ("memory".to_owned(), 80)])
        );
    }

    let lag = objects
        .iter()
        .find(|o| o["spec"]["metrics"][0]["type"] == "External")
        .expect("a lag-based autoscaler example");
    assert_eq!(
        lag["spec"]["maxReplicas"].as_i64(),
        Some(i64::from(partitions))
    );

    // KEDA's kafka scaler watches the worker's own group on the configured
    // brokers, beside the same CPU and memory targets as the HPA.
    let keda = &find("ScaledObject", "shopstream-worker")["spec"];
    assert_eq!(keda["scaleTargetRef"]["name"], "shopstream-worker");
    assert_eq!(
        keda["maxReplicaCount"].as_i64(),
        Some(i64::from(partitions))
    );
    let triggers = keda["triggers"].as_sequence().unwrap();
    let kafka = triggers.iter().find(|t| t["type"] == "kafka").unwrap();
    assert_eq!(
        kafka["metadata"]["consumerGroup"].as_str(),
        Some(config.worker.group_id.as_str())
    );
    assert_eq!(
        kafka["metadata"]["bootstrapServers"].as_str(),
        Some(config.kafka.bootstrap_servers.as_str())
    );
    assert_eq!(kafka["metadata"]["offsetResetPolicy"], "earliest");
    let utilization: BTreeSet<(String, String)> = triggers
        .iter()
        .filter(|t| t["metricType"] == "Utilization")
        .map(|t| {
            (
                t["type"].as_str().unwrap().to_owned(),
                t["metadata"]["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        utilization,
        BTreeSet::from([
            ("cpu".to_owned(), "70".to_owned()),
            ("memory".to_owned(), "80".to_owned())
        ])
    );

    let job = &find("Job", "shopstream-topics")["spec"]["template"]["spec"]["containers"][0];
    let command: Vec<&str> = job["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "shopstream-topics");
    assert!(command.ends_with(&["apply", "--yes"]), "{command:?}");
}

/// What a running worker (no-op handler), analytics job and query service
/// export: every family and sample name of their /metrics. Each is scraped
/// in both formats, and each answer parsed by the Prometheus project's
/// Python client (`tests/metrics_parse.py`), not by the library that wrote
/// it: the two formats carry the same families, types, help and series, and
/// every family has a help text and, where its name ends in one, its unit.
async fn exported_families() -> BTreeSet<String> {
    let database = shopstream_tests::clickhouse()
        .await
        .database()
        .await
        .unwrap();
    let catalog = format!("catalog.path={}", repo_root().join("topics.yaml").display());
    let mut children = shopstream_tests::Children::default();
    let mut exported = BTreeSet::new();
    for (binary, address_key, extra, served) in [
        (
            "shopstream-worker",
            "worker.metrics_address",
            vec!["--handler", "noop"],
            // Its lag, measured every 5 s, also before any record arrives.
            "shopstream_consumer_lag{",
        ),
        (
            "shopstream-analytics",
            "analytics.metrics_address",
            vec![],
            "shopstream_ready 1",
        ),
        (
            "shopstream-query",
            "query.listen_address",
            vec![],
            "# TYPE shopstream_query_seconds",
        ),
    ] {
        let port = shopstream_tests::free_port().unwrap();
        let child = Command::new(shopstream_tests::bin_dir().join(binary))
            .args(["--brokers", "embedded://", "--profile", "dev"])
            .args(extra)
            .args(["--set", &catalog])
            .args(["--set", &format!("clickhouse.url={}", database.url)])
            .args(["--set", &format!("clickhouse.database={}", database.name)])
            .args(["--set", &format!("{address_key}=127.0.0.1:{port}")])
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap();
        children.0.push(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let classic = loop {
            if let Some(text) = bench::scrape::http_get(port, "/metrics").await {
                if text.contains(served) {
                    break text;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{binary} served no ready /metrics within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let open = bench::scrape::http_get_accepting(
            port,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .await
        .unwrap_or_else(|| panic!("{binary} answers an OpenMetrics scrape"));
        let classic = parsed(binary, "prometheus", &classic, "text/plain; version=0.0.4");
        let open = parsed(binary, "openmetrics", &open, "application/openmetrics-text");
        let (classic_described, open_described) = (describe(&classic), describe(&open));
        let differ: Vec<_> = classic_described
            .symmetric_difference(&open_described)
            .collect();
        assert!(
            differ.is_empty(),
            "{binary}: the formats differ in families, types, help or series: {differ:#?}"
        );
        for family in &open {
            let name = family["name"].as_str().unwrap();
            assert!(
                !family["help"].as_str().unwrap_or("").is_empty(),
                "{binary}: {name} has no help"
            );
            if name.ends_with("_seconds") {
                assert_eq!(family["unit"], "seconds", "{binary}: {name}");
            }
        }
        for family in &classic {
            exported.insert(family["name"].as_str().unwrap().to_owned());
            for sample in family["samples"].as_array().unwrap() {
                exported.insert(sample[0].as_str().unwrap().to_owned());
            }
        }
    }
    drop(children);
    exported
}

/// The families of one /metrics `response` (status line, headers, body),
/// after checking its content type, as `tests/metrics_parse.py` parses them
/// in `format`.
fn parsed(
    binary: &str,
    format: &str,
    response: &str,
    content_type: &str,
) -> Vec<serde_json::Value> {
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-type: {content_type}")),
        "{binary} answers {format} as {content_type}: {head}"
    );
    shopstream_tests::parse_exposition(binary, format, body)
}

/// Each family's name, type and help with the names and labels of its
/// series (not their values, which move between two scrapes; not the
/// `_created` series only OpenMetrics has).
fn describe(families: &[serde_json::Value]) -> BTreeSet<String> {
    families
        .iter()
        .flat_map(|family| {
            let head = format!("{} {} {}", family["name"], family["type"], family["help"]);
            let series: Vec<String> = family["samples"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| !s[0].as_str().unwrap().ends_with("_created"))
                .map(|s| {
                    // A bucket bound is a number, written 1 or 1.0.
                    let mut labels = s[1].clone();
                    if let Some(le) = labels.get_mut("le") {
                        let bound: f64 = le.as_str().unwrap().parse().unwrap();
                        *le = format!("{bound:?}").into();
                    }
                    format!("{head} {} {labels}", s[0])
                })
                .collect();
            std::iter::once(head).chain(series)
        })
        .collect()
}

/// The shopstream metrics an expression reads, after it parses as PromQL
/// (what `promtool check rules` would refuse, it refuses). A histogram's
/// `_bucket`, `_sum` and `_count` series belong to its family.
fn metrics_read_by(expr: &str) -> Result<BTreeSet<String>, String> {
    promql_parser::parser::parse(expr).map_err(|e| format!("{expr}: {e}"))?;
    Ok(expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("shopstream_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_owned()
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_metrics_parse_in_both_formats_and_every_alert_rule_and_dashboard_query_reads_them(
) {
    let rules = &documents(&deploy().join("prometheus/alerts.yaml"))[0];
    let operator = documents(&deploy().join("k8s/examples/prometheus-rules.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(
        operator["spec"]["groups"], rules["groups"],
        "the PrometheusRule carries the rules file's groups unchanged"
    );
    let exported = exported_families().await;
    assert!(exported.contains("shopstream_consumer_lag"), "{exported:?}");
    let mut alerts = BTreeSet::new();
    for rule in rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
    {
        let name = rule["alert"].as_str().unwrap();
        alerts.insert(name.to_owned());
        let expr = rule["expr"].as_str().unwrap();
        let read = metrics_read_by(expr).unwrap();
        assert!(!read.is_empty(), "{name} reads no shopstream metric");
        let missing: Vec<_> = read.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{name} reads {missing:?}, which no binary exports"
        );
        assert!(rule["annotations"]["summary"].is_string(), "{name}");
    }
    assert_eq!(
        alerts,
        BTreeSet::from(
            [
                "ShopstreamConsumerLagGrowing",
                "ShopstreamDeadLettersHigh",
                "ShopstreamClickHouseInsertsFailing",
                "ShopstreamReadModelsStale",
                "ShopstreamDeadLettersNotWritten",
                "ShopstreamNotReady",
            ]
            .map(String::from)
        )
    );

    // The Grafana dashboard compose provisions: every query is PromQL over
    // exported metrics, through the provisioned data source, and the
    // panels cover what operators watch.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/dashboards/shopstream.json")).unwrap(),
    )
    .unwrap();
    let sources = documents(&deploy().join("grafana/provisioning/datasources/prometheus.yaml"));
    let source_uid = sources[0]["datasources"][0]["uid"].as_str().unwrap();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        titles.push(title.to_lowercase());
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], source_uid, "{title}");
            let read = metrics_read_by(target["expr"].as_str().unwrap()).unwrap();
            let missing: Vec<_> = read.difference(&exported).collect();
            assert!(
                !read.is_empty() && missing.is_empty(),
                "{title} reads {missing:?}"
            );
        }
    }
    for topic in [
        "records handled",
        "lag",
        "batch latency",
        "retries",
        "dead letters",
        "clickhouse insert",
        "freshness",
        "query latency",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel on {topic}: {titles:?}"
        );
    }

    // Negative controls: a typo in a name, and an expression that is not PromQL.
    let typo = metrics_read_by("rate(shopstream_records_dead_letered_total[5m]) > 1").unwrap();
    assert!(!typo.is_subset(&exported));
    assert!(metrics_read_by("sum(rate(shopstream_ready[5m]) > ").is_err());
}

/// Prometheus in compose scrapes every shopstream service where its
/// configuration listens and loads the alert rules; Grafana gets the data
/// source and the dashboard.
#[test]
fn compose_runs_prometheus_on_every_service_and_grafana_with_the_dashboard() {
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let services = &compose["services"];
    let mounts = |service: &str| -> BTreeSet<String> {
        services[service]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let prometheus = &documents(&deploy().join("prometheus/prometheus.yml"))[0];
    let prometheus_mounts = mounts("prometheus");
    assert!(
        prometheus_mounts.contains("./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro")
    );
    for rules in prometheus["rule_files"].as_sequence().unwrap() {
        let path = rules.as_str().unwrap();
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        assert!(
            prometheus_mounts.contains(&format!("./prometheus/{name}:{path}:ro")),
            "{path} is mounted"
        );
        assert!(deploy().join("prometheus").join(name).exists());
    }
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["static_configs"][0]["targets"]
                .as_sequence()
                .unwrap()
                .clone()
        })
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    let config = load(None, &image().env);
    let expected: BTreeSet<String> = [
        ("worker", &config.worker.metrics_address),
        ("analytics", &config.analytics.metrics_address),
        ("query", &config.query.listen_address),
    ]
    .into_iter()
    .map(|(service, address)| {
        assert!(services[service].is_mapping(), "compose runs {service}");
        format!("{service}:{}", port(address))
    })
    .collect();
    assert_eq!(targets, expected, "every service, where it listens");
    let grafana_mounts = mounts("grafana");
    assert!(grafana_mounts.contains("./grafana/provisioning:/etc/grafana/provisioning:ro"));
    let providers = documents(&deploy().join("grafana/provisioning/dashboards/shopstream.yaml"));
    let path = providers[0]["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(grafana_mounts.contains(&format!("./grafana/dashboards:{path}:ro")));
    let sources = documents(&deploy().join("grafana/provisioning/datasources/prometheus.yaml"));
    assert_eq!(
        sources[0]["datasources"][0]["url"],
        "http://prometheus:9090"
    );
}
