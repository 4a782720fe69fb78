#!/usr/bin/env python3
"""End-to-end checks of the control plane's accounts, tokens and API keys (issue 3), made with
implementations independent of the server's: PyJWT and `cryptography` verify and forge access
tokens against the published JWKS, argon2-cffi checks the stored password hash, psql and
redis-cli read what the server stored, and every response, log file and Redis value of the run
is searched for secrets.

usage: identity_check.py CONTROL_PLANE_URL DATABASE_URL LOGS_DIR REDIS_URL REDIS_PREFIX

Prints one line per check and stops with exit status 1 at the first failure. The last line is
`identity: N passed, F failed`.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
import zlib

import argon2
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

if len(sys.argv) != 6:
    sys.exit(__doc__)
BASE, DATABASE_URL, LOGS_DIR, REDIS_URL, PREFIX = sys.argv[1:]
BASE = BASE.rstrip("/")
ISSUER = "tollgate"
AUDIENCE = "tollgate"
RUN = secrets.token_hex(4)

passed = 0


class CheckFailed(Exception):
    pass


def check(description, condition, detail=""):
    """Records one check; the first failure ends the run."""
    global passed
    if condition:
        passed += 1
        print(f"ok - {description}")
        return
    print(f"not ok - {description}")
    if detail:
        for line in str(detail).splitlines():
            print(f"    {line}")
    raise CheckFailed(description)


# --- HTTP, with every response kept for the secret search ---------------------------------------

RESPONSES = []  # (index, label, status, headers text, body bytes)
SESSION = requests.Session()


def call(method, path, label, json_body=None, headers=None, timeout=30):
    response = SESSION.request(
        method, BASE + path, json=json_body, headers=headers or {}, timeout=timeout
    )
    header_text = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    RESPONSES.append((len(RESPONSES), label, response.status_code, header_text, response.content))
    response.index = len(RESPONSES) - 1
    return response


def describe(response):
    body = response.content.decode("utf-8", "replace")
    if len(body) > 600:
        body = body[:600] + "..."
    return f"{response.request.method} {response.request.url} -> {response.status_code}\n{body}"


def body_json(response):
    try:
        return response.json()
    except ValueError:
        return None


def error_code(response):
    body = body_json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def expect_error(description, response, status, code):
    check(
        description,
        response.status_code == status and error_code(response) == code,
        f"want {status} {code}\n" + describe(response),
    )


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# --- secrets of this run: (kind, value, indexes of the responses allowed to contain it) ---------

SECRETS = []


def secret(kind, value, allowed_response=None):
    allowed = set() if allowed_response is None else {allowed_response.index}
    SECRETS.append((kind, value, allowed))


def secret_parts(kind, value):
    """The strings whose presence betrays the secret: the secret itself and its essential part
    (a token without its public prefix, a PHC string's hash), so a truncated leak counts too."""
    parts = [value]
    if kind == "refresh token" and value.startswith("tgr_"):
        parts.append(value[len("tgr_"):])
    elif kind == "API key" and len(value) > 20:
        parts.append(value[12:])  # what follows the displayed prefix (tgk_ + 8 characters)
    elif kind == "password hash":
        digest = value.rsplit("$", 1)[-1]
        if len(digest) >= 16:
            parts.append(digest)
    return parts


def leaks_in(data):
    """The secrets (kind, value) found in `data` (bytes)."""
    found = []
    for kind, value, _ in SECRETS:
        for part in secret_parts(kind, value):
            if part.encode() in data:
                found.append((kind, value))
                break
    return found


def short(value):
    return value if len(value) <= 24 else value[:12] + "..." + value[-6:]


# --- outside tools -----------------------------------------------------------------------------


def psql(sql):
    result = subprocess.run(
        ["psql", DATABASE_URL, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"psql failed: {result.stderr.strip()}")
    return result.stdout


def password_hash_of(email):
    # The email is ours (letters, digits, '@', '.', '-'), so a literal is safe here.
    assert all(c.isalnum() or c in "@.-_" for c in email)
    out = psql(f"select password_hash from users where lower(email) = lower('{email}');\n")
    return out.strip()


def redis_cli(*args, raw=True):
    command = ["redis-cli", "-u", REDIS_URL] + (["--raw"] if raw else []) + list(args)
    result = subprocess.run(command, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed: {result.stderr!r}")
    return result.stdout


# --- base64url and token building ------------------------------------------------------------


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64u_json(obj):
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def hs256_token(header, payload, key):
    signing_input = f"{b64u_json(header)}.{b64u_json(payload)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64u(signature)}"


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def well_formed_key():
    """A key of the documented shape (tgk_ + 32 base62 + 6-character base62 CRC-32) that the
    server never issued, so that it passes the shape check and must fail the lookup."""
    body = "tgk_" + "".join(secrets.choice(BASE62) for _ in range(32))
    n = zlib.crc32(body.encode())
    digits = []
    for _ in range(6):
        digits.append(BASE62[n % 62])
        n //= 62
    return body + "".join(reversed(digits))


def check_token_response(description, response, status):
    body = body_json(response)
    ok = (
        response.status_code == status
        and isinstance(body, dict)
        and isinstance(body.get("user"), dict)
        and isinstance(body.get("access_token"), str)
        and isinstance(body.get("refresh_token"), str)
        and body.get("token_type") == "Bearer"
        and isinstance(body.get("expires_in"), int)
        and body["expires_in"] > 0
    )
    check(description, ok, describe(response))
    return body


# ================================================================================================


def main():
    subscriber = subprocess.Popen(
        ["redis-cli", "-u", REDIS_URL, "--raw", "PSUBSCRIBE", f"{PREFIX}:*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_checks(subscriber)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
        subscriber.wait()


def run_checks(subscriber):
    email = f"e2e-{RUN}@example.com"
    password = f"pw-{secrets.token_urlsafe(18)}"
    secret("password", password)

    # --- register ---
    r = call("POST", "/v1/auth/register", "register", {"email": email, "password": password})
    reg = check_token_response("register answers 201 with a token response", r, 201)
    secret("refresh token", reg["refresh_token"], r)
    user = reg["user"]
    check(
        "registered user has id, email, role user, status active, created_at",
        isinstance(user.get("id"), str)
        and user.get("email", "").lower() == email.lower()
        and user.get("role") == "user"
        and user.get("status") == "active"
        and isinstance(user.get("created_at"), str),
        json.dumps(user),
    )
    check("register response carries no password", password.encode() not in r.content)

    r = call(
        "POST", "/v1/auth/register", "register again",
        {"email": email.upper(), "password": password},
    )
    expect_error("registering the same email (other case) is 409 email_taken", r, 409, "email_taken")
    short_password = "short7!"
    secret("password", short_password)
    r = call(
        "POST", "/v1/auth/register", "register short password",
        {"email": f"e2e-short-{RUN}@example.com", "password": short_password},
    )
    expect_error("a 7-character password is 400 invalid_request", r, 400, "invalid_request")

    # --- the access token, verified with PyJWT against the JWKS ---
    r = call("GET", "/.well-known/jwks.json", "jwks")
    jwks = body_json(r)
    check(
        "JWKS answers 200 with a key set",
        r.status_code == 200 and isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)
        and jwks["keys"],
        describe(r),
    )
    check(
        "JWKS holds public keys only (no private member 'd')",
        all("d" not in k and "p" not in k and "k" not in k for k in jwks["keys"]),
        json.dumps(jwks),
    )
    access = reg["access_token"]
    header = jwt.get_unverified_header(access)
    kid = header.get("kid")
    check(
        "access token header: alg EdDSA, kid present",
        header.get("alg") == "EdDSA" and isinstance(kid, str) and kid,
        json.dumps(header),
    )
    matching = [k for k in jwks["keys"] if k.get("kid") == kid]
    check("the token's kid is in the JWKS", len(matching) == 1, f"kid {kid!r}, JWKS {jwks}")
    jwk = matching[0]
    check(
        "the JWK is an Ed25519 OKP key",
        jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and isinstance(jwk.get("x"), str),
        json.dumps(jwk),
    )
    server_key = jwt.PyJWK(jwk, algorithm="EdDSA")

    def verify(token):
        return jwt.decode(
            token,
            key=server_key.key,
            algorithms=["EdDSA"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
        )

    try:
        claims = verify(access)
        error = ""
    except jwt.PyJWTError as e:
        claims, error = None, repr(e)
    check("PyJWT verifies the access token (EdDSA, iss and aud tollgate)", claims is not None, error)
    now = int(time.time())
    check(
        "claims: sub is the user id, role user, jti present",
        claims["sub"] == user["id"] and claims.get("role") == "user"
        and isinstance(claims.get("jti"), str) and claims["jti"],
        json.dumps(claims),
    )
    check(
        "claims: iat, nbf, exp are sane (nbf <= iat+1, iat within 60 s of now)",
        all(isinstance(claims.get(c), int) for c in ("iat", "nbf", "exp"))
        and claims["nbf"] <= claims["iat"] + 1
        and abs(claims["iat"] - now) <= 60,
        json.dumps(claims),
    )
    check(
        "exp - iat equals expires_in",
        claims["exp"] - claims["iat"] == reg["expires_in"],
        f"exp-iat={claims['exp'] - claims['iat']}, expires_in={reg['expires_in']}",
    )

    # --- the stored password hash, checked with argon2-cffi ---
    stored = password_hash_of(email)
    secret("password hash", stored)
    check("the users row holds a PHC string", stored.startswith("$argon2"), short(stored))
    hasher = argon2.PasswordHasher()
    try:
        verified = hasher.verify(stored, password)
        error = ""
    except argon2.exceptions.VerificationError as e:
        verified, error = False, repr(e)
    check("argon2-cffi verifies the password against the stored hash", verified is True, error)
    try:
        hasher.verify(stored, password + "x")
        wrong_ok = True
    except argon2.exceptions.VerifyMismatchError:
        wrong_ok = False
    check("argon2-cffi rejects another password against it", not wrong_ok)
    params = argon2.extract_parameters(stored)
    check(
        "hash parameters: argon2id v19, m=19456, t=2, p=1",
        params.type == argon2.Type.ID and params.version == 19 and params.memory_cost == 19456
        and params.time_cost == 2 and params.parallelism == 1,
        repr(params),
    )

    # --- genuine and forged tokens at /v1/me ---
    r = call("GET", "/v1/me", "me genuine", headers=bearer(access))
    me = body_json(r)
    check(
        "GET /v1/me with the genuine token is 200 with the user",
        r.status_code == 200 and isinstance(me, dict) and me.get("id") == user["id"]
        and me.get("email") == user["email"] and me.get("role") == "user",
        describe(r),
    )
    r = call("GET", "/v1/admin/users", "admin as user", headers=bearer(access))
    expect_error("an ordinary user's token at /v1/admin/users is 403 forbidden", r, 403, "forbidden")

    head_b64, payload_b64, _sig_b64 = access.split(".")
    payload = json.loads(b64u_decode(payload_b64))
    raw_public = b64u_decode(jwk["x"])
    check("the JWK's x is a 32-byte Ed25519 public key", len(raw_public) == 32, jwk["x"])
    pem_public = Ed25519PublicKey.from_public_bytes(raw_public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    own_key = Ed25519PrivateKey.generate()
    own_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(own_key.public_key()))

    def own(claims_, headers_):
        return jwt.encode(claims_, own_key, algorithm="EdDSA", headers=headers_)

    def fresh(**changes):
        c = dict(payload)
        c["jti"] = str(uuid.uuid4())
        c.update(changes)
        return c

    t = int(time.time())
    tampered = dict(payload, role="admin")
    forged = [
        ("alg none",
         f"{b64u_json({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64u_json(payload)}."),
        ("alg none, upper-case None",
         f"{b64u_json({'alg': 'None', 'typ': 'JWT', 'kid': kid})}.{b64u_json(payload)}."),
        ("HS256 keyed with the raw 32-byte public key",
         hs256_token({"alg": "HS256", "typ": "JWT", "kid": kid}, payload, raw_public)),
        ("HS256 keyed with the PEM public key",
         hs256_token({"alg": "HS256", "typ": "JWT", "kid": kid}, payload, pem_public)),
        ("HS256 keyed with the JWK's x string",
         hs256_token({"alg": "HS256", "typ": "JWT", "kid": kid}, payload, jwk["x"].encode())),
        ("payload tampered (role admin), original signature",
         f"{head_b64}.{b64u_json(tampered)}.{_sig_b64}"),
        ("valid claims signed by a foreign key under the server's kid",
         own(fresh(), {"kid": kid})),
        ("expired (foreign key, server kid)",
         own(fresh(iat=t - 7200, nbf=t - 7200, exp=t - 3600), {"kid": kid})),
        ("not yet valid (foreign key, server kid)",
         own(fresh(iat=t, nbf=t + 3600, exp=t + 7200), {"kid": kid})),
        ("wrong iss (foreign key, server kid)", own(fresh(iss="https://evil.example"), {"kid": kid})),
        ("wrong aud (foreign key, server kid)", own(fresh(aud="someone-else"), {"kid": kid})),
        ("unknown kid (foreign key)", own(fresh(), {"kid": f"e2e-unknown-{RUN}"})),
        ("no kid (foreign key)", own(fresh(), {})),
        ("foreign key embedded as a jwk header", own(fresh(), {"jwk": own_jwk})),
        ("foreign key embedded as a jwk header under the server's kid",
         own(fresh(), {"kid": kid, "jwk": own_jwk})),
        ("garbage", "not-a-jwt"),
        ("genuine token with its signature cut off", f"{head_b64}.{payload_b64}."),
    ]
    for name, token in forged:
        r = call("GET", "/v1/me", f"me forged {name}", headers=bearer(token))
        expect_error(f"forged token rejected at /v1/me: {name}", r, 401, "unauthorized")
    r = call("GET", "/v1/me", "me no credentials")
    expect_error("no credentials at /v1/me is 401 unauthorized", r, 401, "unauthorized")
    r = call("GET", "/v1/me", "me genuine again", headers=bearer(access))
    check("the genuine token still works after the forgeries", r.status_code == 200, describe(r))

    # --- login ---
    r = call("POST", "/v1/auth/login", "login", {"email": email, "password": password})
    login = check_token_response("login with the right password is 200 with a token response", r, 200)
    secret("refresh token", login["refresh_token"], r)
    check("login returns the same user", login["user"]["id"] == user["id"], json.dumps(login["user"]))
    try:
        verify(login["access_token"])
        error = ""
    except jwt.PyJWTError as e:
        error = repr(e)
    check("PyJWT verifies the login's access token", not error, error)

    wrong_password = f"wrong-{secrets.token_urlsafe(12)}"
    secret("password", wrong_password)
    wrong_times, unknown_times, wrong_bodies, unknown_bodies = [], [], [], []
    for i in range(2):
        t0 = time.monotonic()
        r = call("POST", "/v1/auth/login", "login wrong password",
                 {"email": email, "password": wrong_password})
        wrong_times.append(time.monotonic() - t0)
        expect_error(f"login with a wrong password is 401 invalid_credentials (#{i + 1})",
                     r, 401, "invalid_credentials")
        wrong_bodies.append(r.content)
        unknown_password = f"pw-{secrets.token_urlsafe(12)}"
        secret("password", unknown_password)
        t0 = time.monotonic()
        r = call("POST", "/v1/auth/login", "login unknown email",
                 {"email": f"e2e-nobody-{i}-{RUN}@example.com", "password": unknown_password})
        unknown_times.append(time.monotonic() - t0)
        expect_error(f"login with an unknown email is 401 invalid_credentials (#{i + 1})",
                     r, 401, "invalid_credentials")
        unknown_bodies.append(r.content)
    check(
        "unknown email and wrong password answer byte-identical bodies",
        len(set(wrong_bodies + unknown_bodies)) == 1,
        "\n".join(b.decode("utf-8", "replace") for b in wrong_bodies + unknown_bodies),
    )
    timing = (f"wrong password {min(wrong_times) * 1000:.0f} ms, "
              f"unknown email {min(unknown_times) * 1000:.0f} ms")
    check(
        f"unknown email takes similar time to a wrong password ({timing})",
        min(unknown_times) >= 0.25 * min(wrong_times),
        f"wrong password: {[round(x * 1000) for x in wrong_times]} ms, "
        f"unknown email: {[round(x * 1000) for x in unknown_times]} ms",
    )

    # --- refresh rotation and reuse detection ---
    token_a = login["refresh_token"]
    r = call("POST", "/v1/auth/refresh", "refresh A", {"refresh_token": token_a})
    pair_b = check_token_response("refresh A answers 200 with a token response", r, 200)
    secret("refresh token", pair_b["refresh_token"], r)
    token_b = pair_b["refresh_token"]
    check("refresh returns a NEW refresh token (B != A)", token_b != token_a)
    try:
        verify(pair_b["access_token"])
        error = ""
    except jwt.PyJWTError as e:
        error = repr(e)
    check("PyJWT verifies the refreshed access token", not error, error)
    r = call("POST", "/v1/auth/refresh", "refresh B", {"refresh_token": token_b})
    pair_c = check_token_response("refresh B answers 200 with a token response", r, 200)
    secret("refresh token", pair_c["refresh_token"], r)
    token_c = pair_c["refresh_token"]
    check("C differs from A and B", token_c not in (token_a, token_b))
    r = call("POST", "/v1/auth/refresh", "refresh A reused", {"refresh_token": token_a})
    expect_error("presenting spent A again is 401 invalid_token", r, 401, "invalid_token")
    r = call("POST", "/v1/auth/refresh", "refresh C after reuse", {"refresh_token": token_c})
    expect_error("after the reuse, C is dead too (family revoked): 401 invalid_token",
                 r, 401, "invalid_token")
    r = call("POST", "/v1/auth/refresh", "refresh garbage",
             {"refresh_token": "tgr_" + b64u(secrets.token_bytes(32))})
    expect_error("an unknown refresh token is 401 invalid_token", r, 401, "invalid_token")

    r = call("POST", "/v1/auth/refresh", "refresh register family",
             {"refresh_token": reg["refresh_token"]})
    other = check_token_response(
        "the register's family (another login) is unaffected: its refresh token still works", r, 200)
    secret("refresh token", other["refresh_token"], r)
    r = call("POST", "/v1/auth/logout", "logout", {"refresh_token": other["refresh_token"]})
    check("logout answers 204", r.status_code == 204, describe(r))
    r = call("POST", "/v1/auth/refresh", "refresh after logout",
             {"refresh_token": other["refresh_token"]})
    expect_error("a logged-out refresh token is 401 invalid_token", r, 401, "invalid_token")

    # --- API keys ---
    r = call("POST", "/v1/api-keys", "create api key", {"name": f"e2e {RUN}"}, headers=bearer(access))
    created = body_json(r)
    check(
        "POST /v1/api-keys is 201 with id, name, prefix, key, created_at, expires_at",
        r.status_code == 201 and isinstance(created, dict)
        and all(f in created for f in ("id", "name", "prefix", "key", "created_at", "expires_at")),
        describe(r),
    )
    api_key = created["key"]
    secret("API key", api_key, r)
    check("the key starts with tgk_", isinstance(api_key, str) and api_key.startswith("tgk_"), short(api_key))
    check(
        "the prefix is a proper start of the key",
        isinstance(created["prefix"], str) and api_key.startswith(created["prefix"])
        and len(created["prefix"]) < len(api_key) - 16,
        f"prefix {created['prefix']!r}",
    )
    r = call("GET", "/v1/api-keys", "list api keys", headers=bearer(access))
    listing = body_json(r)
    items = listing.get("items") if isinstance(listing, dict) else None
    mine = [i for i in items or [] if i.get("id") == created["id"]]
    check("GET /v1/api-keys is 200 and lists the key", r.status_code == 200 and len(mine) == 1,
          describe(r))
    item = mine[0]
    check(
        "the listing shows the prefix and no key material",
        item.get("prefix") == created["prefix"] and "key" not in item
        and not any("hash" in f for f in item)
        and set(item) >= {"id", "name", "prefix", "created_at", "last_used_at", "expires_at",
                          "revoked_at"},
        json.dumps(item),
    )
    r = call("GET", "/v1/me", "me api key", headers={"X-API-Key": api_key})
    me = body_json(r)
    check("X-API-Key works at /v1/me", r.status_code == 200 and isinstance(me, dict)
          and me.get("id") == user["id"], describe(r))
    r = call("GET", "/v1/me", "me bad api key",
             headers={"X-API-Key": "tgk_" + secrets.token_hex(20)})
    expect_error("a malformed API key is 401 unauthorized", r, 401, "unauthorized")
    r = call("GET", "/v1/me", "me unknown api key", headers={"X-API-Key": well_formed_key()})
    expect_error("an unknown, well-formed API key is 401 unauthorized", r, 401, "unauthorized")

    # Another user sees none of it and cannot delete it.
    email2 = f"e2e-other-{RUN}@example.com"
    password2 = f"pw-{secrets.token_urlsafe(18)}"
    secret("password", password2)
    r = call("POST", "/v1/auth/register", "register user 2", {"email": email2, "password": password2})
    reg2 = check_token_response("a second user registers", r, 201)
    secret("refresh token", reg2["refresh_token"], r)
    secret("password hash", password_hash_of(email2))
    r = call("GET", "/v1/api-keys", "list api keys user 2", headers=bearer(reg2["access_token"]))
    listing2 = body_json(r)
    check("the other user's key listing does not show it",
          r.status_code == 200 and all(i.get("id") != created["id"]
                                       for i in (listing2 or {}).get("items", [])),
          describe(r))
    r = call("DELETE", f"/v1/api-keys/{created['id']}", "delete api key user 2",
             headers=bearer(reg2["access_token"]))
    expect_error("the other user deleting it gets 404 not_found", r, 404, "not_found")

    r = call("DELETE", f"/v1/api-keys/{created['id']}", "delete api key", headers=bearer(access))
    check("DELETE /v1/api-keys/{id} is 204", r.status_code == 204, describe(r))
    deadline = time.monotonic() + 1.0
    while True:
        r = call("GET", "/v1/me", "me deleted api key", headers={"X-API-Key": api_key})
        if r.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    expect_error("the deleted key is 401 unauthorized (within 1 s)", r, 401, "unauthorized")

    # --- the secret search ---
    time.sleep(0.5)  # let the control plane flush its last log lines and Redis writes
    check("secrets tracked: passwords, hashes, refresh tokens and an API key",
          {k for k, _, _ in SECRETS} == {"password", "password hash", "refresh token", "API key"}
          and len(SECRETS) >= 12, repr([(k, short(v)) for k, v, _ in SECRETS]))

    # Responses: a secret only in the one response that legitimately returned it.
    problems = []
    for index, label, status, header_text, body in RESPONSES:
        for kind, value in leaks_in(body + b"\n" + header_text.encode()):
            allowed = next(a for k, v, a in SECRETS if v == value)
            if index not in allowed:
                problems.append(f"response #{index} ({label}, {status}) contains a {kind} {short(value)}")
    for kind, value, allowed in SECRETS:
        for index in allowed:
            if value.encode() not in RESPONSES[index][4]:
                problems.append(f"tracking error: response #{index} should contain {kind} {short(value)}")
    check(f"no response ({len(RESPONSES)} of them) contains a secret except the one that issued it",
          not problems, "\n".join(problems))

    # Logs: every file in the stack's logs folder.
    problems, files = [], 0
    for root, _dirs, names in os.walk(LOGS_DIR):
        for name in names:
            path = os.path.join(root, name)
            files += 1
            with open(path, "rb") as f:
                data = f.read()
            for number, line in enumerate(data.split(b"\n"), 1):
                for kind, value in leaks_in(line):
                    problems.append(f"{path}:{number}: a {kind} {short(value)}")
    check(f"logs exist ({files} files in {LOGS_DIR})",
          files > 0 and os.path.exists(os.path.join(LOGS_DIR, "control-plane.log")),
          repr(os.listdir(LOGS_DIR) if os.path.isdir(LOGS_DIR) else None))
    check("no log line contains a password, password hash, API key or refresh token",
          not problems, "\n".join(problems[:20]))

    # Redis: every key under the prefix, its name and every value, by type.
    keys = [k for k in redis_cli("--scan", "--pattern", f"{PREFIX}:*").split(b"\n") if k]
    problems, types = [], {}
    for key in keys:
        name = key.decode()
        kind = redis_cli("TYPE", name).strip().decode()
        types[kind] = types.get(kind, 0) + 1
        if kind == "string":
            data = redis_cli("GET", name)
        elif kind == "hash":
            data = redis_cli("HGETALL", name)
        elif kind == "set":
            data = redis_cli("SMEMBERS", name)
        elif kind == "zset":
            data = redis_cli("ZRANGE", name, "0", "-1", "WITHSCORES")
        elif kind == "list":
            data = redis_cli("LRANGE", name, "0", "-1")
        elif kind == "stream":
            data = redis_cli("XRANGE", name, "-", "+")
        elif kind == "none":  # expired meanwhile
            continue
        else:
            problems.append(f"{name}: unexpected type {kind}")
            continue
        for secret_kind, value in leaks_in(key + b"\n" + data):
            problems.append(f"{name} ({kind}) contains a {secret_kind} {short(value)}")
    check(f"Redis keys under {PREFIX}: exist ({len(keys)} keys: {types})", len(keys) > 0)
    check("no Redis key or value contains a password, password hash, API key or refresh token",
          not problems, "\n".join(problems[:20]))

    # Redis pub/sub: everything published under the prefix during the run.
    subscriber.terminate()
    try:
        published, _ = subscriber.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        subscriber.kill()
        published, _ = subscriber.communicate()
    published = published or b""
    check(f"the run's cache events were captured on {PREFIX}:* "
          f"({published.count(b'pmessage')} messages)", b"pmessage" in published,
          published[:500].decode("utf-8", "replace"))
    found = leaks_in(published)
    check("no message published under the prefix contains a secret",
          not found, "\n".join(f"a {k} {short(v)}" for k, v in found))

    # PostgreSQL: no table stores a password, an API key or a refresh token in the clear.
    tables = [t for t in psql(
        "select format('%I.%I', schemaname, tablename) from pg_tables "
        "where schemaname not in ('pg_catalog', 'information_schema') order by 1;\n"
    ).split("\n") if t]
    dump = psql("".join(f"select row_to_json(t)::text from {t} t;\n" for t in tables)).encode()
    found = [(k, v) for k, v in leaks_in(dump) if k != "password hash"]
    check(f"no database table ({len(tables)} of them) holds a password, API key or refresh token "
          "in the clear", not found, "\n".join(f"a {k} {short(v)}" for k, v in found))


if __name__ == "__main__":
    failed = 0
    try:
        main()
    except CheckFailed:
        failed = 1
    except Exception as e:  # a crash of the checker is a failure too, with its reason
        import traceback

        traceback.print_exc()
        print(f"not ok - the checker crashed: {e!r}")
        failed = 1
    print(f"identity: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
