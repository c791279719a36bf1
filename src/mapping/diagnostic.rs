//! Load-time problems with a mapping, each located at file:line:column and
//! carrying the fix.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Where in a mapping file something was written (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem found while loading or checking mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the problem is; `None` for problems of a directory or database
    /// as a whole.
    pub location: Option<Location>,
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn at(location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            location: Some(location),
            message: message.into(),
            help: None,
        }
    }

    pub fn general(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            location: None,
            message: message.into(),
            help: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        write!(f, "error: {}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Turns byte offsets of one file into [`Location`]s.
pub struct SourceFile<'a> {
    pub path: Arc<Path>,
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceFile<'a> {
    pub fn new(path: &Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        SourceFile {
            path: Arc::from(path.to_path_buf().into_boxed_path()),
            text,
            line_starts,
        }
    }

    /// The location of byte `offset` (clamped into the file).
    pub fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let line_start = self.line_starts[line];
        let column = self.text[line_start..]
            .char_indices()
            .take_while(|&(index, _)| index < offset - line_start)
            .count();
        Location {
            file: self.path.clone(),
            line: to_u32(line + 1),
            column: to_u32(column + 1),
        }
    }
}

fn to_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// The closest of `candidates` to a misspelled `word`, if any is close.
pub fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|&candidate| (edit_distance(word, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= 2.max(candidate.len() / 3))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_offsets() {
        let file = SourceFile::new(Path::new("m.toml"), "ab\ncdé\nf");
        let at = |offset| {
            let location = file.locate(offset);
            (location.line, location.column)
        };
        assert_eq!(at(0), (1, 1));
        assert_eq!(at(3), (2, 1));
        assert_eq!(at(7), (2, 4));
        assert_eq!(at(8), (3, 1));
    }

    #[test]
    fn suggests_near_names() {
        assert_eq!(did_you_mean("kyes", &["keys", "tags"]), Some("keys"));
        assert_eq!(did_you_mean("zzzzzz", &["keys", "tags"]), None);
    }
}
