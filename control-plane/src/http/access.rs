//! Who may call a route, enforced from the route table (`api_routes!` in `http/mod.rs`): the
//! column that documents a route's access in `/v1/openapi.json` also wraps its handler, so the
//! two cannot disagree. `User` and `Admin` routes authenticate the caller before any extractor
//! runs (`401`), `Admin` ones then refuse anyone but an admin (`403`); the caller is left in the
//! request for the handler's `AuthUser`.

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::MethodRouter;

use super::AppState;
use super::error::AppError;
use super::openapi::Access;
use crate::auth;

/// `route` guarded as `access` says.
pub fn guard(
    route: MethodRouter<AppState>,
    access: Access,
    state: &AppState,
) -> MethodRouter<AppState> {
    let admin = match access {
        // A gateway proves itself by its signature, checked by the handler over the raw body.
        Access::Public | Access::Gateway => return route,
        Access::User => false,
        Access::Admin => true,
    };
    let guard = Guard {
        state: state.clone(),
        admin,
    };
    route.route_layer(middleware::from_fn_with_state(guard, check))
}

#[derive(Clone)]
struct Guard {
    state: AppState,
    /// Only an admin passes.
    admin: bool,
}

async fn check(
    State(guard): State<Guard>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let (mut parts, body) = request.into_parts();
    let caller = auth::authenticate(&parts, &guard.state).await?;
    if guard.admin && !caller.is_admin() {
        return Err(AppError::forbidden());
    }
    parts.extensions.insert(caller);
    Ok(next.run(Request::from_parts(parts, body)).await)
}
