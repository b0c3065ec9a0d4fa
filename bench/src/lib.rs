//! Benchmark figures: the bench binaries record one line of JSON per figure
//! per run (into the file named by `BENCH_JSON`), and `bench-report` turns
//! the lines of several runs into medians with min and max, the ratio to the
//! baseline measured in the same run, and the goal each figure is held to.
//! Ratios are taken per run, then summarised: a noisy machine slows both
//! sides of a run alike, so it cannot flatter or hurt the ratio much.

pub mod procfs;
pub mod scrape;

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

/// The environment variable naming the file figures are appended to.
pub const BENCH_JSON: &str = "BENCH_JSON";

/// What a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// The ratio to the baseline is at least this.
    RatioAtLeast(f64),
    /// The value is at least this.
    AtLeast(f64),
    /// The value is at most this.
    AtMost(f64),
}

impl Goal {
    fn met(self, value: f64, ratio: Option<f64>) -> bool {
        match self {
            Goal::RatioAtLeast(min) => ratio.is_some_and(|r| r >= min),
            Goal::AtLeast(min) => value >= min,
            Goal::AtMost(max) => value <= max,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(min) => format!("ratio >= {min}"),
            Goal::AtLeast(min) => format!(">= {} {unit}", number(min)),
            Goal::AtMost(max) => format!("<= {} {unit}", number(max)),
        }
    }
}

/// One figure of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Which part: publish, consume, sink, analytics, resources.
    pub section: String,
    pub figure: String,
    pub unit: String,
    pub value: f64,
    /// The baseline's name and its value in the same run.
    pub baseline: Option<(String, f64)>,
    pub goal: Option<Goal>,
    /// The command line that produced it.
    pub command: String,
}

/// Appends records to `BENCH_JSON` when set; always prints them.
#[derive(Debug)]
pub struct Recorder {
    section: String,
    command: String,
    file: Option<std::fs::File>,
}

impl Recorder {
    pub fn from_env(section: &str) -> std::io::Result<Self> {
        let file = match std::env::var_os(BENCH_JSON) {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => None,
        };
        let command = std::env::args()
            .enumerate()
            .map(|(i, a)| {
                if i == 0 {
                    // The binary's name, not where this build put it.
                    std::path::Path::new(&a)
                        .file_name()
                        .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
                } else {
                    a
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Self {
            section: section.to_owned(),
            command,
            file,
        })
    }

    /// Records `figure` of this run, against `baseline` measured in the same run.
    pub fn record(
        &mut self,
        figure: &str,
        unit: &str,
        value: f64,
        baseline: Option<(&str, f64)>,
        goal: Option<Goal>,
    ) -> std::io::Result<()> {
        let record = Record {
            section: self.section.clone(),
            figure: figure.to_owned(),
            unit: unit.to_owned(),
            value,
            baseline: baseline.map(|(name, v)| (name.to_owned(), v)),
            goal,
            command: self.command.clone(),
        };
        if let Some(file) = &mut self.file {
            let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
            writeln!(file, "{line}")?;
        }
        Ok(())
    }
}

/// Median, min and max.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// A figure over every run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub section: String,
    pub figure: String,
    pub unit: String,
    pub runs: usize,
    pub value: Spread,
    pub baseline: Option<String>,
    /// The per-run ratio to the baseline.
    pub ratio: Option<Spread>,
    pub goal: Option<Goal>,
    /// Judged on the medians.
    pub goal_met: Option<bool>,
    pub commands: Vec<String>,
}

/// The order sections are reported in (by prefix); others follow.
const SECTIONS: [&str; 5] = ["publish", "consume", "sink", "analytics", "resources"];

fn section_rank(section: &str) -> usize {
    SECTIONS
        .iter()
        .position(|s| section.starts_with(s))
        .unwrap_or(SECTIONS.len())
}

/// Groups records by section, figure and unit: sections in [`SECTIONS`]
/// order, figures in the order first seen.
pub fn summarise(records: &[Record]) -> Vec<Summary> {
    let mut order: Vec<(String, String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String, String), Vec<&Record>> = BTreeMap::new();
    for record in records {
        let key = (
            record.section.clone(),
            record.figure.clone(),
            record.unit.clone(),
        );
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(record);
    }
    order.sort_by_key(|(section, _, _)| section_rank(section));
    order
        .into_iter()
        .filter_map(|key| {
            let group = &groups[&key];
            let first = group[0];
            let value = Spread::of(&group.iter().map(|r| r.value).collect::<Vec<_>>())?;
            let ratios: Vec<f64> = group
                .iter()
                .filter_map(|r| r.baseline.as_ref().map(|(_, b)| r.value / b))
                .collect();
            let ratio = Spread::of(&ratios);
            let mut commands: Vec<String> = group.iter().map(|r| r.command.clone()).collect();
            commands.dedup();
            Some(Summary {
                section: key.0,
                figure: key.1,
                unit: key.2,
                runs: group.len(),
                value,
                baseline: first.baseline.as_ref().map(|(name, _)| name.clone()),
                ratio,
                goal: first.goal,
                goal_met: first
                    .goal
                    .map(|g| g.met(value.median, ratio.map(|r| r.median))),
                commands,
            })
        })
        .collect()
}

/// A number for people: thousands separated, at most three significant decimals.
pub fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        let whole = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, digit) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        if value < 0.0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The markdown tables, one per section, then the commands.
pub fn render(summaries: &[Summary]) -> String {
    let mut out = String::new();
    let mut sections: Vec<&str> = Vec::new();
    for s in summaries {
        if !sections.contains(&s.section.as_str()) {
            sections.push(&s.section);
        }
    }
    for section in sections {
        out.push_str(&format!("\n### {section}\n\n"));
        out.push_str("| figure | median | min | max | runs | vs baseline, same run (median, min-max) | goal |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        let mut commands: Vec<&String> = Vec::new();
        for s in summaries.iter().filter(|s| s.section == section) {
            let ratio = match (&s.baseline, s.ratio) {
                (Some(name), Some(r)) => {
                    format!("{:.2} of {name} ({:.2}-{:.2})", r.median, r.min, r.max)
                }
                _ => String::new(),
            };
            let goal = match (s.goal, s.goal_met) {
                (Some(goal), Some(met)) => format!(
                    "{}: {}",
                    goal.describe(&s.unit),
                    if met { "met" } else { "**missed**" }
                ),
                _ => String::new(),
            };
            out.push_str(&format!(
                "| {} | {} {} | {} | {} | {} | {ratio} | {goal} |\n",
                s.figure,
                number(s.value.median),
                s.unit,
                number(s.value.min),
                number(s.value.max),
                s.runs
            ));
            for command in &s.commands {
                if !commands.contains(&command) {
                    commands.push(command);
                }
            }
        }
        out.push('\n');
        for command in commands {
            out.push_str(&format!("    {command}\n"));
        }
    }
    out
}

/// Reads records written through [`Recorder`], naming the line of a bad one.
pub fn read(path: &std::path::Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(figure: &str, value: f64, baseline: Option<f64>, goal: Option<Goal>) -> Record {
        Record {
            section: "consume".into(),
            figure: figure.into(),
            unit: "events/s".into(),
            value,
            baseline: baseline.map(|b| ("bare".to_owned(), b)),
            goal,
            command: "consume-bench --events 10".into(),
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }

    #[test]
    fn ratios_are_taken_per_run_then_summarised() {
        // Run 2 is slow for both sides: its ratio is as good as run 1's.
        let records = [
            record("worker", 80.0, Some(100.0), Some(Goal::RatioAtLeast(0.8))),
            record("worker", 40.0, Some(50.0), Some(Goal::RatioAtLeast(0.8))),
            record("worker", 70.0, Some(100.0), Some(Goal::RatioAtLeast(0.8))),
            record("rss", 90.0, None, Some(Goal::AtMost(100.0))),
            Record {
                unit: "MB/s".into(),
                ..record("worker", 8.0, None, None)
            },
        ];
        let summaries = summarise(&records);
        assert_eq!(summaries.len(), 3, "one figure in two units is two figures");
        let worker = &summaries[0];
        assert_eq!(worker.runs, 3);
        assert_eq!(worker.value.median, 70.0);
        let ratio = worker.ratio.unwrap();
        assert_eq!((ratio.median, ratio.min, ratio.max), (0.8, 0.7, 0.8));
        assert_eq!(worker.goal_met, Some(true));
        assert_eq!(summaries[1].goal_met, Some(true));

        let missed = summarise(&[record("w", 1.0, Some(2.0), Some(Goal::RatioAtLeast(0.8)))]);
        assert_eq!(missed[0].goal_met, Some(false));
        let text = render(&missed);
        assert!(text.contains("| w | 1.00 events/s | 1.00 | 1.00 | 1 | 0.50 of bare (0.50-0.50) | ratio >= 0.8: **missed** |"), "{text}");
        assert!(text.contains("    consume-bench --events 10\n"), "{text}");
    }

    #[test]
    fn numbers_read_easily() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(-4_200.0), "-4,200");
        assert_eq!(number(999.6), "1,000");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(0.456), "0.46");
    }

    #[test]
    fn records_round_trip_through_the_file_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("figures.jsonl");
        let r = record("worker", 1.0, Some(2.0), Some(Goal::AtLeast(3.0)));
        std::fs::write(&path, format!("{}\n\n", serde_json::to_string(&r).unwrap())).unwrap();
        assert_eq!(read(&path).unwrap(), vec![r]);
        std::fs::write(&path, "{\"section\": 1}\n").unwrap();
        let error = read(&path).unwrap_err();
        assert!(error.contains("figures.jsonl:1:"), "{error}");
    }
}
