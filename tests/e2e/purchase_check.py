"""The purchase, end to end, for each channel: register, order pro, pay at the simulator as the
buyer would (opening the Alipay pay URL first, exactly as a browser does), watch the order turn
paid, see pro in /v1/quota, and have the sidecar admit calls the free plan would refuse.

argv: control-plane URL, sidecar URL, simulator URL."""

import sys
import time
import uuid

import requests

CP, SIDECAR, SIM = sys.argv[1:4]
passed = 0


def check(name, ok, detail=""):
    global passed
    if not ok:
        print(f"not ok - {name} {detail}")
        print(f"purchase: {passed} passed, 1 failed")
        sys.exit(1)
    passed += 1
    print(f"ok - {name}")


def wait_for(what, fn, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    check(what, False, "(timed out)")


for channel in ["alipay_page", "alipay_wap", "wechat_native"]:
    email = f"buyer-{channel}-{uuid.uuid4().hex[:8]}@example.com"
    r = requests.post(f"{CP}/v1/auth/register", json={"email": email, "password": "correct horse battery"})
    check(f"{channel}: register", r.status_code == 201, r.text)
    auth = {"authorization": "Bearer " + r.json()["access_token"]}

    # The free plan: 50 full processes a month. Use them up through the sidecar.
    for i in range(50):
        r = requests.post(f"{SIDECAR}/process/p{i}/2026-11-25", headers=auth)
        if r.status_code != 200:
            check(f"{channel}: free call {i}", False, f"{r.status_code} {r.text}")
    r = requests.post(f"{SIDECAR}/process/p50/2026-11-25", headers=auth)
    check(f"{channel}: the 51st call on free is refused", r.status_code == 402, r.text)

    r = requests.post(f"{CP}/v1/orders", headers={**auth, "idempotency-key": uuid.uuid4().hex},
                      json={"plan_id": "pro", "channel": channel})
    check(f"{channel}: order created", r.status_code == 201, r.text)
    order = r.json()
    check(f"{channel}: priced on the server", order["amount"] == {"amount": 9900, "currency": "CNY"}, str(order))
    if channel.startswith("alipay"):
        # The buyer's browser opens the signed pay URL: the gateway shows its cashier.
        page = requests.get(order["pay_url"])
        check(f"{channel}: the gateway accepts the signed pay URL", page.status_code == 200, page.text[:300])
    else:
        check(f"{channel}: a code_url to show as a QR code", order["code_url"].startswith("weixin://"), str(order))
        qr = requests.get(f"{CP}{order['qr_svg_url']}", headers=auth)
        check(f"{channel}: the QR code is an SVG", qr.status_code == 200 and "<svg" in qr.text)

    r = requests.post(f"{SIM}/sim/pay", json={"out_trade_no": order["id"]})
    check(f"{channel}: the buyer pays at the simulator", r.status_code == 200, r.text)

    def paid():
        o = requests.get(f"{CP}/v1/orders/{order['id']}", headers=auth).json()
        return o if o["status"] == "paid" else None

    o = wait_for(f"{channel}: the order turns paid", paid)
    check(f"{channel}: the order turns paid", o["paid_at"] is not None)
    quota = requests.get(f"{CP}/v1/quota?app=idoctor", headers=auth).json()
    check(f"{channel}: /v1/quota shows pro", quota["plan"]["id"] == "pro", str(quota["plan"]))
    full = next(q for q in quota["quotas"] if q["type"] == "api_calls_full_process")
    check(f"{channel}: pro's limit, used kept", full["limit"] == 2000 and full["used"] == 50, str(full))
    r = requests.post(f"{SIDECAR}/process/p51/2026-11-25", headers=auth)
    check(f"{channel}: the sidecar admits what free refused", r.status_code == 200, r.text)
    check(f"{channel}: quota headers show pro", r.headers.get("x-quota-limit") == "2000", str(dict(r.headers)))

print(f"purchase: {passed} passed, 0 failed")
