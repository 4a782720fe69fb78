//! Authentication: JWTs verified against cached JWKS (the control plane's and any trusted
//! issuer's), with a bounded cache of verified tokens so that a repeat caller costs one lookup;
//! API keys looked up in Redis with a bounded positive cache and a negative cache. Redis pub/sub
//! drops revoked keys from every sidecar's cache at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quick_cache::sync::Cache;
use sha2::{Digest, Sha256};
use tollgate_common::api_key;
use tollgate_common::claims::{AccessClaims, MAX_TOKEN_BYTES};
use uuid::Uuid;

use crate::HttpClient;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

const LEEWAY_SECONDS: u64 = 30;
/// Signature algorithms accepted: asymmetric only, never `none` or HMAC.
const ALLOWED: [Algorithm; 5] = [
    Algorithm::EdDSA,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::PS256,
];
/// How long a cached API key is trusted without hearing from Redis (pub/sub normally drops it
/// sooner).
const KEY_CACHE_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Jwt,
    ApiKey,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Jwt => "jwt",
            Method::ApiKey => "api_key",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub user: Uuid,
    pub method: Method,
    /// The token's issued-at (s); 0 for API keys.
    pub iat: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials refused: {0}")]
    Refused(&'static str),
    #[error(transparent)]
    Backend(#[from] StoreError),
}

struct JwkEntry {
    key: DecodingKey,
    alg: Algorithm,
    /// From the control plane's JWKS (its issuer is checked), or a trusted issuer's.
    own: bool,
}

#[derive(Clone, Copy)]
struct Verified {
    user: Uuid,
    iat: i64,
    exp: i64,
}

struct CachedKey {
    user: Uuid,
    key_id: Uuid,
    expires_at: i64,
    fetched: Instant,
    /// When this sidecar last told the control plane the key was used (s).
    noted: AtomicI64,
}

pub struct Authenticator {
    http: HttpClient,
    own_jwks: String,
    trusted_jwks: Vec<String>,
    issuer: String,
    audience: String,
    jwks: ArcSwap<HashMap<String, Arc<JwkEntry>>>,
    jwks_loaded: AtomicBool,
    last_refresh: std::sync::Mutex<Option<Instant>>,
    tokens: Cache<[u8; 32], Verified>,
    keys: Cache<[u8; 32], Arc<CachedKey>>,
    unknown_keys: Cache<[u8; 32], Instant>,
    store: Store,
    metrics: Arc<Metrics>,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Authenticator {
    pub fn new(
        http: HttpClient,
        control_plane_url: &str,
        trusted_jwks: Vec<String>,
        issuer: String,
        audience: String,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Authenticator {
        Authenticator {
            http,
            own_jwks: format!("{control_plane_url}/.well-known/jwks.json"),
            trusted_jwks,
            issuer,
            audience,
            jwks: ArcSwap::from_pointee(HashMap::new()),
            jwks_loaded: AtomicBool::new(false),
            last_refresh: std::sync::Mutex::new(None),
            tokens: Cache::new(100_000),
            keys: Cache::new(100_000),
            unknown_keys: Cache::new(100_000),
            store,
            metrics,
        }
    }

    pub fn jwks_loaded(&self) -> bool {
        self.jwks_loaded.load(Ordering::Relaxed)
    }

    async fn fetch(&self, url: &str) -> Result<JwkSet, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let request = http::Request::get(uri)
            .body(crate::empty_body())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.http.request(request))
            .await
            .map_err(|_| format!("{url}: timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: status {}", response.status()));
        }
        let body: Bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a JWK Set: {e}"))
    }

    /// Fetches every JWKS; keeps the old keys of a source that fails.
    pub async fn refresh_jwks(&self) -> Result<(), String> {
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut map: HashMap<String, Arc<JwkEntry>> = HashMap::new();
        let mut errors = Vec::new();
        let sources = std::iter::once((&self.own_jwks, true))
            .chain(self.trusted_jwks.iter().map(|u| (u, false)));
        for (url, own) in sources {
            match self.fetch(url).await {
                Ok(set) => {
                    for jwk in &set.keys {
                        let (Some(kid), Some(alg)) = (&jwk.common.key_id, jwk.common.key_algorithm)
                        else {
                            continue;
                        };
                        let Ok(alg) = alg.to_string().parse::<Algorithm>() else {
                            continue;
                        };
                        if !ALLOWED.contains(&alg) {
                            continue;
                        }
                        // Another issuer can never take over one of our key ids.
                        if !own && map.get(kid).is_some_and(|e| e.own) {
                            continue;
                        }
                        if let Ok(key) = DecodingKey::from_jwk(jwk) {
                            map.insert(kid.clone(), Arc::new(JwkEntry { key, alg, own }));
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            // Keep what we had for the sources that failed.
            for (kid, entry) in self.jwks.load().iter() {
                map.entry(kid.clone()).or_insert_with(|| entry.clone());
            }
        }
        if !map.is_empty() {
            // A key that was withdrawn (say, compromised) takes every token it verified with it.
            let withdrawn = self.jwks.load().keys().any(|kid| !map.contains_key(kid));
            self.jwks.store(Arc::new(map));
            self.jwks_loaded.store(true, Ordering::Relaxed);
            if withdrawn {
                self.tokens.clear();
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// An unknown `kid` triggers a refresh, at most once a second.
    async fn refresh_for_unknown_kid(&self) {
        let due = {
            let last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
            last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        };
        if due && let Err(e) = self.refresh_jwks().await {
            tracing::warn!(error = %e, "jwks refresh failed");
        }
    }

    pub async fn verify_jwt(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Refused("token too long"));
        }
        let now = chrono::Utc::now().timestamp();
        let digest = sha256(token.as_bytes());
        if let Some(v) = self.tokens.get(&digest) {
            if v.exp + LEEWAY_SECONDS as i64 > now {
                self.metrics.cache("token", true);
                return Ok(Identity {
                    user: v.user,
                    method: Method::Jwt,
                    iat: v.iat,
                });
            }
            self.tokens.remove(&digest);
        }
        self.metrics.cache("token", false);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Refused("malformed token"))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(AuthError::Refused("algorithm not accepted"));
        }
        let kid = header.kid.ok_or(AuthError::Refused("no kid"))?;
        let entry = match self.jwks.load().get(&kid).cloned() {
            Some(entry) => entry,
            None => {
                // Rare; on the heap, so that every request's future does not carry a JWKS fetch.
                Box::pin(self.refresh_for_unknown_kid()).await;
                self.jwks
                    .load()
                    .get(&kid)
                    .cloned()
                    .ok_or(AuthError::Refused("unknown kid"))?
            }
        };
        if entry.alg != header.alg {
            return Err(AuthError::Refused("algorithm does not match the key"));
        }
        let mut validation = Validation::new(entry.alg);
        validation.set_audience(&[&self.audience]);
        if entry.own {
            validation.set_issuer(&[&self.issuer]);
            validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        } else {
            validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        }
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &entry.key, &validation)
            .map_err(|_| AuthError::Refused("invalid token"))?
            .claims;
        // A token "issued" in the future would outlive the user's cut-off (`tva`, compared
        // with `iat`): refused beyond the clock-skew leeway.
        if claims.iat > now + LEEWAY_SECONDS as i64 {
            return Err(AuthError::Refused("issued in the future"));
        }
        let user: Uuid = claims
            .sub
            .parse()
            .map_err(|_| AuthError::Refused("sub is not a user id"))?;
        self.tokens.insert(
            digest,
            Verified {
                user,
                iat: claims.iat,
                exp: claims.exp,
            },
        );
        Ok(Identity {
            user,
            method: Method::Jwt,
            iat: claims.iat,
        })
    }

    pub async fn verify_api_key(&self, key: &str) -> Result<Identity, AuthError> {
        if !api_key::is_well_formed(key) {
            return Err(AuthError::Refused("malformed api key"));
        }
        let hash = api_key::hash(key);
        let now = chrono::Utc::now();
        let cached = self
            .keys
            .get(&hash)
            .filter(|c| c.fetched.elapsed() < KEY_CACHE_TTL);
        let entry = match cached {
            Some(entry) => {
                self.metrics.cache("api_key", true);
                entry
            }
            None => {
                if self
                    .unknown_keys
                    .get(&hash)
                    .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
                {
                    self.metrics.cache("api_key_negative", true);
                    return Err(AuthError::Refused("unknown api key"));
                }
                self.metrics.cache("api_key", false);
                match self.store.api_key(&api_key::hex(&hash)).await? {
                    Some(record) => {
                        let entry = Arc::new(CachedKey {
                            user: record.user,
                            key_id: record.key_id,
                            expires_at: record.expires_at,
                            fetched: Instant::now(),
                            noted: AtomicI64::new(0),
                        });
                        self.keys.insert(hash, entry.clone());
                        entry
                    }
                    None => {
                        self.unknown_keys.insert(hash, Instant::now());
                        return Err(AuthError::Refused("unknown api key"));
                    }
                }
            }
        };
        if entry.expires_at != 0 && entry.expires_at <= now.timestamp() {
            return Err(AuthError::Refused("api key expired"));
        }
        // Tell the control plane about use at most once a minute per key.
        let last = entry.noted.load(Ordering::Relaxed);
        if now.timestamp() - last >= 60
            && entry
                .noted
                .compare_exchange(last, now.timestamp(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let store = self.store.clone();
            let key_id = entry.key_id;
            tokio::spawn(async move {
                if let Err(e) = store.note_key_use(key_id, now).await {
                    tracing::debug!(error = %e, "could not note api key use");
                }
            });
        }
        Ok(Identity {
            user: entry.user,
            method: Method::ApiKey,
            iat: 0,
        })
    }

    /// Drops one key (by the hex of its hash) from the caches.
    pub fn forget_key(&self, hash_hex: &str) {
        if let Some(hash) = decode_hex(hash_hex) {
            self.keys.remove(&hash);
            self.unknown_keys.remove(&hash);
        }
    }

    /// Drops every cached key, e.g. after missing invalidations while disconnected.
    pub fn forget_all_keys(&self) {
        self.keys.clear();
        self.unknown_keys.clear();
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::decode_hex;

    #[test]
    fn decode_hex_takes_exactly_64_hex_digits() {
        let check = |text: &str, expected: Option<[u8; 32]>| {
            assert_eq!(decode_hex(text), expected, "{text:?}");
        };
        check(&"ab".repeat(32), Some([0xab; 32]));
        check(&"AB".repeat(32), Some([0xab; 32]));
        check(&"ab".repeat(31), None);
        check(&"ab".repeat(33), None);
        check(&format!("+f{}", "ab".repeat(31)), None);
        check(&"zz".repeat(32), None);
    }
}
