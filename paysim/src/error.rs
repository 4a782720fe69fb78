//! The one error type. Each variant is an answer in the dialect of the surface that refused the
//! request: the Alipay gateway's signed `<method>_response` envelope, WeChat Pay's signed
//! `{"code","message"}`, or the simulator's own `{"error":{"code","message"}}`. The gateways
//! render theirs (they need the signing keys); the simulator's are plain `IntoResponse`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Alipay's public error codes: `40001` Missing Required Arguments, `40002` Invalid
    /// Arguments, `40004` Business Failed, each with a `sub_code` such as `isv.invalid-signature`.
    #[error("alipay {code} {sub_code}: {sub_msg}")]
    Alipay {
        code: &'static str,
        msg: &'static str,
        sub_code: &'static str,
        sub_msg: String,
    },
    /// WeChat Pay API v3: an HTTP status and `{"code","message"}`, e.g. `401 SIGN_ERROR`.
    #[error("wechat {status} {code}: {message}")]
    Wechat {
        status: StatusCode,
        code: &'static str,
        message: String,
        detail: Option<serde_json::Value>,
    },
    /// The simulator's control endpoints (`/sim/...`), in the project's error format.
    #[error("{status} {code}: {message}")]
    Sim {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl Error {
    pub fn alipay_missing(sub_code: &'static str, sub_msg: impl Into<String>) -> Self {
        Error::Alipay {
            code: "40001",
            msg: "Missing Required Arguments",
            sub_code,
            sub_msg: sub_msg.into(),
        }
    }

    pub fn alipay_invalid(sub_code: &'static str, sub_msg: impl Into<String>) -> Self {
        Error::Alipay {
            code: "40002",
            msg: "Invalid Arguments",
            sub_code,
            sub_msg: sub_msg.into(),
        }
    }

    pub fn alipay_business(sub_code: &'static str, sub_msg: impl Into<String>) -> Self {
        Error::Alipay {
            code: "40004",
            msg: "Business Failed",
            sub_code,
            sub_msg: sub_msg.into(),
        }
    }

    pub fn wechat(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Error::Wechat {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn sim(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Error::Sim {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::sim(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for Error {
    /// The simulator's own format. The gateway variants only reach this when a gateway forgot
    /// to render its error, which still must not be a panic or an empty 500.
    fn into_response(self) -> Response {
        match self {
            Error::Sim { status, code, message } => {
                (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
            }
            Error::Wechat { status, code, message, .. } => {
                (status, Json(json!({"code": code, "message": message}))).into_response()
            }
            Error::Alipay { code, msg, sub_code, sub_msg } => (
                StatusCode::OK,
                Json(json!({"error_response": {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_msg}})),
            )
                .into_response(),
        }
    }
}
