use std::ops::Range;

/// Every failure to produce a [`crate::Config`]. Positions are 1-based and
/// counted in characters so editors and `nginx -t`-style tooling agree.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}:{line}:{col}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{origin}: cannot read: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub(crate) fn at(origin: &str, text: &str, offset: usize, message: String) -> Self {
        let (line, col) = line_col(text, offset);
        ConfigError::Invalid {
            origin: origin.to_owned(),
            line,
            col,
            // The Display contract is one line per error; TOML syntax
            // messages can contain newlines.
            message: message.replace('\n', " "),
        }
    }

    pub fn origin(&self) -> &str {
        match self {
            ConfigError::Invalid { origin, .. } | ConfigError::Io { origin, .. } => origin,
        }
    }

    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Io { .. } => None,
        }
    }

    pub fn col(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { col, .. } => Some(*col),
            ConfigError::Io { .. } => None,
        }
    }

    /// The message without the position prefix; `None` for I/O errors.
    pub fn message(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { message, .. } => Some(message),
            ConfigError::Io { .. } => None,
        }
    }
}

/// An error found during validation, before the origin and source text are
/// attached by [`crate::parse`].
#[derive(Debug)]
pub(crate) struct SpanError {
    pub span: Range<usize>,
    pub message: String,
}

impl SpanError {
    pub(crate) fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        SpanError {
            span,
            message: message.into(),
        }
    }
}

/// toml's own message, prefixed with the key path (`listener.max_sessions`)
/// when toml knows it: type errors otherwise do not say which key is wrong.
pub(crate) fn toml_message(e: &toml::de::Error, text: &str) -> String {
    // toml exposes the path only through Display, and only when no source
    // text is attached (otherwise it renders a snippet instead).
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let path = shown
        .lines()
        .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'));
    let mut message = match path {
        Some(path) => format!("{path}: {}", e.message()),
        None => e.message().to_owned(),
    };
    // The parser's "duplicate key" does not say which key; its span does.
    if e.message() == "duplicate key" {
        if let Some(key) = e.span().and_then(|s| text.get(s)) {
            if !key.is_empty() && !key.contains('\n') {
                message = format!("{message} `{key}`");
            }
        }
    }
    message
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // Spans come from the toml parser and are byte offsets; clamp and snap to
    // a char boundary so a malformed span cannot panic the slice below.
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn line_col_is_one_based_and_counts_chars() {
        let text = "ab\nüx\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 3), (2, 1));
        // 'x' follows a two-byte 'ü' but is the second character.
        assert_eq!(line_col(text, 5), (2, 2));
        assert_eq!(line_col(text, 4), (2, 1));
        assert_eq!(line_col(text, 100), (3, 1));
    }
}
