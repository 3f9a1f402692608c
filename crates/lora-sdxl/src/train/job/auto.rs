//! `true`, `false` or `"auto"`: a switch whose best value depends on the
//! device the run lands on.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A job switch that may be left to lorakit (`"auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoBool {
    /// Chosen per device when the run starts.
    #[default]
    Auto,
    /// `true`.
    On,
    /// `false`.
    Off,
}

impl From<bool> for AutoBool {
    fn from(on: bool) -> Self {
        if on {
            Self::On
        } else {
            Self::Off
        }
    }
}

impl AutoBool {
    /// The value: the user's, or `auto_value` with `why` when left to auto.
    /// Returns the value and the reason, for the log.
    pub fn resolve(self, key: &str, auto_value: bool, why: &str) -> (bool, String) {
        match self {
            Self::On => (true, format!("{key} = true")),
            Self::Off => (false, format!("{key} = false")),
            Self::Auto => (auto_value, format!("{key} = \"auto\": {why}")),
        }
    }
}

impl Serialize for AutoBool {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::On => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
        }
    }
}

struct AutoBoolVisitor;

impl Visitor<'_> for AutoBoolVisitor {
    type Value = AutoBool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("true, false or \"auto\"")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<AutoBool, E> {
        Ok(v.into())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<AutoBool, E> {
        match v {
            "auto" => Ok(AutoBool::Auto),
            _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
        }
    }
}

impl<'de> Deserialize<'de> for AutoBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AutoBoolVisitor)
    }
}
