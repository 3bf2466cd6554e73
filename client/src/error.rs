//! Why a `cavi` command failed, as one sentence, and the exit code for it.

/// Exit code for an error the server answered, or bad input data.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a wrong invocation (clap uses the same one).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the server could not be reached at all.
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; `sentence` is its own words.
    #[error("{sentence}")]
    Server {
        status: u16,
        code: String,
        sentence: String,
        /// On a 421: the epoch of the answering node's map.
        epoch: Option<u64>,
        /// The answer's `Retry-After`, when it had one (a `503`).
        retry_after: Option<std::time::Duration>,
    },
    /// No answer: connection refused, name not resolved, timeout.
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// An answer that is not CAVI's wire format.
    #[error("unexpected answer from {endpoint}: {detail}")]
    BadResponse { endpoint: String, detail: String },
    /// A wrong invocation that clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// Unreadable or malformed input.
    #[error("{0}")]
    Input(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(String),
    /// A reshard that was refused or failed.
    #[error("{0}")]
    Reshard(String),
    /// A failure tied to one line of a `load` input.
    #[error("line {line}: {source}")]
    AtLine { line: u64, source: Box<ClientError> },
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Server { .. }
            | ClientError::BadResponse { .. }
            | ClientError::Input(_)
            | ClientError::Reshard(_)
            | ClientError::Output(_) => EXIT_FAILURE,
            ClientError::Usage(_) => EXIT_USAGE,
            ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
            ClientError::AtLine { source, .. } => source.exit_code(),
        }
    }

    pub fn at_line(self, line: u64) -> Self {
        ClientError::AtLine {
            line,
            source: Box::new(self),
        }
    }

    /// The line of a `load` input this error is tied to, if any.
    pub fn line(&self) -> Option<u64> {
        match self {
            ClientError::AtLine { line, .. } => Some(*line),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_cause() {
        let server = ClientError::Server {
            status: 404,
            code: "key_not_found".into(),
            sentence: "key \"x\" not found".into(),
            epoch: None,
            retry_after: None,
        };
        assert_eq!(server.to_string(), "key \"x\" not found");
        assert_eq!(server.exit_code(), 1);
        let down = ClientError::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            down.to_string(),
            "cannot reach http://127.0.0.1:1: connection refused"
        );
        assert_eq!(down.exit_code(), 3);
        let at = down.at_line(7);
        assert_eq!(at.exit_code(), 3);
        assert_eq!(at.line(), Some(7));
        assert!(at.to_string().starts_with("line 7: cannot reach"));
        assert_eq!(ClientError::Usage("u".into()).exit_code(), 2);
    }
}
