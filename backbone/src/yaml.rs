//! Loading YAML so that every error a user can cause names the file, the line
//! and the field. serde gives the field path; a pass over the parser's events
//! maps each path to the line it starts on.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_yaml::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One thing wrong with a user's input, located for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, or where else the value came from (an environment variable).
    pub origin: String,
    pub line: Option<usize>,
    /// The field path, such as `topics[1].partitions`.
    pub field: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.origin, line)?,
            None => write!(f, "{}: ", self.origin)?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found in one input, so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// A parsed YAML file that can say where each field is.
#[derive(Debug, Clone)]
pub struct YamlDocument {
    pub origin: String,
    pub value: Value,
    lines: HashMap<String, usize>,
}

impl YamlDocument {
    /// Parses `text`, read from `origin` (shown in errors).
    pub fn parse(origin: impl Into<String>, text: &str) -> Result<Self, Problem> {
        let origin = origin.into();
        let mut index = LineIndex::default();
        // Event by event: the parser's own `load` recurses per nesting level.
        // An error here only costs line numbers: serde_yaml reports it below.
        let mut parser = Parser::new_from_str(text);
        while let Ok((event, mark)) = parser.next_token() {
            if matches!(event, Event::StreamEnd) {
                break;
            }
            index.on_event(event, mark);
        }
        if let Some(line) = index.too_deep {
            return Err(Problem {
                origin,
                line: Some(line),
                field: String::new(),
                message: format!(
                    "nested more than {MAX_DEPTH} levels deep; no shopstream file needs that"
                ),
            });
        }
        let value: Value = serde_yaml::from_str(text).map_err(|e| {
            let message = strip_location(&e.to_string());
            // serde_yaml points at the mapping; point at the repeated key.
            match index.duplicates.first() {
                Some((field, line)) if message.contains("duplicate") => Problem {
                    origin: origin.clone(),
                    line: Some(*line),
                    field: field.clone(),
                    message: "appears twice; each key may appear once".into(),
                },
                _ => Problem {
                    origin: origin.clone(),
                    line: e.location().map(|l| l.line()),
                    field: String::new(),
                    message: format!("not valid YAML: {message}"),
                },
            }
        })?;
        let value = if value.is_null() {
            Value::Mapping(Default::default())
        } else {
            value
        };
        Ok(Self {
            origin,
            value,
            lines: index.lines,
        })
    }

    /// The line `field` starts on, or that of its nearest enclosing field.
    pub fn line_of(&self, field: &str) -> Option<usize> {
        let mut path = field;
        loop {
            if let Some(&line) = self.lines.get(path) {
                return Some(line);
            }
            path = parent(path)?;
        }
    }

    /// A problem at `field` of this document.
    pub fn problem(&self, field: impl Into<String>, message: impl Into<String>) -> Problem {
        let field = field.into();
        Problem {
            origin: self.origin.clone(),
            line: self.line_of(&field),
            field,
            message: message.into(),
        }
    }

    /// Deserializes the document, locating any error.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        deserialize_value(self.value.clone())
            .map_err(|(field, message)| self.problem(field, message))
    }
}

/// Deserializes a YAML value; on error returns the field path and message.
/// For an unknown field the path names that field, not its parent.
pub fn deserialize_value<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut field = e.path().to_string();
        if field == "." {
            field.clear();
        }
        let message = strip_location(&e.inner().to_string());
        if let Some(unknown) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            if field.rsplit('.').next() != Some(unknown) {
                field = join(&field, unknown);
            }
        }
        (field, message)
    })
}

/// `parent.child`, or `child` at the top level.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// serde_yaml appends " at line N column M"; we print the line ourselves.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

enum Frame {
    Map { key: Option<String> },
    Seq { next: usize },
}

/// Collections nested deeper than this are refused before serde sees them:
/// a hostile file nested thousands deep would otherwise overflow the stack.
pub const MAX_DEPTH: usize = 64;

/// Maps each field path to its line, from the parser's events.
#[derive(Default)]
struct LineIndex {
    stack: Vec<Frame>,
    /// Where nesting first went past [`MAX_DEPTH`]; events are ignored after.
    too_deep: Option<usize>,
    lines: HashMap<String, usize>,
    /// Keys seen twice in one mapping, where they repeat.
    duplicates: Vec<(String, usize)>,
}

impl LineIndex {
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Map { key: Some(key) } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                Frame::Map { key: None } => {}
                Frame::Seq { next } => path.push_str(&format!("[{}]", next.saturating_sub(1))),
            }
        }
        path
    }

    /// A value (scalar or collection) starts.
    fn begin_value(&mut self, line: usize) {
        if let Some(Frame::Seq { next }) = self.stack.last_mut() {
            *next += 1;
            let path = self.path();
            self.lines.entry(path).or_insert(line);
        }
    }

    /// A value ended: the enclosing mapping waits for its next key.
    fn end_value(&mut self) {
        if let Some(Frame::Map { key }) = self.stack.last_mut() {
            *key = None;
        }
    }
}

impl MarkedEventReceiver for LineIndex {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line();
        if self.too_deep.is_some() {
            return;
        }
        if self.stack.len() >= MAX_DEPTH
            && matches!(event, Event::MappingStart(..) | Event::SequenceStart(..))
        {
            self.too_deep = Some(line);
            return;
        }
        match event {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map { key: key @ None }) = self.stack.last_mut() {
                    *key = Some(text);
                    let path = self.path();
                    match self.lines.entry(path) {
                        Entry::Occupied(seen) => self.duplicates.push((seen.key().clone(), line)),
                        Entry::Vacant(slot) => {
                            slot.insert(line);
                        }
                    }
                } else {
                    self.begin_value(line);
                    self.end_value();
                }
            }
            Event::Alias(_) => {
                self.begin_value(line);
                self.end_value();
            }
            Event::MappingStart(..) => {
                self.begin_value(line);
                self.stack.push(Frame::Map { key: None });
            }
            Event::SequenceStart(..) => {
                self.begin_value(line);
                self.stack.push(Frame::Seq { next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.end_value();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
a: 1
b:
  c: x
  list:
    - name: first
    - name: second
      deep: {k: v}
";

    #[test]
    fn fields_map_to_their_lines() {
        let doc = YamlDocument::parse("t.yaml", TEXT).unwrap();
        assert_eq!(doc.line_of("a"), Some(1));
        assert_eq!(doc.line_of("b.c"), Some(3));
        assert_eq!(doc.line_of("b.list[0].name"), Some(5));
        assert_eq!(doc.line_of("b.list[1]"), Some(6));
        assert_eq!(doc.line_of("b.list[1].deep.k"), Some(7));
        // Unknown paths fall back to the nearest parent.
        assert_eq!(doc.line_of("b.list[1].missing"), Some(6));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: u32,
        b: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        c: String,
    }

    #[test]
    fn unknown_fields_are_named_with_their_line() {
        let doc = YamlDocument::parse("t.yaml", "a: 1\nb:\n  c: x\n  colour: red\n").unwrap();
        let problem = doc.deserialize::<Doc>().unwrap_err();
        assert_eq!(problem.field, "b.colour");
        assert_eq!(problem.line, Some(4));
        assert!(problem.message.contains("expected `c`"), "{problem}");
        assert!(problem
            .to_string()
            .starts_with("t.yaml:4: b.colour: unknown field"));
    }

    #[test]
    fn type_errors_name_the_field() {
        let doc = YamlDocument::parse("t.yaml", "a: lots\nb:\n  c: x\n").unwrap();
        let problem = doc.deserialize::<Doc>().unwrap_err();
        assert_eq!((problem.field.as_str(), problem.line), ("a", Some(1)));
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_have_lines() {
        let problem = YamlDocument::parse("t.yaml", "a: 1\nb: [1, 2\n").unwrap_err();
        assert!(problem.line.is_some(), "{problem}");
        assert!(problem.message.starts_with("not valid YAML"));
        let problem = YamlDocument::parse("t.yaml", "a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(
            problem.to_string(),
            "t.yaml:3: a: appears twice; each key may appear once"
        );
    }
}
