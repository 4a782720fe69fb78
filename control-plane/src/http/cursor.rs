//! Opaque keyset cursors: `(time, id)` of the last item of a page, base64url-encoded. Clients
//! pass them back unchanged; a tampered one is `400 invalid_request`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use super::dto::Page;
use super::error::AppError;

pub fn encode<I: std::fmt::Display>(at: DateTime<Utc>, id: I) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.timestamp_micros()))
}

pub fn decode<I: std::str::FromStr>(cursor: &str) -> Result<(DateTime<Utc>, I), AppError> {
    let bad = || AppError::invalid("cursor is not one this service returned");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// [`decode`] of an optional `?cursor=`.
pub fn decode_opt<I: std::str::FromStr>(
    cursor: Option<&str>,
) -> Result<Option<(DateTime<Utc>, I)>, AppError> {
    cursor.map(decode).transpose()
}

/// A page of at most `limit` items from `rows`, which were asked for `limit + 1`: a row past the
/// limit means there is a next page, whose cursor `key` makes of this page's last item.
pub fn page<T>(mut rows: Vec<T>, limit: i64, key: impl FnOnce(&T) -> String) -> Page<T> {
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(key)
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

/// Page size from `?limit=`: default 50, at most 200.
pub fn limit(requested: Option<i64>) -> Result<i64, AppError> {
    match requested {
        None => Ok(50),
        Some(n) if (1..=200).contains(&n) => Ok(n),
        Some(_) => Err(AppError::invalid("limit must be between 1 and 200")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tampering() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("time");
        let id = uuid::Uuid::new_v4();
        let c = encode(at, id);
        assert_eq!(decode::<uuid::Uuid>(&c).expect("decodes"), (at, id));
        assert!(decode::<uuid::Uuid>("!!!").is_err());
        assert!(decode::<uuid::Uuid>(&URL_SAFE_NO_PAD.encode("x:y")).is_err());
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(201)).is_err());
        assert_eq!(limit(None).expect("default"), 50);
    }
}
