//! The reading context: line numbers, collected problems, and typed
//! values that record an error (naming the key) instead of stopping.

use std::fmt::Display;
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::Diagnostic;
use crate::config::{parse_duration, parse_size};

pub(super) type Value<'i> = Spanned<DeValue<'i>>;

pub(super) struct Cx {
    line_starts: Vec<usize>,
    pub(super) errors: Vec<Diagnostic>,
    pub(super) unsupported: Vec<Diagnostic>,
}

impl Cx {
    pub(super) fn new(text: &str) -> Cx {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            line_starts,
            errors: Vec::new(),
            unsupported: Vec::new(),
        }
    }

    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        self.line_starts.partition_point(|&s| s <= span.start)
    }

    pub(super) fn error(&mut self, span: &Range<usize>, key: &str, message: impl Display) {
        self.errors.push(Diagnostic {
            line: self.line(span),
            key: key.into(),
            message: message.to_string(),
        });
    }

    pub(super) fn unknown(
        &mut self,
        key: &Spanned<std::borrow::Cow<str>>,
        path: &str,
        known: &[&str],
    ) {
        self.error(
            &key.span(),
            &join(path, key.get_ref()),
            format!("unknown key (expected one of: {})", known.join(", ")),
        );
    }

    // Typed values. Each returns None after recording an error.

    pub(super) fn table<'a, 'i>(&mut self, v: &'a Value<'i>, key: &str) -> Option<&'a DeTable<'i>> {
        let t = v.get_ref().as_table();
        if t.is_none() {
            self.error(
                &v.span(),
                key,
                format!("expected a table, found {}", v.get_ref().type_str()),
            );
        }
        t
    }

    pub(super) fn string<'a>(&mut self, v: &'a Value<'_>, key: &str) -> Option<&'a str> {
        let s = v.get_ref().as_str();
        if s.is_none() {
            self.error(
                &v.span(),
                key,
                format!("expected a string, found {}", v.get_ref().type_str()),
            );
        }
        s
    }

    pub(super) fn boolean(&mut self, v: &Value<'_>, key: &str) -> Option<bool> {
        let b = v.get_ref().as_bool();
        if b.is_none() {
            self.error(&v.span(), key, "expected true or false");
        }
        b
    }

    pub(super) fn uint(&mut self, v: &Value<'_>, key: &str, min: u64, max: u64) -> Option<u64> {
        let n = v
            .get_ref()
            .as_integer()
            .and_then(|i| i.as_str().replace('_', "").parse::<i64>().ok());
        match n {
            Some(n) if n >= min as i64 && n as u64 <= max => Some(n as u64),
            Some(n) => {
                self.error(
                    &v.span(),
                    key,
                    format!("{n} is out of range ({min} to {max})"),
                );
                None
            }
            None => {
                self.error(&v.span(), key, "expected a whole number");
                None
            }
        }
    }

    pub(super) fn choice<T>(
        &mut self,
        v: &Value<'_>,
        key: &str,
        parse: fn(&str) -> Option<T>,
        choices: &[&str],
    ) -> Option<T> {
        let s = self.string(v, key)?;
        let t = parse(s);
        if t.is_none() {
            self.error(
                &v.span(),
                key,
                format!("unknown value '{s}' (expected {})", choices.join(", ")),
            );
        }
        t
    }

    /// A duration with a unit; `0` (string or number) disables it.
    pub(super) fn duration(&mut self, v: &Value<'_>, key: &str) -> Option<Option<Duration>> {
        match v.get_ref() {
            DeValue::String(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(&v.span(), key, e);
                    None
                }
            },
            DeValue::Integer(i) if i.as_str() == "0" => Some(None),
            DeValue::Integer(i) => {
                let n = i.as_str();
                self.error(
                    &v.span(),
                    key,
                    format!(
                        "{n} is a bare number: a duration needs a unit, e.g. \"{n}s\" or \"{n}ms\""
                    ),
                );
                None
            }
            other => {
                self.error(
                    &v.span(),
                    key,
                    format!(
                        "expected a duration such as \"30s\", found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// A duration that must be set (not 0).
    pub(super) fn positive_duration(&mut self, v: &Value<'_>, key: &str) -> Option<Duration> {
        match self.duration(v, key)? {
            Some(d) => Some(d),
            None => {
                self.error(&v.span(), key, "must be longer than 0");
                None
            }
        }
    }

    pub(super) fn size(&mut self, v: &Value<'_>, key: &str) -> Option<usize> {
        let parsed = match v.get_ref() {
            DeValue::String(s) => parse_size(s).map_err(|e| e.to_string()),
            DeValue::Integer(i) => parse_size(i.as_str()).map_err(|e| e.to_string()),
            other => Err(format!(
                "expected a size such as \"1m\", found {}",
                other.type_str()
            )),
        };
        parsed.map_err(|e| self.error(&v.span(), key, e)).ok()
    }

    /// A string or an array of strings.
    pub(super) fn strings<'a>(
        &mut self,
        v: &'a Value<'_>,
        key: &str,
    ) -> Vec<(&'a str, Range<usize>)> {
        match v.get_ref() {
            DeValue::String(s) => vec![(s.as_ref(), v.span())],
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let s = self.string(item, &format!("{key}[{i}]"))?;
                    Some((s, item.span()))
                })
                .collect(),
            other => {
                self.error(
                    &v.span(),
                    key,
                    format!("expected a list of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    pub(super) fn cidrs(&mut self, v: &Value<'_>, key: &str) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, (text, span)) in self.strings(v, key).into_iter().enumerate() {
            match text.parse::<IpNet>() {
                Ok(net) => nets.push(net),
                // A bare address is a network of one.
                Err(_) => match text.parse::<std::net::IpAddr>() {
                    Ok(ip) => nets.push(IpNet::from(ip)),
                    Err(_) => self.error(
                        &span,
                        &format!("{key}[{i}]"),
                        format!("'{text}' is not a CIDR network (e.g. 10.0.0.0/8 or fd00::/8)"),
                    ),
                },
            }
        }
        nets
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
