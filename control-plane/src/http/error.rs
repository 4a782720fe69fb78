//! The one error type of the REST layer. Every failure becomes the contract's error body here;
//! 5xx bodies stay generic and the detail goes to the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tollgate_common::error::ErrorBody;

use crate::db::DbError;
use crate::payments::PayError;
use crate::payments::service::ServiceError;

#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
    /// What went wrong inside, for the log only.
    pub internal: Option<String>,
}

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        AppError {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
            internal: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid credentials",
        )
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this call needs the admin role",
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this service accepts",
        )
    }

    pub fn unavailable(internal: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a backend this call needs is unavailable; try again shortly",
        );
        e.internal = Some(internal.to_string());
        e
    }

    pub fn internal(internal: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        );
        e.internal = Some(internal.to_string());
        e
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl AppError {
    /// The one mapping of unique-constraint violations to `409`: `conflicts` names, per
    /// constraint, the error code and message; any other failure keeps its own mapping.
    pub fn from_db(e: DbError, conflicts: &[(&str, &'static str, &str)]) -> AppError {
        match e.unique_violation() {
            Some(constraint) => match conflicts.iter().find(|(c, _, _)| *c == constraint) {
                Some((_, code, message)) => AppError::conflict(code, *message),
                None => e.into(),
            },
            None => e.into(),
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match &e {
            DbError::Pool(_) => AppError::unavailable(e),
            // Defence in depth: `http::hygiene` refuses such text before any handler runs.
            _ if e.bad_text() => {
                let mut err = AppError::invalid("the request holds text that cannot be stored");
                err.internal = Some(e.to_string());
                err
            }
            _ => AppError::internal(e),
        }
    }
}

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> AppError {
        match e {
            ServiceError::Db(e) => e.into(),
            ServiceError::NotFound(what) => AppError::not_found(what),
            ServiceError::Invalid(why) => AppError::invalid(why),
            ServiceError::Gateway(e) => ServiceError::Pay(e).into(),
            ServiceError::Pay(
                e @ (PayError::Unreachable(_)
                | PayError::Refused(_)
                | PayError::BadSignature
                | PayError::Invalid(_)),
            ) => {
                let mut err = AppError::new(
                    StatusCode::BAD_GATEWAY,
                    "payment_gateway_error",
                    "the payment gateway could not take the order; try again shortly",
                );
                err.internal = Some(e.to_string());
                err
            }
            ServiceError::Pay(e) => AppError::internal(e),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let Some(internal) = &self.internal {
            if self.status.is_server_error() {
                tracing::error!(code = self.code, error = %internal, "request failed");
            } else {
                tracing::debug!(code = self.code, error = %internal, "request refused");
            }
        }
        let mut body = ErrorBody::new(self.code, self.message);
        if let Some(details) = self.details {
            body = body.with_details(details);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
