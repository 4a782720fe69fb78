//! Quota windows: calendar minute, hour, day, month and year in a configured time zone, and
//! lifetime. This is the only window function; the sidecar (to key and reset counters) and the
//! control plane (for `resets_at` and rebuilding `used`) both call it.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
    Year,
    Lifetime,
}

impl Window {
    /// Every window, in declaration order: `ALL[w.index()] == w`, so a window fits in one
    /// atomic byte (the sidecar's learnt window of a quota) and indexes per-window arrays.
    pub const ALL: [Window; 6] = [
        Window::Minute,
        Window::Hour,
        Window::Day,
        Window::Month,
        Window::Year,
        Window::Lifetime,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
            Window::Year => "year",
            Window::Lifetime => "lifetime",
        }
    }

    pub fn parse(s: &str) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// Its position in [`Window::ALL`].
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The window at `index` in [`Window::ALL`].
    pub fn from_index(index: u8) -> Option<Window> {
        Window::ALL.get(usize::from(index)).copied()
    }
}

/// The window containing an instant: `[start, end)`; `end` is `None` for lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
}

/// Local midnight-like instants can be skipped or doubled by DST; take the earliest valid
/// instant at or after the local time.
fn local_to_utc(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..4 {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(earliest, _) => return earliest.with_timezone(&Utc),
            LocalResult::None => probe += chrono::Duration::minutes(30),
        }
    }
    Utc.from_utc_datetime(&local)
}

fn first_of(year: i32, month: u32) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default()
}

/// The window of kind `window` that contains `now`, in time zone `tz`.
pub fn bounds(window: Window, now: DateTime<Utc>, tz: Tz) -> Bounds {
    let local = now.with_timezone(&tz).naive_local();
    let (start, end) = match window {
        Window::Lifetime => {
            return Bounds {
                start: DateTime::UNIX_EPOCH,
                end: None,
            };
        }
        // Minutes and hours are the same everywhere except in odd offsets; use local time so
        // that "hour" means the local clock hour.
        Window::Minute => {
            let s = local.with_second(0).and_then(|t| t.with_nanosecond(0));
            let s = s.unwrap_or(local);
            (s, s + chrono::Duration::minutes(1))
        }
        Window::Hour => {
            let s = local
                .with_minute(0)
                .and_then(|t| t.with_second(0))
                .and_then(|t| t.with_nanosecond(0))
                .unwrap_or(local);
            (s, s + chrono::Duration::hours(1))
        }
        Window::Day => {
            let s = local.date().and_hms_opt(0, 0, 0).unwrap_or(local);
            (s, s + chrono::Duration::days(1))
        }
        Window::Month => {
            let s = first_of(local.year(), local.month());
            let e = if local.month() == 12 {
                first_of(local.year() + 1, 1)
            } else {
                first_of(local.year(), local.month() + 1)
            };
            (s, e)
        }
        Window::Year => (first_of(local.year(), 1), first_of(local.year() + 1, 1)),
    };
    Bounds {
        start: local_to_utc(tz, start),
        end: Some(local_to_utc(tz, end)),
    }
}

/// The current window of each kind in one time zone, as ms since the epoch, computed once per
/// window instead of once per request (the sidecar asks for every metered decision).
///
/// Lock-free: a writer stores `start` before `end` (Release) and a reader loads `end` before
/// `start` (Acquire), so a reader that sees a new `end` also sees its `start`, and a torn pair
/// (new `start`, old `end`) never contains `now` because consecutive windows do not overlap; the
/// reader then computes the bounds itself.
pub struct BoundsCache {
    tz: Tz,
    start: [std::sync::atomic::AtomicI64; 6],
    end: [std::sync::atomic::AtomicI64; 6],
}

impl BoundsCache {
    pub fn new(tz: Tz) -> BoundsCache {
        BoundsCache {
            tz,
            start: Default::default(),
            end: Default::default(),
        }
    }

    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// `(start, end)` in ms of the `window` containing `now_ms`; `end` is 0 for lifetime.
    pub fn get(&self, window: Window, now_ms: i64) -> (i64, i64) {
        use std::sync::atomic::Ordering::{Acquire, Release};
        if window == Window::Lifetime {
            return (0, 0);
        }
        let i = usize::from(window.index());
        let end = self.end[i].load(Acquire);
        let start = self.start[i].load(Acquire);
        if start <= now_ms && now_ms < end {
            return (start, end);
        }
        let now = DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
        let b = bounds(window, now, self.tz);
        let (start, end) = (
            b.start.timestamp_millis(),
            b.end.map_or(0, |e| e.timestamp_millis()),
        );
        self.start[i].store(start, Release);
        self.end[i].store(end, Release);
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("rfc3339")
    }

    fn check(window: Window, now: &str, tz: Tz, start: &str, end: Option<&str>) {
        let b = bounds(window, at(now), tz);
        assert_eq!(b.start, at(start), "{window:?} start at {now} in {tz}");
        assert_eq!(b.end, end.map(at), "{window:?} end at {now} in {tz}");
    }

    #[test]
    fn the_bounds_cache_agrees_with_bounds() {
        let tz: Tz = "Asia/Shanghai".parse().expect("tz");
        let cache = BoundsCache::new(tz);
        // Across a month and a year boundary, minute by minute and then a jump back in time.
        let mut now = at("2026-12-31T15:58:30Z");
        let steps = (0..5)
            .map(|_| chrono::Duration::minutes(1))
            .chain([chrono::Duration::days(-40), chrono::Duration::seconds(1)]);
        for step in steps {
            for window in Window::ALL {
                let b = bounds(window, now, tz);
                let want = (
                    b.start.timestamp_millis(),
                    b.end.map_or(0, |e| e.timestamp_millis()),
                );
                assert_eq!(
                    cache.get(window, now.timestamp_millis()),
                    want,
                    "{window:?} {now}"
                );
            }
            now += step;
        }
    }

    #[test]
    fn utc_windows() {
        let utc = chrono_tz::UTC;
        check(
            Window::Minute,
            "2026-11-25T13:07:42.5Z",
            utc,
            "2026-11-25T13:07:00Z",
            Some("2026-11-25T13:08:00Z"),
        );
        check(
            Window::Hour,
            "2026-11-25T13:07:42Z",
            utc,
            "2026-11-25T13:00:00Z",
            Some("2026-11-25T14:00:00Z"),
        );
        check(
            Window::Day,
            "2026-11-25T13:07:42Z",
            utc,
            "2026-11-25T00:00:00Z",
            Some("2026-11-26T00:00:00Z"),
        );
        check(
            Window::Month,
            "2026-11-25T13:07:42Z",
            utc,
            "2026-11-01T00:00:00Z",
            Some("2026-12-01T00:00:00Z"),
        );
        check(
            Window::Year,
            "2026-11-25T13:07:42Z",
            utc,
            "2026-01-01T00:00:00Z",
            Some("2027-01-01T00:00:00Z"),
        );
        check(
            Window::Lifetime,
            "2026-11-25T13:07:42Z",
            utc,
            "1970-01-01T00:00:00Z",
            None,
        );
    }

    #[test]
    fn month_and_year_ends_roll_over() {
        let utc = chrono_tz::UTC;
        // The last instant of a month and of a year, and the first of the next.
        check(
            Window::Month,
            "2026-12-31T23:59:59.999Z",
            utc,
            "2026-12-01T00:00:00Z",
            Some("2027-01-01T00:00:00Z"),
        );
        check(
            Window::Month,
            "2027-01-01T00:00:00Z",
            utc,
            "2027-01-01T00:00:00Z",
            Some("2027-02-01T00:00:00Z"),
        );
        check(
            Window::Year,
            "2026-12-31T23:59:59Z",
            utc,
            "2026-01-01T00:00:00Z",
            Some("2027-01-01T00:00:00Z"),
        );
        check(
            Window::Month,
            "2028-02-29T12:00:00Z",
            utc,
            "2028-02-01T00:00:00Z",
            Some("2028-03-01T00:00:00Z"),
        );
    }

    #[test]
    fn shanghai_windows_follow_the_local_calendar() {
        let sh = chrono_tz::Asia::Shanghai; // UTC+8, no DST
        // 2026-11-30T16:30Z is already 2026-12-01 00:30 in Shanghai: a new month there.
        check(
            Window::Month,
            "2026-11-30T16:30:00Z",
            sh,
            "2026-11-30T16:00:00Z",
            Some("2026-12-31T16:00:00Z"),
        );
        check(
            Window::Month,
            "2026-11-30T15:59:59Z",
            sh,
            "2026-10-31T16:00:00Z",
            Some("2026-11-30T16:00:00Z"),
        );
        // Year end: 2026-12-31T16:00Z is 2027-01-01 00:00 in Shanghai.
        check(
            Window::Year,
            "2026-12-31T16:00:00Z",
            sh,
            "2026-12-31T16:00:00Z",
            Some("2027-12-31T16:00:00Z"),
        );
        check(
            Window::Year,
            "2026-12-31T15:59:59Z",
            sh,
            "2025-12-31T16:00:00Z",
            Some("2026-12-31T16:00:00Z"),
        );
        check(
            Window::Day,
            "2026-11-25T17:00:00Z",
            sh,
            "2026-11-25T16:00:00Z",
            Some("2026-11-26T16:00:00Z"),
        );
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let ny = chrono_tz::America::New_York;
        // 2026-03-08: clocks jump from 02:00 to 03:00.
        check(
            Window::Day,
            "2026-03-08T12:00:00Z",
            ny,
            "2026-03-08T05:00:00Z",
            Some("2026-03-09T04:00:00Z"),
        );
        // 2026-11-01: clocks fall back from 02:00 to 01:00.
        check(
            Window::Day,
            "2026-11-01T12:00:00Z",
            ny,
            "2026-11-01T04:00:00Z",
            Some("2026-11-02T05:00:00Z"),
        );
    }

    #[test]
    fn names_round_trip() {
        for w in Window::ALL {
            assert_eq!(Window::parse(w.as_str()), Some(w));
            assert_eq!(Window::from_index(w.index()), Some(w));
        }
        assert_eq!(Window::from_index(Window::ALL.len() as u8), None);
        assert_eq!(Window::parse("week"), None);
    }
}
