//! Account rules.

/// Validates and normalises an email address: trimmed, at most 254 bytes, one `@` with a
/// non-empty local part and a dotted domain, no spaces or control characters. Case is kept
/// (uniqueness is case-insensitive in the database).
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim();
    if email.len() > 254 {
        return Err("email is longer than 254 characters");
    }
    if email
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | ','))
    {
        return Err("email contains characters an address cannot contain");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("email must contain @");
    };
    if local.is_empty() || local.len() > 64 {
        return Err("email's local part must be 1 to 64 characters");
    }
    if domain.contains('@') {
        return Err("email must contain exactly one @");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return Err("email's domain must be a dotted host name such as example.com");
    }
    Ok(email.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        let check = |raw: &str, ok: bool| {
            assert_eq!(normalize_email(raw).is_ok(), ok, "{raw:?}");
        };
        check("a@example.com", true);
        check("  Mixed.Case+tag@Example.co.uk ", true);
        check("no-at.example.com", false);
        check("@example.com", false);
        check("a@b@example.com", false);
        check("a@localhost", false);
        check("a@example..com", false);
        check("a b@example.com", false);
        check("a@example.com\n", true); // trimmed
        check("a\n@example.com", false);
        check(&format!("{}@example.com", "x".repeat(65)), false);
        check(&format!("a@{}.com", "x".repeat(250)), false);
        check("'; DROP TABLE users; --@example.com", false);
    }
}
