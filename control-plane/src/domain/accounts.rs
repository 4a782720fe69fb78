//! Account rules.

use unicode_normalization::UnicodeNormalization;

/// Validates and normalises an email address: trimmed, Unicode NFC (the composed and the
/// decomposed `josé` are one address), at most 254 bytes, one `@` with a non-empty local part
/// and a dotted domain, no spaces or control characters. Case is kept for display; accounts are
/// compared by [`email_key`].
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let composed: String = raw.trim().nfc().collect();
    let email = composed.as_str();
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

/// What accounts are compared by: the email in NFKC with Unicode case folding, so that case,
/// composed/decomposed accents and full-width letters (`ｊｏｓé`) all name one account. Stored in
/// `users.email_key` (unique) and used by login and throttling.
pub fn email_key(email: &str) -> String {
    let decomposed: String = email.trim().nfkd().collect();
    caseless::default_case_fold_str(&decomposed)
        .nfkc()
        .collect()
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
        check("nul\0@example.com", false);
    }

    #[test]
    fn one_key_per_address() {
        let composed = "jos\u{e9}@example.com";
        let decomposed = "jose\u{301}@example.com";
        let full_width = "\u{ff4a}\u{ff4f}\u{ff53}\u{e9}@example.com";
        let upper = "JOS\u{c9}@Example.COM";
        let key = email_key(composed);
        assert_eq!(key, "jos\u{e9}@example.com");
        for other in [decomposed, full_width, upper, " jos\u{e9}@example.com "] {
            assert_eq!(email_key(other), key, "{other:?}");
        }
        assert_ne!(email_key("jose@example.com"), key);
        // Stored for display in NFC, case kept.
        assert_eq!(normalize_email(decomposed).as_deref(), Ok(composed));
        assert_eq!(normalize_email(upper).as_deref(), Ok(upper));
    }
}
