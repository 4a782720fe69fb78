//! The one error body of the public contract:
//! `{"error": {"code": "<snake_case>", "message": "<human readable>", "details": {...}}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                details: None,
            },
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.error.details = Some(details);
        self
    }

    /// Serialised once; used by the sidecar, which builds bodies without a framework.
    pub fn to_json(&self) -> String {
        // A struct of strings and a JSON value cannot fail to serialise.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_contract_shape() {
        let body = ErrorBody::new("not_found", "no such route");
        assert_eq!(
            body.to_json(),
            r#"{"error":{"code":"not_found","message":"no such route"}}"#
        );
        let body = body.with_details(serde_json::json!({"app": "idoctor"}));
        assert_eq!(
            body.to_json(),
            r#"{"error":{"code":"not_found","message":"no such route","details":{"app":"idoctor"}}}"#
        );
    }
}
