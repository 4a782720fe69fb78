#!/usr/bin/env bash
# paysim/gen-keys.sh DIR — creates the payment simulator's local test keys in DIR, only those
# missing, so that the simulator and whoever plays the merchant keep agreeing across runs:
#
#   alipay_app_private.pem / alipay_app_public.pem          the merchant's app key pair
#   alipay_gateway_private.pem / alipay_gateway_public.pem  the simulated Alipay's key pair
#   wechat_merchant_private.pem / wechat_merchant_public.pem  the merchant's API key pair
#   wechat_platform_private.pem / wechat_platform_public.pem  the simulated WeChat Pay key pair
#   wechat_apiv3_key                                        32 ASCII characters
#   ids.env                                                 app id, seller id, mchid, appid, serials
#
# RSA 2048, private keys PKCS#8 and public keys SubjectPublicKeyInfo, both PEM. The simulator
# reads only the public halves of the merchant's keys. These are test keys: never commit them,
# never use them anywhere real.
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1
command -v openssl >/dev/null 2>&1 || {
    echo "gen-keys.sh: openssl is needed (Debian: apt-get install openssl)" >&2
    exit 1
}

umask 077
mkdir -p "$DIR"
# Two stacks starting at once must not write half a key pair each.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DIR/.gen-keys.lock"
    flock -w 60 9 || {
        echo "gen-keys.sh: $DIR/.gen-keys.lock is held by another run" >&2
        exit 1
    }
fi

# write NAME: moves "$DIR/.NAME.tmp" into place, so a reader never sees a partial file.
write() {
    mv -f "$DIR/.$1.tmp" "$DIR/$1"
}

pair() {
    local name=$1
    local private="${name}_private.pem" public="${name}_public.pem"
    if [[ ! -s "$DIR/$private" ]]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$DIR/.$private.tmp" 2>/dev/null
        write "$private"
        # A public key left from an older private key would no longer match.
        rm -f "$DIR/$public"
    fi
    if [[ ! -s "$DIR/$public" ]]; then
        openssl pkey -in "$DIR/$private" -pubout -out "$DIR/.$public.tmp"
        chmod 644 "$DIR/.$public.tmp"
        write "$public"
    fi
}

# digits N: N random decimal digits.
digits() {
    local out="" byte
    while ((${#out} < $1)); do
        for byte in $(od -An -N32 -tu1 /dev/urandom); do
            ((byte < 250)) && out+=$((byte % 10))
        done
    done
    printf '%s' "${out:0:$1}"
}

for name in alipay_app alipay_gateway wechat_merchant wechat_platform; do
    pair "$name"
done

if [[ ! -s "$DIR/wechat_apiv3_key" ]]; then
    printf '%s' "$(openssl rand -hex 16)" >"$DIR/.wechat_apiv3_key.tmp"
    write wechat_apiv3_key
fi

if [[ ! -s "$DIR/ids.env" ]]; then
    cat >"$DIR/.ids.env.tmp" <<IDS
# Identifiers of the simulated merchant accounts (paysim/gen-keys.sh).
ALIPAY_APP_ID=2021000000000001
ALIPAY_SELLER_ID=2088000000000001
WECHAT_MCHID=1900000001
WECHAT_APPID=wx0000000000000001
# The merchant API certificate's serial number (what Authorization: ... serial_no= names).
WECHAT_MERCHANT_SERIAL=$(openssl rand -hex 20 | tr 'a-f' 'A-F')
# The platform key's id (Wechatpay-Serial), in WeChat Pay's public-key mode style.
WECHAT_PLATFORM_SERIAL=PUB_KEY_ID_$(digits 34)
IDS
    chmod 644 "$DIR/.ids.env.tmp"
    write ids.env
fi
