//! The small formats both gateways share: money in yuan strings, Beijing-time timestamps, and
//! escaping for the HTML pages.

use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};
use chrono_tz::Asia::Shanghai;

/// The largest amount either gateway accepts for one order: 100,000,000.00 yuan, in fen.
pub const MAX_AMOUNT: i64 = 100_000_000 * 100;

/// `9900` → `"99.00"`.
pub fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let fen = fen.unsigned_abs();
    format!("{sign}{}.{:02}", fen / 100, fen % 100)
}

/// Alipay's `total_amount` / `refund_amount`: yuan with at most two decimals ("99", "99.9",
/// "99.00"), between 0.01 and 100000000. Returns fen; never goes through a float.
pub fn parse_yuan(text: &str) -> Option<i64> {
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    if whole.is_empty()
        || whole.len() > 9
        || fraction.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || (text.contains('.') && fraction.is_empty())
    {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
    let fen = whole.checked_mul(100)?.checked_add(fraction)?;
    (1..=MAX_AMOUNT).contains(&fen).then_some(fen)
}

/// Alipay's `yyyy-MM-dd HH:mm:ss`, Beijing time.
pub fn alipay_time(at: DateTime<Utc>) -> String {
    at.with_timezone(&Shanghai)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Parses Alipay's `yyyy-MM-dd HH:mm:ss` as Beijing time.
pub fn parse_alipay_time(text: &str) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").ok()?;
    Shanghai
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// WeChat Pay's RFC 3339 with the +08:00 offset, e.g. `2018-06-08T10:34:56+08:00`.
pub fn wechat_time(at: DateTime<Utc>) -> String {
    at.with_timezone(&Shanghai)
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// `yyyyMMdd` in Beijing time, the date prefix of gateway-issued numbers.
pub fn beijing_date(at: DateTime<Utc>) -> String {
    at.with_timezone(&Shanghai).format("%Y%m%d").to_string()
}

pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_strings() {
        let check = |text: &str, want: Option<i64>| assert_eq!(parse_yuan(text), want, "{text:?}");
        check("99.00", Some(9900));
        check("99", Some(9900));
        check("99.9", Some(9990));
        check("0.01", Some(1));
        check("100000000.00", Some(MAX_AMOUNT));
        check("100000000.01", None);
        check("0.00", None);
        check("0", None);
        check("1.234", None);
        check("1.", None);
        check(".5", None);
        check("-1.00", None);
        check("+1.00", None);
        check("1e2", None);
        check(" 1.00", None);
        check("", None);
        assert_eq!(yuan(9900), "99.00");
        assert_eq!(yuan(1), "0.01");
        assert_eq!(yuan(0), "0.00");
    }

    #[test]
    fn beijing_time_round_trips() {
        let at = Utc.with_ymd_and_hms(2024, 1, 31, 16, 30, 5).unwrap();
        assert_eq!(alipay_time(at), "2024-02-01 00:30:05");
        assert_eq!(parse_alipay_time("2024-02-01 00:30:05"), Some(at));
        assert_eq!(wechat_time(at), "2024-02-01T00:30:05+08:00");
        assert_eq!(beijing_date(at), "20240201");
        assert_eq!(parse_alipay_time("2024-02-01T00:30:05"), None);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            html_escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
