//! The syntax of the ids that name apps, plans and quota types. The database refuses any other
//! (a CHECK in `migrations/0001_schema.sql`), the control plane refuses it with a 400 before
//! trying, and the sidecar refuses a routes file naming one, which could match no row.

/// The longest id.
pub const MAX_LEN: usize = 63;

/// An app's or a plan's id: 1 to 63 lowercase ASCII letters, digits, `_` or `-`, the first a
/// letter or a digit.
pub fn is_id(s: &str) -> bool {
    well_formed(s, b"_-")
}

/// A quota type's key: as an id, without `-`.
pub fn is_quota_type_key(s: &str) -> bool {
    well_formed(s, b"_")
}

fn well_formed(s: &str, punctuation: &[u8]) -> bool {
    let plain = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    s.len() <= MAX_LEN
        && s.as_bytes().first().is_some_and(plain)
        && s.bytes().all(|b| plain(&b) || punctuation.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../migrations/0001_schema.sql");

    /// The regular expression of `<column> text ... CHECK (<column> ~ '<regex>')` in the schema.
    fn check_of(table: &str, column: &str) -> regex::Regex {
        let create = format!("CREATE TABLE {table} (");
        let body = &SCHEMA[SCHEMA.find(&create).expect(table)..];
        let body = &body[..body.find(");").expect("end of table")];
        let check = format!("CHECK ({column} ~ '");
        let line = body
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{column} ")) && l.contains(&check))
            .unwrap_or_else(|| panic!("{table}.{column} has a regex CHECK"));
        let start = line.find(&check).expect("check") + check.len();
        let pattern = &line[start..start + line[start..].find('\'').expect("closing quote")];
        regex::Regex::new(pattern).expect("a regex")
    }

    /// Every string of up to 3 characters from an alphabet around the edges, and lengths around
    /// the limit.
    fn samples() -> Vec<String> {
        let alphabet = ['a', 'z', '0', '9', '_', '-', 'A', '.', ' ', 'é'];
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..3 {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        for n in [62, 63, 64] {
            out.push("a".repeat(n));
            out.push(format!("a{}", "-".repeat(n - 1)));
        }
        out.extend(
            [
                "-x",
                "_x",
                "x\n",
                "idoctor",
                "api_calls_full_process",
                "pro-2",
            ]
            .map(String::from),
        );
        out
    }

    #[test]
    fn the_rules_are_the_schemas() {
        for (table, column, rule) in [
            ("apps", "id", is_id as fn(&str) -> bool),
            ("plans", "id", is_id),
            ("quota_types", "key", is_quota_type_key),
        ] {
            let check = check_of(table, column);
            for s in samples() {
                assert_eq!(rule(&s), check.is_match(&s), "{table}.{column}: {s:?}");
            }
        }
    }

    #[test]
    fn examples() {
        assert!(is_id("idoctor") && is_id("pro-2") && is_id("0"));
        assert!(!is_id("-x") && !is_id("_x") && !is_id("") && !is_id("Pro"));
        assert!(is_quota_type_key("storage_bytes"));
        assert!(!is_quota_type_key("storage-bytes") && !is_quota_type_key("_x"));
    }
}
