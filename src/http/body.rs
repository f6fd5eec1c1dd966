//! Request bodies and parameters in the API's terms. A body must be a JSON
//! object; an array is accepted only as the value of the fields that are
//! arrays ([`ARRAY_FIELDS`]), so `["p1","a","b",5]` is not a payment. A
//! field of the wrong kind is named by its path and said as the API says
//! it (`amount: expected an integer, got a string "5"`), never as the Rust
//! type behind it.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The request fields whose value is an array (`tests` in `http/mod.rs`
/// holds this list against the OpenAPI document).
pub const ARRAY_FIELDS: &[&str] = &["payments", "records", "blocked_accounts"];

/// Parses a request body into `T`; `Err` is the message for a 400.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    // The shape needs a look at the whole only when an array may be in it
    // (a payment has none: one parse, as before).
    let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !object || bytes.contains(&b'[') {
        let value: Value = serde_json::from_slice(bytes).map_err(|error| {
            format!("the body is not valid JSON: {}", plain(&error.to_string()))
        })?;
        if !value.is_object() {
            return Err(format!(
                "the body must be a JSON object, got {}",
                kind(&value)
            ));
        }
        shape(&value, "")?;
    }
    // From the bytes, not the value: a key given twice is refused there.
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|error| {
        if error.inner().is_syntax() || error.inner().is_eof() {
            return format!(
                "the body is not valid JSON: {}",
                plain(&error.inner().to_string())
            );
        }
        let mut path = error.path().to_string();
        let message = plain(&error.inner().to_string());
        if message.starts_with("unknown field") {
            // The path ends with the unknown field itself: name its object.
            path = path
                .rsplit_once('.')
                .map_or(String::new(), |(parent, _)| parent.to_owned());
        }
        if path == "." || path.is_empty() {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// Arrays only where the API takes one, and never an array of arrays.
fn shape(value: &Value, path: &str) -> Result<(), String> {
    let Value::Object(fields) = value else {
        return Ok(());
    };
    for (key, field) in fields {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match field {
            Value::Array(items) if ARRAY_FIELDS.contains(&key.as_str()) => {
                for (index, item) in items.iter().enumerate() {
                    if item.is_array() {
                        return Err(format!(
                            "{here}[{index}]: expected an object or a value, got an array"
                        ));
                    }
                    shape(item, &format!("{here}[{index}]"))?;
                }
            }
            Value::Array(_) => {
                return Err(format!(
                    "{here}: expected an object or a value, got an array"
                ))
            }
            Value::Object(_) => shape(field, &here)?,
            _ => {}
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A serde or axum message said in the API's terms: what was expected and
/// what came, without Rust type names or positions in the text.
pub fn plain(message: &str) -> String {
    let mut text = message.to_owned();
    for prefix in [
        "Failed to deserialize query string: ",
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            text = rest.to_owned();
        }
    }
    if let Some(at) = text.find(" at line ") {
        text.truncate(at);
    }
    if let Some(rest) = text.strip_prefix("missing field ") {
        return format!("{rest} is required");
    }
    if let Some(rest) = text.strip_prefix("unknown field ") {
        return match rest.split_once(", expected ") {
            Some((field, known)) => format!(
                "unknown field {field}; the fields are {}",
                known.trim_start_matches("one of ")
            ),
            None => format!("unknown field {rest}"),
        };
    }
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = text.strip_prefix(lead) {
            if let Some((got, expected)) = rest.split_once(", expected ") {
                return format!("expected {}, got {}", api_type(expected), got_text(got));
            }
        }
    }
    api_words(&text)
}

/// What came, as serde says it: `string "5"` → `a string "5"`.
fn got_text(got: &str) -> String {
    let got = api_words(got);
    for (serde, api) in [
        ("string ", "a string "),
        ("integer ", "the number "),
        ("floating point ", "the number "),
        ("boolean ", "the boolean "),
        ("map", "an object"),
        ("sequence", "an array"),
        ("unit value", "null"),
    ] {
        if let Some(rest) = got.strip_prefix(serde) {
            // Serde quotes numbers and booleans in backticks.
            return format!("{api}{}", rest.trim_matches('`'));
        }
    }
    got
}

/// What was expected, as the API says it.
fn api_type(expected: &str) -> String {
    let expected = expected.trim();
    let word = match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" => "a string",
        "a sequence" => "an array",
        "a map" => "an object",
        _ if expected.starts_with("struct ") => "an object",
        _ if expected.starts_with("enum ") => "one of the documented values",
        _ => return api_words(expected),
    };
    word.to_owned()
}

/// Rust type names inside a free text, replaced.
fn api_words(text: &str) -> String {
    let mut out = text.to_owned();
    for (rust, api) in [
        ("i64", "an integer"),
        ("u64", "a whole number"),
        ("u32", "a whole number"),
        ("usize", "a whole number"),
        ("f64", "a number"),
        ("a sequence", "an array"),
        ("a map", "an object"),
    ] {
        out = out.replace(rust, api);
    }
    while let Some(at) = out.find("struct ") {
        let end = out[at + 7..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(out.len(), |e| at + 7 + e);
        out.replace_range(at..end, "an object");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Pay {
        id: Option<String>,
        amount: i64,
        count: Option<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Batch {
        payments: Vec<Pay>,
    }

    fn error<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> String {
        parse::<T>(body.as_bytes()).unwrap_err()
    }

    // Objects only; arrays only where the API takes them; a wrong field named by its path in the API's words.
    #[test]
    fn bodies_are_objects_and_errors_speak_the_api() {
        assert!(parse::<Pay>(br#"{"amount": 5}"#).is_ok());
        assert_eq!(
            error::<Pay>(r#"["p1", 5]"#),
            "the body must be a JSON object, got an array"
        );
        assert_eq!(
            error::<Pay>("5"),
            "the body must be a JSON object, got a number"
        );
        assert_eq!(
            error::<Batch>(r#"{"payments": [["p1", 5]]}"#),
            "payments[0]: expected an object or a value, got an array"
        );
        assert_eq!(
            error::<Pay>(r#"{"amount": [5]}"#),
            "amount: expected an object or a value, got an array"
        );
        assert_eq!(
            error::<Pay>(r#"{"amount": "5"}"#),
            r#"amount: expected an integer, got a string "5""#
        );
        assert_eq!(
            error::<Pay>(r#"{"amount": 1.5}"#),
            "amount: expected an integer, got the number 1.5"
        );
        assert_eq!(
            error::<Pay>(r#"{"amount": 1, "count": -2}"#),
            "count: expected a whole number, 0 or more, got the number -2"
        );
        assert_eq!(error::<Pay>(r#"{"id": "x"}"#), "`amount` is required");
        let unknown = error::<Pay>(r#"{"amount": 1, "colour": 2}"#);
        assert!(
            unknown.starts_with("unknown field `colour`; the fields are `id`"),
            "{unknown}"
        );
        assert_eq!(
            error::<Batch>(r#"{"payments": [{"amount": "x"}]}"#),
            r#"payments[0].amount: expected an integer, got a string "x""#
        );
        let nested = error::<Batch>(r#"{"payments": [{"amount": 1, "colour": 2}]}"#);
        assert!(
            nested.starts_with("payments[0]: unknown field `colour`"),
            "{nested}"
        );
        assert!(error::<Pay>(r#"{"amount": 1, "amount": 2}"#).contains("duplicate field"));
        assert!(error::<Pay>("{").starts_with("the body is not valid JSON"));
        for message in [
            error::<Batch>(r#"{"payments": 5}"#),
            error::<Pay>(r#"{"amount": {}}"#),
        ] {
            for rust in ["struct", "i64", "u32", "Vec", "sequence"] {
                assert!(!message.contains(rust), "{message}");
            }
        }
    }
}
