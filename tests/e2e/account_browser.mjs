// The account page in headless Chromium, at a desktop and a phone width: sign in with the
// keyboard, see the quota fall after a metered call, create an API key (copied, then used),
// revoke it (and see it refused), see orders, and — once the calls' minute has closed and been
// drained into the usage aggregates — see them in the 30-day chart. Saves a screenshot of each
// width into the screenshot folder (docs/images/ in the repository).
// argv: chromium path, control-plane URL, sidecar URL, simulator URL, screenshot folder.
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [chromiumPath, cp, sidecar, sim, shots] = process.argv.slice(2);
const PASSWORD = "correct horse battery";
const QUOTA = "api_calls_full_process";
let passed = 0;
function check(name, ok, detail = "") {
  if (!ok) {
    console.log(`not ok - ${name} ${detail}`);
    console.log(`account-browser: ${passed} passed, 1 failed`);
    process.exit(1);
  }
  passed += 1;
  console.log(`ok - ${name}`);
}

async function json(method, url, { token, key, body, headers = {} } = {}) {
  const h = Object.assign({ "content-type": "application/json" }, headers);
  if (token) h.authorization = "Bearer " + token;
  if (key) h["x-api-key"] = key;
  const response = await fetch(url, { method, headers: h, body: body ? JSON.stringify(body) : undefined });
  const text = await response.text();
  return { status: response.status, headers: response.headers, body: text ? JSON.parse(text) : null };
}

async function metered(cred) {
  return json("POST", `${sidecar}/process/patient1/2026-11-25`, cred);
}

// Waits for the quota bar of QUOTA to read `want` (after pressing Refresh).
async function usedReads(page, want) {
  await page.click("#refresh");
  await page.waitForFunction(([type, text]) => {
    const el = document.querySelector(`.quota[data-type=${type}] .used`);
    return el && el.textContent === text;
  }, [QUOTA, want], { timeout: 10000 });
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const runs = [];
try {
  for (const [name, viewport, mobile] of [
    ["desktop", { width: 1280, height: 900 }, false],
    ["phone", { width: 390, height: 844 }, true],
  ]) {
    const context = await browser.newContext({
      viewport, isMobile: mobile, hasTouch: mobile, locale: "en-GB", timezoneId: "Asia/Shanghai",
    });
    await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: cp });
    const page = await context.newPage();
    const foreign = [];
    page.on("request", (r) => { if (!r.url().startsWith(cp)) foreign.push(r.url()); });
    const email = `account-${name}-${Date.now()}@example.com`;
    const registered = await json("POST", `${cp}/v1/auth/register`, { body: { email, password: PASSWORD } });
    check(`${name}: registered`, registered.status === 201, String(registered.status));

    // Sign in with the keyboard only.
    await page.goto(`${cp}/account`);
    await page.focus("#email");
    await page.keyboard.type(email);
    await page.keyboard.press("Tab");
    await page.keyboard.type(PASSWORD);
    await page.keyboard.press("Enter");
    await page.waitForSelector("#account:not(.hidden)", { timeout: 10000 });
    await page.waitForSelector(`.quota[data-type=${QUOTA}]`, { timeout: 10000 });
    check(`${name}: signed in`, (await page.textContent("#who")) === email);
    check(`${name}: the plan is Free`, (await page.textContent("#plan-name")) === "Free");
    check(`${name}: the upgrade button leads to the checkout`, (await page.getAttribute("#upgrade", "href")) === "/checkout");
    const bars = await page.locator(".quota [role=progressbar]").count();
    check(`${name}: one bar per quota`, bars >= 4, String(bars));
    await usedReads(page, "0 / 50");
    const resets = await page.textContent(`.quota[data-type=${QUOTA}] .muted`);
    check(`${name}: the reset time is shown`, /Resets /.test(resets), resets);

    // A metered call through the sidecar: the quota falls.
    const token = await page.evaluate(() => sessionStorage.getItem("tollgate_token"));
    const call = await metered({ token });
    check(`${name}: a metered call passes`, call.status === 200 && call.headers.get("x-quota-remaining") === "49",
      `${call.status} ${call.headers.get("x-quota-remaining")}`);
    await usedReads(page, "1 / 50");
    check(`${name}: the page shows the quota fell`,
      (await page.textContent(`.quota[data-type=${QUOTA}] .remaining`)) === "49 left");

    // Create a key with the keyboard; it is shown once and copied.
    await page.focus("#key-name");
    await page.keyboard.type(`${name} server`);
    await page.keyboard.press("Enter");
    await page.waitForSelector("#new-key:not(.hidden)", { timeout: 10000 });
    const key = await page.inputValue("#new-key-value");
    check(`${name}: the new key is shown`, /^tgk_/.test(key), key.slice(0, 8));
    await page.keyboard.press("Enter"); // focus is on Copy
    await page.waitForFunction(() => document.getElementById("copy-status").textContent === "Copied.", null, { timeout: 5000 });
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    check(`${name}: the copy button copies the key`, copied === key);
    await page.waitForSelector("#keys tr[data-status=active]", { timeout: 10000 });
    const listed = await page.locator("#keys tr[data-status=active]").count();
    check(`${name}: the key is listed, without its secret`, listed === 1 && !(await page.textContent("#keys")).includes(key));
    const byKey = await metered({ key });
    check(`${name}: the new key works at the sidecar`, byKey.status === 200, String(byKey.status));
    await usedReads(page, "2 / 50");

    // Revoke it: two presses; then the sidecar refuses it within a second.
    await page.click("#keys tr[data-status=active] .revoke");
    await page.click("#keys tr[data-status=active] .revoke");
    await page.waitForSelector("#keys tr[data-status=revoked]", { timeout: 10000 });
    check(`${name}: the key shows as revoked`, (await page.locator("#keys tr[data-status=active]").count()) === 0);
    let refused = 0;
    const deadline = Date.now() + 3000;
    while (Date.now() < deadline) {
      refused = (await metered({ key })).status;
      if (refused === 401) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    check(`${name}: the revoked key is refused`, refused === 401, String(refused));

    // Orders: the desktop user buys Pro (paid at the simulator); the phone user leaves one pending.
    const channel = name === "desktop" ? "wechat_native" : "alipay_wap";
    const order = await json("POST", `${cp}/v1/orders`, {
      token, body: { plan_id: "pro", channel }, headers: { "idempotency-key": `account-${name}` },
    });
    check(`${name}: an order was created`, order.status === 201, String(order.status));
    if (name === "desktop") {
      const paid = await json("POST", `${sim}/sim/pay`, { body: { out_trade_no: order.body.id } });
      check(`${name}: paid at the simulator`, paid.status < 300, String(paid.status));
      for (let i = 0; i < 100 && (await json("GET", `${cp}/v1/orders/${order.body.id}`, { token })).body.status !== "paid"; i++) {
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    await page.click("#refresh");
    const want = name === "desktop" ? "paid" : "pending";
    await page.waitForSelector(`#orders tr[data-order="${order.body.id}"][data-status=${want}]`, { timeout: 10000 });
    check(`${name}: the order is listed as ${want}`, true);
    if (name === "desktop") {
      await page.waitForFunction(() => document.getElementById("plan-name").textContent === "Pro", null, { timeout: 10000 });
      check(`${name}: the plan is Pro with its expiry`, /Paid until/.test(await page.textContent("#plan-expiry")));
    }
    check(`${name}: no third-party requests`, foreign.length === 0, foreign.join(" "));
    runs.push({ name, page, token, viewport });
  }

  // The calls reach /v1/usage once their minute has closed and been drained (the stack runs
  // with TOLLGATE_USAGE_CLOSE_GRACE=0s): up to about 70 seconds.
  const started = Date.now();
  for (const run of runs) {
    let calls = 0;
    while (Date.now() - started < 150000) {
      const usage = await json("GET", `${cp}/v1/usage?granularity=day&app=idoctor`, { token: run.token });
      calls = (usage.body.items || []).filter((i) => i.type === QUOTA).reduce((a, i) => a + i.calls, 0);
      if (calls >= 2) break;
      await new Promise((r) => setTimeout(r, 2000));
    }
    check(`${run.name}: the calls reached the daily usage`, calls === 2, `${calls} after ${Math.round((Date.now() - started) / 1000)} s`);
  }
  for (const { name, page, viewport } of runs) {
    await page.click("#refresh");
    await page.waitForFunction((type) => {
      const chart = document.querySelector(`.chart[data-type=${type}]`);
      return chart && Number(chart.dataset.total) >= 2;
    }, QUOTA, { timeout: 10000 });
    const today = await page.getAttribute(`.chart[data-type=${QUOTA}] rect.bar.today`, "data-amount");
    const height = Number(await page.getAttribute(`.chart[data-type=${QUOTA}] rect.bar.today`, "height"));
    check(`${name}: the chart shows today's calls`, today === "2" && height > 0, `${today} ${height}`);
    const barsDrawn = await page.locator(`.chart[data-type=${QUOTA}] rect.bar`).count();
    check(`${name}: the chart has 30 days`, barsDrawn === 30, String(barsDrawn));
    const overflow = await page.evaluate((width) => document.documentElement.scrollWidth > width + 1, viewport.width);
    check(`${name}: nothing overflows the screen width`, !overflow);
    await page.screenshot({ path: `${shots}/account-${name}.png`, fullPage: true });
  }
} finally {
  await browser.close();
}
console.log(`account-browser: ${passed} passed, 0 failed`);
