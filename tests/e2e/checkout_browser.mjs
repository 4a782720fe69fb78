// Buys `pro` through the checkout page in headless Chromium, once at a desktop width (WeChat Pay
// QR code) and once at a phone width (Alipay H5), paying at the simulator as the buyer would,
// and saves a screenshot of each step.
// argv: chromium path, control-plane URL, simulator URL, screenshot folder.
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [chromiumPath, cp, sim, shots] = process.argv.slice(2);
let passed = 0;
function check(name, ok, detail = "") {
  if (!ok) {
    console.log(`not ok - ${name} ${detail}`);
    console.log(`checkout-browser: ${passed} passed, 1 failed`);
    process.exit(1);
  }
  passed += 1;
  console.log(`ok - ${name}`);
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  for (const [name, viewport, channel, mobile] of [
    ["desktop", { width: 1280, height: 900 }, "wechat_native", false],
    ["phone", { width: 390, height: 844 }, "alipay_wap", true],
  ]) {
    const context = await browser.newContext({ viewport, isMobile: mobile, hasTouch: mobile });
    const page = await context.newPage();
    await page.goto(`${cp}/checkout`);
    await page.fill("#email", `browser-${name}-${Date.now()}@example.com`);
    await page.fill("#password", "correct horse battery");
    await page.click("#register");
    await page.waitForSelector(".plan", { timeout: 10000 });
    check(`${name}: plans listed after registering`, (await page.locator(".plan").count()) >= 2);
    await page.screenshot({ path: `${shots}/${name}-1-plans.png`, fullPage: true });
    await page.click(".plan[data-plan=pro]");
    await page.check(`input[name=channel][value=${channel}]`);
    await page.click("#buy");
    await page.waitForSelector("#paying:not(.hidden)", { timeout: 10000 });
    const orderId = (await page.textContent("#order-id")).trim();
    check(`${name}: an order was created`, /^[A-Za-z0-9_]{1,64}$/.test(orderId), orderId);
    if (channel === "wechat_native") {
      await page.waitForSelector("#qr:not(.hidden)", { timeout: 10000 });
      const qrWidth = await page.evaluate(() => document.getElementById("qr").naturalWidth);
      check(`${name}: the WeChat QR code is shown`, qrWidth > 0, String(qrWidth));
    } else {
      const href = await page.getAttribute("#alipay-link", "href");
      check(`${name}: the Alipay H5 link is shown`, href && href.includes("alipay.trade.wap.pay"), href);
      // The buyer's phone opens the cashier page at the gateway.
      const cashier = await context.newPage();
      const response = await cashier.goto(href);
      check(`${name}: the gateway's cashier page opens`, response.ok(), String(response.status()));
      await cashier.screenshot({ path: `${shots}/${name}-2-cashier.png`, fullPage: true });
      await cashier.close();
    }
    await page.screenshot({ path: `${shots}/${name}-2-paying.png`, fullPage: true });
    // The buyer pays.
    const paid = await fetch(`${sim}/sim/pay`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ out_trade_no: orderId }),
    });
    check(`${name}: paid at the simulator`, paid.ok, String(paid.status));
    await page.waitForFunction(() => document.getElementById("order-status").textContent === "paid", null, { timeout: 15000 });
    await page.waitForSelector("#done:not(.hidden)", { timeout: 10000 });
    const plan = (await page.textContent("#plan-name")).trim();
    check(`${name}: the page shows the new plan`, plan === "Pro", plan);
    const rows = await page.locator("#quotas tr").count();
    check(`${name}: the new quotas are listed`, rows >= 4, String(rows));
    const overflow = await page.evaluate((width) => document.documentElement.scrollWidth > width + 1, viewport.width);
    check(`${name}: nothing overflows the screen width`, !overflow);
    await page.screenshot({ path: `${shots}/${name}-3-paid.png`, fullPage: true });
    await context.close();
  }
} finally {
  await browser.close();
}
console.log(`checkout-browser: ${passed} passed, 0 failed`);
