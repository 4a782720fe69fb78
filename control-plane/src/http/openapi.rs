//! The OpenAPI 3.1 document served at `/v1/openapi.json`. It is generated from the same table that
//! registers the routes (`api_routes!` in `http/mod.rs`), so a route cannot exist without its
//! entry here, nor an entry without its route.

use serde_json::{Map, Value, json};

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (ops endpoints, sign-up, public catalogue).
    Public,
    /// A bearer access token or an API key.
    User,
    /// A user with the admin role.
    Admin,
    /// A payment gateway; authenticated by its signature, not by credentials.
    Gateway,
}

/// One operation of the API.
#[derive(Debug, Clone)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Success status and what it returns.
    pub ok: (u16, &'static str),
    /// Query parameters, `name: description`.
    pub query: &'static [&'static str],
    /// What the JSON (or form) body carries; empty for none.
    pub body: &'static str,
    /// Honours `Idempotency-Key` (docs/api.md, "Idempotent requests").
    pub idempotent: bool,
}

fn error_ref() -> Value {
    json!({"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// Builds the document.
pub fn document(ops: &[Op], server: &str) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for op in ops {
        let mut parameters: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        for q in op.query {
            let (name, description) = q.split_once(':').unwrap_or((q, ""));
            parameters.push(json!({"name": name.trim(), "in": "query", "required": false,
                                   "description": description.trim(), "schema": {"type": "string"}}));
        }
        if op.idempotent {
            parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": false,
                "description": "1-255 visible ASCII characters; a retry with the same key and body within 24 hours gets the first answer (Idempotent-Replayed: true), another body 422",
                "schema": {"type": "string", "maxLength": 255}}));
        }
        let mut responses = Map::new();
        responses.insert(op.ok.0.to_string(), json!({"description": op.ok.1}));
        if op.idempotent {
            responses.insert("422".to_owned(), error_ref());
        }
        let errors: &[u16] = match op.access {
            Access::Public => &[400, 404, 409, 413, 429],
            Access::User => &[400, 401, 404, 413],
            Access::Admin => &[400, 401, 403, 404, 409],
            Access::Gateway => &[400, 401],
        };
        for code in errors {
            responses.insert(code.to_string(), error_ref());
        }
        let mut operation = json!({
            "summary": op.summary,
            "operationId": format!("{}_{}", op.method, op.path.trim_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": parameters,
            "responses": responses,
            "x-access": format!("{:?}", op.access).to_lowercase(),
        });
        if matches!(op.access, Access::User | Access::Admin) {
            operation["security"] = json!([{"bearer": []}, {"apiKey": []}]);
        } else {
            operation["security"] = json!([]);
        }
        if !op.body.is_empty() {
            operation["requestBody"] = json!({"required": true, "description": op.body,
                "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Tollgate control plane", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Users, API keys, plans, quotas, usage, orders and payments. The reference, with status codes, headers and examples, is docs/api.md in the repository."},
        "servers": [{"url": server}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}}
            }
        }
    })
}
