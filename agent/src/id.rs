//! Instance ids: the only caller-supplied text that becomes part of a host path.

use std::fmt;

/// A validated instance id: a UUID in lower-case hyphenated form
/// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`). Anything else, in particular `.`,
/// `/` or NUL, is refused, so the id can name a directory and a cgroup safely.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

#[derive(Debug, thiserror::Error)]
#[error("instance id must be a lower-case hyphenated UUID")]
pub struct InvalidInstanceId;

impl InstanceId {
    pub fn parse(text: &str) -> Result<Self, InvalidInstanceId> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 {
            return Err(InvalidInstanceId);
        }
        for (i, b) in bytes.iter().enumerate() {
            let ok = match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
            };
            if !ok {
                return Err(InvalidInstanceId);
            }
        }
        Ok(InstanceId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_lower_case_uuid() {
        let id = "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b";
        assert_eq!(
            InstanceId::parse(id).map(|i| i.to_string()).ok(),
            Some(id.into())
        );
    }

    #[test]
    fn refuses_anything_that_could_leave_its_directory() {
        for bad in [
            "",
            "..",
            "../../../../etc/passwd",
            "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5",
            "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b0",
            "0F8E2A4C-1B2D-4E5F-8A9B-0C1D2E3F4A5B",
            "0f8e2a4c-1b2d-4e5f-8a9b/0c1d2e3f4a5b",
            "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a/.",
            "0f8e2a4c11b2d14e5f18a9b10c1d2e3f4a5b",
            "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5\0",
            "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5é",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
