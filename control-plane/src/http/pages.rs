//! The account page (`/account`): one self-contained HTML file with its CSS, script and charts
//! inline, calling the public API from the browser with the signed-in user's token. No framework
//! and nothing fetched from elsewhere.

use axum::response::Html;

pub async fn account() -> Html<&'static str> {
    Html(include_str!("../../static/account.html"))
}
