//! Request ids: every response of both programs carries `X-Request-Id` — the client's if it sent
//! a sane one, else a new one.

pub const HEADER: &str = "x-request-id";

/// A client-supplied id is kept only if it is short and made of characters that are safe to put
/// in a log line or a header: letters, digits and `-_.:`.
pub fn is_sane(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A new random id: 32 lowercase hex digits.
pub fn generate() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}

/// The id to use for a request that arrived with `supplied`.
pub fn choose(supplied: Option<&[u8]>) -> String {
    match supplied {
        Some(v) if is_sane(v) => String::from_utf8_lossy(v).into_owned(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanity() {
        let check = |v: &[u8], sane: bool| assert_eq!(is_sane(v), sane, "{v:?}");
        check(b"abc-123_x.y:z", true);
        check(b"", false);
        check(b"has space", false);
        check(b"new\nline", false);
        check(&[b'a'; 128], true);
        check(&[b'a'; 129], false);
        check("ünïcode".as_bytes(), false);
    }

    #[test]
    fn generated_ids_are_sane_and_distinct() {
        let a = generate();
        assert!(is_sane(a.as_bytes()));
        assert_eq!(a.len(), 32);
        assert_ne!(a, generate());
        assert_eq!(choose(Some(b"keep-me")), "keep-me");
        assert_ne!(choose(Some(b"bad id")), "bad id");
    }
}
