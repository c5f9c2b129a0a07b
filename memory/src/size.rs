//! Human-friendly byte sizes: `512M`, `2G`, `65536`, `64KiB`.

use std::fmt;
use std::str::FromStr;

/// Errors from parsing a size string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// The string was empty.
    #[error("empty size")]
    Empty,
    /// The number part could not be parsed.
    #[error("invalid size '{0}': expected a number with an optional K, M or G suffix")]
    Invalid(String),
    /// The value does not fit in 64 bits.
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses a size with an optional binary suffix (`K`, `M`, `G`, `T`, optionally followed by
/// `iB` or `B`, case-insensitive). A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let value: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// A size in bytes that parses from and prints as a human-friendly string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
    /// Whole mebibytes (rounded down).
    pub fn mib(self) -> u64 {
        self.0 >> 20
    }
    /// A size of `mib` mebibytes.
    pub fn from_mib(mib: u64) -> Self {
        ByteSize(mib << 20)
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in UNITS {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{}", self.0 >> shift, unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Sizes in config files (`#[serde(with = "memory::size::size_serde")]`): a string with a
/// K/M/G suffix (`"512M"`) or a number of bytes; written back as the suffixed string.
pub mod size_serde {
    use super::ByteSize;
    use serde::{de, Deserialize, Deserializer, Serializer};

    /// Writes the size as a suffixed string.
    pub fn serialize<S: Serializer>(v: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    /// Reads a suffixed string or a number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a size such as \"512M\" or a number of bytes")
        })? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffixes_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size(" 64M "), Ok(64 << 20));
    }

    #[test]
    fn malformed_sizes_are_refused() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("M"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("12X"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-1M"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184G"),
            Err(SizeError::Overflow(_))
        ));
    }

    proptest! {
        #[test]
        fn display_round_trips(v in 0u64..(1 << 50)) {
            let s = ByteSize(v).to_string();
            prop_assert_eq!(s.parse::<ByteSize>().expect("display output parses"), ByteSize(v));
        }
    }
}
