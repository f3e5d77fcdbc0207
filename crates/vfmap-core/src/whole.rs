//! Integers in JSON requests as JSON Schema reads them: a whole number is an integer however it
//! is written (`3` or `3.0`), so the API's `"type": "integer"` and the daemon agree. For
//! `#[serde(deserialize_with = "...")]` on request fields; a fraction or a value out of the
//! type's range is still an error.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// A `T` read from any whole JSON number.
struct Whole<T>(T);

struct WholeVisitor<T>(PhantomData<T>);

impl<T: TryFrom<i64>> WholeVisitor<T> {
    fn fit<E: de::Error>(&self, value: i64) -> Result<Whole<T>, E> {
        T::try_from(value)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Signed(value), self))
    }
}

impl<T: TryFrom<i64>> Visitor<'_> for WholeVisitor<T> {
    type Value = Whole<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number that fits {}", std::any::type_name::<T>())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Whole<T>, E> {
        self.fit(value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Whole<T>, E> {
        let value = i64::try_from(value)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))?;
        self.fit(value)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Whole<T>, E> {
        // Whole and within i64 (the bounds are exact in f64: -2^63 and 2^63).
        if value.fract() == 0.0
            && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&value)
        {
            self.fit(value as i64)
        } else {
            Err(E::invalid_value(Unexpected::Float(value), &self))
        }
    }
}

impl<'de, T: TryFrom<i64>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Whole<T>, D::Error> {
        deserializer.deserialize_any(WholeVisitor(PhantomData))
    }
}

/// A required integer field.
pub fn required<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    deserializer: D,
) -> Result<T, D::Error> {
    Whole::deserialize(deserializer).map(|w| w.0)
}

/// An optional (nullable) integer field; pair it with `#[serde(default)]`.
pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(deserializer).map(|w| w.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        #[serde(deserialize_with = "super::required")]
        count: u32,
        #[serde(default, deserialize_with = "super::optional")]
        node: Option<i32>,
    }

    fn parse(text: &str) -> Result<Body, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn whole_numbers_in_any_spelling_and_nothing_else() {
        for (text, count, node) in [
            (r#"{"count": 3}"#, 3, None),
            (r#"{"count": 3.0, "node": -1.0}"#, 3, Some(-1)),
            (r#"{"count": 3e2, "node": null}"#, 300, None),
            (
                r#"{"count": 4294967295, "node": -2147483648}"#,
                u32::MAX,
                Some(i32::MIN),
            ),
        ] {
            assert_eq!(parse(text), Ok(Body { count, node }), "{text}");
        }
        for bad in [
            r#"{"count": 1.5}"#,
            r#"{"count": -1}"#,
            r#"{"count": 4294967296}"#,
            r#"{"count": 1e300}"#,
            r#"{"count": "1"}"#,
            r#"{"count": 18446744073709551615}"#,
            r#"{"count": 1, "node": 2147483648.0}"#,
            r#"{"count": 1, "node": true}"#,
            r#"{}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
