//! A problem with the operator's input, and where it is.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a config or list file. Loading collects every problem and
/// reports them together, so one `mxgate check` run shows all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line, when the problem is on one line.
    pub line: Option<u32>,
    /// The config key (`listen.threads`), when the problem is about one.
    pub key: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn in_file(file: &Path, message: impl Into<String>) -> Self {
        Problem { file: file.to_owned(), line: None, key: None, message: message.into() }
    }

    pub fn at_line(file: &Path, line: u32, message: impl Into<String>) -> Self {
        Problem { line: Some(line), ..Problem::in_file(file, message) }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All the problems found while loading; the input was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}
