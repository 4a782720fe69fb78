#!/usr/bin/env python3
"""The payment simulator against independent implementations of both protocols.

Usage: paysim_interop.py SIM_BASE_URL KEYS_DIR   (run by tests/e2e/40-paysim-interop.sh)

python-alipay-sdk and wechatpayv3 play the merchant with the keys gen-keys.sh made: they sign
the requests (the simulator must accept them, and refuse the same requests signed with another
key), verify the simulator's signed answers (the SDKs raise when a signature does not verify),
and verify the notifications the simulator sends to a small HTTP server here (wechatpayv3 also
decrypts them). Prints one line per check and ends with `paysim-interop: N passed, M failed`.
"""

import http.server
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid

import requests
from alipay import AliPay
from wechatpayv3 import WeChatPay, WeChatPayType

BASE, KEYS_DIR = sys.argv[1], sys.argv[2]
TIMEOUT = 10

passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported and counted
        failed += 1
        print(f"not ok - {name}: {type(e).__name__}: {e}", flush=True)
    else:
        passed += 1
        print(f"ok - {name}", flush=True)


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def read(name):
    with open(os.path.join(KEYS_DIR, name), encoding="utf-8") as f:
        return f.read()


IDS = {}
for line in read("ids.env").splitlines():
    if line and not line.startswith("#") and "=" in line:
        key, value = line.split("=", 1)
        IDS[key] = value


def new_no(prefix):
    return prefix + uuid.uuid4().hex[:24]


# --- the merchant's notification endpoint -----------------------------------------------------


class Inbox:
    def __init__(self):
        self.lock = threading.Lock()
        self.hits = {"alipay": [], "wechat": []}

    def add(self, channel, headers, body):
        with self.lock:
            self.hits[channel].append((headers, body))

    def wait(self, channel, count, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.hits[channel]) >= count:
                    return list(self.hits[channel])
            time.sleep(0.05)
        raise AssertionError(f"{channel}: fewer than {count} notifications after {seconds} s")

    def count(self, channel):
        with self.lock:
            return len(self.hits[channel])


INBOX = Inbox()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path == "/alipay/notify":
            INBOX.add("alipay", headers, body)
            answer = b"success"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        elif self.path == "/wechat/notify":
            INBOX.add("wechat", headers, body)
            self.send_response(204)
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
RECEIVER = f"http://127.0.0.1:{server.server_address[1]}"

SESSION = requests.Session()
SESSION.trust_env = False  # no proxies for this machine
SIM_KEYS = SESSION.get(f"{BASE}/sim/keys", timeout=TIMEOUT).json()


def sim_pay(out_trade_no):
    r = SESSION.post(f"{BASE}/sim/pay", json={"out_trade_no": out_trade_no}, timeout=TIMEOUT)
    expect(r.status_code == 200, f"/sim/pay answered {r.status_code} {r.text}")
    return r.json()


# --- Alipay: python-alipay-sdk as the merchant ------------------------------------------------

GATEWAY = f"{BASE}/alipay/gateway.do"


def alipay_client(private_key_file="alipay_app_private.pem"):
    client = AliPay(
        appid=IDS["ALIPAY_APP_ID"],
        app_notify_url=f"{RECEIVER}/alipay/notify",
        app_private_key_string=read(private_key_file),
        # What the SDK verifies the gateway's answers with: the simulator's published key.
        alipay_public_key_string=SIM_KEYS["alipay"]["gateway_public_key"],
        sign_type="RSA2",
    )
    client._gateway = GATEWAY  # the SDK has no option for a gateway URL besides its sandbox
    return client


ALIPAY = alipay_client()
PAID_ALIPAY = new_no("ali")
state = {}


def alipay_page_pay():
    order_string = ALIPAY.api_alipay_trade_page_pay(
        subject="Tollgate Pro 专业版",
        out_trade_no=PAID_ALIPAY,
        total_amount="99.00",
        return_url="http://127.0.0.1:9/return",
    )
    r = SESSION.get(f"{GATEWAY}?{order_string}", timeout=TIMEOUT)
    expect(r.status_code == 200, f"{r.status_code}: {r.text[:300]}")
    expect(PAID_ALIPAY in r.text and "99.00" in r.text, "the cashier shows the order and amount")


def alipay_wap_pay():
    no = new_no("wap")
    order_string = ALIPAY.api_alipay_trade_wap_pay(subject="H5", out_trade_no=no, total_amount=12.5)
    r = SESSION.get(f"{GATEWAY}?{order_string}", timeout=TIMEOUT)
    expect(r.status_code == 200 and no in r.text and "12.50" in r.text, f"{r.status_code}: {r.text[:300]}")


def alipay_query_waiting():
    result = ALIPAY.api_alipay_trade_query(out_trade_no=PAID_ALIPAY)
    expect(result.get("code") == "10000", result)
    expect(result.get("trade_status") == "WAIT_BUYER_PAY", result)
    expect(result.get("total_amount") == "99.00", result)


def alipay_other_key_refused():
    forger = alipay_client("wechat_merchant_private.pem")
    result = forger.api_alipay_trade_query(out_trade_no=PAID_ALIPAY)
    expect(result.get("code") == "40002" and result.get("sub_code") == "isv.invalid-signature", result)
    # The refusal echoes the string the gateway checked, slashes and all ("\/" in the JSON):
    # the SDK's check of the answer's signature is over the raw bytes.
    result = forger.api_alipay_trade_refund(refund_amount="1.00", out_trade_no=PAID_ALIPAY, refund_reason="key / 密钥")
    expect(result.get("sub_code") == "isv.invalid-signature" and '"refund_reason":"key / ' in result.get("sub_msg", ""), result)
    order_string = forger.api_alipay_trade_page_pay(subject="x", out_trade_no=new_no("ali"), total_amount="1.00")
    r = SESSION.get(f"{GATEWAY}?{order_string}", timeout=TIMEOUT)
    expect(r.status_code == 400 and "isv.invalid-signature" in r.text, f"{r.status_code}: {r.text[:300]}")


def alipay_notification_verifies():
    before = INBOX.count("alipay")
    paid = sim_pay(PAID_ALIPAY)
    expect(paid == {"out_trade_no": PAID_ALIPAY, "channel": "alipay", "status": "paid"}, paid)
    headers, body = INBOX.wait("alipay", before + 1)[before]
    expect(headers.get("content-type", "").startswith("application/x-www-form-urlencoded"), headers)
    # Decode the form once, as a web framework would.
    data = dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    state["alipay_notification"] = dict(data)
    signature = data.pop("sign")
    expect(ALIPAY.verify(dict(data), signature), "python-alipay-sdk verifies the notification")
    for key, want in [
        ("out_trade_no", PAID_ALIPAY),
        ("trade_status", "TRADE_SUCCESS"),
        ("total_amount", "99.00"),
        ("app_id", IDS["ALIPAY_APP_ID"]),
        ("seller_id", IDS["ALIPAY_SELLER_ID"]),
        ("subject", "Tollgate Pro 专业版"),
    ]:
        expect(data.get(key) == want, f"{key}: {data.get(key)!r} != {want!r}")


def alipay_forged_notification_fails():
    data = dict(state["alipay_notification"])
    signature = data.pop("sign")
    data["total_amount"] = "0.01"
    expect(not ALIPAY.verify(data, signature), "a changed amount must not verify")


def alipay_query_paid():
    result = ALIPAY.api_alipay_trade_query(out_trade_no=PAID_ALIPAY)
    expect(result.get("trade_status") == "TRADE_SUCCESS", result)
    expect(result.get("trade_no") == state["alipay_notification"]["trade_no"], result)
    expect(result.get("fund_bill_list") == [{"amount": "99.00", "fund_channel": "ALIPAYACCOUNT"}], result)


def alipay_refund():
    result = ALIPAY.api_alipay_trade_refund(refund_amount="99.00", out_trade_no=PAID_ALIPAY)
    expect(result.get("code") == "10000" and result.get("fund_change") == "Y", result)
    expect(result.get("refund_fee") == "99.00", result)
    result = ALIPAY.api_alipay_trade_query(out_trade_no=PAID_ALIPAY)
    expect(result.get("trade_status") == "TRADE_CLOSED", result)


def alipay_close():
    no = new_no("ali")
    order_string = ALIPAY.api_alipay_trade_page_pay(subject="close me", out_trade_no=no, total_amount="5.00")
    expect(SESSION.get(f"{GATEWAY}?{order_string}", timeout=TIMEOUT).status_code == 200, "page pay")
    result = ALIPAY.api_alipay_trade_close(out_trade_no=no)
    expect(result.get("code") == "10000", result)
    result = ALIPAY.api_alipay_trade_query(out_trade_no=no)
    expect(result.get("trade_status") == "TRADE_CLOSED", result)


def alipay_unknown_order():
    result = ALIPAY.api_alipay_trade_query(out_trade_no=new_no("none"))
    expect(result.get("code") == "40004" and result.get("sub_code") == "ACQ.TRADE_NOT_EXIST", result)


def alipay_duplicate_delivery():
    before = INBOX.count("alipay")
    r = SESSION.post(f"{BASE}/sim/notify-again", json={"out_trade_no": PAID_ALIPAY, "times": 2}, timeout=30)
    expect(r.status_code == 200 and r.json().get("acknowledged") == 2, r.text)
    hits = INBOX.wait("alipay", before + 2)
    for headers, body in hits[before:]:
        data = dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        expect(data["notify_id"] == state["alipay_notification"]["notify_id"], "the same notification")
        signature = data.pop("sign")
        expect(ALIPAY.verify(data, signature), "each delivery verifies")


# --- WeChat Pay: wechatpayv3 as the merchant ----------------------------------------------------


def wechat_client(private_key_file="wechat_merchant_private.pem"):
    client = WeChatPay(
        wechatpay_type=WeChatPayType.NATIVE,
        mchid=IDS["WECHAT_MCHID"],
        private_key=read(private_key_file),
        cert_serial_no=IDS["WECHAT_MERCHANT_SERIAL"],
        appid=IDS["WECHAT_APPID"],
        apiv3_key=read("wechat_apiv3_key"),
        notify_url=f"{RECEIVER}/wechat/notify",
        # WeChat Pay public-key mode: answers and notifications are verified with this key when
        # Wechatpay-Serial names this id.
        public_key=SIM_KEYS["wechat"]["platform_public_key"],
        public_key_id=IDS["WECHAT_PLATFORM_SERIAL"],
        timeout=(5, 10),
    )
    client._core._gate_way = f"{BASE}/wechat"  # the SDK has no option for the API host
    client._core._proxy = {"http": None, "https": None}
    return client


WECHAT = wechat_client()
PAID_WECHAT = new_no("wx")


def wechat_native():
    code, message = WECHAT.pay(description="Tollgate Pro", out_trade_no=PAID_WECHAT, amount={"total": 9900})
    expect(code == 200, f"{code}: {message}")
    code_url = json.loads(message)["code_url"]
    expect(code_url.startswith("weixin://wxpay/bizpayurl?pr="), code_url)


def wechat_query_notpay():
    code, message = WECHAT.query(out_trade_no=PAID_WECHAT)
    body = json.loads(message)
    expect(code == 200 and body["trade_state"] == "NOTPAY", f"{code}: {message}")
    expect(body["amount"]["total"] == 9900 and body["mchid"] == IDS["WECHAT_MCHID"], message)


def wechat_other_key_refused():
    code, message = wechat_client("alipay_app_private.pem").pay(
        description="forged", out_trade_no=new_no("wx"), amount={"total": 1}
    )
    expect(code == 401 and json.loads(message)["code"] == "SIGN_ERROR", f"{code}: {message}")


def wechat_callback_decrypts():
    before = INBOX.count("wechat")
    paid = sim_pay(PAID_WECHAT)
    expect(paid["channel"] == "wechat", paid)
    headers, body = INBOX.wait("wechat", before + 1)[before]
    state["wechat_callback"] = (headers, body)
    result = WECHAT.callback(headers, body)
    expect(result is not None, "wechatpayv3 verifies the signature and decrypts the resource")
    expect(result["event_type"] == "TRANSACTION.SUCCESS", result)
    resource = result["resource"]
    for key, want in [
        ("out_trade_no", PAID_WECHAT),
        ("trade_state", "SUCCESS"),
        ("trade_type", "NATIVE"),
        ("appid", IDS["WECHAT_APPID"]),
        ("mchid", IDS["WECHAT_MCHID"]),
    ]:
        expect(resource.get(key) == want, f"{key}: {resource.get(key)!r} != {want!r}")
    expect(resource["amount"]["total"] == 9900 and resource["amount"]["payer_total"] == 9900, resource)
    state["transaction_id"] = resource["transaction_id"]


def wechat_tampered_callback_rejected():
    headers, body = state["wechat_callback"]
    tampered = body.replace("支付成功".encode(), "支付失败".encode())
    expect(tampered != body, "the summary is in the body")
    expect(WECHAT.callback(headers, tampered) is None, "a changed body must not verify")
    other = dict(headers)
    other["wechatpay-nonce"] = "x" + other["wechatpay-nonce"][1:]
    expect(WECHAT.callback(other, body) is None, "a changed nonce must not verify")


def wechat_query_success():
    code, message = WECHAT.query(out_trade_no=PAID_WECHAT)
    body = json.loads(message)
    expect(code == 200 and body["trade_state"] == "SUCCESS", f"{code}: {message}")
    expect(body["transaction_id"] == state["transaction_id"], message)
    code, message = WECHAT.query(transaction_id=state["transaction_id"])
    expect(code == 200 and json.loads(message)["out_trade_no"] == PAID_WECHAT, f"{code}: {message}")


def wechat_refund():
    code, message = WECHAT.refund(
        out_refund_no=new_no("rf"),
        amount={"refund": 9900, "total": 9900, "currency": "CNY"},
        out_trade_no=PAID_WECHAT,
    )
    body = json.loads(message)
    expect(code == 200 and body["status"] == "SUCCESS" and body["amount"]["refund"] == 9900, f"{code}: {message}")
    code, message = WECHAT.query(out_trade_no=PAID_WECHAT)
    expect(json.loads(message)["trade_state"] == "REFUND", message)


def wechat_close():
    no = new_no("wx")
    code, message = WECHAT.pay(description="close me", out_trade_no=no, amount={"total": 100})
    expect(code == 200, f"{code}: {message}")
    # 204: the SDK verifies the platform's signature over the empty body.
    code, message = WECHAT.close(out_trade_no=no)
    expect(code == 204, f"{code}: {message}")
    code, message = WECHAT.query(out_trade_no=no)
    expect(json.loads(message)["trade_state"] == "CLOSED", message)


def wechat_unknown_order():
    code, message = WECHAT.query(out_trade_no=new_no("none"))
    expect(code == 404 and json.loads(message)["code"] == "ORDER_NOT_EXIST", f"{code}: {message}")


def wechat_duplicate_delivery():
    before = INBOX.count("wechat")
    r = SESSION.post(f"{BASE}/sim/notify-again", json={"out_trade_no": PAID_WECHAT, "times": 2, "concurrent": True}, timeout=30)
    expect(r.status_code == 200 and r.json().get("acknowledged") == 2, r.text)
    first_id = json.loads(state["wechat_callback"][1])["id"]
    for headers, body in INBOX.wait("wechat", before + 2)[before:]:
        result = WECHAT.callback(headers, body)
        expect(result is not None and result["id"] == first_id, "each delivery verifies and is the same event")


for name, fn in [
    ("alipay: page.pay URL signed by the SDK opens the cashier", alipay_page_pay),
    ("alipay: wap.pay URL signed by the SDK opens the cashier", alipay_wap_pay),
    ("alipay: trade.query, answer verified by the SDK: WAIT_BUYER_PAY", alipay_query_waiting),
    ("alipay: requests signed with another key are refused (isv.invalid-signature)", alipay_other_key_refused),
    ("alipay: the notification verifies with the SDK", alipay_notification_verifies),
    ("alipay: a notification with a changed amount does not verify", alipay_forged_notification_fails),
    ("alipay: trade.query after payment: TRADE_SUCCESS", alipay_query_paid),
    ("alipay: trade.refund in full, then TRADE_CLOSED", alipay_refund),
    ("alipay: trade.close of an unpaid order", alipay_close),
    ("alipay: an unknown order is ACQ.TRADE_NOT_EXIST", alipay_unknown_order),
    ("alipay: re-delivered notifications are the same and verify", alipay_duplicate_delivery),
    ("wechat: native order, answer verified by the SDK", wechat_native),
    ("wechat: query by out_trade_no: NOTPAY", wechat_query_notpay),
    ("wechat: a request signed with another key is 401 SIGN_ERROR", wechat_other_key_refused),
    ("wechat: the callback verifies and decrypts with the SDK", wechat_callback_decrypts),
    ("wechat: a tampered callback is rejected by the SDK", wechat_tampered_callback_rejected),
    ("wechat: query after payment (by out_trade_no and transaction_id): SUCCESS", wechat_query_success),
    ("wechat: refund in full: SUCCESS, then REFUND", wechat_refund),
    ("wechat: close of an unpaid order (204, signed), then CLOSED", wechat_close),
    ("wechat: an unknown order is 404 ORDER_NOT_EXIST", wechat_unknown_order),
    ("wechat: re-delivered callbacks verify and are the same event", wechat_duplicate_delivery),
]:
    check(name, fn)

server.shutdown()
print(f"paysim-interop: {passed} passed, {failed} failed", flush=True)
sys.exit(0 if failed == 0 else 1)
