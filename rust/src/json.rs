//! JSON as the readers of user data take it: a key twice in one object is refused (serde_json's
//! own maps keep the last value silently, so a header or plan could mean two things to two
//! readers), and nesting is bounded by serde_json's recursion limit (128 levels), so no input can
//! overflow the stack.

use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses `text` as JSON, refusing duplicate keys at any depth (the message names the key and
/// its path, with serde_json's line and column).
pub fn from_str(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Strict>(text).map(|strict| strict.0)
}

/// Parses `bytes` as UTF-8 JSON, like [`from_str`].
pub fn from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|strict| strict.0)
}

/// Appends `key` to a JSON path as [`Trail`] writes it: `.key` for an identifier (`.tensors`,
/// `.auto_map`; no dot at the start), `["key"]` for anything else (`["model.embed.weight"]`,
/// `["0"]`), so the path reads like the expression that would reach the value.
pub fn push_key(path: &mut String, key: &str) {
    let mut chars = key.chars();
    let identifier =
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if identifier {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&serde_json::to_string(key).expect("strings always serialise"));
        path.push(']');
    }
}

/// Where a value sits in the document, built only when an error needs it (a list of a million
/// numbers allocates nothing for its elements' paths).
enum Trail<'a> {
    Root,
    Key(&'a Trail<'a>, &'a str),
    Index(&'a Trail<'a>, usize),
}

impl Trail<'_> {
    fn path(&self) -> String {
        match self {
            Trail::Root => String::new(),
            Trail::Key(parent, key) => {
                let mut path = parent.path();
                push_key(&mut path, key);
                path
            }
            Trail::Index(parent, index) => format!("{}[{index}]", parent.path()),
        }
    }
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        Seed(&Trail::Root).deserialize(deserializer).map(Strict)
    }
}

struct Seed<'a>(&'a Trail<'a>);

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor(self.0))
    }
}

struct StrictVisitor<'a>(&'a Trail<'a>);

impl<'de> Visitor<'de> for StrictVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(Seed(&Trail::Index(self.0, items.len())))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                let path = Trail::Key(self.0, &key).path();
                return Err(de::Error::custom(format!("duplicate key '{key}' at {path}")));
            }
            let value = access.next_value_seed(Seed(&Trail::Key(self.0, &key)))?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let message = from_str(r#"{"a": 1, "b": {"c": 2, "c": 3}}"#).unwrap_err().to_string();
        assert!(message.contains("duplicate key 'c' at b.c"), "{message}");
        let message = from_str(r#"{"t": {"m.w": {"keep": {"0": [1], "0": [2]}}}}"#).unwrap_err().to_string();
        assert!(message.contains(r#"duplicate key '0' at t["m.w"].keep["0"]"#), "{message}");
        let message = from_str(r#"[0, {"a": [{"b": 1, "b": 2}]}]"#).unwrap_err().to_string();
        assert!(message.contains("duplicate key 'b' at [1].a[0].b"), "{message}");
        assert!(from_str(r#"{"a": 1, "a": 1}"#).unwrap_err().to_string().contains("duplicate key 'a'"));
        assert!(from_str(r#"[{"x": 1}, {"x": 2}]"#).is_ok(), "the same key in two objects is fine");
    }

    #[test]
    fn values_match_serde_json() {
        let text = r#"{"z": [1, -2, 3.5, 1e300, 18446744073709551615, null, true, "s"], "a": {"b": {}}}"#;
        let strict = from_str(text).unwrap();
        assert_eq!(strict, serde_json::from_str::<Value>(text).unwrap());
        let keys: Vec<_> = strict.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["z", "a"], "key order kept");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(from_str(&deep).unwrap_err().to_string().contains("recursion limit"));
        let objects = "{\"a\":".repeat(100_000) + "1" + &"}".repeat(100_000);
        assert!(from_str(&objects).is_err());
    }
}
