//! The simulator's key material, read once at start-up from `PAYSIM_KEYS_DIR` (made by
//! `paysim/gen-keys.sh`). The simulator holds the gateways' private keys and only the merchant's
//! PUBLIC keys: it can verify what a merchant signs, never sign as one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rsa::pkcs1v15::{SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;
use tollgate_common::config::Problems;

pub const ALIPAY_APP_PUBLIC: &str = "alipay_app_public.pem";
pub const ALIPAY_GATEWAY_PRIVATE: &str = "alipay_gateway_private.pem";
pub const ALIPAY_GATEWAY_PUBLIC: &str = "alipay_gateway_public.pem";
pub const WECHAT_MERCHANT_PUBLIC: &str = "wechat_merchant_public.pem";
pub const WECHAT_PLATFORM_PRIVATE: &str = "wechat_platform_private.pem";
pub const WECHAT_PLATFORM_PUBLIC: &str = "wechat_platform_public.pem";
pub const WECHAT_APIV3_KEY: &str = "wechat_apiv3_key";
pub const IDS: &str = "ids.env";

/// The merchant's private keys live in the same folder for whoever plays the merchant; the
/// simulator never opens them.
pub const MERCHANT_ONLY: [&str; 2] = ["alipay_app_private.pem", "wechat_merchant_private.pem"];

const ID_NAMES: [&str; 6] = [
    "ALIPAY_APP_ID",
    "ALIPAY_SELLER_ID",
    "WECHAT_MCHID",
    "WECHAT_APPID",
    "WECHAT_MERCHANT_SERIAL",
    "WECHAT_PLATFORM_SERIAL",
];

#[derive(Clone)]
pub struct Keys {
    pub alipay: AlipayKeys,
    pub wechat: WechatKeys,
}

#[derive(Clone)]
pub struct AlipayKeys {
    pub app_id: String,
    pub seller_id: String,
    /// Verifies every request a merchant signs.
    pub app_public: VerifyingKey<Sha256>,
    /// Signs sync responses, notifications and return redirects.
    pub gateway: SigningKey<Sha256>,
    pub app_public_pem: String,
    pub gateway_private_pem: String,
    pub gateway_public_pem: String,
}

#[derive(Clone)]
pub struct WechatKeys {
    pub mchid: String,
    pub appid: String,
    /// The serial the merchant names in `Authorization: … serial_no="…"`.
    pub merchant_serial: String,
    pub merchant_public: VerifyingKey<Sha256>,
    /// Sent as `Wechatpay-Serial`; `PUB_KEY_ID_…` for WeChat Pay's public-key mode.
    pub platform_serial: String,
    pub platform: SigningKey<Sha256>,
    pub apiv3_key: String,
    pub merchant_public_pem: String,
    pub platform_private_pem: String,
    pub platform_public_pem: String,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("alipay_app_id", &self.alipay.app_id)
            .field("wechat_mchid", &self.wechat.mchid)
            .field("private keys", &"[redacted]")
            .finish()
    }
}

impl Keys {
    /// Reads every file, reporting each missing or broken one under `setting` (the variable that
    /// named the folder), so that one run of the simulator lists all that is wrong.
    pub fn load(dir: &Path, setting: &str, problems: &mut Problems) -> Option<Keys> {
        let hint = format!("create them with paysim/gen-keys.sh {}", dir.display());
        let mut missing = Vec::new();
        let mut read = |name: &str| -> Option<String> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    missing.push(name.to_owned());
                    None
                }
                Err(e) => {
                    problems.push(
                        setting,
                        format_args!("{}: cannot read: {e}", dir.join(name).display()),
                    );
                    None
                }
            }
        };
        let app_public_pem = read(ALIPAY_APP_PUBLIC);
        let gateway_private_pem = read(ALIPAY_GATEWAY_PRIVATE);
        let gateway_public_pem = read(ALIPAY_GATEWAY_PUBLIC);
        let merchant_public_pem = read(WECHAT_MERCHANT_PUBLIC);
        let platform_private_pem = read(WECHAT_PLATFORM_PRIVATE);
        let platform_public_pem = read(WECHAT_PLATFORM_PUBLIC);
        let apiv3 = read(WECHAT_APIV3_KEY);
        let ids = read(IDS);
        if !missing.is_empty() {
            problems.push(
                setting,
                format_args!("{}: missing {} ({hint})", dir.display(), missing.join(", ")),
            );
        }

        let mut public = |name: &str, text: &Option<String>| -> Option<RsaPublicKey> {
            RsaPublicKey::from_public_key_pem(text.as_deref()?.trim())
                .map_err(|e| {
                    problems.push(
                        setting,
                        format_args!(
                            "{name}: not an RSA public key in PEM (SubjectPublicKeyInfo): {e}"
                        ),
                    )
                })
                .ok()
        };
        let app_public = public(ALIPAY_APP_PUBLIC, &app_public_pem);
        let gateway_public = public(ALIPAY_GATEWAY_PUBLIC, &gateway_public_pem);
        let merchant_public = public(WECHAT_MERCHANT_PUBLIC, &merchant_public_pem);
        let platform_public = public(WECHAT_PLATFORM_PUBLIC, &platform_public_pem);
        let mut private = |name: &str, text: &Option<String>| -> Option<RsaPrivateKey> {
            RsaPrivateKey::from_pkcs8_pem(text.as_deref()?.trim())
                .map_err(|e| {
                    problems.push(
                        setting,
                        format_args!("{name}: not an RSA private key in PEM (PKCS#8): {e}"),
                    )
                })
                .ok()
        };
        let gateway_private = private(ALIPAY_GATEWAY_PRIVATE, &gateway_private_pem);
        let platform_private = private(WECHAT_PLATFORM_PRIVATE, &platform_private_pem);
        for (private_name, private_key, public_name, public_key) in [
            (
                ALIPAY_GATEWAY_PRIVATE,
                &gateway_private,
                ALIPAY_GATEWAY_PUBLIC,
                &gateway_public,
            ),
            (
                WECHAT_PLATFORM_PRIVATE,
                &platform_private,
                WECHAT_PLATFORM_PUBLIC,
                &platform_public,
            ),
        ] {
            if let (Some(private_key), Some(public_key)) = (private_key, public_key)
                && private_key.to_public_key() != *public_key
            {
                problems.push(
                    setting,
                    format_args!("{public_name} is not the public half of {private_name}"),
                );
            }
        }

        let apiv3_key = apiv3.and_then(|text| {
            // A trailing newline from an editor or `echo` is not part of the key.
            let key = text.trim_end_matches(['\n', '\r']).to_owned();
            if key.len() == 32 && key.bytes().all(|b| b.is_ascii_graphic()) {
                Some(key)
            } else {
                problems.push(
                    setting,
                    format_args!("{WECHAT_APIV3_KEY}: the APIv3 key must be 32 printable ASCII characters, found {} bytes", key.len()),
                );
                None
            }
        });

        let ids = ids.map(|text| parse_env_file(&text)).unwrap_or_default();
        let mut id = |name: &str| -> Option<String> {
            match ids.get(name) {
                Some(value) if !value.is_empty() => Some(value.clone()),
                _ => {
                    if missing.iter().all(|m| m != IDS) {
                        problems.push(setting, format_args!("{IDS}: {name} is missing or empty"));
                    }
                    None
                }
            }
        };
        let [
            app_id,
            seller_id,
            mchid,
            appid,
            merchant_serial,
            platform_serial,
        ] = ID_NAMES.map(&mut id);

        Some(Keys {
            alipay: AlipayKeys {
                app_id: app_id?,
                seller_id: seller_id?,
                app_public: VerifyingKey::new(app_public?),
                gateway: SigningKey::new(gateway_private?),
                app_public_pem: app_public_pem?,
                gateway_private_pem: gateway_private_pem?,
                gateway_public_pem: gateway_public_pem?,
            },
            wechat: WechatKeys {
                mchid: mchid?,
                appid: appid?,
                merchant_serial: merchant_serial?,
                merchant_public: VerifyingKey::new(merchant_public?),
                platform_serial: platform_serial?,
                platform: SigningKey::new(platform_private?),
                apiv3_key: apiv3_key?,
                merchant_public_pem: merchant_public_pem?,
                platform_private_pem: platform_private_pem?,
                platform_public_pem: platform_public_pem?,
            },
        })
    }
}

/// `KEY=VALUE` lines as a shell would source them: blank lines and `#` comments skipped, an
/// optional `export `, and one level of quotes around the value.
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

/// Keys for unit tests, every role played by wechatpay-go's published test key (no key
/// generation in unit tests; the integration tests use gen-keys.sh).
#[cfg(test)]
pub(crate) fn test_keys() -> Keys {
    use crate::crypto::tests::{WECHATPAY_GO_TEST_KEY, wechatpay_go_key};
    use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
    let private = wechatpay_go_key();
    let public = private.to_public_key();
    let public_pem = public.to_public_key_pem(LineEnding::LF).expect("PEM");
    Keys {
        alipay: AlipayKeys {
            app_id: "2021000000000001".to_owned(),
            seller_id: "2088000000000001".to_owned(),
            app_public: VerifyingKey::new(public.clone()),
            gateway: SigningKey::new(private.clone()),
            app_public_pem: public_pem.clone(),
            gateway_private_pem: WECHATPAY_GO_TEST_KEY.to_owned(),
            gateway_public_pem: public_pem.clone(),
        },
        wechat: WechatKeys {
            mchid: "1900000001".to_owned(),
            appid: "wx0000000000000001".to_owned(),
            merchant_serial: "F5765756002FDD77".to_owned(),
            merchant_public: VerifyingKey::new(public),
            platform_serial: "PUB_KEY_ID_0000000000000000000000000000000001".to_owned(),
            platform: SigningKey::new(private),
            apiv3_key: "0123456789abcdef0123456789abcdef".to_owned(),
            merchant_public_pem: public_pem.clone(),
            platform_private_pem: WECHATPAY_GO_TEST_KEY.to_owned(),
            platform_public_pem: public_pem,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines() {
        let parsed = parse_env_file(
            "# ids\nALIPAY_APP_ID=2021000000000001\nexport WECHAT_MCHID=\"1900000001\"\n\n X='y z' \n",
        );
        assert_eq!(
            parsed.get("ALIPAY_APP_ID").map(String::as_str),
            Some("2021000000000001")
        );
        assert_eq!(
            parsed.get("WECHAT_MCHID").map(String::as_str),
            Some("1900000001")
        );
        assert_eq!(parsed.get("X").map(String::as_str), Some("y z"));
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn an_empty_folder_is_one_clear_problem() {
        let dir = std::env::temp_dir().join(format!("paysim-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut problems = Problems::default();
        assert!(Keys::load(&dir, "PAYSIM_KEYS_DIR", &mut problems).is_none());
        let lines = problems.finish(()).unwrap_err().0;
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(lines.len(), 1, "{lines:?}");
        for name in [
            ALIPAY_APP_PUBLIC,
            ALIPAY_GATEWAY_PRIVATE,
            WECHAT_APIV3_KEY,
            IDS,
        ] {
            assert!(lines[0].contains(name), "{}", lines[0]);
        }
        assert!(lines[0].contains("gen-keys.sh"), "{}", lines[0]);
        for name in MERCHANT_ONLY {
            assert!(
                !lines[0].contains(name),
                "the merchant's private keys are not needed: {}",
                lines[0]
            );
        }
    }
}
