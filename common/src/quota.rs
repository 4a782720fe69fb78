//! One quota's state as a user sees it, in the one shape the contract (`docs/api.md`) gives it
//! twice: an item of the control plane's `/v1/quota` and the `details` of a sidecar's
//! `402 quota_exceeded`.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::window::Window;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaStatus<'a> {
    /// In a `402`'s details; `/v1/quota` names the app once, above its items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<&'a str>,
    #[serde(rename = "type")]
    pub quota_type: &'a str,
    /// In `/v1/quota` only.
    #[serde(flatten)]
    pub about: Option<QuotaAbout<'a>>,
    pub limit: i64,
    pub used: i64,
    /// `limit - used`, never below 0.
    pub remaining: i64,
    /// When the window ends, to the second; `null` for a lifetime quota.
    #[serde(serialize_with = "seconds")]
    pub resets_at: Option<DateTime<Utc>>,
}

/// What a quota type is: its name, unit and window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaAbout<'a> {
    pub name: &'a str,
    pub unit: &'a str,
    pub window: Window,
}

impl<'a> QuotaStatus<'a> {
    pub fn new(
        quota_type: &'a str,
        limit: i64,
        used: i64,
        resets_at: Option<DateTime<Utc>>,
    ) -> QuotaStatus<'a> {
        QuotaStatus {
            app: None,
            quota_type,
            about: None,
            limit,
            used,
            remaining: (limit - used).max(0),
            resets_at,
        }
    }

    /// As a `402`'s details: with the app.
    pub fn of_app(self, app: &'a str) -> QuotaStatus<'a> {
        QuotaStatus {
            app: Some(app),
            ..self
        }
    }

    /// As a `/v1/quota` item: with what the quota type is.
    pub fn about(self, about: QuotaAbout<'a>) -> QuotaStatus<'a> {
        QuotaStatus {
            about: Some(about),
            ..self
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        // Strings, integers and times cannot fail to serialise.
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// RFC 3339 in UTC to the second, as every time of the contract.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn seconds<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_are_the_contracts() {
        let reset = "2026-12-01T00:00:00Z".parse().ok();
        let status = QuotaStatus::new("storage_bytes", 10, 12, reset);
        assert_eq!(
            serde_json::to_string(&status.clone().of_app("idoctor").to_json()).ok(),
            Some(
                r#"{"app":"idoctor","limit":10,"remaining":0,"resets_at":"2026-12-01T00:00:00Z","type":"storage_bytes","used":12}"#
                    .to_owned()
            )
        );
        let item = QuotaStatus::new("api_calls", 100, 3, None).about(QuotaAbout {
            name: "API calls",
            unit: "calls",
            window: Window::Lifetime,
        });
        assert_eq!(
            serde_json::to_string(&item.to_json()).ok(),
            Some(
                r#"{"limit":100,"name":"API calls","remaining":97,"resets_at":null,"type":"api_calls","unit":"calls","used":3,"window":"lifetime"}"#
                    .to_owned()
            )
        );
    }
}
