//! One error type for every handler, mapped to a status and the JSON shape
//! `{"error":{"code","message"}}`. Internal details are logged, not returned.

use axum::body::Bytes;
use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{de::DeserializeOwned, Serialize};
use utoipa::ToSchema;

use super::body;
use crate::runtime::ingest::IngestError;
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A conflict with a code of its own (e.g. `balance_not_zero`).
    #[error("{1}")]
    ConflictAs(&'static str, String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than the limit")]
    TooLarge,
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    /// No space on the data directory's device: nothing was written.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_request`, `conflict`.
    #[schema(example = "invalid_request")]
    pub code: String,
    /// What went wrong, for a person.
    #[schema(example = "amount must be > 0")]
    pub message: String,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::ConflictAs(code, _) => (StatusCode::CONFLICT, code),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::Unsupported(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    pub fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: self.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answering a request");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> Self {
        if error.is_no_space() {
            return Self::InsufficientStorage(error.to_string());
        }
        match error {
            RuntimeError::Log(log) => Self::Unavailable(format!("log unavailable: {log}")),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::NoSpace(_) => Self::InsufficientStorage(error.to_string()),
            IngestError::Log(log) if log.is_no_space() => {
                Self::InsufficientStorage(log.to_string())
            }
            IngestError::Conflict(_) => Self::Conflict(error.to_string()),
            IngestError::Busy(_)
            | IngestError::Throttled(_)
            | IngestError::Backlog { .. }
            | IngestError::Closed
            | IngestError::Log(_) => Self::Unavailable(error.to_string()),
            IngestError::Runtime(runtime) => runtime.into(),
        }
    }
}

/// A JSON request body, refused in the API's error shape and terms: not
/// JSON (415), too large (413), not an object, or a field of the wrong
/// kind, named by its path (400).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::Unsupported(
                "send the body as JSON with Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::BadRequest(format!(
                    "the body could not be read: {}",
                    rejection.body_text()
                ))
            }
        })?;
        body::parse(&bytes).map(Self).map_err(ApiError::BadRequest)
    }
}

/// An optional body: absent (no `Content-Type`) is `None`; present must be valid JSON.
impl<S, T> OptionalFromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        if !req.headers().contains_key(header::CONTENT_TYPE) {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state)
            .await
            .map(Some)
    }
}

/// `application/json`, or any `application/*+json`.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl From<crate::ops::dlq::DlqError> for ApiError {
    fn from(error: crate::ops::dlq::DlqError) -> Self {
        use crate::ops::dlq::DlqError;
        match error {
            DlqError::BadId(_) => Self::BadRequest(error.to_string()),
            DlqError::NotFound(_) => Self::NotFound(error.to_string()),
            DlqError::Unprocessable(_) => Self::Unprocessable(error.to_string()),
            DlqError::Runtime(runtime) => runtime.into(),
        }
    }
}

/// Query and path extractors whose rejection uses the API's error shape.
macro_rules! api_extractor {
    ($(#[$doc:meta])* $name:ident, $bounds:path) => {
        $(#[$doc])*
        pub struct $name<T>(pub T);

        impl<S, T> axum::extract::FromRequestParts<S> for $name<T>
        where
            T: DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                <$bounds>::from_request_parts(parts, state)
                    .await
                    .map(|value| Self(value.0))
                    .map_err(|rejection| ApiError::BadRequest(body::plain(&rejection.body_text())))
            }
        }
    };
}

api_extractor!(
    /// `axum::extract::Query` whose rejection uses the API's error shape.
    Query,
    axum::extract::Query<T>
);
api_extractor!(
    /// `axum::extract::Path` whose rejection uses the API's error shape.
    Path,
    axum::extract::Path<T>
);
