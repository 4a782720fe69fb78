//! What the Lua scripts in `lua/` take and answer, beside the keys and field names of
//! [`crate::keys`]: the words passed as arguments, `decide.lua`'s reply tags, and the entry that
//! notes an API key's use. Together with `keys` this is the whole Redis protocol of the two
//! programs; the tests below read the scripts and fail when they and this crate disagree.
//!
//! No time to live is written in a script: the caller passes every one (the settle marker's and
//! its tombstone's is the sidecar's `settle_window`). Usage buckets have none: the drain deletes
//! them once the ledger has them.

use uuid::Uuid;

/// How `decide.lua` charges a quota (its ARGV[10]), as recorded in the settle marker.
pub mod charge_mode {
    /// The whole cost, known up front.
    pub const FIXED: &str = "fixed";
    /// An upload of unknown length: up to the cost of what remains; `settle.lua` commits the
    /// real size.
    pub const RESERVE: &str = "reserve";
}

/// How `settle.lua` finishes a request (its ARGV[1]).
pub mod settle_mode {
    /// Give back what the decision took.
    pub const REFUND: &str = "refund";
    /// A reserved upload ended: keep its real size, give back the rest.
    pub const COMMIT: &str = "commit";
}

/// The first element of every reply of `decide.lua`; anything else is a fault, never an
/// admission.
pub mod decide_reply {
    pub const MISSING: &str = "missing";
    pub const DISABLED: &str = "disabled";
    pub const REVOKED: &str = "revoked";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const WINDOW: &str = "window";
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    pub const CANCELLED: &str = "cancelled";
    pub const OK: &str = "ok";
    /// Every tag the script answers with.
    pub const ALL: [&str; 8] = [
        MISSING,
        DISABLED,
        REVOKED,
        RATE_LIMITED,
        WINDOW,
        QUOTA_EXCEEDED,
        CANCELLED,
        OK,
    ];
    /// Elements of an `ok` reply before the rate limits' pairs: the tag, the plan, and the
    /// quota's limit, remaining, reset, taken and window start.
    pub const OK_HEAD: usize = 7;
}

/// An API key's use as a member of `Keys::api_key_last_used`: `(score, member)` = (when, in
/// seconds since the epoch; the key's id). Both programs add it with `ZADD GT`, so an older use
/// never replaces a newer one; the control plane drains the set into PostgreSQL.
pub fn key_use(key_id: Uuid, at_s: i64) -> (f64, String) {
    (at_s as f64, key_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{bucket_field, user_field};
    use crate::window::Window;

    const DECIDE: &str = include_str!("../../lua/decide.lua");
    const SETTLE: &str = include_str!("../../lua/settle.lua");
    const RESERVE: &str = include_str!("../../lua/reserve.lua");
    const SYNC_USER: &str = include_str!("../../lua/sync_user.lua");
    const SET_COUNTER: &str = include_str!("../../lua/set_counter.lua");
    const DRAIN_CLAIM: &str = include_str!("../../lua/drain_claim.lua");
    const DRAIN_DONE: &str = include_str!("../../lua/drain_done.lua");
    const LOGIN_THROTTLE: &str = include_str!("../../lua/login_throttle.lua");
    const SCHEMA: &str = include_str!("../../migrations/0001_schema.sql");

    const SCRIPTS: [(&str, &str); 8] = [
        ("decide.lua", DECIDE),
        ("settle.lua", SETTLE),
        ("reserve.lua", RESERVE),
        ("sync_user.lua", SYNC_USER),
        ("set_counter.lua", SET_COUNTER),
        ("drain_claim.lua", DRAIN_CLAIM),
        ("drain_done.lua", DRAIN_DONE),
        ("login_throttle.lua", LOGIN_THROTTLE),
    ];

    /// The code of a script, without its comments (the contract above it names fields freely).
    fn code(script: &str) -> String {
        script
            .lines()
            .map(|line| line.split("--").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every double-quoted string literal of a script's code.
    fn literals(script: &str) -> Vec<String> {
        code(script)
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The scripts prepend the user and a prefix to a bucket field, and recognise the staging
    /// stamp: they must spell these as `keys` does.
    #[test]
    fn the_scripts_spell_bucket_fields_as_keys_does() {
        for script in [DECIDE, SETTLE] {
            let code = code(script);
            assert!(code.contains(&format!("\"{}\" .. suffix", bucket_field::AMOUNT_PREFIX)));
            assert!(code.contains(&format!("\"{}\" .. suffix", bucket_field::CALLS_PREFIX)));
        }
        for field in [bucket_field::STAGED_BY, bucket_field::STAGED_AT] {
            assert!(literals(DRAIN_CLAIM).contains(&field.to_owned()), "{field}");
        }
        assert!(literals(DRAIN_DONE).contains(&bucket_field::STAGED_BY.to_owned()));
    }

    /// `decide.lua` reads the user's status, token cut-off and plan by name (one HMGET of fixed
    /// fields); every other field of the user's hash, in every script, is passed in.
    #[test]
    fn the_scripts_name_only_the_users_fixed_fields() {
        let fixed = [
            user_field::STATUS,
            user_field::TOKENS_VALID_AFTER,
            user_field::PLAN,
        ];
        let decide = code(DECIDE);
        assert!(
            decide.contains(&format!(
                "local fields = {{ \"{}\", \"{}\", \"{}\" }}",
                fixed[0], fixed[1], fixed[2]
            )),
            "decide.lua reads status, tva and plan, in this order"
        );
        for (name, script) in SCRIPTS {
            for prefix in [
                user_field::QUOTA_PREFIX,
                user_field::COUNTER_PREFIX,
                user_field::RATE_PREFIX,
            ] {
                assert!(
                    !literals(script).iter().any(|l| l.starts_with(prefix)),
                    "{name} builds a {prefix} field; pass it from keys.rs instead"
                );
            }
        }
        for field in [user_field::STATUS, user_field::ROLE, user_field::PLAN] {
            assert!(
                !literals(SYNC_USER).contains(&field.to_owned()),
                "sync_user.lua names {field}; the control plane passes it"
            );
        }
    }

    /// Every word a script compares an argument or a reply with is one of the constants here.
    #[test]
    fn the_scripts_use_the_modes_and_replies_here() {
        let decide = literals(DECIDE);
        assert!(decide.contains(&charge_mode::RESERVE.to_owned()));
        let settle = literals(SETTLE);
        for word in [
            settle_mode::REFUND,
            settle_mode::COMMIT,
            charge_mode::RESERVE,
        ] {
            assert!(settle.contains(&word.to_owned()), "settle.lua: {word}");
        }
        assert!(code(RESERVE).contains(&format!("\"|{}\"", charge_mode::RESERVE)));
        assert!(code(RESERVE).contains(&format!("~= \"{}\"", charge_mode::RESERVE)));
        // A refund's tombstone: settle.lua writes it, reserve.lua and settle.lua recognise it.
        assert!(code(SETTLE).contains("SET\", KEYS[2], \"x\""));
        assert!(code(SETTLE).contains("marker == \"x\""));
        assert!(code(RESERVE).contains("marker == \"x\""));

        // decide.lua answers with exactly the tags of `decide_reply`.
        let code = code(DECIDE);
        let mut answered: Vec<&str> = code
            .split("return { \"")
            .skip(1)
            .chain(code.split("local out = { \"").skip(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        answered.sort_unstable();
        answered.dedup();
        let mut known = decide_reply::ALL.to_vec();
        known.sort_unstable();
        assert_eq!(answered, known);
        // The `ok` reply's fixed head, then two elements per rate limit.
        assert!(code.contains("out[3], out[4], out[5], out[6], out[7] ="));
        assert_eq!(decide_reply::OK_HEAD, 7);
    }

    /// Times to live come from the caller, never from a number in a script.
    #[test]
    fn no_script_sets_its_own_time_to_live() {
        for (name, script) in SCRIPTS {
            let code = code(script);
            for (i, _) in code.match_indices("\"PX\", ") {
                let ttl = &code[i + 6..];
                assert!(ttl.starts_with("ARGV["), "{name}: PX {ttl:.20}");
            }
            for command in ["\"EX\"", "\"EXPIRE\"", "\"EXPIREAT\"", "\"PEXPIREAT\""] {
                assert!(!code.contains(command), "{name}: {command}");
            }
        }
        // login_throttle's PEXPIRE is its window (ARGV[6]) plus the wait it computed.
        assert!(code(LOGIN_THROTTLE).contains("local window = tonumber(ARGV[6])"));
        assert!(code(LOGIN_THROTTLE).contains("PEXPIRE\", KEYS[i], math.floor(window + wait)"));
    }

    /// Windows are compared by name (the quota field's value, decide.lua's ARGV[11]) and stored
    /// by name in PostgreSQL: the schema's list is `Window::ALL`, in its order.
    #[test]
    fn the_schema_names_the_windows_in_order() {
        let names: Vec<String> = Window::ALL
            .iter()
            .map(|w| format!("'{}'", w.as_str()))
            .collect();
        let check = format!("CHECK (\"window\" IN ({}))", names.join(", "));
        assert!(SCHEMA.contains(&check), "{check}");
    }

    #[test]
    fn a_key_use_is_its_id_scored_by_time() {
        let id = Uuid::new_v4();
        assert_eq!(key_use(id, 1_700_000_000), (1.7e9, id.to_string()));
    }
}
