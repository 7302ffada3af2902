//! A strict reader over one `toml_edit` table: every key must be consumed
//! or it is reported as unknown, and every error carries the source span of
//! the offending key or value.

use std::ops::Range;

use toml_edit::{Item, Table, Value};

use crate::ConfigError;
use crate::SourceMap;

/// Reads typed fields out of `table`, remembering which keys were used.
pub(crate) struct TableReader<'a> {
    pub(crate) table: &'a Table,
    pub(crate) src: &'a SourceMap,
    /// What this table is called in messages, e.g. "[vm]" or "[[device]] #2".
    pub(crate) what: String,
    used: Vec<&'static str>,
}

impl<'a> TableReader<'a> {
    pub(crate) fn new(table: &'a Table, src: &'a SourceMap, what: String) -> Self {
        TableReader {
            table,
            src,
            what,
            used: Vec::new(),
        }
    }

    /// The span of the table itself (its header), for table-level errors.
    pub(crate) fn span(&self) -> Option<Range<usize>> {
        self.table.span()
    }

    pub(crate) fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        self.src.error(span, message)
    }

    fn item(&mut self, key: &'static str) -> Option<&'a Item> {
        self.used.push(key);
        self.table.get(key)
    }

    fn value(&mut self, key: &'static str) -> Result<Option<SpannedValue<'a>>, ConfigError> {
        match self.item(key) {
            None => Ok(None),
            Some(Item::Value(v)) => Ok(Some((v, v.span()))),
            Some(other) => Err(self.error(
                other.span().or_else(|| self.key_span(key)),
                format!(
                    "`{key}` in {} must be a value, not a {}",
                    self.what,
                    other.type_name()
                ),
            )),
        }
    }

    pub(crate) fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table.get_key_value(key).and_then(|(k, _)| k.span())
    }

    fn type_error(
        &self,
        key: &str,
        expected: &str,
        v: &Value,
        span: Option<Range<usize>>,
    ) -> ConfigError {
        self.error(
            span,
            format!(
                "`{key}` in {} must be {expected}, found {}",
                self.what,
                v.type_name()
            ),
        )
    }

    pub(crate) fn opt_string(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Spanned<String>>, ConfigError> {
        let Some((v, span)) = self.value(key)? else {
            return Ok(None);
        };
        match v.as_str() {
            Some(s) => Ok(Some(Spanned {
                value: s.to_owned(),
                span,
            })),
            None => Err(self.type_error(key, "a string", v, span)),
        }
    }

    pub(crate) fn string(&mut self, key: &'static str) -> Result<Spanned<String>, ConfigError> {
        match self.opt_string(key)? {
            Some(s) => Ok(s),
            None => Err(self.missing(key)),
        }
    }

    pub(crate) fn opt_integer(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Spanned<i64>>, ConfigError> {
        let Some((v, span)) = self.value(key)? else {
            return Ok(None);
        };
        match v.as_integer() {
            Some(i) => Ok(Some(Spanned { value: i, span })),
            None => Err(self.type_error(key, "an integer", v, span)),
        }
    }

    /// An integer in `range`, or `default` when absent.
    pub(crate) fn integer_in(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
        default: Option<i64>,
    ) -> Result<Spanned<i64>, ConfigError> {
        let got = match self.opt_integer(key)? {
            Some(i) => i,
            None => match default {
                Some(d) => Spanned {
                    value: d,
                    span: None,
                },
                None => return Err(self.missing(key)),
            },
        };
        if !range.contains(&got.value) {
            return Err(self.error(
                got.span.clone(),
                format!(
                    "`{key}` in {} must be between {} and {}, found {}",
                    self.what,
                    range.start(),
                    range.end(),
                    got.value
                ),
            ));
        }
        Ok(got)
    }

    /// An integer in `range` when present.
    pub(crate) fn opt_integer_in(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<Spanned<i64>>, ConfigError> {
        if self.opt_integer(key)?.is_none() {
            return Ok(None);
        }
        self.integer_in(key, range, None).map(Some)
    }

    pub(crate) fn opt_bool(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Spanned<bool>>, ConfigError> {
        let Some((v, span)) = self.value(key)? else {
            return Ok(None);
        };
        match v.as_bool() {
            Some(b) => Ok(Some(Spanned { value: b, span })),
            None => Err(self.type_error(key, "true or false", v, span)),
        }
    }

    pub(crate) fn string_list(
        &mut self,
        key: &'static str,
    ) -> Result<Vec<Spanned<String>>, ConfigError> {
        let Some((v, span)) = self.value(key)? else {
            return Ok(Vec::new());
        };
        let Some(array) = v.as_array() else {
            return Err(self.type_error(key, "an array of strings", v, span));
        };
        array
            .iter()
            .map(|e| match e.as_str() {
                Some(s) => Ok(Spanned {
                    value: s.to_owned(),
                    span: e.span(),
                }),
                None => Err(self.type_error(key, "an array of strings", e, e.span())),
            })
            .collect()
    }

    pub(crate) fn missing(&self, key: &str) -> ConfigError {
        self.error(self.span(), format!("{} is missing `{key}`", self.what))
    }

    /// Marks keys as handled elsewhere.
    pub(crate) fn mark_used(&mut self, keys: &[&'static str]) {
        self.used.extend_from_slice(keys);
    }

    /// Errors on the first key that no reader call asked for.
    pub(crate) fn deny_unknown(&self) -> Result<(), ConfigError> {
        for (key, _) in self.table.iter() {
            if !self.used.contains(&key) {
                return Err(self.error(
                    self.key_span(key),
                    format!(
                        "unknown key `{key}` in {} (expected one of: {})",
                        self.what,
                        self.used.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The keys no reader call asked for: handed on to a plugin.
    pub(crate) fn unused_keys(&self) -> Vec<&'a str> {
        self.table
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !self.used.contains(k))
            .collect()
    }
}

/// A raw value with its span.
type SpannedValue<'a> = (&'a Value, Option<Range<usize>>);

/// A value with the byte range it came from.
#[derive(Clone, Debug)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Option<Range<usize>>,
}
