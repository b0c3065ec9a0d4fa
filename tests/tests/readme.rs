//! The README against the code: its configuration reference lists every key
//! of the config structs with the real default, every setting it mentions
//! exists, and its first commands are the two set-up scripts.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use backbone::config::Config;
use serde_json::Value;
use shopstream_tests::repo_root;

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// Every leaf of the default configuration as `path -> default`, rendered as
/// the README shows it. A map (`kafka.client`) is one `path.*` entry.
fn defaults() -> BTreeMap<String, String> {
    fn walk(path: String, value: &Value, out: &mut BTreeMap<String, String>) {
        match value {
            Value::Object(map) if map.is_empty() => {
                out.insert(format!("{path}.*"), "(none)".into());
            }
            Value::Object(map) => {
                for (key, value) in map {
                    let path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(path, value, out);
                }
            }
            Value::Null => {
                out.insert(path, "(none)".into());
            }
            Value::String(text) if text.is_empty() => {
                out.insert(path, "`\"\"`".into());
            }
            Value::String(text) => {
                out.insert(path, format!("`{text}`"));
            }
            other => {
                out.insert(path, format!("`{other}`"));
            }
        }
    }
    let mut out = BTreeMap::new();
    let value = serde_json::to_value(Config::default()).expect("the config serializes");
    walk(String::new(), &value, &mut out);
    out
}

/// The `| key | default | ... |` rows of the configuration reference.
fn reference_table(readme: &str) -> BTreeMap<String, String> {
    let start = readme
        .find("| key | default | what it does |")
        .expect("the configuration reference table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect()
}

#[test]
fn the_configuration_reference_lists_every_key_with_its_default() {
    let expected = defaults();
    let documented = reference_table(&readme());
    let missing: Vec<String> = expected
        .iter()
        .filter(|(key, _)| !documented.contains_key(*key))
        .map(|(key, default)| format!("| `{key}` | {default} | ... |"))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's configuration reference lacks:\n{}",
        missing.join("\n")
    );
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "README.md documents keys the config does not have: {unknown:?}"
    );
    for (key, default) in &expected {
        assert_eq!(&documented[key], default, "the README's default for {key}");
    }
}

#[test]
fn every_setting_the_readme_mentions_exists() {
    let keys = defaults();
    let sections = [
        "kafka.",
        "clickhouse.",
        "catalog.",
        "telemetry.",
        "worker.",
        "analytics.",
    ];
    let readme = readme();
    let mut unknown = Vec::new();
    for token in readme.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
        let token = token.trim_end_matches('.');
        if !sections.iter().any(|s| token.starts_with(s))
            || token.ends_with(".yaml")
            || token.ends_with(".rs")
        {
            continue;
        }
        let known = keys.contains_key(token)
            || keys.keys().any(|k| {
                k.strip_suffix(".*")
                    .is_some_and(|map| token.starts_with(map))
            });
        if !known {
            unknown.push(token.to_owned());
        }
    }
    assert!(
        unknown.is_empty(),
        "README.md mentions settings that do not exist: {unknown:?}"
    );
}

#[test]
fn the_readme_starts_with_the_two_set_up_commands() {
    let readme = readme();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a first shell block");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands, ["scripts/demo", "scripts/test"]);
    for script in commands {
        let mode = std::fs::metadata(repo_root().join(script))
            .expect(script)
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is executable");
    }
    assert!(
        readme.find("```sh\n") < readme.find("## "),
        "the commands come before the first section"
    );
}
